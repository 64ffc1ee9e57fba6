"""The one door to the converted systems: dispatch by diffusers class, and the velocity wrapper."""

import importlib

import pytest
import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from adaln.models import DIFFUSERS_CLASSES, SystemVelocity, from_diffusers
from adaln.models.dit import DiT


def test_dispatch_reaches_the_module_of_each_class():
    for name, module in DIFFUSERS_CLASSES.items():
        assert callable(importlib.import_module(module).from_diffusers), name


def _random_dit() -> DiTTransformer2DModel:
    theirs = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                   num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    for p in theirs.parameters():
        nn.init.normal_(p, std=0.05)
    return theirs


def test_dit_through_the_door_reproduces_diffusers():
    theirs = _random_dit()
    ours = from_diffusers(theirs)
    assert isinstance(ours, DiT)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([1, 9])
    with torch.no_grad():
        ref = theirs(x, timestep=t, class_labels=y).sample
        torch.testing.assert_close(ours(x, t, y), ref, rtol=1e-5, atol=1e-6)


def test_unknown_classes_are_named():
    with pytest.raises(TypeError, match="from_diffusers converts .*; got Linear"):
        from_diffusers(nn.Linear(2, 2))


class _Reversed(nn.Module):
    """A toy system in Lumina 2's convention: t = 1 - sigma, output data - noise."""

    velocity_sign = -1.0

    def flow_timestep(self, sigma):
        return 1 - sigma

    def forward(self, x, t, context=None):
        self.seen = t
        return x * 3 + context


def test_system_velocity_applies_time_and_sign_and_sees_through_wrappers():
    model = _Reversed()
    x, sigma, ctx = torch.randn(2, 1, 4, 4), torch.tensor([0.2, 0.9]), torch.ones(2, 1, 4, 4)
    out = SystemVelocity(model)(x, sigma, context=ctx)
    assert torch.equal(out, -(x * 3 + ctx)) and torch.allclose(model.seen, 1 - sigma)

    class Wrapper(nn.Module):  # what DDP looks like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *a, **k):
            return self.module(*a, **k)

    assert torch.equal(SystemVelocity(Wrapper(model))(x, sigma, context=ctx), out)
    with pytest.raises(TypeError, match="not a converted system"):
        SystemVelocity(nn.Linear(2, 2))


SYSTEM_ARCHS = ("mmdit", "flux", "pixart", "lumina2", "zimage")


@pytest.mark.parametrize("arch", SYSTEM_ARCHS)
def test_every_system_checks_placement_and_caption_length_at_the_boundary(arch):
    from adaln.tasks.text_digits import TextModelConfig, build_system

    model = build_system(TextModelConfig(arch=arch), 16).eval()
    x, t, context = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.7]), torch.randn(2, 3, 16)
    kw = dict(context=context, pooled=torch.randn(2, 16)) if arch in ("mmdit", "flux") else dict(context=context)
    with pytest.raises(ValueError, match="x is on meta but the model's parameters are on cpu"):
        model(x.to("meta"), t, **kw)
    with pytest.raises(ValueError, match="context is on meta but the model's parameters are on cpu"):
        model(x, t, **{**kw, "context": context.to("meta")})
    with pytest.raises(ValueError, match=r"t must have shape \(B,\) = \(2,\)"):
        model(x, t[:1].expand(3), **kw)
    empty = {**kw, "context": context[:, :0]}
    if arch in ("mmdit", "flux"):  # joint attention always has the image's own keys: an empty caption is valid
        with torch.no_grad():
            assert model(x, t, **empty).isfinite().all()
    else:
        with pytest.raises(ValueError, match=r"context must have shape \(B, L, 16\) with B = 2 and L >= 1"):
            model(x, t, **empty)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)
        self.b.weight = self.a.weight
        self.register_buffer("table", torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7)
        self.register_buffer("index", torch.arange(3))


def test_build_empty_makes_uninitialised_parameters_in_the_target_dtype_and_keeps_buffers_and_ties():
    from adaln.models._layout import build_empty

    like = torch.empty(0, dtype=torch.bfloat16)
    built = build_empty(_Tied, like)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" and p.requires_grad for p in built.parameters())
    assert built.b.weight is built.a.weight and len(list(built.parameters())) == 3
    assert torch.equal(built.table, _Tied().table.to(torch.bfloat16)) and built.index.dtype == torch.long
    assert nn.Module.register_parameter is _Tied.register_parameter  # the patch is gone
    assert all(p.device.type == "cpu" for p in _Tied().parameters())


def test_from_diffusers_in_bfloat16_holds_exactly_their_weights():
    theirs = _random_dit()
    in_fp32 = from_diffusers(theirs)
    ours = from_diffusers(theirs.to(torch.bfloat16))
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16} and not ours.training
    sd, ref = ours.state_dict(), in_fp32.state_dict()
    for key in ref:
        assert torch.equal(sd[key], ref[key].to(torch.bfloat16)), key


def test_block_count_reads_contiguous_indices_only():
    from adaln.models._layout import block_count

    sd = {"layers.0.w": 0, "layers.1.w": 0, "layers.1.b": 0, "layers_extra.5.w": 0, "head.w": 0}
    assert block_count(sd, "layers") == 2 and block_count(sd, "refiner") == 0
    with pytest.raises(ValueError, match=r"refiner indices must run 0..N-1 \(N >= 1\), got \[\]"):
        block_count(sd, "refiner", minimum=1)
    with pytest.raises(ValueError, match=r"layers indices must run 0..N-1, got \[0, 2\]"):
        block_count({"layers.0.w": 0, "layers.2.w": 0}, "layers")
