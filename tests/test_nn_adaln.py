"""adaln.nn.adaln against float64 references of the source formulas (numpy, written independently).

Max abs errors are recorded with ``record_property("max_abs_err", ...)``; read them with
``--junitxml=FILE -o junit_family=xunit1``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adaln.nn.adaln import (
    AdaLN,
    AdaLNContinuous,
    AdaLNSingle,
    AdaLNSingleTable,
    AdaLNZero,
    AdaptiveZeroInit,
    AF3AdaptiveLayerNorm,
    adaln_continuous_from_diffusers,
    adaln_continuous_to_diffusers,
)

SPATIAL = [(), (5,), (3, 4), (2, 3, 2)]


# ----------------------------------------------------------------------------- references (numpy f64)


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def ref_layer_norm(x, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps)


def ref_rms_norm(x, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps)


def ref_norm(x, norm, eps):
    return ref_layer_norm(x, eps) if norm == "layer" else ref_rms_norm(x, eps)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def silu(z):
    return z * sigmoid(z)


def linear(h, w, b=None):
    out = h @ w.T
    return out if b is None else out + b


def bcast(c, x):
    """A global (B, C) array viewed over x's token axes."""
    return c.reshape(c.shape[0], *([1] * (x.ndim - 2)), c.shape[-1]) if c.ndim == 2 else c


def act(g, kind):
    return {"linear": g, "tanh": np.tanh(g), "sigmoid": sigmoid(g)}[kind]


def randomize_(module: torch.nn.Module, std: float = 0.5) -> torch.nn.Module:
    """Re-draw every parameter (zero-initialised ones would hide errors)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * std)
    return module


def make_inputs(spatial, dim, cond_dim, per_token, dtype=torch.float64, batch=2):
    x = torch.randn(batch, *spatial, dim, dtype=dtype) * 2 + 0.5
    cshape = (batch, *spatial, cond_dim) if per_token else (batch, cond_dim)
    return x, torch.randn(cshape, dtype=dtype)


def max_err(a, b) -> float:
    return float(np.max(np.abs(np64(a) - b))) if b.size else 0.0


# ----------------------------------------------------------------------------- AdaLN


@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("shift", [True, False])
def test_adaln_matches_float64_reference(spatial, per_token, norm, shift, record_property):
    dim, cond_dim = 8, 6
    m = randomize_(AdaLN(dim, cond_dim, norm=norm, shift=shift).double())
    x, c = make_inputs(spatial, dim, cond_dim, per_token)
    out = m(x, c)

    w, b = np64(m.proj[1].weight), np64(m.proj[1].bias)
    mod = bcast(linear(silu(np64(c)), w, b), np64(x))
    shift_, scale = (mod[..., :dim], mod[..., dim:]) if shift else (0.0, mod)
    ref = ref_norm(np64(x), norm, 1e-6) * (1 + scale) + shift_
    err = max_err(out, ref)
    record_property("max_abs_err", err)
    assert out.dtype == torch.float64 and out.shape == x.shape
    assert err < 1e-12


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("shift", [True, False])
def test_adaln_at_init_is_plain_norm(norm, shift):
    m = AdaLN(16, 4, norm=norm, shift=shift)
    assert not m.proj[1].weight.any() and not m.proj[1].bias.any()
    x, c = make_inputs((7,), 16, 4, False, dtype=torch.float32)
    plain = ref_norm(np64(x), norm, 1e-6)
    assert max_err(m(x, c), plain) < 1e-5


def test_adaln_modulation_chunk_order_is_shift_then_scale():
    m = AdaLN(4, 3)
    with torch.no_grad():
        m.proj[1].bias.copy_(torch.arange(8.0))
    shift, scale = m.modulation(torch.zeros(2, 3))
    assert torch.equal(shift[0], torch.arange(4.0)) and torch.equal(scale[0], torch.arange(4.0, 8.0))
    assert AdaLN(4, 3, shift=False).modulation(torch.zeros(2, 3))[0] is None


# ----------------------------------------------------------------------------- AdaLNZero


@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize(
    "branches,norm,shift,gate",
    [
        (2, "layer", True, "linear"),
        (2, "rms", False, "tanh"),
        (1, "layer", True, "sigmoid"),
        (3, "rms", True, "tanh"),
    ],
)
def test_adaln_zero_matches_float64_reference(
    spatial, per_token, branches, norm, shift, gate, record_property
):
    dim, cond_dim = 8, 5
    m = randomize_(AdaLNZero(dim, cond_dim, branches=branches, norm=norm, shift=shift, gate=gate).double())
    x, c = make_inputs(spatial, dim, cond_dim, per_token)
    y = torch.randn_like(x)
    mods = m(c)

    k = 3 if shift else 2
    full = linear(silu(np64(c)), np64(m.proj[1].weight), np64(m.proj[1].bias))
    errs = []
    assert len(mods) == branches
    for i, (sh, sc, g) in enumerate(mods):
        part = full[..., i * k * dim : (i + 1) * k * dim]
        ref_sh = part[..., :dim] if shift else None
        ref_sc, ref_g = part[..., (k - 2) * dim : (k - 1) * dim], part[..., (k - 1) * dim :]
        assert (sh is None) == (not shift)
        assert sc.shape == c.shape[:-1] + (dim,)
        errs += [max_err(sc, ref_sc), max_err(g, ref_g)] + ([max_err(sh, ref_sh)] if shift else [])

        xb = np64(x)
        ref_apply = ref_norm(xb, norm, 1e-6) * (1 + bcast(ref_sc, xb)) + (bcast(ref_sh, xb) if shift else 0.0)
        errs.append(max_err(m.modulate(x, sh, sc), ref_apply))
        ref_res = xb + act(bcast(ref_g, xb), gate) * np64(y)
        errs.append(max_err(m.residual(x, y, g), ref_res))
    record_property("max_abs_err", max(errs))
    assert max(errs) < 1e-12


def test_adaln_zero_attributes_and_init_gates_zero():
    m = AdaLNZero(8, 4, branches=2, norm="rms", shift=False, gate="tanh", eps=1e-5)
    assert (m.dim, m.norm, m.eps, m.gate, m.shift, m.branches) == (8, "rms", 1e-5, "tanh", False, 2)
    assert m.proj[1].weight.shape == (2 * 2 * 8, 4)
    x, c = make_inputs((3, 3), 8, 4, False, dtype=torch.float32)
    y = torch.randn_like(x)
    for shift, scale, gate in m(c):
        assert shift is None and not scale.any() and not gate.any()
        assert torch.equal(m.residual(x, y, gate), x)  # adaLN-Zero: the block is the identity at init


def test_adaln_zero_leaves_module_apply_alone():
    parent = torch.nn.Sequential(AdaLNZero(8, 4), torch.nn.Linear(8, 8))
    seen = []
    assert parent.apply(lambda mod: seen.append(type(mod).__name__)) is parent
    assert seen.count("Linear") == 2 and "AdaLNZero" in seen


def test_adaln_zero_without_activation_is_a_bare_linear(record_property):
    m = randomize_(AdaLNZero(8, 5, norm="rms", shift=False, gate="tanh", activation=None).double())
    assert isinstance(m.proj[0], torch.nn.Identity)
    assert set(m.state_dict()) == {"proj.1.weight", "proj.1.bias"}
    c = torch.randn(3, 5, dtype=torch.float64)
    full = linear(np64(c), np64(m.proj[1].weight), np64(m.proj[1].bias))  # no SiLU
    got = np.concatenate([np64(t) for _, sc, g in m(c) for t in (sc, g)], axis=-1)
    err = float(np.abs(got - full).max())
    record_property("max_abs_err", err)
    assert err < 1e-12


def test_adaln_zero_modulate_applies_the_norm_weight(record_property):
    m = randomize_(AdaLNZero(8, 5, norm="rms", shift=False, eps=1e-5).double())
    x, c = make_inputs((4,), 8, 5, per_token=False)
    w = torch.randn(8, dtype=torch.float64)
    (_, sc, _), _ = m(c)
    ref = ref_rms_norm(np64(x), 1e-5) * np64(w) * (1 + bcast(np64(sc), np64(x)))
    err = max_err(m.modulate(x, None, sc, weight=w), ref)
    record_property("max_abs_err", err)
    assert err < 1e-12
    ones = torch.ones(8, dtype=torch.float64)
    assert torch.equal(m.modulate(x, None, sc, weight=ones), m.modulate(x, None, sc))


# ----------------------------------------------------------------------------- Z-Image, Lumina 2 (diffusers)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def randomize_weights_(module: torch.nn.Module, std: float) -> torch.nn.Module:
    """Random Linear weights of scale ``std``, norm weights ``1 + N(0, 0.5^2)`` (never all ones)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm = "norm" in name
            p.copy_(1 + 0.5 * torch.randn_like(p) if is_norm else std * torch.randn_like(p))
    return module


def test_z_image_block_modulation_path_matches_diffusers(record_property):
    """A diffusers ``ZImageTransformerBlock`` with its modulation, pre-norms and gates done by ours.

    The attention and feed-forward are diffusers' own modules (not under test); everything between them
    is ``AdaLNZero(activation=None)`` with the weighted RMSNorms passed to ``modulate``. fp32: diffusers'
    RMSNorm computes its statistics in fp32 whatever the input dtype.
    """
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    torch.manual_seed(0)
    dim, eps = 320, 1e-5  # dim > 256: the projection input min(dim, 256) differs from dim
    theirs = ZImageTransformerBlock(0, dim, n_heads=4, n_kv_heads=4, norm_eps=eps, qk_norm=True).eval()
    randomize_weights_(theirs, std=0.05)
    cond_dim = theirs.adaLN_modulation[0].in_features
    assert cond_dim == 256

    def ours_block(ada: AdaLNZero, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        post = [torch.nn.RMSNorm(dim, eps=eps) for _ in range(2)]
        for norm, src in zip(post, (theirs.attention_norm2, theirs.ffn_norm2)):
            norm.weight.data.copy_(src.weight)
        (_, s_attn, g_attn), (_, s_ffn, g_ffn) = ada(t)
        h = ada.modulate(x, None, s_attn, weight=theirs.attention_norm1.weight)
        x = ada.residual(x, post[0](theirs.attention(h, attention_mask=None, freqs_cis=None)), g_attn)
        h = ada.modulate(x, None, s_ffn, weight=theirs.ffn_norm1.weight)
        return ada.residual(x, post[1](theirs.feed_forward(h)), g_ffn)

    x, t = torch.randn(2, 7, dim), torch.randn(2, cond_dim)
    errs = {}
    for activation in (None, "silu"):
        ada = AdaLNZero(dim, cond_dim, norm="rms", shift=False, gate="tanh", eps=eps, activation=activation)
        ada.load_state_dict({"proj.1.weight": theirs.adaLN_modulation[0].weight,
                             "proj.1.bias": theirs.adaLN_modulation[0].bias})  # fmt: skip
        with torch.no_grad():
            errs[activation] = rel_err(ours_block(ada, x, t), theirs(x, None, None, adaln_input=t))
    record_property("max_rel_err", errs[None])
    assert errs[None] <= 1e-5
    assert errs["silu"] > 0.05  # the SiLU that Z-Image does not have is far off: the test can tell


def test_lumina2_norms_with_weights_match_diffusers(record_property):
    """diffusers ``LuminaRMSNormZero`` (``norm1``) and ``ffn_norm1 * (1 + scale_mlp)``, non-unit weights."""
    from diffusers.models.normalization import LuminaRMSNormZero, RMSNorm

    torch.manual_seed(0)
    dim, eps = 1040, 1e-5  # dim > 1024: the projection input min(dim, 1024) differs from dim
    norm1 = randomize_weights_(LuminaRMSNormZero(dim, norm_eps=eps, norm_elementwise_affine=True), std=0.03)
    ffn_norm1 = randomize_weights_(RMSNorm(dim, eps=eps), std=0.0)
    cond_dim = norm1.linear.in_features
    assert cond_dim == 1024
    ada = AdaLNZero(dim, cond_dim, norm="rms", shift=False, gate="tanh", eps=eps)
    ada.load_state_dict({"proj.1.weight": norm1.linear.weight, "proj.1.bias": norm1.linear.bias})

    x, h, emb = torch.randn(2, 6, dim), torch.randn(2, 6, dim), torch.randn(2, cond_dim)
    with torch.no_grad():
        ref_x, ref_gate_msa, ref_scale_mlp, ref_gate_mlp = norm1(x, emb)
        ref_h = ffn_norm1(h) * (1 + ref_scale_mlp[:, None])
        (_, scale_msa, gate_msa), (_, scale_mlp, gate_mlp) = ada(emb)
        got_x = ada.modulate(x, None, scale_msa, weight=norm1.norm.weight)
        got_h = ada.modulate(h, None, scale_mlp, weight=ffn_norm1.weight)
        unweighted = ada.modulate(x, None, scale_msa)
    errs = [rel_err(got_x, ref_x), rel_err(got_h, ref_h)]
    pairs = ((gate_msa, ref_gate_msa), (scale_mlp, ref_scale_mlp), (gate_mlp, ref_gate_mlp))
    errs += [rel_err(a, b) for a, b in pairs]
    record_property("max_rel_err", max(errs))
    assert max(errs) <= 1e-5
    assert rel_err(unweighted, ref_x) > 0.05  # without the norm weight it is far off


# ----------------------------------------------------------------------------- AdaLNSingle (PixArt)


def test_adaln_single_and_table_match_pixart_formula(record_property):
    dim, batch = 6, 3
    single = randomize_(AdaLNSingle(dim).double())
    tables = [randomize_(AdaLNSingleTable(dim).double()) for _ in range(2)]
    t_emb = torch.randn(batch, dim, dtype=torch.float64)
    t_mod = single(t_emb)

    ref_mod = linear(silu(np64(t_emb)), np64(single.t_block[1].weight), np64(single.t_block[1].bias))
    errs = [max_err(t_mod, ref_mod)]
    for table in tables:
        params = table(t_mod)
        # PixArtBlock: (scale_shift_table[None] + t.reshape(B, 6, -1)).chunk(6, dim=1), DiT order
        ref = np64(table.scale_shift_table)[None] + ref_mod.reshape(batch, 6, dim)
        assert len(params) == 6
        errs += [max_err(p, ref[:, i]) for i, p in enumerate(params)]
    record_property("max_abs_err", max(errs))
    assert max(errs) < 1e-12


def test_adaln_single_init_and_keys():
    torch.manual_seed(1)
    dim = 256
    single, table = AdaLNSingle(dim), AdaLNSingleTable(dim)
    assert set(single.state_dict()) == {"t_block.1.weight", "t_block.1.bias"}
    assert set(table.state_dict()) == {"scale_shift_table"}
    assert abs(single.t_block[1].weight.std().item() - 0.02) < 0.001 and not single.t_block[1].bias.any()
    assert abs(table.scale_shift_table.std().item() - dim**-0.5) < 0.1 * dim**-0.5


# ----------------------------------------------------------------------------- AdaLNContinuous (SD3/Flux)


@pytest.mark.parametrize("norm_type", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("affine", [False, True])
def test_adaln_continuous_matches_diffusers(norm_type, affine, record_property):
    from diffusers.models.normalization import AdaLayerNormContinuous

    dim, cond_dim = 16, 12
    theirs = AdaLayerNormContinuous(dim, cond_dim, elementwise_affine=affine, eps=1e-6, norm_type=norm_type)
    randomize_(theirs, std=0.3)
    sd = {k: v.clone() for k, v in theirs.state_dict().items()}
    ours = AdaLNContinuous.from_diffusers_state_dict(sd, norm=norm_type.split("_")[0], eps=1e-6)
    # diffusers (scale, shift) halves -> our (shift, scale)
    assert torch.equal(ours.proj[1].weight[:dim], sd["linear.weight"][dim:])

    x, c = torch.randn(3, 7, dim), torch.randn(3, cond_dim)
    with torch.no_grad():
        err = (ours(x, c) - theirs(x, c)).abs().max().item()
    record_property("max_abs_err", err)
    assert err <= 1e-6
    back = ours.to_diffusers_state_dict()
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_adaln_continuous_float64_reference(spatial, norm, record_property):
    dim, cond_dim = 8, 4
    m = randomize_(AdaLNContinuous(dim, cond_dim, norm=norm, elementwise_affine=True).double())
    x, c = make_inputs(spatial, dim, cond_dim, per_token=False)
    mod = bcast(linear(silu(np64(c)), np64(m.proj[1].weight), np64(m.proj[1].bias)), np64(x))
    normed = ref_norm(np64(x), norm, 1e-6) * np64(m.norm_weight)
    if norm == "layer":
        normed = normed + np64(m.norm_bias)
    ref = normed * (1 + mod[..., dim:]) + mod[..., :dim]
    err = max_err(m(x, c), ref)
    record_property("max_abs_err", err)
    assert err < 1e-12


@pytest.mark.parametrize("norm_type", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("affine", [False, True])
def test_adaln_continuous_without_bias_matches_diffusers(norm_type, affine, record_property):
    from diffusers.models.normalization import AdaLayerNormContinuous

    dim, cond_dim = 16, 12
    theirs = AdaLayerNormContinuous(
        dim, cond_dim, elementwise_affine=affine, eps=1e-6, bias=False, norm_type=norm_type
    )
    randomize_(theirs, std=0.3)
    sd = theirs.state_dict()
    assert "linear.bias" not in sd and "norm.bias" not in sd
    ours = AdaLNContinuous.from_diffusers_state_dict(sd, norm=norm_type.split("_")[0], eps=1e-6)
    assert ours.proj[1].bias is None and ours.norm_bias is None
    x, c = torch.randn(3, 7, dim), torch.randn(3, cond_dim)
    with torch.no_grad():
        err = (ours(x, c) - theirs(x, c)).abs().max().item()
    record_property("max_abs_err", err)
    assert err <= 1e-6
    back = ours.to_diffusers_state_dict()
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("bias", [True, False])
def test_adaln_continuous_from_float64_state_dict_stays_float64(bias, record_property):
    """diffusers' LayerNorm variant runs wholly in float64, so ours must match it to float64 rounding."""
    from diffusers.models.normalization import AdaLayerNormContinuous

    dim, cond_dim = 16, 12
    theirs = randomize_(AdaLayerNormContinuous(dim, cond_dim, eps=1e-6, bias=bias).double(), std=0.3)
    sd = theirs.state_dict()
    ours = AdaLNContinuous.from_diffusers_state_dict(sd, eps=1e-6)
    assert all(p.dtype == torch.float64 for p in ours.parameters())
    assert torch.equal(ours.proj[1].weight[:dim], sd["linear.weight"][dim:])  # exact, not rounded
    x, c = torch.randn(3, 7, dim, dtype=torch.float64), torch.randn(3, cond_dim, dtype=torch.float64)
    with torch.no_grad():
        err = (ours(x, c) - theirs(x, c)).abs().max().item()
    record_property("max_abs_err", err)
    assert err <= 1e-13


def test_adaln_continuous_conversion_functions_swap_halves():
    sd = {"linear.weight": torch.randn(8, 3), "linear.bias": torch.randn(8)}
    ours = adaln_continuous_from_diffusers(sd)
    assert torch.equal(ours["proj.1.bias"], torch.cat([sd["linear.bias"][4:], sd["linear.bias"][:4]]))
    back = adaln_continuous_to_diffusers(ours)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match="unexpected keys"):
        adaln_continuous_from_diffusers({**sd, "extra": torch.zeros(1)})
    assert not AdaLNContinuous(4, 3).proj[1].weight.any()  # our default init is adaln_zero


# ----------------------------------------------------------------------------- AlphaFold3


@pytest.mark.parametrize("lead", [(), (2,), (2, 3)])
def test_af3_adaptive_layernorm_matches_float64_reference(lead, record_property):
    dim, cond_dim, n = 8, 6, 5
    m = randomize_(AF3AdaptiveLayerNorm(dim, cond_dim).double())
    x = torch.randn(*lead, n, dim, dtype=torch.float64) * 3
    c = torch.randn(*lead, n, cond_dim, dtype=torch.float64) + 1
    cn = ref_layer_norm(np64(c), 1e-5) * np64(m.single_cond_layer_norm.weight)
    scale = sigmoid(linear(cn, np64(m.single_cond_scale.weight), np64(m.single_cond_scale.bias)))
    ref = scale * ref_layer_norm(np64(x), 1e-5) + linear(cn, np64(m.single_cond_bias.weight))
    err = max_err(m(x, c), ref)

    plain = randomize_(AF3AdaptiveLayerNorm(dim, None).double())
    ref_plain = ref_layer_norm(np64(x), 1e-5) * np64(plain.layer_norm.weight) + np64(plain.layer_norm.bias)
    err = max(err, max_err(plain(x), ref_plain))
    record_property("max_abs_err", err)
    assert err < 1e-12


def test_af3_adaptive_layernorm_init_and_names():
    m = AF3AdaptiveLayerNorm(16, 8)
    assert set(m.state_dict()) == {
        "single_cond_layer_norm.weight",
        "single_cond_scale.weight",
        "single_cond_scale.bias",
        "single_cond_bias.weight",
    }
    assert set(AF3AdaptiveLayerNorm(16, None).state_dict()) == {"layer_norm.weight", "layer_norm.bias"}
    x, c = torch.randn(4, 10, 16), torch.randn(4, 10, 8)
    assert max_err(m(x, c), 0.5 * ref_layer_norm(np64(x), 1e-5)) < 1e-5


@pytest.mark.parametrize("lead", [(), (2,), (2, 3)])
def test_adaptive_zero_init_matches_float64_reference(lead, record_property):
    in_dim, out_dim, cond_dim, n = 10, 8, 6, 4
    m = randomize_(AdaptiveZeroInit(in_dim, out_dim, cond_dim).double())
    x = torch.randn(*lead, n, in_dim, dtype=torch.float64)
    c = torch.randn(*lead, n, cond_dim, dtype=torch.float64)
    gate = sigmoid(linear(np64(c), np64(m.adaptive_zero_cond.weight), np64(m.adaptive_zero_cond.bias)))
    ref = gate * linear(np64(x), np64(m.transition2.weight))
    err = max_err(m(x, c), ref)

    plain = randomize_(AdaptiveZeroInit(in_dim, out_dim, None).double())
    err = max(err, max_err(plain(x), linear(np64(x), np64(plain.transition2.weight))))
    record_property("max_abs_err", err)
    assert err < 1e-12


def test_adaptive_zero_init_at_init():
    torch.manual_seed(3)
    m = AdaptiveZeroInit(256, 256, 16)
    x, c = torch.randn(2, 5, 256), torch.randn(2, 5, 16)
    expected = 0.11920292202211755 * linear(np64(x), np64(m.transition2.weight))  # sigmoid(-2)
    assert max_err(m(x, c), expected) < 1e-5
    assert torch.equal(m.adaptive_zero_cond.bias, torch.full((256,), -2.0))
    assert m.transition2.bias is None and not m.adaptive_zero_cond.weight.any()
    # AF3 'linear' init: truncated normal (+-2 sigma) rescaled to std 1/sqrt(fan_in)
    w = m.transition2.weight
    assert abs(w.std().item() * math.sqrt(256) - 1) < 0.03
    assert w.abs().max().item() <= 2 / 0.87962566103423978 / 16 + 1e-6
    plain = AdaptiveZeroInit(256, 8, None)
    assert not plain.transition2.weight.any() and not plain(x).any()


# ----------------------------------------------------------------------------- properties


def _all_modules():
    return {
        "AdaLN": randomize_(AdaLN(8, 4)),
        "AdaLNContinuous": randomize_(AdaLNContinuous(8, 4, elementwise_affine=True)),
        "AF3AdaptiveLayerNorm": randomize_(AF3AdaptiveLayerNorm(8, 4)),
        "AdaptiveZeroInit": randomize_(AdaptiveZeroInit(8, 8, 4)),
    }


@pytest.mark.parametrize("name", ["AdaLN", "AdaLNContinuous", "AF3AdaptiveLayerNorm", "AdaptiveZeroInit"])
@pytest.mark.parametrize("spatial", [(5,), (3, 4)])
def test_pooled_and_per_token_condition_agree(name, spatial):
    m = _all_modules()[name]
    x, c = make_inputs(spatial, 8, 4, False, dtype=torch.float32)
    c_tok = c.view(2, *([1] * len(spatial)), 4).expand(2, *spatial, 4)
    torch.testing.assert_close(m(x, c), m(x, c_tok), rtol=0, atol=1e-6)


def test_adaln_zero_pooled_and_per_token_agree():
    m = randomize_(AdaLNZero(8, 4, gate="tanh"))
    x, c = make_inputs((3, 4), 8, 4, False, dtype=torch.float32)
    c_tok = c[:, None, None].expand(2, 3, 4, 4)
    y = torch.randn_like(x)
    for (sh, sc, g), (sh_t, sc_t, g_t) in zip(m(c), m(c_tok)):
        torch.testing.assert_close(m.modulate(x, sh, sc), m.modulate(x, sh_t, sc_t), rtol=0, atol=1e-6)
        torch.testing.assert_close(m.residual(x, y, g), m.residual(x, y, g_t), rtol=0, atol=1e-6)


# Every op runs in fp32 from the (rounded) half inputs and only the output is rounded back, so the
# half result must be within half an ulp of the fp32 result: |err| <= 2^-8 |y| (bf16), 2^-11 (fp16).
HALF_RTOL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_finite_and_within_half_ulp_of_fp32(dtype):
    x, c = make_inputs((6,), 8, 4, True, dtype=dtype)
    y = torch.randn_like(x)
    zero = randomize_(AdaLNZero(8, 4, gate="tanh"))
    # AdaptiveZeroInit is left out: its main Linear runs in the module's dtype, not the policy's
    modules = {name: m for name, m in _all_modules().items() if name != "AdaptiveZeroInit"}
    outs = {name: (m(x, c), m(x.float(), c.float())) for name, m in modules.items()}
    sh, sc, g = zero(c)[0]
    sh32, sc32, g32 = zero(c.float())[0]
    assert sc.dtype == torch.float32  # modulation stays fp32 so 1 + scale is not rounded
    outs["AdaLNZero.modulate"] = (zero.modulate(x, sh, sc), zero.modulate(x.float(), sh32, sc32))
    outs["AdaLNZero.residual"] = (zero.residual(x, y, g), zero.residual(x.float(), y.float(), g32))
    for name, (half, full) in outs.items():
        assert half.dtype == dtype and torch.isfinite(half).all(), name
        err = (half.float() - full).abs()
        assert (err <= HALF_RTOL[dtype] * full.abs() + 1e-7).all(), (name, err.max().item())


def test_nan_in_one_sample_condition_stays_in_that_sample():
    x, c = make_inputs((5,), 8, 4, False, dtype=torch.float32)
    c[0, 1] = float("nan")
    results = {name: m(x, c) for name, m in _all_modules().items()}
    zero = randomize_(AdaLNZero(8, 4))
    sh, sc, g = zero(c)[0]
    results["AdaLNZero"] = zero.residual(x, zero.modulate(x, sh, sc), g)
    for name, out in results.items():
        assert torch.isfinite(out[1:]).all(), name
        assert torch.isnan(out[0]).any(), name


def test_compile_fullgraph_adaln_and_adaln_zero():
    torch._dynamo.reset()
    x, c = make_inputs((4, 3), 8, 4, False, dtype=torch.float32)
    y = torch.randn_like(x)
    adaln = randomize_(AdaLN(8, 4))
    zero = randomize_(AdaLNZero(8, 4, gate="tanh"))

    def block(x, y, c):
        (sh1, sc1, g1), (sh2, sc2, g2) = zero(c)
        h = zero.residual(x, zero.modulate(x, sh1, sc1) * y, g1)
        return zero.residual(h, zero.modulate(h, sh2, sc2), g2)

    compiled_adaln = torch.compile(adaln, fullgraph=True, backend="aot_eager")
    compiled_block = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled_adaln(x, c), adaln(x, c), rtol=0, atol=1e-6)
    torch.testing.assert_close(compiled_block(x, y, c), block(x, y, c), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- bad inputs


X = torch.randn(2, 5, 8)
C = torch.randn(2, 4)


def _adaln(x, c):
    return AdaLN(8, 4)(x, c)


def _zero():
    return AdaLNZero(8, 4)


def _af3(cond_dim):
    return AF3AdaptiveLayerNorm(8, cond_dim)


def _azi(in_dim, cond_dim):
    return AdaptiveZeroInit(in_dim, 8, cond_dim)


BAD_INPUTS = [
    ("adaln cond None", lambda: _adaln(X, None), ValueError, "cond is required"),
    (
        "adaln cond batch",
        lambda: _adaln(X, torch.randn(3, 4)),
        ValueError,
        r"cond must be global \(B, cond_dim\) = \(2, 4\)",
    ),
    ("adaln cond_dim", lambda: _adaln(X, torch.randn(2, 3)), ValueError, "last dim cond_dim=4"),
    ("adaln x 1-D", lambda: _adaln(torch.randn(8), C), ValueError, "x must have at least 2 dims"),
    ("adaln x dim", lambda: _adaln(X[..., :7], C), ValueError, r"x must have shape \(B, \*spatial, 8"),
    ("adaln per-token", lambda: _adaln(X, torch.randn(2, 6, 4)), ValueError, r"per-token \(2, 5, 4\)"),
    ("adaln int x", lambda: _adaln(X.long(), C), TypeError, "x must be a floating-point tensor"),
    ("adaln int cond", lambda: _adaln(X, C.long()), TypeError, "cond must be a floating-point tensor"),
    ("adaln bad norm", lambda: AdaLN(8, 4, norm="group"), ValueError, "norm must be one of"),
    ("zero cond None", lambda: _zero()(None), ValueError, "cond is required"),
    ("zero cond_dim", lambda: _zero()(torch.randn(2, 5)), ValueError, "cond_dim=4"),
    ("zero cond 1-D", lambda: _zero()(torch.randn(4)), ValueError, "cond must have at least 2 dims"),
    ("zero modulate x", lambda: _zero().modulate(torch.randn(2, 5, 6), None, C), ValueError, "x must have shape"),
    ("zero modulate scale", lambda: _zero().modulate(X, None, C[:1]), ValueError, "scale must be global"),
    ("zero residual y", lambda: _zero().residual(X, X[:, :4], X[:, 0]), ValueError, "y must have x's shape"),
    ("zero residual gate", lambda: _zero().residual(X, X, C), ValueError, "gate must be global"),
    ("zero bad gate", lambda: AdaLNZero(8, 4, gate="relu"), ValueError, "gate must be one of"),
    (
        "zero bad activation",
        lambda: AdaLNZero(8, 4, activation="gelu"),
        ValueError,
        r"activation must be one of \('silu', None\), got 'gelu'",
    ),
    ("zero modulate weight", lambda: _zero().modulate(X, None, C[:, :1].expand(2, 8), weight=torch.ones(7)),
     ValueError, r"weight must have shape \(8,\) to match x's channels"),
    ("continuous cond_dim", lambda: AdaLNContinuous(8, 4)(X, X[:, 0]), ValueError, "cond_dim=4"),
    ("continuous keys", lambda: AdaLNContinuous.from_diffusers_state_dict({}), ValueError, "linear.weight"),
    (
        "continuous odd rows",
        lambda: AdaLNContinuous.from_diffusers_state_dict({"linear.weight": torch.zeros(7, 3)}),
        ValueError,
        r"'linear.weight' of shape \(2 \* dim, cond_dim\)",
    ),
    ("single t_emb", lambda: AdaLNSingle(8)(X[:, 0, :7]), ValueError, r"t_emb must have shape \(B, 8\)"),
    ("table t_mod", lambda: AdaLNSingleTable(8)(torch.randn(2, 40)), ValueError, r"t_mod .* \(B, 48\)"),
    ("af3 cond missing", lambda: _af3(4)(X), ValueError, "cond is required"),
    ("af3 cond unexpected", lambda: _af3(None)(X, C), ValueError, "cond must be None"),
    ("af3 cond tokens", lambda: _af3(4)(X, torch.randn(2, 4, 4)), ValueError, "per-token"),
    ("af3 int x", lambda: _af3(None)(X.int()), TypeError, "x must be a floating-point"),
    ("azi cond missing", lambda: _azi(8, 4)(X), ValueError, "cond is required"),
    ("azi cond unexpected", lambda: _azi(8, None)(X, C), ValueError, "cond must be None"),
    ("azi x dim", lambda: _azi(6, 4)(X, C), ValueError, r"x must have shape \(B, \*spatial, 6\)"),
    ("azi cond batch", lambda: _azi(8, 4)(X, torch.randn(3, 5, 4)), ValueError, "cond must be global"),
]


@pytest.mark.parametrize("name,call,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()
