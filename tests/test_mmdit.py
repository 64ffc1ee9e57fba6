"""MMDiT (SD3 / SD3.5) against diffusers' SD3Transformer2DModel on random weights: outputs, skip-layer
guidance, the diffusers and original (Stability mmditx.py) layouts, gradients, torch.compile, init, inputs."""

from __future__ import annotations

import math

import pytest
import torch

import adaln.models as adaln_models
from adaln.models.mmdit import (
    MMDiT,
    convert_sd3_state_dict,
    from_diffusers,
    mmdit_kwargs_from_diffusers,
    mmdit_kwargs_from_sd3_state_dict,
    sd3_pos_embed,
)

diffusers = pytest.importorskip("diffusers")

# Measured max relative errors (max |ours - theirs| / max |theirs|, outputs of max |y| 2.9-4.5), float32:
# plain SD3 1.5e-7 (8x8) / 1.1e-7 (6x10), SD3.5 (qk RMSNorm + dual attention) 1.6e-7 / 1.3e-7, qk LayerNorm
# 2.5e-7 / 6.6e-8; skip_layers 1.1e-7. float64: 3.2e-16 (SD3, qk LayerNorm); SD3.5 7.6e-10 because
# diffusers' RMSNorm takes its variance in float32. Half precision, against diffusers in float32: ours
# 6.9e-3 (bf16) / 1.2e-3 (fp16), diffusers itself 1.0e-2 / 1.4e-3 (our modulation runs in fp32).
# 8x8 latents, patch 2, a 6x6 position table (the 4x4 grid is cropped from its centre), 3 blocks.
BASE = dict(
    sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4, pos_embed_max_size=6,
)  # fmt: skip
VARIANTS = {
    "sd3": {},
    "sd35": dict(qk_norm="rms_norm", dual_attention_layers=(0, 2)),  # the last (pre-only) block dual too
    "qk_layer_norm": dict(qk_norm="layer_norm", dual_attention_layers=(1,)),
}


def _random_sd3(variant: str = "sd35", dtype: torch.dtype = torch.float32):
    """SD3Transformer2DModel with every parameter random (its zero/one-initialised ones included)."""
    dm = diffusers.SD3Transformer2DModel(**BASE, **VARIANTS[variant]).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in dm.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return dm.to(dtype)


def _inputs(b: int = 2, h: int = 8, w: int = 8, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, h, w, generator=g, dtype=dtype)
    t = torch.rand(b, generator=g, dtype=dtype) * 1000  # fractional timesteps, as SD3's scheduler gives
    context = torch.randn(b, 5, 12, generator=g, dtype=dtype)
    pooled = torch.randn(b, 10, generator=g, dtype=dtype)
    return x, t, context, pooled


def _theirs(dm, x, t, context, pooled, **kw):
    with torch.no_grad():
        return dm(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t, **kw).sample


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# ---- outputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("hw", [(8, 8), (6, 10)])  # the training size and a non-square crop
def test_matches_diffusers_float32(variant, hw):
    dm = _random_sd3(variant)
    ours = from_diffusers(dm)
    assert isinstance(ours, MMDiT) and not ours.training
    x, t, context, pooled = _inputs(h=hw[0], w=hw[1])
    theirs = _theirs(dm, x, t, context, pooled)
    with torch.no_grad():
        out = ours(x, t, context, pooled)
    assert out.shape == theirs.shape == x.shape
    assert theirs.abs().max() > 1.0  # a non-trivial output
    assert _rel_err(out, theirs) <= 1e-5


@pytest.mark.parametrize("variant", ["sd3", "qk_layer_norm"])  # diffusers' RMSNorm takes its variance in float32
def test_matches_diffusers_float64(variant):
    dm = _random_sd3(variant, torch.float64)
    ours = from_diffusers(dm)
    assert ours.pos_embed.dtype == torch.float64
    x, t, context, pooled = _inputs(dtype=torch.float64)
    t = t.float()  # diffusers computes the sinusoid in float32 for any t; so does ours for float32 t
    with torch.no_grad():
        assert _rel_err(ours(x, t, context, pooled), _theirs(dm, x, t, context, pooled)) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_at_least_as_close_as_diffusers(dtype):
    """Half inputs: outputs in the input dtype, no clipping (diffusers' SD3 blocks clip nothing either),
    and no further from diffusers' float32 outputs than diffusers' own half-precision run."""
    x, t, context, pooled = _inputs()
    ref = _theirs(_random_sd3("sd35"), x, t, context, pooled)
    dm = _random_sd3("sd35", dtype)
    ours = from_diffusers(dm)
    half = [v.to(dtype) for v in (x, context, pooled)]
    with torch.no_grad():
        out = ours(half[0], t, *half[1:])
    theirs = _theirs(dm, half[0], t, *half[1:])
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert _rel_err(out, ref) <= _rel_err(theirs, ref)


@pytest.mark.parametrize("skip", [[1], [2], [0, 2]])  # a middle block, the pre-only last block, two
def test_skip_layers_match_diffusers(skip):
    dm = _random_sd3("sd35")
    ours = from_diffusers(dm)
    x, t, context, pooled = _inputs()
    theirs = _theirs(dm, x, t, context, pooled, skip_layers=skip)
    with torch.no_grad():
        out = ours(x, t, context, pooled, skip_layers=skip)
        full = ours(x, t, context, pooled)
    assert _rel_err(out, theirs) <= 1e-5
    assert _rel_err(full, out) > 1e-2  # skipping a block is another function


def test_scalar_timestep_broadcasts():
    ours = from_diffusers(_random_sd3("sd3"))
    x, _, context, pooled = _inputs()
    with torch.no_grad():
        ref = ours(x, torch.full((2,), 250.0), context, pooled)
        assert torch.equal(ours(x, torch.tensor(250.0), context, pooled), ref)
        assert torch.equal(ours(x, 250.0, context, pooled), ref)


# ---- layouts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_diffusers_round_trip_exact(variant):
    dm = _random_sd3(variant)
    ours = from_diffusers(dm)
    config = ours.diffusers_config()
    theirs = {k: dm.config[k] for k in config}
    assert {**theirs, "dual_attention_layers": tuple(theirs["dual_attention_layers"])} == config
    back = ours.to_diffusers_state_dict()
    rebuilt = diffusers.SD3Transformer2DModel(**ours.diffusers_config())
    rebuilt.load_state_dict(back, strict=True)
    ref = dm.state_dict()
    assert back.keys() == ref.keys() and all(torch.equal(back[k], ref[k]) for k in ref)
    again = MMDiT(**mmdit_kwargs_from_diffusers(dm.config))
    again.load_diffusers_state_dict(back)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in again.state_dict().items())


@pytest.mark.parametrize("variant", ["sd3", "sd35"])  # diffusers' converter reads RMSNorm qk weights only
def test_diffusers_single_file_converter_reads_our_sd3_export(variant):
    """Our original-layout export, read by diffusers' own single-file converter, gives diffusers' state
    dict to the bit: key names, qkv order, (shift, scale) halves, the 9-chunk SD3.5 order."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    dm = _random_sd3(variant)
    sd3 = from_diffusers(dm).to_sd3_state_dict()
    assert any(k.startswith("joint_blocks.2.context_block.adaLN_modulation.1.") for k in sd3)
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(dict(sd3))
    ref = dm.state_dict()
    assert theirs.keys() == ref.keys() and all(torch.equal(theirs[k], ref[k]) for k in ref)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sd3_layout_round_trip_exact(variant):
    dm = _random_sd3(variant)
    ours = from_diffusers(dm)
    sd3 = ours.to_sd3_state_dict()
    mine = ours.state_dict()
    for sd in (sd3, {f"model.diffusion_model.{k}": v for k, v in sd3.items()}):
        converted = convert_sd3_state_dict(sd)
        assert converted.keys() == mine.keys() and all(torch.equal(converted[k], mine[k]) for k in mine)
    fresh = MMDiT(**mmdit_kwargs_from_diffusers(dm.config))
    fresh.load_sd3_state_dict(sd3)
    assert all(torch.equal(v, mine[k]) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sizes_read_from_an_original_sd3_state_dict_build_a_model_equal_to_diffusers(variant):
    dm = _random_sd3(variant)
    sd3 = {f"model.diffusion_model.{k}": v for k, v in from_diffusers(dm).to_sd3_state_dict().items()}
    head_dim = None if VARIANTS[variant].get("qk_norm") else 8  # read from the q-norm where there is one
    kwargs = mmdit_kwargs_from_sd3_state_dict(sd3, sample_size=BASE["sample_size"], head_dim=head_dim)
    assert kwargs == mmdit_kwargs_from_diffusers(dm.config)
    ours = MMDiT(**kwargs).eval()
    ours.load_sd3_state_dict(sd3)
    x, t, context, pooled = _inputs()
    with torch.no_grad():
        assert _rel_err(ours(x, t, context=context, pooled=pooled), _theirs(dm, x, t, context, pooled)) <= 1e-5
    if head_dim:
        with pytest.raises(ValueError, match="hidden width 16 is not a multiple of the head width 64"):
            mmdit_kwargs_from_sd3_state_dict(sd3)
    with pytest.raises(ValueError, match=r"cannot read MMDiT sizes from the state dict: missing \['pos_embed'\]"):
        mmdit_kwargs_from_sd3_state_dict({k: v for k, v in sd3.items() if not k.endswith("pos_embed")})


def test_layout_errors_name_the_key():
    dm = _random_sd3("sd35")
    ours = from_diffusers(dm)
    sd = dm.state_dict()
    missing = {k: v for k, v in sd.items() if k != "transformer_blocks.1.attn.norm_added_k.weight"}
    with pytest.raises(ValueError, match=r"missing keys.*transformer_blocks\.1\.attn\.norm_added_k\.weight"):
        ours.load_diffusers_state_dict(missing)
    wrong = {**sd, "proj_out.weight": torch.zeros(3, 16)}
    with pytest.raises(ValueError, match=r"proj_out\.weight: got \(3, 16\), expected \(16, 16\)"):
        ours.load_diffusers_state_dict(wrong)
    with pytest.raises(ValueError, match=r"unexpected keys.*extra"):
        ours.load_diffusers_state_dict({**sd, "extra": torch.zeros(1)})
    sd3 = ours.to_sd3_state_dict()
    with pytest.raises(ValueError, match=r"unexpected keys \['first_stage_model\.w'\]"):
        convert_sd3_state_dict({**sd3, "first_stage_model.w": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"missing keys \['joint_blocks\.0\.x_block\.mlp\.fc1\.bias'\]"):
        convert_sd3_state_dict({k: v for k, v in sd3.items() if k != "joint_blocks.0.x_block.mlp.fc1.bias"})
    plain = MMDiT(**mmdit_kwargs_from_diffusers({**BASE}))  # no qk norm, no dual blocks
    with pytest.raises(ValueError, match=r"unexpected keys.*joint_blocks\.0\.x_block\.attn2\.qkv\.weight"):
        plain.load_sd3_state_dict(sd3)
    with pytest.raises(TypeError, match="SD3Transformer2DModel"):
        from_diffusers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="caption_projection_dim=24"):
        mmdit_kwargs_from_diffusers({**BASE, "caption_projection_dim": 24})
    with pytest.raises(ValueError, match="qk_norm='l2'"):
        mmdit_kwargs_from_diffusers({**BASE, "qk_norm": "l2"})


# ---- training -------------------------------------------------------------------------------------


def test_gradients_reach_every_parameter():
    """Every parameter gets a non-zero gradient except the last block's context q-norm: that block's
    context queries only produce outputs SD3 discards (diffusers' norm_added_q gets a zero gradient)."""
    dm = _random_sd3("sd35")
    ours = from_diffusers(dm).train()
    x, t, context, pooled = _inputs()
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (ours(x, t, context, pooled) * weights).sum().backward()
    dead = {"joint_blocks.2.context_block.attn.q_norm.weight"}
    for name, p in ours.named_parameters():
        if name in dead:
            assert p.grad is None or not p.grad.any(), name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    out = dm.train()(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample
    (out * weights).sum().backward()
    grad = dm.transformer_blocks[2].attn.norm_added_q.weight.grad
    assert grad is None or not grad.any()


def test_torch_compile_fullgraph_matches_eager():
    ours = from_diffusers(_random_sd3("sd35"))
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    x, t, context, pooled = _inputs()
    with torch.no_grad():
        assert _rel_err(compiled(x, t, context, pooled), ours(x, t, context, pooled)) <= 1e-6
        skipped = ours(x, t, context, pooled, skip_layers=[1])
        assert _rel_err(compiled(x, t, context, pooled, skip_layers=[1]), skipped) <= 1e-6


def test_init_is_identity_blocks_zero_output_and_trains():
    torch.manual_seed(0)
    model = MMDiT(sample_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=2, num_heads=2, context_dim=12,
                  pooled_dim=10, pos_embed_max_size=4, qk_norm="rms", dual_attention_layers=(0,))  # fmt: skip
    ref = diffusers.SD3Transformer2DModel(**model.diffusers_config())
    assert torch.equal(model.pos_embed, ref.pos_embed.pos_embed)  # SD3's table, recomputed
    assert torch.equal(sd3_pos_embed(16, 4, 4)[None], model.pos_embed)
    x, t, context, pooled = _inputs()
    assert not model(x, t, context, pooled).any()  # zero output layer
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(25):
        loss = (model(x, t, context, pooled) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_flow_interface_matches_sd3_scheduler():
    model = MMDiT(sample_size=8, hidden_size=16, depth=1, num_heads=2, context_dim=4, pooled_dim=4,
                  pos_embed_max_size=4)  # fmt: skip
    assert model.velocity_sign == 1.0
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(7)
    assert torch.allclose(model.flow_timestep(scheduler.sigmas[:-1]), scheduler.timesteps, rtol=1e-6)


def test_project_dispatch_and_flow_velocity():
    dm = _random_sd3("sd3")
    ours = adaln_models.from_diffusers(dm)
    assert isinstance(ours, MMDiT) and adaln_models.is_system(ours)
    x, _, context, pooled = _inputs()
    sigma = torch.tensor([0.25, 0.75])
    with torch.no_grad():
        v = adaln_models.SystemVelocity(ours)(x, sigma, context=context, pooled=pooled)
    assert _rel_err(v, _theirs(dm, x, 1000 * sigma, context, pooled)) <= 1e-5


# ---- inputs ---------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    ours = from_diffusers(_random_sd3("sd3"))
    x, t, context, pooled = _inputs()
    cases = [
        (dict(context_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "context_mask must be None"),
        (dict(guidance=torch.ones(2)), ValueError, "guidance must be None"),
        (dict(context=None), ValueError, r"context is required: expected shape \(B, L, 12\)"),
        (dict(pooled=None), ValueError, r"pooled is required: expected shape \(B, 10\)"),
        (dict(pooled=torch.randn(2, 9)), ValueError, r"pooled must have shape \(B, 10\) with B = 2, got \(2, 9\)"),
        (dict(context=torch.randn(3, 5, 12)), ValueError, r"context must have shape \(B, L, 12\) with B = 2"),
        (dict(x=torch.randn(2, 3, 8, 8)), ValueError, r"x must have shape \(B, 4, H, W\)"),
        (dict(x=torch.randn(2, 4, 7, 8)), ValueError, "multiples of patch_size 2"),
        (dict(x=torch.randn(2, 4, 14, 8)), ValueError, r"at most pos_embed_max_size=6 patches each \(<= 12\)"),
        (dict(x=x.double()), TypeError, "x has dtype torch.float64"),
        (dict(x=x.long()), TypeError, "x must be a floating-point tensor"),
        (dict(t=torch.ones(3)), ValueError, r"t must have shape \(B,\) = \(2,\)"),
        (dict(t="1"), TypeError, "t must be a real torch.Tensor"),
        (dict(skip_layers=[3]), ValueError, r"skip_layers must hold block indices in \[0, 3\)"),
        (dict(skip_layers=1), TypeError, "skip_layers must be a sequence"),
    ]
    for overrides, error, message in cases:
        kw = {**dict(x=x, t=t, context=context, pooled=pooled), **overrides}
        with pytest.raises(error, match=message):
            ours(kw.pop("x"), kw.pop("t"), **kw)
    with pytest.raises(ValueError, match=r"dual_attention_layers must be block indices in \[0, 2\)"):
        MMDiT(sample_size=8, hidden_size=16, depth=2, num_heads=2, dual_attention_layers=(2,))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MMDiT(sample_size=8, hidden_size=18, depth=2, num_heads=4)
    with pytest.raises(ValueError, match="qk_norm must be one of"):
        MMDiT(sample_size=8, hidden_size=16, depth=2, num_heads=2, qk_norm="rms_norm")
