"""Bad input at the boundary of DiT, ConditionalDiT and ResidualDenoiser: half-precision x into a float32
model is a clear TypeError unless autocast is on (then it runs), and a tensor on another device than the
model is a ValueError naming the argument (the 'meta' device stands in for a second device)."""

from __future__ import annotations

import pytest
import torch

from adaln.models.conditioning import ConditionalDiT
from adaln.models.dit import DiT
from adaln.models.residual_denoiser import ResidualDenoiser

META = torch.device("meta")


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


MODELS = {
    "dit": lambda: DiT(8, 2, 3, 32, 1, 2, num_classes=10, learn_sigma=False),
    "conditional": lambda: ConditionalDiT(8, 2, 3, 32, 1, 2, num_classes=10, vec_dim=6, token_dim=5),
    "residual_hyena": lambda: ResidualDenoiser(8, 2, 3, 32, 1, mixer="hyena", num_heads=2, num_classes=10),
    "residual_attention": lambda: ResidualDenoiser(8, 2, 3, 32, 1, mixer="attention", num_heads=2, num_classes=10),
}


def _inputs(name: str, b: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    args = dict(x=torch.randn(b, 3, 8, 8, generator=g), t=torch.tensor([3.0, 700.0]), y=torch.tensor([1, 10]))
    if name == "conditional":
        args.update(vec=torch.randn(b, 6, generator=g), tokens=torch.randn(b, 4, 5, generator=g),
                    token_mask=torch.tensor([[True, True, False, False], [True, True, True, True]]))  # fmt: skip
    return args


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_x_dtype_other_than_the_model_is_a_clear_error(name, dtype):
    model, args = MODELS[name](), _inputs(name)
    args["x"] = args["x"].to(dtype)
    want = rf"x has dtype {dtype} but the model's parameters are torch.float32: cast one to the other"
    with pytest.raises(TypeError, match=want):
        model(**args)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_autocast_still_runs_float32_and_bfloat16_x(name):
    model, args = _randomise(MODELS[name]()), _inputs(name)
    with torch.no_grad():
        ref = model(**args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = [model(**args), model(**{**args, "x": args["x"].bfloat16()})]
    assert ref.abs().max() > 0.1  # random weights: a non-trivial output
    for out in outs:
        assert out.shape == ref.shape and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=5e-2 * ref.abs().max().item())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_an_argument_on_another_device_is_named(name):
    model, args = MODELS[name](), _inputs(name)
    for arg in args:
        moved = {**args, arg: args[arg].to(META)}
        with pytest.raises(ValueError, match=rf"^{arg} is on meta but the model's parameters are on cpu; move it"):
            model(**moved)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_inputs_on_the_cpu_for_a_model_elsewhere_are_named(name):
    model, args = MODELS[name]().to(META), _inputs(name)
    want = r"^x is on cpu but the model's parameters are on meta; move it with x.to\('meta'\)"
    with pytest.raises(ValueError, match=want):
        model(**args)
