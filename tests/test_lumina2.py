"""Lumina 2 (Next-DiT) against diffusers' Lumina2Transformer2DModel on random weights: outputs with caption
masks, the diffusers and original (Lumina-Image-2.0 NextDiT) layouts, gradients, torch.compile, init, inputs."""

from __future__ import annotations

import math

import pytest
import torch

import adaln.models as adaln_models
from adaln.models.lumina2 import (
    Lumina2,
    compact_captions,
    convert_lumina2_state_dict,
    from_diffusers,
    lumina2_kwargs_from_diffusers,
    lumina2_kwargs_from_lumina2_state_dict,
    lumina_ffn_dim,
)

diffusers = pytest.importorskip("diffusers")

# Measured max relative errors (max |ours - theirs| / max |theirs|, outputs of max |y| 7.1-7.5), float32, 8x8 /
# 6x10 latents: captions of different lengths (3 and 6 of 6 kept) 2.6e-7 / 1.8e-7, both short (2 of 6) 1.9e-7 /
# 2.2e-7, an empty caption next to a full one 1.9e-7 / 2.6e-7, every token kept 0 (bit-equal); width 1040
# (condition 1024) 2.8e-7. Half precision
# against diffusers in float32: ours 1.0e-2 (bf16) / 2.2e-3 (fp16), diffusers itself 1.1e-2 / 2.6e-3.
# 8x8 latents, patch 2, width 32, 4 query / 2 key-value heads of width 8 = RoPE (2, 2, 4), 2 + 2 refiner blocks,
# SwiGLU width int(0.7 * 128) = 89 rounded up to 96, caption features 12 wide.
BASE = dict(
    sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=2,
    num_attention_heads=4, num_kv_heads=2, multiple_of=16, ffn_dim_multiplier=0.7, axes_dim_rope=(2, 2, 4),
    axes_lens=(16, 8, 8), cap_feat_dim=12,
)  # fmt: skip
MASKS = {
    "different_lengths": [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]],
    "all_kept": [[1] * 6, [1] * 6],
    "equal_short": [[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]],
    "empty_caption": [[0] * 6, [1] * 6],
}


def _random_lumina2(dtype: torch.dtype = torch.float32, **overrides):
    """Lumina2Transformer2DModel with every parameter random (its zero- and one-initialised ones included)."""
    dm = diffusers.Lumina2Transformer2DModel(**{**BASE, **overrides}).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in dm.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:  # norm weights around 1, biases around 0
                p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
    return dm if dtype == torch.float32 else dm.to(dtype)


def _inputs(b: int = 2, h: int = 8, w: int = 8, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, h, w, generator=g, dtype=dtype)
    t = torch.rand(b, generator=g, dtype=dtype)  # 1 - sigma, as the pipeline passes it
    context = torch.randn(b, 6, 12, generator=g, dtype=dtype)
    return x, t, context


def _theirs(dm, x, t, context, mask):
    with torch.no_grad():
        return dm(hidden_states=x, timestep=t, encoder_hidden_states=context, encoder_attention_mask=mask).sample


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# ---- outputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("masks", list(MASKS))
@pytest.mark.parametrize("hw", [(8, 8), (6, 10)])
def test_matches_diffusers_float32(masks, hw):
    dm = _random_lumina2()
    ours = from_diffusers(dm)
    assert isinstance(ours, Lumina2) and not ours.training
    x, t, context = _inputs(h=hw[0], w=hw[1])
    mask = torch.tensor(MASKS[masks], dtype=torch.bool)
    theirs = _theirs(dm, x, t, context, mask)
    with torch.no_grad():
        out = ours(x, t, context, context_mask=mask)
    assert out.shape == theirs.shape == x.shape
    assert theirs.abs().max() > 1.0  # a non-trivial output
    assert _rel_err(out, theirs) <= 1e-5


def test_condition_width_is_capped_at_1024():
    """Width 1040: the timestep embedding, every AdaLN and the final layer read min(D, 1024) = 1024 features."""
    dm = _random_lumina2(hidden_size=1040, num_attention_heads=8, num_kv_heads=2, axes_dim_rope=(42, 44, 44),
                         num_layers=1, num_refiner_layers=1)  # fmt: skip
    ours = from_diffusers(dm)
    assert ours.cond_dim == 1024 and ours.layers[0].adaLN_modulation.proj[1].weight.shape == (4 * 1040, 1024)
    x, t, context = _inputs()
    mask = torch.tensor(MASKS["different_lengths"], dtype=torch.bool)
    with torch.no_grad():
        assert _rel_err(ours(x, t, context, context_mask=mask), _theirs(dm, x, t, context, mask)) <= 1e-5


def test_mask_none_keeps_every_token_and_padding_never_matters():
    ours = from_diffusers(_random_lumina2())
    x, t, context = _inputs()
    mask = torch.tensor(MASKS["different_lengths"], dtype=torch.bool)
    noisy_padding = torch.where(mask[..., None], context, 1e4 * torch.randn(context.shape))
    with torch.no_grad():
        assert torch.equal(ours(x, t, context), ours(x, t, context, context_mask=torch.ones(2, 6, dtype=torch.bool)))
        assert torch.equal(ours(x, t, noisy_padding, context_mask=mask), ours(x, t, context, context_mask=mask))
        # the padding is not ignored without a mask: the masked call is another function
        assert _rel_err(ours(x, t, context), ours(x, t, context, context_mask=mask)) > 1e-3


def test_non_prefix_mask_equals_its_compacted_caption():
    """Kept tokens anywhere in the caption act as the same tokens moved to the front (in order)."""
    dm = _random_lumina2()
    ours = from_diffusers(dm)
    x, t, context = _inputs()
    mask = torch.tensor([[0, 1, 0, 1, 1, 0], [1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    packed, keep = compact_captions(context, mask)
    assert torch.equal(keep, torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool))
    assert torch.equal(packed[0, :3], context[0, [1, 3, 4]]) and not packed[0, 3:].any()
    assert torch.equal(compact_captions(packed, keep)[0], packed)  # a prefix mask is left as it is
    with torch.no_grad():
        out = ours(x, t, context, context_mask=mask)
        assert torch.equal(out, ours(x, t, packed, context_mask=keep))
    assert _rel_err(out, _theirs(dm, x, t, packed, keep)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_at_least_as_close_as_diffusers(dtype):
    """Half inputs: outputs in the input dtype, no further from diffusers' float32 outputs than diffusers'
    own half-precision run (our modulation runs in fp32)."""
    x, t, context = _inputs()
    mask = torch.tensor(MASKS["different_lengths"], dtype=torch.bool)
    ref = _theirs(_random_lumina2(), x, t, context, mask)
    dm = _random_lumina2(dtype)
    ours = from_diffusers(dm)
    with torch.no_grad():
        out = ours(x.to(dtype), t, context.to(dtype), context_mask=mask)
    theirs = _theirs(dm, x.to(dtype), t, context.to(dtype), mask)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert _rel_err(out, ref) <= _rel_err(theirs, ref)


def test_scalar_timestep_broadcasts():
    ours = from_diffusers(_random_lumina2())
    x, _, context = _inputs()
    with torch.no_grad():
        ref = ours(x, torch.full((2,), 0.25), context)
        assert torch.equal(ours(x, torch.tensor(0.25), context), ref)
        assert torch.equal(ours(x, 0.25, context), ref)


def test_ffn_width_rule():
    assert lumina_ffn_dim(2304, 256, None) == 9216  # Lumina-Image 2.0: 4 D, already a multiple of 256
    assert lumina_ffn_dim(32, 16, 0.7) == 96  # int(0.7 * 128) = 89, rounded up to 96
    assert from_diffusers(_random_lumina2()).layers[0].feed_forward.w1.weight.shape == (96, 32)


# ---- layouts --------------------------------------------------------------------------------------


def test_diffusers_round_trip_exact():
    dm = _random_lumina2()
    ours = from_diffusers(dm)
    config = ours.diffusers_config()
    theirs = {k: tuple(v) if isinstance(v, list) else v for k, v in dm.config.items() if k in config}
    assert config == {**theirs, "out_channels": 4}  # diffusers' None means in_channels
    back = ours.to_diffusers_state_dict()
    rebuilt = diffusers.Lumina2Transformer2DModel(**config)
    rebuilt.load_state_dict(back, strict=True)
    ref = dm.state_dict()
    assert back.keys() == ref.keys() and all(torch.equal(back[k], ref[k]) for k in ref)
    again = Lumina2(**lumina2_kwargs_from_diffusers(dm.config))
    again.load_diffusers_state_dict(back)
    mine = ours.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in again.state_dict().items())


def test_diffusers_single_file_converter_reads_our_lumina2_export():
    """Our NextDiT-layout export, read by diffusers' own converter, gives diffusers' state dict to the bit.
    That converter splits ``qkv`` at the 2B model's fixed widths (2304, 768, 768), so the small model's
    fused projections are compared to [to_q; to_k; to_v] directly."""
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

    dm = _random_lumina2()
    original = from_diffusers(dm).to_lumina2_state_dict()
    assert "norm_final.weight" in original and "layers.1.adaLN_modulation.1.weight" in original
    ref = dm.state_dict()
    theirs = convert_lumina2_to_diffusers({k: v for k, v in original.items() if ".qkv." not in k})
    expected = {k for k in ref if ".attn.to_q." not in k and ".attn.to_k." not in k and ".attn.to_v." not in k}
    assert theirs.keys() == expected and all(torch.equal(theirs[k], ref[k]) for k in expected)
    qkv = [k for k in original if ".qkv." in k]
    assert len(qkv) == 6  # 2 noise refiner + 2 context refiner + 2 layers
    for key in qkv:
        prefix = key.replace("attention.qkv.weight", "attn.")
        assert torch.equal(original[key], torch.cat([ref[prefix + f"to_{n}.weight"] for n in "qkv"]))


def test_lumina2_layout_round_trip_exact():
    dm = _random_lumina2()
    ours = from_diffusers(dm)
    original = ours.to_lumina2_state_dict()
    mine = ours.state_dict()
    for sd in (original, {f"model.diffusion_model.{k}": v for k, v in original.items()}):
        converted = convert_lumina2_state_dict(sd)
        assert converted.keys() == mine.keys() and all(torch.equal(converted[k], mine[k]) for k in mine)
    fresh = Lumina2(**lumina2_kwargs_from_diffusers(dm.config))
    fresh.load_lumina2_state_dict(original)
    assert all(torch.equal(v, mine[k]) for k, v in fresh.state_dict().items())


def test_sizes_read_from_a_nextdit_state_dict_build_a_model_equal_to_diffusers():
    dm = _random_lumina2()
    original = {f"model.diffusion_model.{k}": v for k, v in from_diffusers(dm).to_lumina2_state_dict().items()}
    kwargs = lumina2_kwargs_from_lumina2_state_dict(original, multiple_of=16, ffn_dim_multiplier=0.7,
                                                    axes_dim=(2, 2, 4), sample_size=8)  # fmt: skip
    expected = lumina2_kwargs_from_diffusers(dm.config)
    assert kwargs == {k: v for k, v in expected.items() if k in kwargs}
    assert set(expected) - set(kwargs) == {"norm_eps", "axes_lens"}  # not stored; Lumina2's defaults fit
    ours = Lumina2(**kwargs, axes_lens=expected["axes_lens"]).eval()
    ours.load_lumina2_state_dict(original)
    x, t, context = _inputs()
    mask = torch.tensor(MASKS["different_lengths"], dtype=torch.bool)
    with torch.no_grad():
        assert _rel_err(ours(x, t, context=context, context_mask=mask), _theirs(dm, x, t, context, mask)) <= 1e-5
    with pytest.raises(ValueError, match="SwiGLU is 96 wide, but multiple_of=256 and ffn_dim_multiplier=None give 256"):
        lumina2_kwargs_from_lumina2_state_dict(original, axes_dim=(2, 2, 4))
    with pytest.raises(ValueError, match="heads of width 8 do not split into three equal even RoPE axes"):
        lumina2_kwargs_from_lumina2_state_dict(original, multiple_of=16, ffn_dim_multiplier=0.7)


def test_layout_errors_name_the_key():
    dm = _random_lumina2()
    ours = from_diffusers(dm)
    sd = dm.state_dict()
    with pytest.raises(ValueError, match=r"missing keys.*context_refiner\.1\.norm1\.weight"):
        ours.load_diffusers_state_dict({k: v for k, v in sd.items() if k != "context_refiner.1.norm1.weight"})
    wrong = {**sd, "layers.0.attn.to_k.weight": torch.zeros(32, 32)}
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.to_k\.weight: got \(32, 32\), expected \(16, 32\)"):
        ours.load_diffusers_state_dict(wrong)
    with pytest.raises(ValueError, match=r"unexpected keys.*extra"):
        ours.load_diffusers_state_dict({**sd, "extra": torch.zeros(1)})
    original = ours.to_lumina2_state_dict()
    with pytest.raises(ValueError, match=r"not in a Lumina-Image-2.0 NextDiT state dict: \['vae\.w'\]"):
        convert_lumina2_state_dict({**original, "vae.w": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"missing keys.*layers\.0\.feed_forward\.w2\.weight"):
        ours.load_lumina2_state_dict({k: v for k, v in original.items() if k != "layers.0.feed_forward.w2.weight"})
    with pytest.raises(TypeError, match="Lumina2Transformer2DModel"):
        from_diffusers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"):
        Lumina2(**lumina2_kwargs_from_diffusers({**BASE, "num_kv_heads": 3}))
    with pytest.raises(ValueError, match=r"axes_dim must be 3 RoPE widths .* = 8, got \(4, 4, 4\)"):
        Lumina2(**lumina2_kwargs_from_diffusers({**BASE, "axes_dim_rope": (4, 4, 4)}))


# ---- training -------------------------------------------------------------------------------------


def test_gradients_reach_every_parameter():
    ours = from_diffusers(_random_lumina2()).train()
    x, t, context = _inputs()
    mask = torch.tensor(MASKS["different_lengths"], dtype=torch.bool)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (ours(x, t, context, context_mask=mask) * weights).sum().backward()
    for name, p in ours.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_torch_compile_fullgraph_matches_eager():
    ours = from_diffusers(_random_lumina2())
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    x, t, context = _inputs()
    mask = torch.tensor(MASKS["different_lengths"], dtype=torch.bool)
    with torch.no_grad():
        assert _rel_err(compiled(x, t, context, context_mask=mask), ours(x, t, context, context_mask=mask)) <= 1e-6
        assert _rel_err(compiled(x, t, context), ours(x, t, context)) <= 1e-6


def test_init_is_identity_blocks_zero_output_and_trains():
    torch.manual_seed(0)
    model = Lumina2(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_refiner_layers=1,
                    num_heads=4, num_kv_heads=2, context_dim=12, multiple_of=16, axes_dim=(2, 2, 4))  # fmt: skip
    x, t, context = _inputs()
    mask = torch.tensor(MASKS["different_lengths"], dtype=torch.bool)
    assert not model(x, t, context, context_mask=mask).any()  # zero output layer
    for block in (*model.noise_refiner, *model.layers):  # tanh(0) gates: identity blocks
        assert not block.adaLN_modulation.proj[1].weight.any()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(25):
        loss = (model(x, t, context, context_mask=mask) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_flow_interface_matches_lumina2_pipeline():
    """The pipeline passes 1 - t / 1000 (t = 1000 sigma) and negates the output: velocity = -output."""
    dm = _random_lumina2()
    ours = adaln_models.from_diffusers(dm)
    assert isinstance(ours, Lumina2) and adaln_models.is_system(ours) and ours.velocity_sign == -1.0
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(7)
    torch.testing.assert_close(ours.flow_timestep(scheduler.sigmas[:-1]), 1 - scheduler.timesteps / 1000)
    x, _, context = _inputs()
    mask = torch.tensor(MASKS["different_lengths"], dtype=torch.bool)
    sigma = torch.tensor([0.25, 0.75])
    with torch.no_grad():
        v = adaln_models.SystemVelocity(ours)(x, sigma, context=context, context_mask=mask)
    assert _rel_err(v, -_theirs(dm, x, 1 - sigma, context, mask)) <= 1e-5


# ---- inputs ---------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    ours = from_diffusers(_random_lumina2())
    x, t, context = _inputs()
    mask = torch.ones(2, 6, dtype=torch.bool)
    cases = [
        (dict(pooled=torch.ones(2, 4)), ValueError, "pooled must be None: Lumina 2 takes no pooled input"),
        (dict(guidance=torch.ones(2)), ValueError, "guidance must be None"),
        (dict(context=None), ValueError, r"context is required: expected shape \(B, L, 12\) with B = 2"),
        (dict(context=torch.randn(2, 6, 11)), ValueError, r"context must have shape \(B, L, 12\) with B = 2"),
        (dict(context=torch.randn(2, 0, 12)), ValueError, r"with B = 2 and L >= 1, got \(2, 0, 12\)"),
        (dict(context_mask=mask.float()), TypeError, "context_mask must be a bool tensor"),
        (dict(context_mask=mask[:, :5]), ValueError, r"context_mask must have shape \(B, L\) = \(2, 6\)"),
        (dict(x=torch.randn(2, 3, 8, 8)), ValueError, r"x must have shape \(B, 4, H, W\)"),
        (dict(x=torch.randn(2, 4, 7, 8)), ValueError, "multiples of patch_size 2"),
        (dict(x=x.double()), TypeError, "x has dtype torch.float64"),
        (dict(x=x.long()), TypeError, "x must be a floating-point tensor"),
        (dict(t=torch.ones(3)), ValueError, r"t must have shape \(B,\) = \(2,\)"),
        (dict(t="1"), TypeError, "t must be a real torch.Tensor"),
    ]
    for overrides, error, message in cases:
        kw = {**dict(x=x, t=t, context=context, context_mask=mask), **overrides}
        with pytest.raises(error, match=message):
            ours(kw.pop("x"), kw.pop("t"), **kw)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        Lumina2(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="num_refiner_layers must be an int >= 0"):
        Lumina2(hidden_size=32, num_heads=4, num_kv_heads=2, axes_dim=(2, 2, 4), num_refiner_layers=-1)
