"""Symmetries, masking, dtypes, input checks and sampling of the AF3 modules."""

from __future__ import annotations

import pytest
import torch

from adaln.diffusion import sample_af3
from adaln.models.af3 import AttentionPairBias, ConditionedTransition, DiffusionModule, DiffusionTransformer
from test_af3_reference import F64, randomize_, toy_structure, torch_features


def _transformer(dtype=F64):
    module = DiffusionTransformer(8, 6, 4, num_blocks=4, num_heads=2, super_block_size=2)
    return randomize_(module.to(F64), seed=4).to(dtype)


def _inputs(n=7, batch=2, dtype=F64):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, n, 8, generator=g, dtype=F64).to(dtype)
    cond = torch.randn(batch, n, 6, generator=g, dtype=F64).to(dtype)
    pair = torch.randn(batch, n, n, 4, generator=g, dtype=F64).to(dtype)
    return x, cond, pair


def test_transformer_is_permutation_equivariant():
    module = _transformer()
    x, cond, pair = _inputs()
    mask = torch.ones(2, 7, dtype=F64)
    mask[0, 3] = 0
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    out = module(x, cond, pair, mask)
    out_perm = module(x[:, perm], cond[:, perm], pair[:, perm][:, :, perm], mask[:, perm])
    torch.testing.assert_close(out_perm, out[:, perm], rtol=0, atol=1e-12)
    assert not torch.allclose(out_perm, out, atol=1e-3)  # the permutation did move tokens


def test_masked_tokens_do_not_change_unmasked_outputs():
    module = _transformer()
    x, cond, pair = _inputs()
    mask = torch.ones(2, 7, dtype=F64)
    masked = torch.tensor([1, 4])
    mask[:, masked] = 0
    x2, cond2, pair2 = x.clone(), cond.clone(), pair.clone()
    x2[:, masked] += 5.0
    cond2[:, masked] -= 3.0
    pair2[:, :, masked] *= -2.0
    pair2[:, masked] += 1.0
    keep = torch.tensor([0, 2, 3, 5, 6])
    out, out2 = module(x, cond, pair, mask), module(x2, cond2, pair2, mask)
    torch.testing.assert_close(out2[:, keep], out[:, keep], rtol=0, atol=1e-12)
    assert not torch.allclose(out2[:, masked], out[:, masked])


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_transformer_runs_in_low_precision(dtype, tol):
    reference = _transformer()
    x, cond, pair = _inputs()
    expected = reference(x, cond, pair)
    low = _transformer(dtype)
    out = low(*(t.to(dtype) for t in (x, cond, pair)))
    assert out.dtype == dtype and torch.isfinite(out).all()
    err = (out.double() - expected).abs().max() / expected.abs().max()
    assert err < tol


def test_attention_logits_run_in_fp32_for_bf16():
    module = randomize_(AttentionPairBias(8, None, num_heads=2).to(F64), seed=6).to(torch.bfloat16)
    x = torch.randn(1, 5, 8).to(torch.bfloat16)
    captured = {}
    original = torch.softmax

    def spy(t, dim):
        captured["dtype"] = t.dtype
        return original(t, dim)

    torch.softmax = spy
    try:
        out = module(x, pair_logits=torch.randn(1, 2, 5, 5).to(torch.bfloat16))
    finally:
        torch.softmax = original
    assert captured["dtype"] == torch.float32 and out.dtype == torch.bfloat16


def test_input_checks_name_the_argument():
    module = DiffusionTransformer(8, 6, 4, num_blocks=2, num_heads=2, super_block_size=1)
    x, cond, pair = (t.float() for t in _inputs())
    with pytest.raises(ValueError, match="x must have 8 channels"):
        module(x[..., :5], cond, pair)
    with pytest.raises(ValueError, match="cond must be"):
        module(x, cond[:, :3], pair)
    with pytest.raises(ValueError, match="pair must be"):
        module(x, cond, pair[:, :4, :4])
    with pytest.raises(ValueError, match="mask must be broadcastable"):
        module(x, cond, pair, torch.ones(2, 3))
    with pytest.raises(ValueError, match="cond is required"):
        ConditionedTransition(8, 6)(x)
    with pytest.raises(ValueError, match="pair_logits must be"):
        AttentionPairBias(8, 6, num_heads=2)(x, cond, pair_logits=torch.zeros(2, 3, 7, 7))
    with pytest.raises(ValueError, match="divisible"):
        AttentionPairBias(8, 6, num_heads=3)
    with pytest.raises(ValueError, match="multiple of super_block_size"):
        DiffusionTransformer(8, 6, 4, num_blocks=5, super_block_size=2)


def _toy_module(**kwargs):
    return DiffusionModule(
        c_token=16, c_single=8, c_pair=4, c_s_inputs=5, c_atom=8, c_atompair=4, num_blocks=2, num_heads=2,
        super_block_size=1, atom_blocks=1, atom_heads=2, **kwargs,
    )


def test_diffusion_module_checks_features():
    module = _toy_module()
    f = torch_features(toy_structure())
    cond = dict(s_trunk=torch.randn(5, 8), s_inputs=torch.randn(5, 5), z_trunk=torch.randn(5, 5, 4))
    x = torch.randn(22, 3)
    bad = dict(f, atom_mask=torch.tensor([0.0] + [1.0] * 21))
    with pytest.raises(ValueError, match="real atoms first"):
        module(x, 3.0, features=bad, **cond)
    with pytest.raises(ValueError, match="missing"):
        module(x, 3.0, features={k: v for k, v in f.items() if k != "ref_space_uid"}, **cond)
    with pytest.raises(ValueError, match="atom_to_token"):
        module(x, 3.0, features=dict(f, atom_to_token=f["atom_to_token"] + 5), **cond)
    with pytest.raises(TypeError, match="ref_element"):
        module(x, 3.0, features=dict(f, ref_element=f["ref_element"].float()), **cond)
    with pytest.raises(ValueError, match="ref_pos"):
        module(x, 3.0, features=dict(f, ref_pos=f["ref_pos"][:, :2]), **cond)
    with pytest.raises(ValueError, match="exactly one of z_trunk"):
        module(x, 3.0, features=f, s_trunk=cond["s_trunk"], s_inputs=cond["s_inputs"])
    with pytest.raises(ValueError, match="sigma must broadcast"):
        module(x[None].expand(2, -1, -1), torch.ones(3), features=f, **cond)


def test_diffusion_module_samples_with_sample_af3():
    torch.manual_seed(0)
    module = randomize_(_toy_module(), seed=7, scale=0.5).float().eval()
    f = torch_features(toy_structure())
    f = {k: (v.float() if v.is_floating_point() else v) for k, v in f.items()}
    g = torch.Generator().manual_seed(1)
    s_trunk, s_inputs = torch.randn(5, 8, generator=g), torch.randn(5, 5, generator=g)
    z_trunk = torch.randn(5, 5, 4, generator=g)
    pair_cond = module.conditioning.pair(z_trunk, f)  # noise-independent: computed once per run
    mask = f["atom_mask"]
    with torch.no_grad():
        result = sample_af3(
            module, (3, 22, 3), steps=8, mask=mask, generator=torch.Generator().manual_seed(2),
            features=f, s_trunk=s_trunk, s_inputs=s_inputs, pair_cond=pair_cond,
        )
    x = result.samples
    assert result.nfe == 8 and x.shape == (3, 22, 3)
    assert torch.isfinite(x).all()
    assert (x[:, mask == 0] == 0).all()
    assert x[:, mask > 0].abs().max() > 0
    with torch.no_grad():
        sigma, cond = torch.full((3,), 2.0), dict(features=f, s_trunk=s_trunk, s_inputs=s_inputs)
        direct = module(x, sigma, z_trunk=z_trunk, **cond)
        cached = module(x, sigma, pair_cond=pair_cond, **cond)
    torch.testing.assert_close(direct, cached, rtol=0, atol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_diffusion_module_runs_in_low_precision(dtype, tol):
    reference = randomize_(_toy_module().to(F64), seed=3, scale=0.7)
    f = torch_features(toy_structure())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 22, 3, generator=g, dtype=F64) * 10
    sigma = torch.tensor([3.0, 50.0], dtype=F64)
    cond = dict(
        s_trunk=torch.randn(5, 8, generator=g, dtype=F64),
        s_inputs=torch.randn(5, 5, generator=g, dtype=F64),
        z_trunk=torch.randn(5, 5, 4, generator=g, dtype=F64),
    )
    low = _toy_module()
    low.load_state_dict(reference.state_dict())
    low = low.to(dtype)
    with torch.no_grad():
        expected = reference(x, sigma, features=f, **cond)
        out = low(x.to(dtype), sigma.to(dtype), features=f, **{k: v.to(dtype) for k, v in cond.items()})
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.double() - expected).abs().max() / expected.abs().max() < tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_into_a_float32_module_name_the_argument(dtype):
    module = _transformer(torch.float32)
    x, cond, pair = (t.float() for t in _inputs())
    for name, args in (("x", (x.to(dtype), cond, pair)), ("cond", (x, cond.to(dtype), pair)),
                       ("pair", (x, cond, pair.to(dtype)))):
        with pytest.raises(TypeError, match=f"^{name} has dtype {dtype}, but the DiffusionTransformer "
                                            "parameters are torch.float32"):
            module(*args)
    with pytest.raises(TypeError, match=f"^x has dtype {dtype}, but the AttentionPairBias parameters"):
        module.blocks[0].attention(x.to(dtype), cond)
    with pytest.raises(TypeError, match=f"^cond has dtype {dtype}, but the ConditionedTransition parameters"):
        module.blocks[0].transition(x, cond.to(dtype))


def test_autocast_still_runs_a_float32_module():
    module = _transformer(torch.float32)
    x, cond, pair = (t.float() for t in _inputs())
    expected = module(x, cond, pair)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for args in ((x, cond, pair), tuple(t.bfloat16() for t in (x, cond, pair))):
            out = module(*args)
            assert torch.isfinite(out).all()
            assert (out.double() - expected.double()).abs().max() / expected.abs().max() < 5e-2


def test_inputs_on_another_device_name_the_argument():
    module = _transformer(torch.float32)
    x, cond, pair = (t.float() for t in _inputs())
    on_meta = {name: t.to("meta") for name, t in (("x", x), ("cond", cond), ("pair", pair))}
    for name in ("x", "cond", "pair"):
        args = {**dict(x=x, cond=cond, pair=pair), name: on_meta[name]}
        with pytest.raises(ValueError, match=f"^{name} is on device meta, but the DiffusionTransformer "
                                             "parameters are on cpu"):
            module(args["x"], args["cond"], args["pair"])
    with pytest.raises(ValueError, match="^mask is on device meta"):
        module(x, cond, pair, torch.ones(2, 7, device="meta"))


def _toy_diffusion_inputs(dtype=torch.float32):
    f = torch_features(toy_structure())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 22, 3, generator=g).to(dtype)
    cond = dict(
        s_trunk=torch.randn(5, 8, generator=g).to(dtype),
        s_inputs=torch.randn(5, 5, generator=g).to(dtype),
        z_trunk=torch.randn(5, 5, 4, generator=g).to(dtype),
    )
    return x, f, cond


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_diffusion_module_rejects_half_inputs_into_float32(dtype):
    module = _toy_module()
    x, f, cond = _toy_diffusion_inputs()
    with pytest.raises(TypeError, match=f"^x_noisy has dtype {dtype}, but the DiffusionModule parameters are "
                                        "torch.float32"):
        module(x.to(dtype), 3.0, features=f, **cond)
    for name in cond:
        bad = dict(cond, **{name: cond[name].to(dtype)})
        with pytest.raises(TypeError, match=f"^{name} has dtype {dtype}"):
            module(x, 3.0, features=f, **bad)
    module = randomize_(module, seed=3, scale=0.7)
    with torch.no_grad():
        expected = module(x, 3.0, features=f, **cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x, 3.0, features=f, **cond)
    assert out.shape == (2, 22, 3) and torch.isfinite(out).all()
    assert (out - expected).abs().max() / expected.abs().max() < 3e-2


def test_diffusion_module_inputs_on_another_device_name_the_argument():
    module = _toy_module()
    x, f, cond = _toy_diffusion_inputs()
    with pytest.raises(ValueError, match="^x_noisy is on device meta, but the DiffusionModule parameters"):
        module(x.to("meta"), 3.0, features=f, **cond)
    with pytest.raises(ValueError, match="^s_inputs is on device meta"):
        module(x, 3.0, features=f, **dict(cond, s_inputs=cond["s_inputs"].to("meta")))
    with pytest.raises(ValueError, match="^sigma is on device meta"):
        module(x, torch.ones(2, device="meta"), features=f, **cond)
    with pytest.raises(ValueError, match=r"^features\['ref_pos'\] is on device meta"):
        module(x, 3.0, features=dict(f, ref_pos=f["ref_pos"].to("meta")), **cond)


def test_official_gather_needs_the_24_slot_layout():
    module = _toy_module()
    f = torch_features(toy_structure(2, (30, 4), padded_slots=2, chains=(0, 0)))
    f = dict(f, residue_index=f["residue_index"][:2], entity_id=f["entity_id"][:2], sym_id=f["sym_id"][:2])
    cond = dict(s_trunk=torch.randn(2, 8), s_inputs=torch.randn(2, 5), z_trunk=torch.randn(2, 2, 4))
    with pytest.raises(ValueError, match=r"token_atom_slot'\] must lie in \[0, 24\) \(without it: at most 24"):
        module(torch.randn(36, 3), 3.0, features=f, **cond)
    with pytest.raises(ValueError, match=r"token_atom_slot'\] must be an integer tensor of shape \(36,\)"):
        module(torch.randn(36, 3), 3.0, features=dict(f, token_atom_slot=torch.zeros(36)), **cond)
    consistent = _toy_module(uid_gather="queries")  # the token -> queries -> keys gather has no such limit
    assert consistent(torch.randn(36, 3), 3.0, features=f, **cond).shape == (36, 3)
