"""Protenix and alphafold3-pytorch state dicts: key names, layouts, the pair-norm fold and round trips.

The state dicts are made here with the ports' key names and shapes (random values, per-block pair
LayerNorms that differ); the NumPy forward passes below follow bytedance/Protenix
``protenix/model/modules/{transformer,primitives}.py`` (``DiffusionTransformer``, ``AttentionPairBias``,
``ConditionedTransitionBlock``, ``AdaptiveLayerNorm``, ``Attention``) and lucidrains/alphafold3-pytorch
``alphafold3.py`` / ``attention.py`` (``DiffusionTransformer``, ``ConditionWrapper``,
``AdaptiveLayerNorm``, ``AttentionPairBias``, ``Attention``, ``Transition``, ``SwiGLU``) in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaln.models.af3 import (
    ConditionedTransition,
    DiffusionTransformer,
    alphafold3_pytorch_state_dict,
    load_alphafold3_pytorch_state_dict,
    load_protenix_state_dict,
    protenix_state_dict,
)
from test_af3_reference import F64, layer_norm, max_err, randomize_, sigmoid, softmax

C, CS, CZ, H, BLOCKS = 8, 6, 4, 2, 4
DIM_HEAD = 3  # alphafold3-pytorch: attention width heads * dim_head = 6, not the token width 8
TOL = 1e-14  # measured at most 2.7e-15 (float64): docs/af3_differences.md


def silu(x):
    return x * sigmoid(x)


def lin(sd, key, x):
    """torch Linear: weight (out, in), optional bias."""
    y = x @ sd[f"{key}.weight"].T
    return y + sd[f"{key}.bias"] if f"{key}.bias" in sd else y


def randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=F64)


# ------------------------------------------------------------------------------------------------
# Port state dicts (their key names and shapes) and their forward passes
# ------------------------------------------------------------------------------------------------


def protenix_transition_sd(g, p, c=C, cs=CS, n=2):
    return {
        f"{p}adaln.layernorm_s.weight": 1 + 0.3 * randn(g, cs),
        f"{p}adaln.linear_s.weight": randn(g, c, cs) / cs**0.5,
        f"{p}adaln.linear_s.bias": 0.5 * randn(g, c),
        f"{p}adaln.linear_nobias_s.weight": randn(g, c, cs) / cs**0.5,
        f"{p}linear_nobias_a1.weight": randn(g, n * c, c) / c**0.5,
        f"{p}linear_nobias_a2.weight": randn(g, n * c, c) / c**0.5,
        f"{p}linear_nobias_b.weight": randn(g, c, n * c) / (n * c) ** 0.5,
        f"{p}linear_s.weight": randn(g, c, cs) / cs**0.5,
        f"{p}linear_s.bias": 0.5 * randn(g, c) - 2.0,
    }


def protenix_transformer_sd(g, prefix="", equal_norms=False):
    sd = {}
    shared = 1 + 0.3 * randn(g, CZ)
    for i in range(BLOCKS):
        a = f"{prefix}blocks.{i}.attention_pair_bias."
        sd.update({
            f"{a}layernorm_a.layernorm_s.weight": 1 + 0.3 * randn(g, CS),
            f"{a}layernorm_a.linear_s.weight": randn(g, C, CS) / CS**0.5,
            f"{a}layernorm_a.linear_s.bias": 0.5 * randn(g, C),
            f"{a}layernorm_a.linear_nobias_s.weight": randn(g, C, CS) / CS**0.5,
            f"{a}attention.linear_q.weight": randn(g, C, C) / C**0.5,
            f"{a}attention.linear_q.bias": 0.5 * randn(g, C),
            f"{a}attention.linear_k.weight": randn(g, C, C) / C**0.5,
            f"{a}attention.linear_v.weight": randn(g, C, C) / C**0.5,
            f"{a}attention.linear_o.weight": randn(g, C, C) / C**0.5,
            f"{a}attention.linear_g.weight": randn(g, C, C) / C**0.5,
            f"{a}layernorm_z.weight": shared.clone() if equal_norms else 1 + 0.3 * randn(g, CZ),
            f"{a}linear_nobias_z.weight": randn(g, H, CZ) / CZ**0.5,
            f"{a}linear_a_last.weight": randn(g, C, CS) / CS**0.5,
            f"{a}linear_a_last.bias": 0.5 * randn(g, C) - 2.0,
        })
        sd.update(protenix_transition_sd(g, f"{prefix}blocks.{i}.conditioned_transition_block."))
    return sd


def protenix_adaln(sd, p, a, s):
    s = layer_norm(s, sd[f"{p}layernorm_s.weight"])
    return sigmoid(lin(sd, f"{p}linear_s", s)) * layer_norm(a) + lin(sd, f"{p}linear_nobias_s", s)


def protenix_transition(sd, p, a, s):
    x = protenix_adaln(sd, f"{p}adaln.", a, s)
    b = silu(lin(sd, f"{p}linear_nobias_a1", x)) * lin(sd, f"{p}linear_nobias_a2", x)
    return sigmoid(lin(sd, f"{p}linear_s", s)) * lin(sd, f"{p}linear_nobias_b", b)


def protenix_transformer(sd, a, s, z, prefix=""):
    """DiffusionTransformer.forward (no mask: Protenix attends over every token)."""
    for i in range(BLOCKS):
        p = f"{prefix}blocks.{i}.attention_pair_bias."
        x = protenix_adaln(sd, f"{p}layernorm_a.", a, s)
        bias = lin(sd, f"{p}linear_nobias_z", layer_norm(z, sd[f"{p}layernorm_z.weight"]))
        bias = np.moveaxis(bias, -1, -3)  # (..., H, N, N)
        heads = lambda t: np.moveaxis(t.reshape(t.shape[:-1] + (H, -1)), -2, -3)  # noqa: E731
        q = heads(lin(sd, f"{p}attention.linear_q", x))
        k, v = heads(lin(sd, f"{p}attention.linear_k", x)), heads(lin(sd, f"{p}attention.linear_v", x))
        q = q / np.sqrt(q.shape[-1])
        o = softmax(q @ np.swapaxes(k, -1, -2) + bias) @ v  # (..., H, N, c)
        o = np.moveaxis(o, -3, -2)
        g = sigmoid(lin(sd, f"{p}attention.linear_g", x)).reshape(o.shape)
        o = lin(sd, f"{p}attention.linear_o", (o * g).reshape(o.shape[:-2] + (-1,)))
        attn_out = sigmoid(lin(sd, f"{p}linear_a_last", s)) * o + a
        transition = f"{prefix}blocks.{i}.conditioned_transition_block."
        a = protenix_transition(sd, transition, attn_out, s) + attn_out
    return a


def lucid_wrapper_sd(g, p, c=C, cs=CS):
    return {
        f"{p}adaptive_norm.norm_cond.weight": 1 + 0.3 * randn(g, cs),
        f"{p}adaptive_norm.to_gamma.0.weight": randn(g, c, cs) / cs**0.5,
        f"{p}adaptive_norm.to_gamma.0.bias": 0.5 * randn(g, c),
        f"{p}adaptive_norm.to_beta.weight": randn(g, c, cs) / cs**0.5,
        f"{p}to_adaln_zero_gamma.0.weight": randn(g, c, cs) / cs**0.5,
        f"{p}to_adaln_zero_gamma.0.bias": 0.5 * randn(g, c) - 2.0,
    }


def lucid_transition_sd(g, p, c=C, cs=CS, factor=2):
    return {
        **lucid_wrapper_sd(g, p, c, cs),
        f"{p}fn.ff.0.weight": randn(g, 2 * factor * c, c) / c**0.5,
        f"{p}fn.ff.2.weight": randn(g, c, factor * c) / (factor * c) ** 0.5,
    }


def lucid_transformer_sd(g, prefix="", branch=True, equal_norms=False):
    sd, b = {}, ".branch" if branch else ""
    inner = H * DIM_HEAD
    shared, zeros = 1 + 0.3 * randn(g, CZ), torch.zeros(CZ, dtype=F64)
    for i in range(BLOCKS):
        a = f"{prefix}layers.{i}.2{b}."
        sd.update(lucid_wrapper_sd(g, a))
        sd.update({
            f"{a}fn.attn.to_q.weight": randn(g, inner, C) / C**0.5,
            f"{a}fn.attn.to_q.bias": 0.5 * randn(g, inner),
            f"{a}fn.attn.to_kv.weight": randn(g, 2 * inner, C) / C**0.5,
            f"{a}fn.attn.to_out.weight": randn(g, C, inner) / inner**0.5,
            f"{a}fn.attn.to_gates.0.weight": randn(g, inner, C) / C**0.5,
            f"{a}fn.to_attn_bias_norm.weight": shared.clone() if equal_norms else 1 + 0.3 * randn(g, CZ),
            f"{a}fn.to_attn_bias_norm.bias": zeros.clone() if equal_norms else 0.5 * randn(g, CZ),
            f"{a}fn.to_attn_bias.0.weight": randn(g, H, CZ) / CZ**0.5,
        })
        sd.update(lucid_transition_sd(g, f"{prefix}layers.{i}.3{b}."))
    return sd


def lucid_adaln(sd, p, x, cond):
    c = layer_norm(cond, sd[f"{p}norm_cond.weight"])
    return layer_norm(x) * sigmoid(lin(sd, f"{p}to_gamma.0", c)) + lin(sd, f"{p}to_beta", c)


def swiglu(x):
    x, gates = np.split(x, 2, axis=-1)  # alphafold3-pytorch gates with the SECOND half
    return silu(gates) * x


def lucid_transition(sd, p, x, cond):
    h = lucid_adaln(sd, f"{p}adaptive_norm.", x, cond)
    out = lin(sd, f"{p}fn.ff.2", swiglu(lin(sd, f"{p}fn.ff.0", h)))
    return out * sigmoid(lin(sd, f"{p}to_adaln_zero_gamma.0", cond))


def lucid_transformer(sd, x, cond, z, mask, prefix="", branch=True):
    """DiffusionTransformer.to_serial_layers with the residual of the (disabled) hyper-connections."""
    b = ".branch" if branch else ""
    for i in range(BLOCKS):
        p = f"{prefix}layers.{i}.2{b}."
        h = lucid_adaln(sd, f"{p}adaptive_norm.", x, cond)
        norm = layer_norm(z, sd[f"{p}fn.to_attn_bias_norm.weight"], sd[f"{p}fn.to_attn_bias_norm.bias"])
        bias = np.moveaxis(lin(sd, f"{p}fn.to_attn_bias.0", norm), -1, -3)
        heads = lambda t: np.moveaxis(t.reshape(t.shape[:-1] + (H, DIM_HEAD)), -2, -3)  # noqa: E731
        q = heads(lin(sd, f"{p}fn.attn.to_q", h)) * DIM_HEAD**-0.5
        k, v = (heads(t) for t in np.split(lin(sd, f"{p}fn.attn.to_kv", h), 2, axis=-1))
        sim = q @ np.swapaxes(k, -1, -2) + bias
        sim = np.where(mask[..., None, None, :] > 0, sim, -np.finfo(np.float64).max)
        out = np.moveaxis(softmax(sim) @ v, -3, -2).reshape(x.shape[:-1] + (-1,))
        out = lin(sd, f"{p}fn.attn.to_out", out * sigmoid(lin(sd, f"{p}fn.attn.to_gates.0", h)))
        x = x + out * sigmoid(lin(sd, f"{p}to_adaln_zero_gamma.0", cond))
        x = x + lucid_transition(sd, f"{prefix}layers.{i}.3{b}.", x, cond)
    return x


def numpy_sd(sd):
    return {k: v.numpy() for k, v in sd.items()}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return randn(g, 2, 7, C), randn(g, 2, 7, CS), randn(g, 2, 7, 7, CZ)


def _ours(**kwargs):
    return DiffusionTransformer(C, CS, CZ, BLOCKS, H, 2, **kwargs).to(F64)


# ------------------------------------------------------------------------------------------------
# Protenix
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("equal_norms", [False, True])
def test_protenix_transformer_matches_its_forward(equal_norms):
    sd = protenix_transformer_sd(torch.Generator().manual_seed(1), "diffusion_module.diffusion_transformer.",
                                 equal_norms)
    module = _ours()
    load_protenix_state_dict(module, sd, prefix="diffusion_module.diffusion_transformer.")
    x, cond, pair = _inputs()
    ref = protenix_transformer(numpy_sd(sd), x.numpy(), cond.numpy(), pair.numpy(),
                               "diffusion_module.diffusion_transformer.")
    err = max_err(module(x, cond, pair), ref)
    # Equal per-block norms are copied as they are; different ones are folded (rounding only).
    assert err < TOL, err
    if equal_norms:
        norm = sd["diffusion_module.diffusion_transformer.blocks.0.attention_pair_bias.layernorm_z.weight"]
        assert torch.equal(module.pair_input_layer_norm.weight, norm)
        w = sd["diffusion_module.diffusion_transformer.blocks.3.attention_pair_bias.linear_nobias_z.weight"]
        assert torch.equal(module.pair_logits_projection[1].weight[H:], w)
    else:
        assert torch.equal(module.pair_input_layer_norm.weight, torch.ones(CZ, dtype=F64))


def test_protenix_transition_and_round_trip():
    sd = protenix_transition_sd(torch.Generator().manual_seed(2), "t.")
    module = ConditionedTransition(C, CS).to(F64)
    load_protenix_state_dict(module, sd, prefix="t.")
    x, cond, _ = _inputs(3)
    assert max_err(module(x, cond), protenix_transition(numpy_sd(sd), "t.", x.numpy(), cond.numpy())) < TOL
    exported = protenix_state_dict(module, prefix="t.")
    assert exported.keys() == sd.keys()
    assert all(torch.equal(exported[k], sd[k]) for k in sd)


def test_protenix_round_trip_of_ours_is_exact():
    source = randomize_(_ours(), seed=5)
    sd = protenix_state_dict(source, prefix="dt.")
    assert "dt.blocks.3.conditioned_transition_block.linear_nobias_a2.weight" in sd
    assert "dt.blocks.0.attention_pair_bias.layernorm_z.bias" not in sd  # create_offset_ln_z=False
    target = _ours()
    load_protenix_state_dict(target, sd, prefix="dt.")
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), name
    x, cond, pair = _inputs()
    ref = protenix_transformer(numpy_sd(sd), x.numpy(), cond.numpy(), pair.numpy(), "dt.")
    assert max_err(source(x, cond, pair), ref) < TOL


def test_protenix_errors_name_the_keys_and_copy_nothing():
    sd = protenix_transformer_sd(torch.Generator().manual_seed(1))
    module = _ours()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    del sd["blocks.2.attention_pair_bias.attention.linear_k.weight"]
    sd["blocks.1.conditioned_transition_block.linear_nobias_b.weight"] = torch.zeros(C, 3 * C, dtype=F64)
    sd["blocks.0.attention_pair_bias.linear_a_last.bias"] = torch.full((C,), float("nan"), dtype=F64)
    sd["blocks.4.attention_pair_bias.linear_q.weight"] = torch.zeros(C, C)  # a fifth block
    with pytest.raises(ValueError) as info:
        load_protenix_state_dict(module, sd)
    message = str(info.value)
    assert "missing (1): blocks.2.attention_pair_bias.attention.linear_k.weight" in message
    misshaped = "blocks.1.conditioned_transition_block.linear_nobias_b.weight: expected shape (8, 16), got"
    assert f"{misshaped} (8, 24)" in message
    assert "blocks.0.attention_pair_bias.linear_a_last.bias: holds NaN" in message
    assert "not representable by this module (1): blocks.4.attention_pair_bias.linear_q.weight" in message
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


# ------------------------------------------------------------------------------------------------
# alphafold3-pytorch
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("branch", [True, False])
@pytest.mark.parametrize("equal_norms", [False, True])
def test_alphafold3_pytorch_transformer_matches_its_forward(branch, equal_norms):
    prefix = "diffusion_module.token_transformer."
    sd = lucid_transformer_sd(torch.Generator().manual_seed(4), prefix, branch, equal_norms)
    module = _ours(key_dim=H * DIM_HEAD, value_dim=H * DIM_HEAD)
    load_alphafold3_pytorch_state_dict(module, sd, prefix=prefix)
    x, cond, pair = _inputs()
    mask = torch.ones(2, 7, dtype=F64)
    mask[1, 5:] = 0
    ref = lucid_transformer(numpy_sd(sd), x.numpy(), cond.numpy(), pair.numpy(), mask.numpy(), prefix, branch)
    err = max_err(module(x, cond, pair, mask), ref)
    assert err < TOL, err
    if equal_norms:  # the fold is a copy
        block = f"{prefix}layers.2.2{'.branch' if branch else ''}.fn."
        assert torch.equal(module.pair_input_layer_norm.weight, sd[f"{block}to_attn_bias_norm.weight"])
        assert torch.equal(module.pair_logits_projection[1].weight[:H], sd[f"{block}to_attn_bias.0.weight"])


def test_alphafold3_pytorch_swiglu_halves_are_swapped():
    sd = lucid_transition_sd(torch.Generator().manual_seed(6), "t.", factor=3)
    module = ConditionedTransition(C, CS, factor=3).to(F64)
    load_alphafold3_pytorch_state_dict(module, sd, prefix="t.")
    w = sd["t.fn.ff.0.weight"]
    # Ours gates with the first half of transition1: that is their second half.
    assert torch.equal(module.transition1.weight[: 3 * C], w[3 * C :])
    assert torch.equal(module.transition1.weight[3 * C :], w[: 3 * C])
    x, cond, _ = _inputs(7)
    out = module(x, cond)
    ref = lucid_transition(numpy_sd(sd), "t.", x.numpy(), cond.numpy())
    assert max_err(out, ref) < TOL
    # Copied without the swap, the transition would compute something else.
    unswapped = numpy_sd(sd)
    unswapped["t.fn.ff.0.weight"] = np.concatenate([w[3 * C :].numpy(), w[: 3 * C].numpy()])
    assert max_err(out, lucid_transition(unswapped, "t.", x.numpy(), cond.numpy())) > 1e-3
    exported = alphafold3_pytorch_state_dict(module, prefix="t.")
    assert exported.keys() == sd.keys() and all(torch.equal(exported[k], sd[k]) for k in sd)


@pytest.mark.parametrize("branch", [True, False])
def test_alphafold3_pytorch_round_trip_of_ours_is_exact(branch):
    source = randomize_(_ours(key_dim=6, value_dim=6), seed=8)
    sd = alphafold3_pytorch_state_dict(source, prefix="dt.", branch=branch)
    infix = ".branch" if branch else ""
    assert torch.equal(sd[f"dt.layers.1.2{infix}.fn.to_attn_bias_norm.bias"], torch.zeros(CZ, dtype=F64))
    target = _ours(key_dim=6, value_dim=6)
    load_alphafold3_pytorch_state_dict(target, sd, prefix="dt.")
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), name


def test_alphafold3_pytorch_errors_name_the_keys_and_copy_nothing():
    sd = lucid_transformer_sd(torch.Generator().manual_seed(4))
    narrow = _ours()  # attention width 8, theirs heads * dim_head = 6
    with pytest.raises(ValueError, match=r"(?s)layers\.0\.2\.branch\.fn\.attn\.to_q\.weight: expected shape "
                                         r"\(8, 8\), got \(6, 8\).*key_dim = value_dim = heads \* dim_head"):
        load_alphafold3_pytorch_state_dict(narrow, sd)
    module = _ours(key_dim=6, value_dim=6)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    extra = {
        "layers.1.2.branch.fn.attn.memory_kv": torch.zeros(2, H, 4, DIM_HEAD),
        "layers.2.2.branch.fn.attn.to_value_residual_mix.0.weight": torch.zeros(H, C),
        "layers.0.0.fn.weight": torch.zeros(3),
        "registers": torch.zeros(2, C),
    }
    with pytest.raises(ValueError) as info:
        load_alphafold3_pytorch_state_dict(module, {**sd, **extra})
    message = str(info.value)
    assert "not representable by this module (4): " + ", ".join(sorted(extra)) in message
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    with pytest.raises(TypeError, match="module must be one of DiffusionTransformer, ConditionedTransition"):
        load_alphafold3_pytorch_state_dict(torch.nn.Linear(2, 2), sd)
    with pytest.raises(ValueError, match="always conditioned"):
        load_protenix_state_dict(ConditionedTransition(C, None), {})
