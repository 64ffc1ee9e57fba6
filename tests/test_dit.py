"""DiT against an independent float64 re-implementation of facebookresearch/DiT models.py, the
checkpoint converters (fb and diffusers layouts), the size registry, label dropout and input checks."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adaln.models.dit import (
    DiT,
    DiT_models,
    convert_facebookresearch_state_dict,
    convert_from_diffusers,
    convert_to_diffusers,
    dit_edm_denoiser,
    dit_kwargs_from_diffusers,
    fb_dit_vp_denoiser,
    from_diffusers,
    load_facebookresearch_checkpoint,
)

F64 = torch.float64


# ---- the reference: fb DiT from models.py facts, float64, fb key names --------------------------


@dataclass
class Cfg:
    input_size: tuple[int, int] = (8, 8)
    patch: int = 2
    in_ch: int = 3
    hidden: int = 32
    depth: int = 2
    heads: int = 2
    mlp_ratio: float = 4.0
    num_classes: int = 10
    learn_sigma: bool = True

    @property
    def out_ch(self) -> int:
        return 2 * self.in_ch if self.learn_sigma else self.in_ch

    @property
    def grid(self) -> tuple[int, int]:
        return self.input_size[0] // self.patch, self.input_size[1] // self.patch

    def model(self, **kw) -> DiT:
        return DiT(
            self.input_size, self.patch, self.in_ch, self.hidden, self.depth, self.heads, self.mlp_ratio,
            num_classes=self.num_classes, learn_sigma=self.learn_sigma, **kw,
        )  # fmt: skip


def ref_pos_embed(dim: int, h: int, w: int) -> torch.Tensor:
    """MAE/DiT sin-cos: token (i, j) -> [sin(j w_k), cos(j w_k), sin(i w_k), cos(i w_k)], w_k = 1e4^(-k/(D/4))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    i, j = np.divmod(np.arange(h * w), w)
    a, b = np.outer(j, omega), np.outer(i, omega)
    pe = np.concatenate([np.sin(a), np.cos(a), np.sin(b), np.cos(b)], axis=1)
    return torch.from_numpy(pe).float().double()[None]  # fb stores it as float32


def ref_fb_state_dict(cfg: Cfg, dtype=F64, generator=None) -> dict[str, torch.Tensor]:
    """fb DiT's state dict with random non-zero weights (its zero-initialised layers included)."""
    g = generator if generator is not None else torch.Generator().manual_seed(1)
    d, p, hid = cfg.hidden, cfg.patch, int(cfg.hidden * cfg.mlp_ratio)

    def lin(name, n_in, n_out, gain=1.0):
        sd[f"{name}.weight"] = gain * torch.randn(n_out, n_in, generator=g, dtype=F64) / math.sqrt(n_in)
        sd[f"{name}.bias"] = 0.1 * torch.randn(n_out, generator=g, dtype=F64)

    sd: dict[str, torch.Tensor] = {}
    sd["x_embedder.proj.weight"] = torch.randn(d, cfg.in_ch, p, p, generator=g, dtype=F64) / p
    sd["x_embedder.proj.bias"] = 0.1 * torch.randn(d, generator=g, dtype=F64)
    sd["pos_embed"] = ref_pos_embed(d, *cfg.grid)
    lin("t_embedder.mlp.0", 256, d)
    lin("t_embedder.mlp.2", d, d)
    sd["y_embedder.embedding_table.weight"] = torch.randn(cfg.num_classes + 1, d, generator=g, dtype=F64)
    for i in range(cfg.depth):
        lin(f"blocks.{i}.attn.qkv", d, 3 * d)
        lin(f"blocks.{i}.attn.proj", d, d)
        lin(f"blocks.{i}.mlp.fc1", d, hid)
        lin(f"blocks.{i}.mlp.fc2", hid, d)
        lin(f"blocks.{i}.adaLN_modulation.1", d, 6 * d, gain=0.3)
    lin("final_layer.linear", d, p * p * cfg.out_ch)
    lin("final_layer.adaLN_modulation.1", d, 2 * d, gain=0.3)
    return {k: v.to(dtype) for k, v in sd.items()}


def _lin(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _ln(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _silu(x):
    return x / (1 + torch.exp(-x))


def ref_forward(cfg: Cfg, sd, x, t, y, *, freq_shift: int = 0, mlp_eps: float = 1e-6):
    """fb DiT.forward (eval mode) in float64 from models.py: patchify conv, + pos, t/y embedders, blocks,
    final layer, unpatchify. ``freq_shift=1, mlp_eps=norm_eps`` are diffusers' DiTTransformer2DModel
    instead (frequencies exp(-ln 1e4 * i / 127); BasicTransformerBlock.norm3 eps from its config)."""
    sd = {k: v.double() for k, v in sd.items()}
    x, p, d, nh = x.double(), cfg.patch, cfg.hidden, cfg.heads
    b = x.shape[0]
    tok = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    tok = tok.flatten(2).transpose(1, 2) + sd["pos_embed"]  # (B, N, D), row-major patches
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=F64) / (half - freq_shift))
    args = t.double()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], -1)
    t_emb = _lin(_silu(_lin(t_freq, sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]
    n = tok.shape[1]
    for i in range(cfg.depth):
        mod = _lin(_silu(c), sd, f"blocks.{i}.adaLN_modulation.1")
        sh1, sc1, g1, sh2, sc2, g2 = (m[:, None] for m in mod.chunk(6, dim=1))
        h = _ln(tok) * (1 + sc1) + sh1
        qkv = _lin(h, sd, f"blocks.{i}.attn.qkv").reshape(b, n, 3, nh, d // nh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // nh), dim=-1)
        a = _lin((att @ v).transpose(1, 2).reshape(b, n, d), sd, f"blocks.{i}.attn.proj")
        tok = tok + g1 * a
        h = _ln(tok, mlp_eps) * (1 + sc2) + sh2
        tok = tok + g2 * _lin(_gelu_tanh(_lin(h, sd, f"blocks.{i}.mlp.fc1")), sd, f"blocks.{i}.mlp.fc2")
    shift, scale = (m[:, None] for m in _lin(_silu(c), sd, "final_layer.adaLN_modulation.1").chunk(2, dim=1))
    out = _lin(_ln(tok) * (1 + scale) + shift, sd, "final_layer.linear")
    gh, gw = cfg.grid
    out = out.reshape(b, gh, gw, p, p, cfg.out_ch).permute(0, 5, 1, 3, 2, 4)  # nhwpqc -> nchpwq
    return out.reshape(b, cfg.out_ch, gh * p, gw * p)


def inputs(cfg: Cfg, b=3, dtype=F64, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_ch, *cfg.input_size, generator=g, dtype=dtype)
    t = (torch.rand(b, generator=g, dtype=F64) * 999).to(dtype)
    y = torch.randint(0, cfg.num_classes + 1, (b,), generator=g)
    y[-1] = cfg.num_classes  # the null class
    return x, t, y


# ---- facebookresearch layout --------------------------------------------------------------------


@pytest.mark.parametrize("input_size", [(8, 8), (8, 12)], ids=["square", "non_square"])
def test_matches_fb_reference_float64(input_size):
    cfg = Cfg(input_size=input_size)
    sd = ref_fb_state_dict(cfg)
    model = cfg.model().double().eval()
    model.load_facebookresearch_state_dict(sd)
    x, t, y = inputs(cfg)
    out, ref = model(x, t, y), ref_forward(cfg, sd, x, t, y)
    assert out.shape == (3, cfg.out_ch, *input_size)
    assert ref.abs().max() > 0.5  # a non-trivial output
    err = (out - ref).abs().max().item()
    assert err < 1e-13, err  # measured 1.3e-15


def test_matches_fb_reference_float32():
    cfg = Cfg(learn_sigma=False)
    sd = ref_fb_state_dict(cfg)
    model = cfg.model().eval()
    model.load_facebookresearch_state_dict({k: v.float() for k, v in sd.items()})
    x, t, y = inputs(cfg, dtype=torch.float32)
    ref = ref_forward(cfg, sd, x, t, y)
    with torch.no_grad():
        err = (model(x, t, y).double() - ref).abs().max().item()
    assert err < 2e-6 * ref.abs().max().item(), err  # measured 4.3e-7 relative


@pytest.mark.parametrize("input_size", [(8, 8), (8, 12)], ids=["square", "non_square"])
def test_init_pos_embed_is_fb_sincos(input_size):
    cfg = Cfg(input_size=input_size, hidden=48)
    model = cfg.model()
    assert not any(p is model.pos_embed for p in model.parameters())  # fixed, not trained
    assert model.pos_embed.shape == (1, cfg.grid[0] * cfg.grid[1], 48)
    torch.testing.assert_close(model.pos_embed.double(), ref_pos_embed(48, *cfg.grid), rtol=0, atol=0)


def test_fb_round_trip_identical():
    cfg = Cfg()
    sd = ref_fb_state_dict(cfg, dtype=torch.float32)
    model = cfg.model()
    model.load_facebookresearch_state_dict(sd)
    back = model.to_facebookresearch_state_dict()
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_convert_fb_renames_only_adaln():
    sd = ref_fb_state_dict(Cfg(depth=1))
    ours = convert_facebookresearch_state_dict(sd)
    renamed = {k for k in sd if "adaLN_modulation.1." in k}
    assert renamed == {
        "blocks.0.adaLN_modulation.1.weight", "blocks.0.adaLN_modulation.1.bias",
        "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
    }  # fmt: skip
    for k, v in sd.items():
        assert ours[k.replace("adaLN_modulation.1.", "adaLN_modulation.proj.1.")] is v


def test_bad_fb_state_dict_one_error_listing_all():
    cfg = Cfg()
    sd = ref_fb_state_dict(cfg, dtype=torch.float32)
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    sd["final_layer.linear.weight"] = torch.zeros(5, cfg.hidden)
    model = cfg.model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        model.load_facebookresearch_state_dict(sd)
    msg = str(info.value)
    for needle in ("blocks.1.mlp.fc2.bias", "blocks.0.extra.weight", "final_layer.linear.weight: got (5, 32)"):
        assert needle in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded


def test_state_dict_of_another_size_is_named():
    big = Cfg(hidden=64, depth=3, heads=4)
    with pytest.raises(ValueError, match=r"hidden_size=64.*depth=3(.|\n)*model: +hidden_size=32.*depth=2"):
        Cfg().model().load_facebookresearch_state_dict(ref_fb_state_dict(big, dtype=torch.float32))


def test_non_tensor_value_is_type_error():
    sd = ref_fb_state_dict(Cfg(), dtype=torch.float32)
    sd["pos_embed"] = [0.0]
    with pytest.raises(TypeError, match="pos_embed"):
        Cfg().model().load_facebookresearch_state_dict(sd)


def test_load_checkpoint_raw_and_train_py(tmp_path):
    cfg = Cfg()
    raw = ref_fb_state_dict(cfg, dtype=torch.float32)
    ema = ref_fb_state_dict(cfg, dtype=torch.float32, generator=torch.Generator().manual_seed(9))
    torch.save(raw, tmp_path / "raw.pt")
    train = {"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
             "args": argparse.Namespace(model="DiT-XL/2", image_size=256)}  # fmt: skip
    torch.save(train, tmp_path / "train.pt")
    for path, ema_flag, want in (("raw.pt", True, raw), ("train.pt", True, ema), ("train.pt", False, raw)):
        got = load_facebookresearch_checkpoint(tmp_path / path, ema=ema_flag)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    model = cfg.model()
    model.load_facebookresearch_state_dict(load_facebookresearch_checkpoint(tmp_path / "train.pt"))
    assert torch.equal(model.blocks[1].attn.qkv.weight, ema["blocks.1.attn.qkv.weight"])


def test_load_checkpoint_rejects_pickled_code(tmp_path):
    torch.save({"model": {}, "fn": argparse.ArgumentParser}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        load_facebookresearch_checkpoint(tmp_path / "evil.pt")


# ---- diffusers layout ---------------------------------------------------------------------------
# Measured on random weights (every zero-initialised layer randomised, one shared embedder): a DiT made
# by from_diffusers equals DiTTransformer2DModel to the bit in float32 (max abs 0.0 on outputs of size
# ~3.4) and to 1.3e-15 abs (3.9e-16 relative) in float64 with integer timesteps; with fractional float64
# timesteps 7.7e-6 abs (2.3e-6 relative), because diffusers computes its sinusoid in float32 for any t.
# fb's frequency spacing instead of diffusers' moves the outputs by ~1 and fb's MLP eps by ~6e-7.

DIFFUSERS_CFG = dict(
    num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=6, num_layers=2, sample_size=8,
    patch_size=2, num_embeds_ada_norm=10,
)  # fmt: skip  (Cfg()'s size; norm_eps left at diffusers' class default 1e-5)


def _diffusers():
    return pytest.importorskip("diffusers")


def _random_diffusers_model(dtype=torch.float32, **overrides):
    """A DiTTransformer2DModel with random weights everywhere (its zero-initialised layers included) and
    one embedder shared by all blocks, as in every converted fb checkpoint."""
    dm = _diffusers().DiTTransformer2DModel(**{**DIFFUSERS_CFG, **overrides}).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in dm.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        for block in dm.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(dm.transformer_blocks[0].norm1.emb.state_dict())
    return dm if dtype == torch.float32 else dm.to(dtype)


def _random_model(cfg: Cfg, dtype=torch.float32, **kw) -> DiT:
    model = cfg.model(**kw).to(dtype).eval()
    model.load_facebookresearch_state_dict({k: v.to(dtype) for k, v in ref_fb_state_dict(cfg).items()})
    return model


def _max_errors(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs, max abs / max |ref|) difference."""
    err = (ours.double() - ref.double()).abs().max().item()
    return err, err / ref.double().abs().max().item()


def test_from_diffusers_reproduces_diffusers_float32():
    dm = _random_diffusers_model()
    ours = from_diffusers(dm)
    assert isinstance(ours, DiT) and (ours.freq_shift, ours.mlp_norm_eps) == (1, dm.config.norm_eps) == (1, 1e-5)
    assert not ours.training and ours.pos_embed.dtype == torch.float32
    cfg = Cfg()
    x, t, y = inputs(cfg, b=4, dtype=torch.float32)  # fractional timesteps, the null class included
    with torch.no_grad():
        theirs = dm(x, t, class_labels=y).sample
        abs_err, rel_err = _max_errors(ours(x, t, y), theirs)
    assert theirs.abs().max() > 1.0  # a non-trivial output
    assert rel_err <= 1e-6, (abs_err, rel_err)
    # and both equal the float64 re-derivation of diffusers' formulas (not fb's: freq_shift=1, eps 1e-5)
    sd = ours.to_facebookresearch_state_dict()
    ref = ref_forward(cfg, sd, x, t, y, freq_shift=1, mlp_eps=1e-5)
    assert _max_errors(theirs, ref)[1] < 1e-5
    assert _max_errors(ref_forward(cfg, sd, x, t, y), ref)[0] > 0.1  # fb's formulas are another model


def test_from_diffusers_reproduces_diffusers_float64():
    dm = _random_diffusers_model(torch.float64)
    ours = DiT.from_diffusers(dm)
    assert ours.x_embedder.proj.weight.dtype == torch.float64
    cfg = Cfg()
    x, t, y = inputs(cfg, b=4)
    with torch.no_grad():
        steps = t.round().long()  # DDPM timesteps: both sinusoids then run in float32, bit for bit
        theirs = dm(x, steps, class_labels=y).sample
        assert _max_errors(ours(x, steps, y), theirs)[1] < 1e-14
        # fractional float64 t: ours computes the sinusoid in float64, diffusers in float32
        abs_err, rel_err = _max_errors(ours(x, t, y), dm(x, t, class_labels=y).sample)
        assert 1e-8 < rel_err < 2e-5, rel_err
        # each diffusers setting matters: fb's MLP eps or fb's frequency spacing is another model
        for kw, floor in ((dict(freq_shift=1), 1e-8), (dict(mlp_norm_eps=1e-5), 0.1)):
            other = cfg.model(**kw).double().eval()
            other.load_diffusers_state_dict(dm.state_dict())
            assert _max_errors(other(x, steps, y), theirs)[0] > floor, kw
        # ours in float64 throughout (float64 t) against the float64 re-derivation of diffusers' formulas
        ref = ref_forward(cfg, ours.to_facebookresearch_state_dict(), x, t, y, freq_shift=1, mlp_eps=1e-5)
        assert _max_errors(ours(x, t, y), ref)[1] < 1e-13


def test_diffusers_settings_round_trip_and_config():
    dm = _random_diffusers_model(norm_eps=1e-6)
    ours = from_diffusers(dm)
    assert ours.mlp_norm_eps == 1e-6
    assert {k: dm.config[k] for k in ours.diffusers_config()} == ours.diffusers_config()
    back = ours.to_diffusers_state_dict()
    assert set(back) == set(dm.state_dict()) and all(torch.equal(back[k], v) for k, v in dm.state_dict().items())


def test_to_diffusers_fb_settings_give_fb_outputs_diffusers_settings_diffusers_outputs():
    """The same weights in both layouts: a DiT with fb's settings computes fb's model (the float64
    re-derivation), the diffusers model built from its state dict computes diffusers' model; a DiT with
    diffusers' settings computes exactly what that diffusers model does."""
    cfg = Cfg()
    fb_settings = _random_model(cfg)
    dm = _diffusers().DiTTransformer2DModel(**fb_settings.diffusers_config()).eval()
    dm.load_state_dict(fb_settings.to_diffusers_state_dict(), strict=True)
    diffusers_settings = _random_model(cfg, freq_shift=1)
    x, t, y = inputs(cfg, b=4, dtype=torch.float32)
    sd = ref_fb_state_dict(cfg)
    with torch.no_grad():
        theirs = dm(x, t, class_labels=y).sample
        assert _max_errors(fb_settings(x, t, y), ref_forward(cfg, sd, x, t, y))[1] < 1e-5
        assert _max_errors(theirs, ref_forward(cfg, sd, x, t, y, freq_shift=1))[1] < 1e-5
        assert _max_errors(diffusers_settings(x, t, y), theirs)[1] <= 1e-6
        assert _max_errors(fb_settings(x, t, y), theirs)[0] > 1e-3  # i/128 vs i/127: a real difference


def test_convert_from_diffusers_checks_shapes_before_loading():
    dm = _random_diffusers_model()
    sd = dict(dm.state_dict())
    sd["transformer_blocks.1.attn1.to_k.weight"] = torch.zeros(16, 32)
    want = r"transformer_blocks\.1\.attn1\.to_k\.weight: got \(16, 32\), expected \(32, 32\)"
    for config in (None, dm.config):
        with pytest.raises(ValueError, match=want):
            convert_from_diffusers(sd, config=config)
    model = Cfg().model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=want):
        model.load_diffusers_state_dict(sd)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded
    # a state dict of another size is named against the config it was said to have
    small = _random_diffusers_model(num_layers=1).state_dict()
    one_block = r"depth=2, num_classes=10\)(.|\n)*missing keys \(19\): \['transformer_blocks\.1\."
    with pytest.raises(ValueError, match=one_block):
        convert_from_diffusers(small, config=dm.config)


def test_from_diffusers_rejects_what_our_dit_cannot_compute():
    for key, value in (("activation_fn", "gelu"), ("attention_bias", False), ("norm_elementwise_affine", True)):
        with pytest.raises(ValueError, match=f"config {key}="):
            dit_kwargs_from_diffusers({**DIFFUSERS_CFG, key: value})
    with pytest.raises(ValueError, match="out_channels=5"):
        dit_kwargs_from_diffusers({**DIFFUSERS_CFG, "out_channels": 5})
    with pytest.raises(TypeError, match="from_diffusers supports DiTTransformer2DModel; got Linear"):
        from_diffusers(torch.nn.Linear(2, 2))


def test_from_diffusers_rejects_differing_block_embedders():
    model = _random_model(Cfg())
    sd = model.to_diffusers_state_dict()
    sd["transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"] = torch.zeros(32)
    sd["transformer_blocks.0.bogus"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): \['transformer_blocks\.0\.bogus'\]"):
        convert_from_diffusers(sd)
    del sd["transformer_blocks.0.bogus"]
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.norm1\.emb\.timestep_embedder\.linear_2\.bias"):
        convert_from_diffusers(sd)


def test_diffusers_without_null_row_round_trip():
    cfg = Cfg(learn_sigma=False)
    model = cfg.model(class_dropout_prob=0.0)
    assert model.y_embedder.embedding_table.weight.shape[0] == cfg.num_classes
    sd = model.to_diffusers_state_dict()
    table = sd["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"]
    assert table.shape[0] == cfg.num_classes + 1 and not table[-1].any()
    other = cfg.model(class_dropout_prob=0.0)
    other.load_diffusers_state_dict(sd)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in other.state_dict().items())


def test_to_diffusers_lists_missing_and_unknown_keys():
    sd = Cfg().model().state_dict()
    del sd["blocks.1.attn.qkv.bias"]
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(16)
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv\.bias.*blocks\.0\.attn\.q_norm\.weight"):
        convert_to_diffusers(sd, num_classes=10)


def test_diffusers_config_refuses_non_square():
    with pytest.raises(ValueError, match="square"):
        Cfg(input_size=(8, 12)).model().diffusers_config()


# ---- registry, init, labels, guidance, inputs ---------------------------------------------------


def _fb_param_count(depth, hidden, patch, in_ch=4, tokens=256, classes=1000, learn_sigma=True):
    """fb's sum(p.numel()) for DiT (pos_embed included) from the layer shapes in models.py."""
    d, out = hidden, (2 if learn_sigma else 1) * in_ch
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + (d * 6 * d + 6 * d)
    return (
        in_ch * patch * patch * d + d + tokens * d + (256 * d + d) + (d * d + d) + (classes + 1) * d
        + depth * block + (d * 2 * d + 2 * d) + (d * patch * patch * out + patch * patch * out)
    )  # fmt: skip


SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}


def test_registry_sizes_and_param_counts():
    assert sorted(DiT_models) == sorted(f"DiT-{s}/{p}" for s in SIZES for p in (2, 4, 8))
    for name, factory in DiT_models.items():
        size, patch = name[4:].split("/")
        depth, hidden, heads = SIZES[size]
        with torch.device("meta"):
            m = factory(input_size=32)
        assert (m.depth, m.hidden_size, m.num_heads, m.patch_size) == (depth, hidden, heads, int(patch))
        assert len(m.blocks) == depth and m.blocks[0].attn.qkv.out_features == 3 * hidden
        count = sum(p.numel() for p in m.parameters()) + m.pos_embed.numel()
        assert count == _fb_param_count(depth, hidden, int(patch), tokens=(32 // int(patch)) ** 2), name
    assert _fb_param_count(28, 1152, 2) == 675_129_632  # fb's DiT-XL/2: "675M"


def test_initialize_weights_as_fb():
    model = Cfg(depth=3).model()
    for block in model.blocks:
        proj = block.adaLN_modulation.proj[-1]
        assert not proj.weight.any() and not proj.bias.any()
    fl = model.final_layer
    for t in (fl.linear.weight, fl.linear.bias, fl.adaLN_modulation.proj[-1].weight, fl.adaLN_modulation.proj[-1].bias):
        assert not t.any()
    w = model.blocks[0].mlp.fc1.weight  # xavier uniform: bound sqrt(6 / (fan_in + fan_out))
    bound = math.sqrt(6 / sum(w.shape))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound and not model.blocks[0].mlp.fc1.bias.any()
    assert 0.015 < model.t_embedder.mlp[0].weight.std() < 0.025
    assert 0.015 < model.y_embedder.embedding_table.weight.std() < 0.025
    x, t, y = inputs(Cfg(), dtype=torch.float32)
    assert not model(x, t, y).any()  # zero output layer


def test_label_dropout_rate_in_training_never_in_eval():
    p, n = 0.3, 4000
    model = Cfg(hidden=16, depth=1, heads=1).model(class_dropout_prob=p)
    null = model.y_embedder.embedding_table.weight[model.num_classes]
    seen = []
    model.y_embedder.register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
    x = torch.zeros(n, 3, 8, 8)
    t = torch.full((n,), 10.0)
    y = torch.arange(n) % model.num_classes
    model.train()
    model(x, t, y, generator=torch.Generator().manual_seed(0))
    rate = (seen[-1] == null).all(-1).float().mean().item()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n), rate
    model(x, t, y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen[-1], seen[-2])  # the generator fixes the dropped labels
    model.eval()
    model(x, t, y)
    assert not (seen[-1] == null).all(-1).any()


def _fb_forward_with_cfg(model, x, t, y, scale, k):
    """fb models.py forward_with_cfg with its channel slice ``k`` (3 in the release)."""
    half = x[: len(x) // 2]
    out = model(torch.cat([half, half]), t, y)
    eps, rest = out[:, :k], out[:, k:]
    c, u = torch.split(eps, len(eps) // 2, dim=0)
    h = u + scale * (c - u)
    return torch.cat([torch.cat([h, h]), rest], dim=1)


def test_forward_with_cfg():
    cfg = Cfg(in_ch=4)
    model = _random_model(cfg, F64)
    x, t, y = inputs(cfg, b=4)
    y[2:] = cfg.num_classes
    fb3 = model.forward_with_cfg(x, t, y, 4.0, guided_channels=3)
    torch.testing.assert_close(fb3, _fb_forward_with_cfg(model, x, t, y, 4.0, 3), rtol=0, atol=0)
    full = model.forward_with_cfg(x, t, y, 4.0)
    torch.testing.assert_close(full, _fb_forward_with_cfg(model, x, t, y, 4.0, 4), rtol=0, atol=0)
    assert not torch.equal(full[:, 3], fb3[:, 3])
    with pytest.raises(ValueError, match="guided_channels"):
        model.forward_with_cfg(x, t, y, 4.0, guided_channels=9)
    with pytest.raises(ValueError, match=r"\(2B, C, H, W\)"):
        model.forward_with_cfg(x[:3], t[:3], y[:3], 4.0)


def test_bad_inputs_raise_clear_errors():
    cfg = Cfg()
    model = cfg.model()
    x, t, y = inputs(cfg, dtype=torch.float32)
    cases = [
        ((x[0], t, y), ValueError, r"x must have shape \(B, 3, 8, 8\)"),
        ((x[:, :2], t, y), ValueError, r"x must have shape"),
        ((x[..., :6], t, y), ValueError, r"x must have shape"),
        ((x.long(), t, y), TypeError, "x must be a floating-point"),
        ((x, t[:2], y), ValueError, r"t must have shape \(B,\) = \(3,\)"),
        ((x, t[:, None], y), ValueError, "t must have shape"),
        ((x, 5.0, y), TypeError, "t must be"),
        ((x, t, y.float()), TypeError, "y must be an integer"),
        ((x, t, y[:1]), ValueError, r"y must have shape \(B,\)"),
        ((x, t, y + 100), ValueError, r"y must hold class ids in \[0, 10\]"),
        ((x, t, y - 20), ValueError, r"y must hold class ids"),
    ]
    for args, err, match in cases:
        with pytest.raises(err, match=match):
            model(*args)
    with pytest.raises(TypeError, match="input_size"):
        DiT((8, 8, 8), 2, 3, 32, 1, 2)
    no_null = cfg.model(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match=r"y must hold class ids in \[0, 9\] \(no null class"):
        no_null(x, t, torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match="mlp_norm_eps must be > 0"):
        cfg.model(mlp_norm_eps=0.0)
    with pytest.raises(ValueError, match="freq_shift must be 0"):
        cfg.model(freq_shift=2)


# ---- diffusion wrappers -------------------------------------------------------------------------


def test_edm_denoiser_formula():
    cfg = Cfg(learn_sigma=False)
    model = _random_model(cfg, F64)
    denoiser = dit_edm_denoiser(model, sigma_data=0.5)
    x, _, y = inputs(cfg)
    sigma = torch.tensor([0.01, 1.0, 40.0], dtype=F64)
    sd = 0.5
    s = sigma[:, None, None, None]
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / torch.sqrt(s**2 + sd**2)
    c_in = 1 / torch.sqrt(s**2 + sd**2)
    ref = c_skip * x + c_out * ref_forward(cfg, model.to_facebookresearch_state_dict(), c_in * x, 250 * sigma.log(), y)
    err = (denoiser(x, sigma, y=y) - ref).abs().max().item()
    assert err < 1e-10, err
    with pytest.raises(ValueError, match="learn_sigma=False"):
        dit_edm_denoiser(Cfg().model())


def test_fb_vp_denoiser_at_ddpm_steps():
    cfg = Cfg()
    model = _random_model(cfg, F64)
    denoiser = fb_dit_vp_denoiser(model)
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    steps = np.array([0, 250, 999])
    sigma = torch.tensor(np.sqrt((1 - abar[steps]) / abar[steps]))
    x, _, y = inputs(cfg)
    s = sigma[:, None, None, None]
    x_vp = x / torch.sqrt(1 + s**2)
    eps = ref_forward(cfg, model.to_facebookresearch_state_dict(), x_vp, torch.tensor(steps, dtype=F64), y)
    ref = x - s * eps[:, : cfg.in_ch]
    err = (denoiser(x, sigma, y=y) - ref).abs().max().item()
    assert err < 1e-6, err


def test_dit_compiles_without_graph_breaks():
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                num_classes=10, learn_sigma=False).eval()
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3) * 999, torch.tensor([0, 5, 10])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, t, y), model(x, t, y))
