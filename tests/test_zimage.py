"""Z-Image against diffusers' ZImageTransformer2DModel on random weights: two captions of different lengths
in one batch (diffusers takes them as a list and pads each to a multiple of 32), the diffusers layout,
gradients, torch.compile, init, inputs."""

from __future__ import annotations

import math

import pytest
import torch

import adaln.models as adaln_models
from adaln.models.zimage import ZImage, from_diffusers, zimage_ffn_dim, zimage_kwargs_from_diffusers

diffusers = pytest.importorskip("diffusers")

# Measured max relative errors (max |ours - theirs| / max |theirs|, outputs of max |y| 3.5-4.5), float32, 8x8 /
# 6x10 latents (16 / 15 image tokens, padded with 16 / 17 x_pad_tokens): captions of 7 and 40 tokens (padded
# to 32 and 64) 4.1e-7 / 3.8e-7, 5 and 32 (one padded, one not) 4.2e-7 / 5.9e-7, an empty caption and 6
# tokens 3.4e-7 / 4.3e-7, 3 and 3 4.4e-7 / 4.3e-7; without qk norm 5.5e-7; width 288 (condition 256) 4.5e-7.
# Half precision against diffusers in float32: ours 2.0e-2 (bf16) / 2.0e-3 (fp16), diffusers itself 2.4e-2 / 2.3e-3.
# Width 32 (AdaLN condition min(32, 256) = 32), 4 heads of width 8 = RoPE (2, 2, 4), 2 + 2 refiner blocks,
# SwiGLU width int(32 / 3 * 8) = 85, caption features 12 wide.
BASE = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=2, n_heads=4,
    n_kv_heads=4, cap_feat_dim=12, axes_dims=[2, 2, 4], axes_lens=[128, 8, 8],
)  # fmt: skip
LENGTHS = {"7_and_40": (7, 40), "5_and_32": (5, 32), "empty_and_6": (0, 6), "3_and_3": (3, 3)}


def _random_zimage(dtype: torch.dtype = torch.float32, **overrides):
    """ZImageTransformer2DModel with every parameter random (its zero- and one-initialised ones included)."""
    dm = diffusers.ZImageTransformer2DModel(**{**BASE, **overrides}).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in dm.named_parameters():
            if "pad_token" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:  # norm weights around 1, biases around 0
                p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
    return dm if dtype == torch.float32 else dm.to(dtype)


def _inputs(lengths=(7, 40), h: int = 8, w: int = 8, dtype: torch.dtype = torch.float32):
    """x, t (1 - sigma, as the pipeline passes it), right-padded captions (B, L, 12) and their mask."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(lengths), 4, h, w, generator=g, dtype=dtype)
    t = torch.rand(len(lengths), generator=g, dtype=dtype)
    context = torch.randn(len(lengths), max(max(lengths), 1), 12, generator=g, dtype=dtype)
    mask = torch.arange(context.shape[1])[None] < torch.tensor(lengths)[:, None]
    return x, t, context, mask


def _theirs(dm, x, t, context, mask):
    """diffusers' call: a list of (C, 1, H, W) frames and a list of (L_i, 12) captions; output stacked."""
    captions = [c[m] for c, m in zip(context, mask)]
    with torch.no_grad():
        return torch.stack(dm(list(x.unsqueeze(2).unbind(0)), t, captions).sample).squeeze(2)


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# ---- outputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("hw", [(8, 8), (6, 10)])
def test_matches_diffusers_float32(lengths, hw):
    dm = _random_zimage()
    ours = from_diffusers(dm)
    assert isinstance(ours, ZImage) and not ours.training
    x, t, context, mask = _inputs(LENGTHS[lengths], *hw)
    theirs = _theirs(dm, x, t, context, mask)
    with torch.no_grad():
        out = ours(x, t, context, context_mask=mask)
    assert out.shape == theirs.shape == x.shape
    assert theirs.abs().max() > 1.0  # a non-trivial output
    assert _rel_err(out, theirs) <= 1e-5


def test_without_qk_norm_matches_diffusers():
    dm = _random_zimage(qk_norm=False)
    ours = from_diffusers(dm)
    assert isinstance(ours.layers[0].attention.q_norm, torch.nn.Identity)
    x, t, context, mask = _inputs()
    with torch.no_grad():
        assert _rel_err(ours(x, t, context, context_mask=mask), _theirs(dm, x, t, context, mask)) <= 1e-5


def test_condition_width_is_capped_at_256():
    """Width 288: the timestep embedding, every AdaLN and the final layer read min(D, 256) = 256 features."""
    dm = _random_zimage(dim=288, n_heads=4, axes_dims=[24, 24, 24], n_layers=1, n_refiner_layers=1)
    ours = from_diffusers(dm)
    assert ours.cond_dim == 256 and ours.layers[0].adaLN_modulation.proj[1].weight.shape == (4 * 288, 256)
    x, t, context, mask = _inputs()
    with torch.no_grad():
        assert _rel_err(ours(x, t, context, context_mask=mask), _theirs(dm, x, t, context, mask)) <= 1e-5


def test_pad_tokens_are_part_of_the_function():
    """A caption of 5 tokens attends to 27 copies of cap_pad_token, one of 32 to none: changing the pad
    token moves the first sample only. Every image of 16 tokens has 16 x_pad_token copies."""
    ours = from_diffusers(_random_zimage())
    x, t, context, mask = _inputs((5, 32))
    with torch.no_grad():
        ref = ours(x, t, context, context_mask=mask)
        ours.cap_pad_token.add_(1.0)
        moved = ours(x, t, context, context_mask=mask)
        ours.cap_pad_token.sub_(1.0)
        ours.x_pad_token.add_(1.0)
        both = ours(x, t, context, context_mask=mask)
    assert _rel_err(moved[0], ref[0]) > 1e-3 and torch.equal(moved[1], ref[1])
    assert _rel_err(both[0], ref[0]) > 1e-3 and _rel_err(both[1], ref[1]) > 1e-3


def test_mask_none_keeps_every_token_and_padding_never_matters():
    ours = from_diffusers(_random_zimage())
    x, t, context, mask = _inputs()
    noisy_padding = torch.where(mask[..., None], context, 1e4 * torch.randn(context.shape))
    with torch.no_grad():
        assert torch.equal(ours(x, t, context), ours(x, t, context, context_mask=torch.ones_like(mask)))
        assert torch.equal(ours(x, t, noisy_padding, context_mask=mask), ours(x, t, context, context_mask=mask))


def test_non_prefix_mask_equals_its_compacted_caption():
    dm = _random_zimage()
    ours = from_diffusers(dm)
    x, t, context, _ = _inputs((6, 6))
    mask = torch.tensor([[0, 1, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        out = ours(x, t, context, context_mask=mask)
    assert _rel_err(out, _theirs(dm, x, t, context, mask)) <= 1e-5  # diffusers gets the kept tokens as a list


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_at_least_as_close_as_diffusers(dtype):
    """Half inputs: outputs in the input dtype, no further from diffusers' float32 outputs than diffusers'
    own half-precision run (our modulation runs in fp32)."""
    x, t, context, mask = _inputs()
    ref = _theirs(_random_zimage(), x, t, context, mask)
    dm = _random_zimage(dtype)
    ours = from_diffusers(dm)
    with torch.no_grad():
        out = ours(x.to(dtype), t, context.to(dtype), context_mask=mask)
    theirs = _theirs(dm, x.to(dtype), t, context.to(dtype), mask)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert _rel_err(out, ref) <= _rel_err(theirs, ref)


def test_scalar_timestep_broadcasts():
    ours = from_diffusers(_random_zimage())
    x, _, context, mask = _inputs()
    with torch.no_grad():
        ref = ours(x, torch.full((2,), 0.25), context, context_mask=mask)
        assert torch.equal(ours(x, torch.tensor(0.25), context, context_mask=mask), ref)
        assert torch.equal(ours(x, 0.25, context, context_mask=mask), ref)


def test_ffn_width_rule():
    assert zimage_ffn_dim(3840) == 10240  # Z-Image-Turbo
    assert zimage_ffn_dim(32) == 85
    assert from_diffusers(_random_zimage()).layers[0].feed_forward.w1.weight.shape == (85, 32)


# ---- layout ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("qk_norm", [True, False])
def test_diffusers_round_trip_exact(qk_norm):
    dm = _random_zimage(qk_norm=qk_norm)
    ours = from_diffusers(dm)
    config = ours.diffusers_config()
    assert config == {k: tuple(v) if k.startswith("all_") else v for k, v in dm.config.items() if k in config}
    back = ours.to_diffusers_state_dict()
    rebuilt = diffusers.ZImageTransformer2DModel(**config)
    rebuilt.load_state_dict(back, strict=True)
    ref = dm.state_dict()
    assert back.keys() == ref.keys() and all(torch.equal(back[k], ref[k]) for k in ref)
    again = ZImage(**zimage_kwargs_from_diffusers(dm.config))
    again.load_diffusers_state_dict(back)
    mine = ours.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in again.state_dict().items())


def test_layout_errors_name_the_key():
    dm = _random_zimage()
    ours = from_diffusers(dm)
    sd = dm.state_dict()
    with pytest.raises(ValueError, match=r"missing keys.*cap_pad_token"):
        ours.load_diffusers_state_dict({k: v for k, v in sd.items() if k != "cap_pad_token"})
    wrong = {**sd, "layers.1.adaLN_modulation.0.weight": torch.zeros(96, 32)}
    with pytest.raises(ValueError, match=r"layers\.1\.adaLN_modulation\.0\.weight: got \(96, 32\), expected \(128"):
        ours.load_diffusers_state_dict(wrong)
    with pytest.raises(ValueError, match=r"unexpected keys.*extra"):
        ours.load_diffusers_state_dict({**sd, "extra": torch.zeros(1)})
    no_qk = ZImage(**zimage_kwargs_from_diffusers({**BASE, "qk_norm": False}))
    with pytest.raises(ValueError, match=r"unexpected keys.*noise_refiner\.0\.attention\.norm_q\.weight"):
        no_qk.load_diffusers_state_dict(sd)
    with pytest.raises(TypeError, match="ZImageTransformer2DModel"):
        from_diffusers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"all_patch_size=\(2, 4\): ZImage has one patch size"):
        zimage_kwargs_from_diffusers({**BASE, "all_patch_size": (2, 4), "all_f_patch_size": (1, 1)})
    with pytest.raises(ValueError, match=r"all_f_patch_size=\(2,\)"):
        zimage_kwargs_from_diffusers({**BASE, "all_f_patch_size": (2,)})
    with pytest.raises(ValueError, match="siglip_feat_dim=16: the Omni mode is not supported"):
        zimage_kwargs_from_diffusers({**BASE, "siglip_feat_dim": 16})
    small = ZImage(patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=4, context_dim=12,
                   axes_dim=(2, 2, 4), timestep_hidden=64)  # fmt: skip
    with pytest.raises(ValueError, match="timestep MLP of width 1024; this one has 64"):
        small.diffusers_config()


# ---- training -------------------------------------------------------------------------------------


def test_gradients_reach_every_parameter():
    ours = from_diffusers(_random_zimage()).train()
    x, t, context, mask = _inputs()
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (ours(x, t, context, context_mask=mask) * weights).sum().backward()
    for name, p in ours.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_torch_compile_fullgraph_matches_eager():
    ours = from_diffusers(_random_zimage())
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    x, t, context, mask = _inputs()
    with torch.no_grad():
        assert _rel_err(compiled(x, t, context, context_mask=mask), ours(x, t, context, context_mask=mask)) <= 1e-6
        assert _rel_err(compiled(x, t, context), ours(x, t, context)) <= 1e-6


def test_init_is_identity_blocks_zero_output_and_trains():
    torch.manual_seed(0)
    model = ZImage(patch_size=2, in_channels=4, hidden_size=32, depth=2, num_refiner_layers=1, num_heads=4,
                   context_dim=12, axes_dim=(2, 2, 4), timestep_hidden=64)  # fmt: skip
    x, t, context, mask = _inputs((3, 6))
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


def test_flow_interface_matches_zimage_pipeline():
    """The pipeline passes (1000 - t) / 1000 (t = 1000 sigma) and negates the output: velocity = -output."""
    dm = _random_zimage()
    ours = adaln_models.from_diffusers(dm)
    assert isinstance(ours, ZImage) and adaln_models.is_system(ours) and ours.velocity_sign == -1.0
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(7)
    torch.testing.assert_close(ours.flow_timestep(scheduler.sigmas[:-1]), (1000 - scheduler.timesteps) / 1000)
    x, _, context, mask = _inputs()
    sigma = torch.tensor([0.25, 0.75])
    with torch.no_grad():
        v = adaln_models.SystemVelocity(ours)(x, sigma, context=context, context_mask=mask)
    assert _rel_err(v, -_theirs(dm, x, 1 - sigma, context, mask)) <= 1e-5


# ---- inputs ---------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    ours = from_diffusers(_random_zimage())
    x, t, context, mask = _inputs()
    cases = [
        (dict(pooled=torch.ones(2, 4)), ValueError, "pooled must be None: Z-Image takes no pooled input"),
        (dict(guidance=torch.ones(2)), ValueError, "guidance must be None: Z-Image takes no guidance input"),
        (dict(context=None), ValueError, r"context is required: expected shape \(B, L, 12\) with B = 2"),
        (dict(context=torch.randn(2, 40, 11)), ValueError, r"context must have shape \(B, L, 12\) with B = 2"),
        (dict(context_mask=mask.long()), TypeError, "context_mask must be a bool tensor"),
        (dict(context_mask=mask[:, :5]), ValueError, r"context_mask must have shape \(B, L\) = \(2, 40\)"),
        (dict(x=torch.randn(2, 3, 8, 8)), ValueError, r"x must have shape \(B, 4, H, W\)"),
        (dict(x=torch.randn(2, 4, 8, 9)), ValueError, "multiples of patch_size 2"),
        (dict(x=x.double()), TypeError, "x has dtype torch.float64"),
        (dict(t=torch.ones(2, 1)), ValueError, r"t must have shape \(B,\) = \(2,\)"),
        (dict(t=None), TypeError, "t must be a real torch.Tensor"),
    ]
    for overrides, error, message in cases:
        kw = {**dict(x=x, t=t, context=context, context_mask=mask), **overrides}
        with pytest.raises(error, match=message):
            ours(kw.pop("x"), kw.pop("t"), **kw)
    with pytest.raises(ValueError, match=r"axes_dim must be 3 RoPE widths .* = 8, got \(4, 4, 4\)"):
        ZImage(hidden_size=32, num_heads=4, axes_dim=(4, 4, 4))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ZImage(hidden_size=30, num_heads=4)
