"""PixArt-alpha against diffusers' PixArtTransformer2DModel (random weights, caption masks, size conditions),
its conversions (diffusers layout, PixArt-alpha's own checkpoint layout), gradients, torch.compile, the
flow interface, the VP wrapper and the input checks."""

import math
import re

import pytest
import torch
from torch import nn

from adaln.diffusion import sigma_to_vp_timestep, vp_sigmas
from adaln.models.pixart import (
    PixArt,
    convert_from_diffusers,
    convert_pixart_state_dict,
    convert_to_diffusers,
    from_diffusers,
    pixart_kwargs_from_diffusers,
    pixart_vp_denoiser,
)

# Measured on CPU (random weights everywhere, B = 3, 8x8 latents): float32 outputs equal diffusers' to the
# bit (max relative error 0.0) with and without a caption mask, with size conditions, on 12x8 and 8x12 grids,
# without caption projection and without attention biases; float64 with integer timesteps 3.2e-16.
CFG = dict(
    num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
    patch_size=2, cross_attention_dim=48, caption_channels=20, use_additional_conditions=False,
)  # fmt: skip
LENGTHS = (6, 3, 1)  # kept caption tokens per sample; the last sample keeps a non-prefix token set


def _diffusers():
    return pytest.importorskip("diffusers")


def _randomize_(module: nn.Module, seed: int = 5) -> nn.Module:
    """Every parameter non-zero random (so zero-initialised layers cannot hide a mapping error)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) / math.sqrt(p.shape[-1]))
    return module


def _random_diffusers(dtype=torch.float32, **overrides):
    dm = _diffusers().PixArtTransformer2DModel(**{**CFG, **overrides}).eval()
    return _randomize_(dm).to(dtype)


def _inputs(b=3, h=8, w=8, dtype=torch.float32, context_dim=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, h, w, generator=g).to(dtype)
    t = torch.tensor([0.0, 17.5, 999.0])[:b].to(dtype)
    context = torch.randn(b, 6, context_dim, generator=g).to(dtype)
    mask = torch.zeros(b, 6, dtype=torch.bool)
    for i, n in enumerate(LENGTHS[:b]):
        mask[i, :n] = True
    mask[-1] = torch.tensor([False, True, False, False, True, False])
    return x, t, context, mask


def _sizes(b=3, dtype=torch.float32):
    resolution = torch.tensor([[64.0, 64.0], [48.0, 80.0], [96.0, 32.0]])[:b].to(dtype)
    return {"resolution": resolution, "aspect_ratio": (resolution[:, :1] / resolution[:, 1:]).to(dtype)}


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def _theirs(dm, x, t, context, mask, sizes=None):
    kw = {} if mask is None else {"encoder_attention_mask": mask.float()}
    with torch.no_grad():
        return dm(x, encoder_hidden_states=context, timestep=t, added_cond_kwargs=sizes, **kw).sample


# ---- outputs equal diffusers' --------------------------------------------------------------------


@pytest.mark.parametrize("size_conditioning", [False, True])
def test_from_diffusers_matches_diffusers_with_caption_mask(size_conditioning):
    dm = _random_diffusers(use_additional_conditions=size_conditioning)
    ours = from_diffusers(dm)
    assert isinstance(ours, PixArt) and ours.size_conditioning == size_conditioning and not ours.training
    x, t, context, mask = _inputs()
    sizes = _sizes() if size_conditioning else None
    theirs = _theirs(dm, x, t, context, mask, sizes)
    with torch.no_grad():
        out = ours(x, t, context=context, context_mask=mask, **(sizes or {}))
        unmasked = ours(x, t, context=context, **(sizes or {}))
    assert out.shape == (3, 8, 8, 8) and theirs.abs().max() > 1.0
    assert _rel(out, theirs) <= 1e-5
    assert _rel(unmasked, _theirs(dm, x, t, context, None, sizes)) <= 1e-5
    assert _rel(unmasked, theirs) > 1e-3  # the mask matters, so the comparison could fail
    if size_conditioning:  # and so do the sizes
        other = {k: v.flip(0) for k, v in sizes.items()}
        with torch.no_grad():
            assert _rel(ours(x, t, context=context, context_mask=mask, **other), theirs) > 1e-3


@pytest.mark.parametrize(
    "overrides, h, w",
    [
        ({}, 12, 8),  # another grid than sample_size: positions rescaled to the 4x4 base grid
        ({"interpolation_scale": 2}, 8, 12),
        ({"caption_channels": None, "cross_attention_dim": 20}, 8, 8),  # no caption projection
        ({"attention_bias": False, "out_channels": 4, "norm_eps": 1e-5}, 8, 8),
    ],
)
def test_from_diffusers_matches_diffusers_other_settings(overrides, h, w):
    dm = _random_diffusers(**overrides)
    ours = from_diffusers(dm)
    x, t, context, mask = _inputs(h=h, w=w)
    with torch.no_grad():
        out = ours(x, t, context=context, context_mask=mask)
    theirs = _theirs(dm, x, t, context, mask)
    assert out.shape == theirs.shape == (3, ours.out_channels, h, w)
    assert _rel(out, theirs) <= 1e-5


def test_from_diffusers_float64_integer_timesteps():
    dm = _random_diffusers(torch.float64, use_additional_conditions=True)
    ours = from_diffusers(dm)
    assert ours.pos_embed.dtype == next(ours.parameters()).dtype == torch.float64
    x, _, context, mask = _inputs(dtype=torch.float64)
    t = torch.tensor([3, 250, 999])  # int64, as the pipeline passes scheduler steps
    # float32 sizes: diffusers computes every sinusoid in float32, ours in float64 for float64 inputs
    # (with float64 sizes the outputs differ by 4e-7 relative for that reason alone)
    sizes = _sizes(dtype=torch.float32)
    with torch.no_grad():
        out = ours(x, t, context=context, context_mask=mask, **sizes)
    assert _rel(out, _theirs(dm, x, t, context, mask, sizes)) <= 1e-12


def test_scalar_timestep_broadcasts():
    dm = _random_diffusers()
    ours = from_diffusers(dm)
    x, _, context, mask = _inputs()
    with torch.no_grad():
        a = ours(x, 400.0, context=context, context_mask=mask)
        b = ours(x, torch.tensor(400.0), context=context, context_mask=mask)
    assert torch.equal(a, b)
    assert _rel(a, _theirs(dm, x, torch.full((3,), 400.0), context, mask)) <= 1e-5


def test_empty_caption_adds_nothing_and_other_samples_keep_diffusers_outputs():
    dm = _random_diffusers()
    ours = from_diffusers(dm)
    x, t, context, mask = _inputs()
    mask[1] = False
    other = context.clone()
    other[1] = torch.randn_like(other[1]) * 3
    with torch.no_grad():
        out = ours(x, t, context=context, context_mask=mask)
        out_other = ours(x, t, context=other, context_mask=mask)
        # the caption-less sample equals a network whose cross-attention outputs are zero by their weights
        for block in ours.blocks:
            block.cross_attn.proj.weight.zero_()
            block.cross_attn.proj.bias.zero_()
        cut = ours(x, t, context=context)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], out_other[1])
    assert torch.equal(out[1], cut[1]) and _rel(out[0], cut[0]) > 1e-3
    theirs = _theirs(dm, x, t, context, mask)
    assert _rel(out[[0, 2]], theirs[[0, 2]]) <= 1e-5


# ---- conversions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides", [{"use_additional_conditions": True}, {"caption_channels": None, "cross_attention_dim": 20}]
)
def test_diffusers_round_trip_exact(overrides):
    dm = _random_diffusers(**overrides)
    ours = from_diffusers(dm)
    config = ours.diffusers_config()
    assert {k: dm.config[k] for k in config if k != "interpolation_scale"} == {
        k: v for k, v in config.items() if k != "interpolation_scale"
    }
    back = _diffusers().PixArtTransformer2DModel(**config)
    back.load_state_dict(ours.to_diffusers_state_dict(), strict=True)
    theirs = dm.state_dict()
    assert back.state_dict().keys() == theirs.keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in theirs.items())
    sd = ours.state_dict()
    again = convert_from_diffusers(convert_to_diffusers(sd))
    assert again.keys() == sd.keys() and all(torch.equal(again[k], v) for k, v in sd.items())


def _pixart_layout(dm) -> dict[str, torch.Tensor]:
    """A PixArt-alpha (PixArtMS) checkpoint state dict for dm's weights, written from the key names of
    PixArt-alpha's PixArt.py / PixArtMS.py / PixArt_blocks.py (the inverse of diffusers'
    scripts/convert_pixart_alpha_to_diffusers.py, with ar_embedder feeding the aspect-ratio embedder),
    plus the two non-weight tensors PixArt checkpoints hold."""
    sd = dm.state_dict()
    rename = {
        "pos_embed.proj": "x_embedder.proj",
        "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "adaln_single.emb.resolution_embedder.linear_1": "csize_embedder.mlp.0",
        "adaln_single.emb.resolution_embedder.linear_2": "csize_embedder.mlp.2",
        "adaln_single.emb.aspect_ratio_embedder.linear_1": "ar_embedder.mlp.0",
        "adaln_single.emb.aspect_ratio_embedder.linear_2": "ar_embedder.mlp.2",
        "adaln_single.linear": "t_block.1",
        "caption_projection.linear_1": "y_embedder.y_proj.fc1",
        "caption_projection.linear_2": "y_embedder.y_proj.fc2",
        "proj_out": "final_layer.linear",
    }
    out = {}
    for theirs, orig in rename.items():
        for p in ("weight", "bias"):
            if f"{theirs}.{p}" in sd:
                out[f"{orig}.{p}"] = sd[f"{theirs}.{p}"]
    out["final_layer.scale_shift_table"] = sd["scale_shift_table"]
    for i in range(dm.config.num_layers):
        b = f"transformer_blocks.{i}."
        out[f"blocks.{i}.scale_shift_table"] = sd[b + "scale_shift_table"]
        for p in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([sd[f"{b}attn1.to_{n}.{p}"] for n in "qkv"])
            out[f"blocks.{i}.attn.proj.{p}"] = sd[f"{b}attn1.to_out.0.{p}"]
            out[f"blocks.{i}.cross_attn.q_linear.{p}"] = sd[f"{b}attn2.to_q.{p}"]
            out[f"blocks.{i}.cross_attn.kv_linear.{p}"] = torch.cat([sd[f"{b}attn2.to_{n}.{p}"] for n in "kv"])
            out[f"blocks.{i}.cross_attn.proj.{p}"] = sd[f"{b}attn2.to_out.0.{p}"]
            out[f"blocks.{i}.mlp.fc1.{p}"] = sd[f"{b}ff.net.0.proj.{p}"]
            out[f"blocks.{i}.mlp.fc2.{p}"] = sd[f"{b}ff.net.2.{p}"]
    out["pos_embed"] = torch.zeros(1, 16, 48)
    out["y_embedder.y_embedding"] = torch.randn(120, 20)
    return out


def test_pixart_checkpoint_layout_loads_and_round_trips():
    dm = _random_diffusers(use_additional_conditions=True)
    orig = _pixart_layout(dm)
    ours = PixArt(**pixart_kwargs_from_diffusers(dm.config)).eval()
    ours.load_pixart_state_dict(orig)
    x, t, context, mask = _inputs()
    with torch.no_grad():
        out = ours(x, t, context=context, context_mask=mask, **_sizes())
    assert _rel(out, _theirs(dm, x, t, context, mask, _sizes())) <= 1e-5
    back = ours.to_pixart_state_dict()
    weights = {k: v for k, v in orig.items() if k not in ("pos_embed", "y_embedder.y_embedding")}
    assert back.keys() == weights.keys() and all(torch.equal(back[k], v) for k, v in weights.items())
    assert convert_pixart_state_dict(back).keys() == ours.state_dict().keys()


def test_pixart_layout_errors_name_the_keys():
    dm = _random_diffusers(use_additional_conditions=True)
    ours = PixArt(**pixart_kwargs_from_diffusers(dm.config))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    bad = _pixart_layout(dm)
    del bad["ar_embedder.mlp.2.bias"]
    bad["blocks.1.cross_attn.kv_linear.weight"] = bad["blocks.1.cross_attn.kv_linear.weight"][:-1]
    bad["blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        ours.load_pixart_state_dict(bad)
    for key in ("ar_embedder.mlp.2.bias", "blocks.1.cross_attn.kv_linear.weight", "blocks.0.extra.weight"):
        assert key in str(err.value)
    assert "blocks.1.scale_shift_table" not in str(err.value)  # names are PixArt's, checked before loading
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())
    with pytest.raises(TypeError, match="state_dict values must be tensors"):
        convert_pixart_state_dict({"t_block.1.weight": 1.0})


def test_from_diffusers_checks_every_key_before_loading():
    dm = _random_diffusers()
    dm.transformer_blocks[0].attn2.to_k.weight = nn.Parameter(torch.randn(48, 7))
    shape = r"transformer_blocks\.0\.attn2\.to_k\.weight: got \(48, 7\), expected \(48, 48\)"
    with pytest.raises(ValueError, match=shape):
        from_diffusers(dm)
    unknown = r"keys not in a PixArtTransformer2DModel: \['transformer_blocks.0.norm1.weight'\]"
    with pytest.raises(ValueError, match=unknown):
        convert_from_diffusers({"transformer_blocks.0.norm1.weight": torch.ones(48)})
    with pytest.raises(ValueError, match=r"fused projections need all of .*attn1\.to_v\.weight"):
        convert_from_diffusers({f"transformer_blocks.0.attn1.to_{n}.weight": torch.ones(4, 4) for n in "qk"})
    with pytest.raises(ValueError, match=r"keys not in a PixArt state dict: \['blocks.0.norm1.weight'\]"):
        convert_to_diffusers({"blocks.0.norm1.weight": torch.ones(48)})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"norm_elementwise_affine": True}, "norm_elementwise_affine=True"),
        ({"activation_fn": "geglu"}, "activation_fn='geglu'"),
        ({"dropout": 0.1}, "dropout=0.1"),
        ({"out_channels": 5}, "out_channels=5"),
        ({"cross_attention_dim": None}, "cross_attention_dim=None"),
        ({"cross_attention_dim": 32}, "cross_attention_dim=32 must equal"),
    ],
)
def test_unsupported_diffusers_configs_are_named(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        pixart_kwargs_from_diffusers({**CFG, **overrides})


def test_diffusers_rule_for_size_conditions_and_interpolation_scale():
    kw = pixart_kwargs_from_diffusers({**CFG, "use_additional_conditions": None, "sample_size": 128})
    assert kw["size_conditioning"] and PixArt(**{**kw, "hidden_size": 48, "depth": 1}).interpolation_scale == 2
    assert not pixart_kwargs_from_diffusers({**CFG, "use_additional_conditions": None})["size_conditioning"]


# ---- training-side properties --------------------------------------------------------------------


def _small(**kw) -> PixArt:
    base = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=2, num_heads=2, context_dim=20)
    return PixArt(**{**base, **kw})


def test_gradients_reach_every_parameter():
    model = _randomize_(_small(size_conditioning=True)).train()
    x, t, context, mask = _inputs()
    model(x, t, context=context, context_mask=mask, **_sizes()).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


def test_torch_compile_fullgraph_matches_eager():
    model = _randomize_(_small(size_conditioning=True)).eval()
    x, t, context, mask = _inputs()
    mask[1] = False
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        eager = model(x, t, context=context, context_mask=mask, **_sizes())
        assert _rel(compiled(x, t, context=context, context_mask=mask, **_sizes()), eager) <= 1e-6


def test_pixart_init_predicts_zero_and_keeps_pixart_tables():
    model = _small(size_conditioning=True)
    x, t, context, mask = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, context=context, context_mask=mask, **_sizes()), torch.zeros(3, 8, 8, 8))
    for block in model.blocks:
        assert not block.cross_attn.proj.weight.any() and block.modulation.scale_shift_table.abs().min() > 0
    assert abs(model.adaln_single.t_block[1].weight.std().item() - 0.02) < 0.002
    assert model.pos_embed.shape == (1, 16, 48) and "pos_embed" not in model.state_dict()


def test_flow_interface():
    model = _small()
    sigma = torch.tensor([0.0, 0.25, 1.0])
    assert torch.equal(model.flow_timestep(sigma), torch.tensor([0.0, 250.0, 1000.0]))
    assert model.velocity_sign == 1.0


def test_vp_denoiser_is_x_minus_sigma_eps_at_the_ddpm_step():
    model = _randomize_(_small()).eval()
    x, _, context, mask = _inputs()
    sigma = vp_sigmas()[[10, 500, 990]].float()
    assert torch.allclose(sigma_to_vp_timestep(sigma), torch.tensor([10.0, 500.0, 990.0]), atol=1e-3)
    s = sigma[:, None, None, None]
    with torch.no_grad():
        d = pixart_vp_denoiser(model)(x, sigma, context=context, context_mask=mask)
        eps = model(x / (1 + s**2).sqrt(), sigma_to_vp_timestep(sigma), context=context, context_mask=mask)[:, :4]
    assert torch.allclose(d, x - s * eps, rtol=1e-5, atol=1e-4)


# ---- bad inputs ----------------------------------------------------------------------------------

X, T, C, M = _inputs()
SIZED = _small(size_conditioning=True)
PLAIN = _small()
RES = _sizes()["resolution"]


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: PLAIN(X[:, :3], T, context=C), ValueError, "x must have shape (B, 4, H, W) with H and W"),
        (lambda: PLAIN(X[..., :7], T, context=C), ValueError, "multiples of patch_size 2, got (3, 4, 8, 7)"),
        (lambda: PLAIN(X.long(), T, context=C), TypeError, "x must be a floating-point tensor"),
        (lambda: PLAIN(X.double(), T, context=C), TypeError, "x has dtype torch.float64"),
        (lambda: PLAIN(X, T[:2], context=C), ValueError, "t must have shape (B,) = (3,)"),
        (lambda: PLAIN(X, T > 0, context=C), TypeError, "t must be a real torch.Tensor"),
        (lambda: PLAIN(X, T), ValueError, "context is required"),
        (lambda: PLAIN(X, T, context=C[..., :7]), ValueError,
         "context must have shape (B, L, 20) with B = 3"),
        (lambda: PLAIN(X, T, context=C, context_mask=M.float()), TypeError, "context_mask must be a bool tensor"),
        (lambda: PLAIN(X, T, context=C, context_mask=M[:, :4]), ValueError,
         "context_mask must have shape (B, L) = (3, 6)"),
        (lambda: PLAIN(X, T, context=C, pooled=C[:, 0]), ValueError, "pooled must be None"),
        (lambda: PLAIN(X, T, context=C, guidance=T), ValueError, "guidance must be None"),
        (lambda: PLAIN(X, T, context=C, **_sizes()), ValueError, "resolution must be None"),
        (lambda: SIZED(X, T, context=C), ValueError, "resolution is required"),
        (lambda: SIZED(X, T, context=C, resolution=RES), ValueError, "aspect_ratio is required"),
        (lambda: SIZED(X, T, context=C, resolution=torch.ones(3, 3), aspect_ratio=torch.ones(3)), ValueError,
         "resolution must have shape (3, 2), got (3, 3)"),
        (lambda: SIZED(X, T, context=C, resolution=RES, aspect_ratio=torch.ones(3, 2)), ValueError,
         "aspect_ratio must have shape (3,) or (3, 1)"),
        (lambda: _small(size_conditioning=True, hidden_size=40), ValueError, "hidden_size must be divisible by 3"),
        (lambda: _small(hidden_size=42, num_heads=2), ValueError, "hidden_size must be divisible by 4"),
        (lambda: _small(sample_size=9), ValueError, "sample_size (9) must be divisible by patch_size (2)"),
    ],
)  # fmt: skip
def test_bad_inputs_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()
