"""Official AlphaFold3 parameter names, layouts and the load/export round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaln.models.af3 import (
    AttentionPairBias,
    ConditionedTransition,
    DiffusionModule,
    DiffusionTransformer,
    export_alphafold3_params,
    load_alphafold3_params,
)
from test_af3_reference import F64, randomize_, toy_structure, torch_features

STACK = "__layer_stack_with_per_layer"


def test_transition_names_and_shapes():
    module = ConditionedTransition(8, 6, factor=2)
    shapes = {k: v.shape for k, v in export_alphafold3_params(module, "p_").items()}
    assert shapes == {
        "p_ffw_single_cond_layer_norm/scale": (6,),
        "p_ffw_single_cond_scale/weights": (6, 8),
        "p_ffw_single_cond_scale/bias": (8,),
        "p_ffw_single_cond_bias/weights": (6, 8),
        "p_ffw_transition1/weights": (8, 32),
        "p_ffw_transition2/weights": (16, 8),
        "p_ffw_adaptive_zero_cond/weights": (6, 8),
        "p_ffw_adaptive_zero_cond/bias": (8,),
    }
    plain = export_alphafold3_params(ConditionedTransition(8, None), "p_")
    assert set(plain) == {
        "p_ffw_layer_norm/scale",
        "p_ffw_layer_norm/offset",
        "p_ffw_transition1/weights",
        "p_ffw_transition2/weights",
    }


def test_attention_names_and_shapes():
    params = export_alphafold3_params(AttentionPairBias(8, 6, num_heads=2), "p_")
    shapes = {k: v.shape for k, v in params.items()}
    assert shapes == {
        "p_single_cond_layer_norm/scale": (6,),
        "p_single_cond_scale/weights": (6, 8),
        "p_single_cond_scale/bias": (8,),
        "p_single_cond_bias/weights": (6, 8),
        "p_q_projection/weights": (8, 2, 4),
        "p_q_projection/bias": (2, 4),
        "p_k_projection/weights": (8, 2, 4),
        "p_v_projection/weights": (8, 2, 4),
        "p_gating_query/weights": (8, 8),  # no bias: the official bias_init is ignored
        "p_transition2/weights": (8, 8),
        "p_adaptive_zero_cond/weights": (6, 8),
        "p_adaptive_zero_cond/bias": (8,),
    }


def test_transformer_names_and_stacked_shapes():
    module = DiffusionTransformer(8, 6, 4, num_blocks=6, num_heads=2, super_block_size=3)
    params = export_alphafold3_params(module, "transformer")
    assert params["transformer/pair_input_layer_norm/scale"].shape == (4,)
    assert params[f"transformer/{STACK}/pair_logits_projection/weights"].shape == (2, 4, 3, 2)
    block = f"transformer/{STACK}/{STACK}/transformer"
    assert params[f"{block}q_projection/weights"].shape == (2, 3, 8, 2, 4)
    assert params[f"{block}ffw_transition1/weights"].shape == (2, 3, 8, 32)
    # Block (i, j) of the stack is our block 3 i + j; haiku weights are (in, out).
    v_weight = module.blocks[5].attention.v_projection.weight.detach().t().reshape(8, 2, 4).numpy()
    np.testing.assert_array_equal(params[f"{block}v_projection/weights"][1, 2], v_weight)
    pair_w = module.pair_logits_projection[1].weight.detach().t().reshape(4, 3, 2).numpy()
    np.testing.assert_array_equal(params[f"transformer/{STACK}/pair_logits_projection/weights"][1], pair_w)
    assert all(k.startswith("transformer/") for k in params)
    # Under an enclosing scope the block names keep the module's own name.
    scoped = export_alphafold3_params(module, "diffuser/~/diffusion_head/transformer")
    assert f"diffuser/~/diffusion_head/transformer/{STACK}/{STACK}/transformerq_projection/bias" in scoped


def _toy_inputs(n_samples=2):
    f = torch_features(toy_structure())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n_samples, 22, 3, generator=g, dtype=F64) * 8
    cond = dict(
        features=f,
        s_trunk=torch.randn(5, 8, generator=g, dtype=F64),
        s_inputs=torch.randn(5, 5, generator=g, dtype=F64),
        z_trunk=torch.randn(5, 5, 4, generator=g, dtype=F64),
    )
    return x, torch.tensor([1.5, 40.0][:n_samples], dtype=F64), cond


def _small_module(seed):
    torch.manual_seed(seed)
    return DiffusionModule(
        c_token=16, c_single=8, c_pair=4, c_s_inputs=5, c_atom=8, c_atompair=4, num_blocks=2, num_heads=2,
        super_block_size=1, atom_blocks=2, atom_heads=2,
    ).to(F64)


@pytest.mark.parametrize(
    "make, prefix",
    [
        (lambda: ConditionedTransition(8, 6), "p_"),
        (lambda: AttentionPairBias(8, None, num_heads=2), "p_"),
        (lambda: DiffusionTransformer(8, 6, 4, num_blocks=4, num_heads=2, super_block_size=2), "transformer"),
    ],
)
def test_round_trip_small_modules(make, prefix):
    source, target = randomize_(make().to(F64), seed=1), make().to(F64)
    load_alphafold3_params(target, export_alphafold3_params(source, prefix), prefix)
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), name


def test_round_trip_diffusion_module_gives_identical_outputs():
    source, target = randomize_(_small_module(0), seed=2), _small_module(1)
    x, sigma, cond = _toy_inputs()
    params = export_alphafold3_params(source, "diffuser/~/diffusion_head")
    # Official dumps also hold _per_atom_conditioning's unused pair projections; they are accepted.
    params["diffuser/~/diffusion_head/diffusion_embed_pair_offsets/weights"] = np.zeros((3, 4))
    assert not torch.equal(source(x, sigma, **cond), target(x, sigma, **cond))
    load_alphafold3_params(target, params, "diffuser/~/diffusion_head")
    assert torch.equal(source(x, sigma, **cond), target(x, sigma, **cond))


def test_bad_keys_raise_one_error_listing_all():
    module = DiffusionTransformer(8, 6, 4, num_blocks=2, num_heads=2, super_block_size=1)
    params = export_alphafold3_params(module, "transformer")
    missing = f"transformer/{STACK}/{STACK}/transformerk_projection/weights"
    misshaped = "transformer/pair_input_layer_norm/scale"
    unexpected = "transformer/extra_projection/weights"
    del params[missing]
    params[misshaped] = np.ones(5)
    params[unexpected] = np.ones(3)
    params["evoformer/unrelated/weights"] = np.ones(3)  # outside the prefix: not ours to judge
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_alphafold3_params(module, params, "transformer")
    message = str(info.value)
    for key in (missing, misshaped, unexpected, "expected (4,), got (5,)"):
        assert key in message
    assert "evoformer/unrelated" not in message
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # nothing copied
    with pytest.raises(ValueError, match="missing"):  # strict=False still requires every parameter
        load_alphafold3_params(module, params, "transformer", strict=False)
    params[missing] = np.zeros((2, 1, 8, 2, 4))
    params[misshaped] = np.ones(4)
    load_alphafold3_params(module, params, "transformer", strict=False)
    assert torch.equal(module.pair_input_layer_norm.weight, torch.ones(4))


def test_load_rejects_wrong_types():
    with pytest.raises(TypeError, match="params"):
        load_alphafold3_params(ConditionedTransition(4), [("a", 1)], "p_")
    with pytest.raises(TypeError, match="adaln.models.af3"):
        load_alphafold3_params(torch.nn.Linear(2, 2), {}, "p_")


@pytest.mark.parametrize(
    "bad, reason",
    [
        (lambda shape: np.full(shape, "0.5"), "is not a real number type"),
        (lambda shape: np.full(shape, None, dtype=object), "is not a real number type"),
        (lambda shape: np.full(shape, np.nan), "NaN or infinite"),
        (lambda shape: torch.full(shape, float("inf")), "NaN or infinite"),
        (lambda shape: torch.zeros(shape, dtype=torch.complex64), "is not a real number type"),
    ],
)
def test_unusable_values_raise_before_anything_is_copied(bad, reason):
    module = DiffusionTransformer(8, 6, 4, num_blocks=2, num_heads=2, super_block_size=1)
    source = randomize_(DiffusionTransformer(8, 6, 4, 2, 2, 1), seed=9)
    params = export_alphafold3_params(source, "transformer")
    # The last key in load order: every other value would be copied first if checks ran late.
    key = list(params)[-1]
    params[key] = bad(params[key].shape)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=f"unusable \\(1\\): {key}: .*{reason}"):
        load_alphafold3_params(module, params, "transformer")
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_names_and_shapes_with_independent_attention_widths():
    module = AttentionPairBias(8, 6, num_heads=2, key_dim=4, value_dim=12)
    shapes = {k: v.shape for k, v in export_alphafold3_params(module, "p_").items()}
    assert shapes["p_q_projection/weights"] == (8, 2, 2)
    assert shapes["p_k_projection/weights"] == (8, 2, 2)
    assert shapes["p_v_projection/weights"] == (8, 2, 6)
    assert shapes["p_gating_query/weights"] == (8, 12)
    assert shapes["p_transition2/weights"] == (12, 8)
    transition = export_alphafold3_params(ConditionedTransition(8, 6, factor=3), "p_")
    assert transition["p_ffw_transition1/weights"].shape == (8, 48)
    assert transition["p_ffw_transition2/weights"].shape == (24, 8)


def _wide_module(seed):
    torch.manual_seed(seed)
    return DiffusionModule(
        c_token=16, c_single=8, c_pair=4, c_s_inputs=5, c_atom=8, c_atompair=4, num_blocks=2, num_heads=2,
        super_block_size=1, atom_blocks=2, atom_heads=2, c_single_cond=6, c_pair_cond=3, transition_factor=3,
        key_dim=12, value_dim=6, atom_transition_factor=1, atom_key_dim=6, atom_value_dim=10,
    ).to(F64)


def test_round_trip_with_independent_widths():
    source, target = randomize_(_wide_module(0), seed=4), _wide_module(1)
    x, sigma, cond = _toy_inputs()
    params = export_alphafold3_params(source, "diffuser/~/diffusion_head")
    head = "diffuser/~/diffusion_head"
    assert params[f"{head}/single_cond_initial_projection/weights"].shape == (8 + 5, 6)
    assert params[f"{head}/pair_cond_initial_projection/weights"].shape == (4 + 139, 3)
    assert params[f"{head}/diffusion_lnorm_trunk_single_cond/scale"].shape == (8,)  # the raw trunk single
    assert params[f"{head}/diffusion_lnorm_trunk_pair_cond/scale"].shape == (3,)  # the conditioned pair
    atom_block = f"{head}/diffusion_atom_transformer_encoder/{STACK}/diffusion_atom_transformer_encoder"
    assert params[f"{atom_block}q_projection/weights"].shape == (2, 8, 2, 3)
    assert params[f"{atom_block}v_projection/weights"].shape == (2, 8, 2, 5)
    assert params[f"{atom_block}ffw_transition1/weights"].shape == (2, 8, 16)
    load_alphafold3_params(target, params, head)
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(source(x, sigma, **cond), target(x, sigma, **cond))
