"""adaln.models.flux against diffusers' FluxTransformer2DModel on random weights, and its converters.

Max relative errors (max |ours - diffusers| / max |diffusers|) are recorded with
``record_property("max_rel_err", ...)``; read them with ``--junitxml=FILE -o junit_family=xunit1``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaln.models.flux import (
    Flux,
    convert_flux_state_dict,
    default_axes_dim,
    flux_kwargs_from_diffusers,
    flux_kwargs_from_flux_state_dict,
    flux_position_ids,
    from_diffusers,
    pack_latents,
    unpack_latents,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline  # noqa: E402

CONFIG = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=24, pooled_projection_dim=20, axes_dims_rope=(4, 6, 6),
)  # fmt: skip
B, C, H, W, L = 2, 4, 8, 8, 5


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter non-zero and random: weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), q/k RMSNorm
    weights ~ 1 + N(0, 0.2^2), so no zero init hides a wrong chunk or a missing branch."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g)
                if isinstance(module, nn.RMSNorm):
                    p.copy_(1 + 0.2 * noise)
                elif name == "weight" and p.dim() >= 2:
                    p.copy_(noise / p[0].numel() ** 0.5)
                else:
                    p.copy_(0.1 * noise)
    return model


def diffusers_flux(guidance: bool, **overrides) -> FluxTransformer2DModel:
    return randomize_(FluxTransformer2DModel(**{**CONFIG, **overrides}, guidance_embeds=guidance)).eval()


def inputs(guidance: bool, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(1)
    out = dict(
        x=torch.randn(B, C, H, W, generator=g, dtype=dtype),
        t=torch.rand(B, generator=g).to(dtype),
        context=torch.randn(B, L, CONFIG["joint_attention_dim"], generator=g, dtype=dtype),
        pooled=torch.randn(B, CONFIG["pooled_projection_dim"], generator=g, dtype=dtype),
    )
    if guidance:
        out["guidance"] = torch.tensor([3.5, 1.25])
    return out


def diffusers_call(model: FluxTransformer2DModel, x, t, context, pooled, guidance=None, context_mask=None):
    """diffusers' transformer called as FluxPipeline calls it: packed latents, latent and text ids."""
    b, c, hh, ww = x.shape
    packed = FluxPipeline._pack_latents(x, b, c, hh, ww)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, hh // 2, ww // 2, x.device, x.dtype)
    txt_ids = torch.zeros(context.shape[1], 3, dtype=x.dtype)
    kwargs = None
    if context_mask is not None:
        keep = torch.cat([context_mask, torch.ones(b, packed.shape[1], dtype=torch.bool)], dim=1)
        kwargs = {"attention_mask": keep[:, None, None]}
    out = model(hidden_states=packed, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, joint_attention_kwargs=kwargs,
                return_dict=False)[0]  # fmt: skip
    return FluxPipeline._unpack_latents(out, hh * 8, ww * 8, vae_scale_factor=8)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------- outputs equal diffusers'


@pytest.mark.parametrize("guidance", [False, True])
def test_matches_diffusers(guidance, record_property):
    theirs = diffusers_flux(guidance)
    ours = from_diffusers(theirs)
    args = inputs(guidance)
    with torch.no_grad():
        expected, out = diffusers_call(theirs, **args), ours(**args)
    assert out.shape == (B, C, H, W) and expected.abs().max() > 0.1
    err = rel_err(out, expected)
    record_property("max_rel_err", err)
    assert err <= 1e-5, err


def test_matches_diffusers_with_context_mask(record_property):
    theirs = diffusers_flux(True)
    ours = from_diffusers(theirs)
    args = inputs(True)
    mask = torch.tensor([[True, True, False, True, False], [True, False, False, False, False]])
    with torch.no_grad():
        expected = diffusers_call(theirs, **args, context_mask=mask)
        out = ours(**args, context_mask=mask)
        unmasked = ours(**args)
    err = rel_err(out, expected)
    record_property("max_rel_err", err)
    assert err <= 1e-5, err
    assert rel_err(unmasked, expected) > 1e-3  # the mask changes the outputs


def test_scalar_t_and_guidance_broadcast():
    ours = from_diffusers(diffusers_flux(True))
    args = inputs(True)
    with torch.no_grad():
        scalar = ours(args["x"], 0.25, args["context"], args["pooled"], guidance=3.5)
        full = torch.full((B,), 0.25), torch.full((B,), 3.5)
        batched = ours(args["x"], full[0], args["context"], args["pooled"], guidance=full[1])
    torch.testing.assert_close(scalar, batched, rtol=0, atol=0)


def test_non_square_latents_match_diffusers():
    theirs = diffusers_flux(False)
    ours = from_diffusers(theirs)
    args = {**inputs(False), "x": torch.randn(B, C, 6, 10)}
    with torch.no_grad():
        assert rel_err(ours(**args), diffusers_call(theirs, **args)) <= 1e-5


def test_packing_and_ids_are_the_pipelines():
    x = torch.randn(B, C, 6, 10)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, B, C, 6, 10), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 3, 5), x, rtol=0, atol=0)
    ids = flux_position_ids(4, 3, 5)
    expected = torch.cat([torch.zeros(4, 3), FluxPipeline._prepare_latent_image_ids(B, 3, 5, "cpu", torch.float32)])
    torch.testing.assert_close(ids.float(), expected, rtol=0, atol=0)
    assert default_axes_dim(128) == (16, 56, 56) and sum(default_axes_dim(16)) == 16


def test_through_the_door_as_a_flow_velocity():
    """adaln.models.from_diffusers dispatches to Flux; SystemVelocity at sigma is diffusers at timestep sigma."""
    from adaln.models import SystemVelocity
    from adaln.models import from_diffusers as door

    theirs = diffusers_flux(True)
    ours = door(theirs)
    assert isinstance(ours, Flux)
    args = inputs(True)
    sigma = args.pop("t")
    with torch.no_grad():
        out = SystemVelocity(ours)(args.pop("x"), sigma, **args)
        expected = diffusers_call(theirs, inputs(True)["x"], sigma, **args)
    assert rel_err(out, expected) <= 1e-5


def test_flow_interface():
    model = Flux(sample_size=8, in_channels=1, hidden_size=32, depth=1, depth_single_blocks=1, num_heads=2,
                 context_dim=8, pooled_dim=8)  # fmt: skip
    sigma = torch.tensor([0.0, 0.3, 1.0])
    torch.testing.assert_close(model.flow_timestep(sigma), sigma)
    assert model.velocity_sign == 1.0


# ----------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("guidance", [False, True])
def test_diffusers_round_trips_exact(guidance):
    theirs = diffusers_flux(guidance)
    ours = from_diffusers(theirs)
    sd = ours.to_diffusers_state_dict()
    assert ours.diffusers_config() == {**flux_config(), "guidance_embeds": guidance}
    fresh = FluxTransformer2DModel(**ours.diffusers_config())
    fresh.load_state_dict(sd, strict=True)
    for k, v in theirs.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    again = Flux(**flux_kwargs_from_diffusers(fresh.config))
    again.load_diffusers_state_dict(fresh.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def flux_config() -> dict:
    return {**CONFIG, "out_channels": CONFIG["in_channels"]}


def test_from_diffusers_keeps_dtype_and_mode():
    theirs = diffusers_flux(False).double().train()
    ours = from_diffusers(theirs)
    assert next(ours.parameters()).dtype == torch.float64 and ours.training


def bfl_state_dict(theirs: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    """The original BFL layout written from diffusers' weights, following black-forest-labs/flux
    modules/layers.py and the inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers."""
    sd = theirs.state_dict()
    out = {
        "img_in.weight": sd["x_embedder.weight"], "img_in.bias": sd["x_embedder.bias"],
        "txt_in.weight": sd["context_embedder.weight"], "txt_in.bias": sd["context_embedder.bias"],
    }  # fmt: skip
    embedders = (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"), ("guidance_in", "guidance_embedder"))
    for bfl, ours in embedders:
        for layer, lin in (("in_layer", "linear_1"), ("out_layer", "linear_2")):
            for p in ("weight", "bias"):
                if f"time_text_embed.{ours}.{lin}.{p}" in sd:
                    out[f"{bfl}.{layer}.{p}"] = sd[f"time_text_embed.{ours}.{lin}.{p}"]
    for i in range(CONFIG["num_layers"]):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for p in ("weight", "bias"):
            out[b + f"img_mod.lin.{p}"] = sd[d + f"norm1.linear.{p}"]
            out[b + f"txt_mod.lin.{p}"] = sd[d + f"norm1_context.linear.{p}"]
            out[b + f"img_attn.qkv.{p}"] = torch.cat([sd[d + f"attn.to_{n}.{p}"] for n in "qkv"])
            out[b + f"txt_attn.qkv.{p}"] = torch.cat([sd[d + f"attn.add_{n}_proj.{p}"] for n in "qkv"])
            out[b + f"img_attn.proj.{p}"] = sd[d + f"attn.to_out.0.{p}"]
            out[b + f"txt_attn.proj.{p}"] = sd[d + f"attn.to_add_out.{p}"]
            out[b + f"img_mlp.0.{p}"] = sd[d + f"ff.net.0.proj.{p}"]
            out[b + f"img_mlp.2.{p}"] = sd[d + f"ff.net.2.{p}"]
            out[b + f"txt_mlp.0.{p}"] = sd[d + f"ff_context.net.0.proj.{p}"]
            out[b + f"txt_mlp.2.{p}"] = sd[d + f"ff_context.net.2.{p}"]
        for stream, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
            out[b + f"{stream}_attn.norm.query_norm.scale"] = sd[d + f"attn.{q}.weight"]
            out[b + f"{stream}_attn.norm.key_norm.scale"] = sd[d + f"attn.{k}.weight"]
    for i in range(CONFIG["num_single_layers"]):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ("weight", "bias"):
            out[b + f"modulation.lin.{p}"] = sd[d + f"norm.linear.{p}"]
            out[b + f"linear1.{p}"] = torch.cat([sd[d + f"attn.to_{n}.{p}"] for n in "qkv"] + [sd[d + f"proj_mlp.{p}"]])
            out[b + f"linear2.{p}"] = sd[d + f"proj_out.{p}"]
        out[b + "norm.query_norm.scale"] = sd[d + "attn.norm_q.weight"]
        out[b + "norm.key_norm.scale"] = sd[d + "attn.norm_k.weight"]
    for p in ("weight", "bias"):
        out[f"final_layer.linear.{p}"] = sd[f"proj_out.{p}"]
        scale, shift = sd[f"norm_out.linear.{p}"].chunk(2)  # diffusers (scale, shift); BFL LastLayer (shift, scale)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    return out


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_layout_gives_diffusers_outputs(prefix, record_property):
    theirs = diffusers_flux(True)
    bfl = {prefix + k: v for k, v in bfl_state_dict(theirs).items()}
    kwargs = flux_kwargs_from_flux_state_dict(bfl)
    ours = Flux(**kwargs).eval()
    ours.load_flux_state_dict(bfl)
    args = inputs(True)
    with torch.no_grad():
        err = rel_err(ours(**args), diffusers_call(theirs, **args))
    record_property("max_rel_err", err)
    assert err <= 1e-5, err
    assert kwargs["num_heads"] == 2 and kwargs["mlp_ratio"] == 4.0 and kwargs["guidance_embeds"]


def test_bfl_round_trips_exact():
    ours = randomize_(Flux(in_channels=4, hidden_size=32, depth=2, depth_single_blocks=2, num_heads=2, context_dim=24,
                           pooled_dim=20, guidance_embeds=True))  # fmt: skip
    sd = ours.to_flux_state_dict()
    back = convert_flux_state_dict(sd)
    assert back.keys() == ours.state_dict().keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(back[k], v), k


def test_bfl_names_and_shapes_equal_diffusers_converter_at_flux_dev_size():
    """At FLUX.1-dev's widths (on the meta device, no memory), diffusers' own converter of the original
    layout turns our BFL export into exactly the keys and shapes of our diffusers export."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        ours = Flux(depth=1, depth_single_blocks=1, guidance_embeds=True)
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(ours.to_flux_state_dict()))
    expected = ours.to_diffusers_state_dict()
    assert converted.keys() == expected.keys()
    assert all(converted[k].shape == expected[k].shape for k in expected)


# ----------------------------------------------------------------------------- training-side properties


def test_gradients_reach_every_parameter():
    ours = randomize_(Flux(in_channels=C, hidden_size=32, depth=2, depth_single_blocks=2, num_heads=2, context_dim=24,
                           pooled_dim=20, guidance_embeds=True, axes_dim=(4, 6, 6)))  # fmt: skip
    mask = torch.tensor([[True, True, False, True, True], [True, False, True, True, True]])
    ours(**inputs(True), context_mask=mask).square().mean().backward()
    dead = [n for n, p in ours.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


@pytest.mark.parametrize("masked", [False, True])
def test_compiles_without_graph_breaks(masked):
    ours = from_diffusers(diffusers_flux(True))
    args = inputs(True)
    if masked:
        args["context_mask"] = torch.tensor([[True, True, False, True, False], [True] * 5])
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**args), ours(**args))


def test_init_predicts_zero_and_trains():
    torch.manual_seed(0)
    model = Flux(sample_size=8, in_channels=1, hidden_size=32, depth=1, depth_single_blocks=1, num_heads=2,
                 context_dim=8, pooled_dim=8)  # fmt: skip
    x, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    ctx, pooled, sigma = torch.randn(4, 3, 8), torch.randn(4, 8), torch.rand(4)
    x_t = (1 - sigma)[:, None, None, None] * x + sigma[:, None, None, None] * noise
    assert torch.equal(model(x_t, model.flow_timestep(sigma), ctx, pooled), torch.zeros_like(x))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = (model(x_t, model.flow_timestep(sigma), ctx, pooled) - (noise - x)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_fp16_clipping_as_diffusers():
    """float16 overflow: diffusers clips the single blocks' output and the double blocks' text stream to
    +-65504 (inf becomes finite); the double blocks' image stream is not clipped (inf stays)."""
    theirs = FluxTransformer2DModel(**{**CONFIG, "num_layers": 1, "num_single_layers": 1})
    randomize_(theirs)
    with torch.no_grad():
        for name in ("transformer_blocks.0.ff.net.2.bias", "transformer_blocks.0.ff_context.net.2.bias",
                     "single_transformer_blocks.0.proj_out.bias"):  # fmt: skip
            theirs.get_parameter(name).fill_(3e3)
        for name in ("transformer_blocks.0.norm1.linear.bias", "transformer_blocks.0.norm1_context.linear.bias",
                     "single_transformer_blocks.0.norm.linear.bias"):  # fmt: skip
            theirs.get_parameter(name).fill_(1e2)  # every gate (and shift, scale) ~ 100: residuals ~ 3e5
    theirs = theirs.half().eval()
    ours = from_diffusers(theirs)
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(1, 16, 32, generator=g).half(), torch.randn(1, 5, 32, generator=g).half()
    c = torch.randn(1, 32, generator=g).half()
    ids = flux_position_ids(5, 4, 4)
    rotary = theirs.pos_embed(ids.float())
    freqs = ours.rope(ids)
    with torch.no_grad():
        t_txt, t_img = theirs.transformer_blocks[0](img, txt, c, rotary)
        o_img, o_txt = ours.double_blocks[0](img, txt, c, freqs)
        t_single = torch.cat(theirs.single_transformer_blocks[0](img, txt, c, rotary), dim=1)
        o_single = ours.single_blocks[0](torch.cat([txt, img], dim=1), c, freqs)
    assert t_img.isinf().any() and torch.equal(o_img.isinf(), t_img.isinf())
    for theirs_out, ours_out in ((t_txt, o_txt), (t_single, o_single)):
        assert theirs_out.isfinite().all() and ours_out.isfinite().all()
        assert torch.equal(ours_out.abs() == 65504, theirs_out.abs() == 65504)
        assert (ours_out.abs() == 65504).any()


# ----------------------------------------------------------------------------- bad inputs


def small_model(guidance: bool = False) -> Flux:
    return Flux(sample_size=8, in_channels=C, hidden_size=32, depth=1, depth_single_blocks=1, num_heads=2,
                context_dim=24, pooled_dim=20, guidance_embeds=guidance)  # fmt: skip


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(x=torch.randn(B, C + 1, H, W)), ValueError, r"x must have shape \(B, 4, H, W\)"),
        (dict(x=torch.randn(B, C, 6, 6)), ValueError, r"x must have shape \(B, 4, 8, 8\)"),
        (dict(t=torch.rand(B + 1)), ValueError, r"t must have shape \(B,\)"),
        (dict(t="0.5"), TypeError, "t must be a real"),
        (dict(context=None), ValueError, "context is required"),
        (dict(pooled=None), ValueError, "pooled is required"),
        (dict(context=torch.randn(B, L, 7)), ValueError, r"context must have shape \(B, L, 24\)"),
        (dict(pooled=torch.randn(B + 1, 20)), ValueError, r"pooled must have shape \(B, 20\)"),
        (dict(context_mask=torch.ones(B, L)), TypeError, "context_mask must be a bool"),
        (dict(context_mask=torch.ones(B, L + 1, dtype=torch.bool)), ValueError, r"context_mask must have shape"),
        (dict(guidance=torch.ones(B)), ValueError, "guidance must be None"),
        (dict(x=torch.randn(B, C, H, W, dtype=torch.float64)), TypeError, "dtype"),
    ],
)
def test_bad_inputs(change, error, match):
    args = {**inputs(False), **change}
    with pytest.raises(error, match=match):
        small_model()(**args)


def test_guidance_model_requires_guidance():
    with pytest.raises(ValueError, match="guidance is required"):
        small_model(True)(**inputs(False))
    with pytest.raises(ValueError, match=r"guidance must have shape \(B,\)"):
        small_model(True)(**{**inputs(False), "guidance": torch.ones(B, 1)})


def test_odd_latents_rejected_without_sample_size():
    model = Flux(in_channels=C, hidden_size=32, depth=1, depth_single_blocks=1, num_heads=2, context_dim=24,
                 pooled_dim=20)  # fmt: skip
    with pytest.raises(ValueError, match="multiples of patch_size 2"):
        model(**{**inputs(False), "x": torch.randn(B, C, 7, 8)})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(hidden_size=30, num_heads=4), "divisible"),
        (dict(axes_dim=(4, 4, 4)), "axes_dim"),
        (dict(depth=-1), "depth"),
        (dict(sample_size=7), "sample_size"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    base = dict(in_channels=C, hidden_size=32, depth=1, depth_single_blocks=1, num_heads=2, context_dim=24,
                pooled_dim=20)  # fmt: skip
    with pytest.raises(ValueError, match=match):
        Flux(**{**base, **kwargs})


def test_conversion_errors_name_the_key():
    theirs = diffusers_flux(False)
    ours = from_diffusers(theirs)
    sd = theirs.state_dict()
    missing = {k: v for k, v in sd.items() if k != "transformer_blocks.1.attn.norm_added_k.weight"}
    with pytest.raises(ValueError, match=r"missing keys \(1\).*transformer_blocks\.1\.attn\.norm_added_k\.weight"):
        ours.load_diffusers_state_dict(missing)
    wrong = {**sd, "single_transformer_blocks.0.proj_mlp.weight": torch.zeros(3, 32)}
    with pytest.raises(ValueError, match=r"single_transformer_blocks\.0\.proj_mlp\.weight: got \(3, 32\)"):
        ours.load_diffusers_state_dict(wrong)
    with pytest.raises(ValueError, match=r"unexpected keys.*extra\.weight"):
        ours.load_diffusers_state_dict({**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"guidance_in\.in_layer\.weight"):
        ours.load_flux_state_dict({**ours.to_flux_state_dict(), "guidance_in.in_layer.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys \['lora\.weight'\]"):
        convert_flux_state_dict({**ours.to_flux_state_dict(), "lora.weight": torch.zeros(1)})
    with pytest.raises(TypeError, match="FluxTransformer2DModel"):
        from_diffusers(nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("config", "match"), [(dict(patch_size=2), "patch_size"), (dict(in_channels=18), "in_channels=18")]
)
def test_unsupported_diffusers_configs(config, match):
    with pytest.raises(ValueError, match=match):
        flux_kwargs_from_diffusers({**CONFIG, **config})
