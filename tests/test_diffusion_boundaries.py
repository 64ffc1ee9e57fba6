"""Bad input at the diffusion boundary: clear errors, not silent NaN; the exact EDM answer at sigma = 0."""

import math

import pytest
import torch
from torch import nn

from adaln.diffusion import ClassifierFreeGuidance, EDMPrecond, sample_af3, sample_ddim, sample_edm
from adaln.diffusion.schedules import vp_alphas_cumprod
from adaln.nn import AdaLN, TimestepEmbedder

INF, NAN = math.inf, math.nan


class TinyDiT(nn.Module):
    """DiT-shaped: noise level -> sinusoidal ``TimestepEmbedder`` -> AdaLN over channels-last tokens.

    ``ln(0) / 4 = -inf`` gives ``cos(-inf) = NaN`` in the embedding, as in every DiT.
    """

    def __init__(self, channels: int = 4, hidden: int = 16):
        super().__init__()
        self.t_embedder = TimestepEmbedder(hidden, frequency_embedding_size=32)
        self.inp, self.out = nn.Linear(channels, hidden), nn.Linear(hidden, channels)
        self.norm = AdaLN(hidden, hidden)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.3)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        tokens = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        h = self.norm(self.inp(tokens), self.t_embedder(c_noise))
        return self.out(h).permute(0, 3, 1, 2)


def edm_formula(net, x, sigma, sd):
    """EDM eq. 7 as written (NVlabs/edm): NaN at sigma = 0 through ln(0)."""
    s = sigma.view(-1, 1, 1, 1)
    total = s**2 + sd**2
    return sd**2 / total * x + s * sd / total.sqrt() * net(x / total.sqrt(), sigma.log() / 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edm_precond_at_sigma_zero_returns_x_exactly(dtype):
    net = TinyDiT().to(dtype)
    precond = EDMPrecond(net, 0.5)
    x = torch.randn(3, 4, 5, 5, dtype=dtype)
    assert torch.isnan(edm_formula(net, x, torch.zeros(3, dtype=dtype), 0.5)).all()  # the source's answer
    assert torch.equal(precond(x, 0.0), x)
    sigma = torch.tensor([0.0, 0.7, 0.0], dtype=dtype)
    out = precond(x, sigma)
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    # sigma > 0 is untouched: same as the formula to rounding
    ref = edm_formula(net, x[1:2], sigma[1:2], 0.5)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (out[1:2] - ref).abs().max().item() <= tol * ref.abs().max().item()


def test_edm_precond_at_sigma_zero_has_finite_gradients():
    net = TinyDiT()
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    EDMPrecond(net, 0.5)(x, torch.tensor([0.0, 1.5])).sum().backward()
    assert torch.equal(x.grad[0], torch.ones_like(x[0]))  # dD/dx = c_skip(0) = 1, nothing from the net
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("noise_input", ["af3", "callable"])
def test_edm_precond_sigma_zero_never_reaches_the_net(noise_input):
    seen = []

    def net(x, c_noise):
        seen.append(c_noise)
        return x * c_noise.log().view(-1, *[1] * (x.dim() - 1))  # AF3 takes log(sigma / sigma_data) inside

    fn = "af3" if noise_input == "af3" else (lambda s: s)
    x = torch.randn(2, 6, 3)
    out = EDMPrecond(net, 16.0, noise_input=fn)(x, torch.tensor([0.0, 3.0]))
    assert torch.equal(out[0], x[0]) and torch.isfinite(out).all()
    assert (seen[-1] > 0).all()


def test_edm_precond_rejects_non_finite_sigma():
    precond = EDMPrecond(TinyDiT(), 0.5)
    x = torch.randn(2, 4, 3, 3)
    for bad in (INF, NAN):
        with pytest.raises(ValueError, match=f"sigma must be finite and >= 0, got {bad}"):
            precond(x, bad)
        with pytest.raises(ValueError, match="sigma must be finite and >= 0 everywhere"):
            precond(x, torch.tensor([1.0, bad]))


# ----------------------------------------------------------------------------- guidance


def _denoiser(x, sigma, y):
    return x * (1 + y.view(-1, *[1] * (x.dim() - 1)).to(x.dtype))


@pytest.mark.parametrize("scale", [INF, NAN, -1.0])
def test_cfg_scale_must_be_finite_and_nonnegative(scale):
    match = rf"scale must be finite and >= 0 \(0: unconditional, 1: conditional\), got {scale}"
    with pytest.raises(ValueError, match=match):
        ClassifierFreeGuidance(_denoiser, scale, null_cond={"y": 0})


@pytest.mark.parametrize(
    "channels, match",
    [
        ([0, 4], r"guided_channels \[4\] out of range for the 4 channels on dim 1 of x \(2, 4, 3\) "
                 r"\(valid: -4 to 3\)"),
        ([-5, 1, 9], r"guided_channels \[-5, 9\] out of range for the 4 channels"),
        (slice(4, 8), r"guided_channels slice\(4, 8, None\) selects none of the 4 channels on dim 1 of x"),
    ],
)  # fmt: skip
def test_cfg_guided_channels_out_of_range(channels, match):
    x, y = torch.randn(2, 4, 3), torch.tensor([1, 2])
    for scale in (1.0, 2.0):  # the check does not depend on the scale
        guided = ClassifierFreeGuidance(_denoiser, scale, null_cond={"y": 0}, guided_channels=channels)
        with pytest.raises(ValueError, match=match):
            guided(x, 0.5, y=y)
    in_range = ClassifierFreeGuidance(_denoiser, 2.0, null_cond={"y": 0}, guided_channels=[-4, 3])
    assert torch.isfinite(in_range(x, 0.5, y=y)).all()


# ----------------------------------------------------------------------------- samplers


def _predicts_zero(x, sigma):
    return torch.zeros_like(x)


@pytest.mark.parametrize("bad", [INF, NAN])
@pytest.mark.parametrize("name", ["sigma_max", "sigma_min", "rho", "s_noise"])
def test_sample_edm_rejects_non_finite_levels(name, bad):
    kind = ">= 0" if name == "s_noise" else "> 0"
    with pytest.raises(ValueError, match=f"{name} must be finite and {kind}, got {bad}"):
        sample_edm(_predicts_zero, (2, 3), steps=2, **{name: bad})


def test_sample_edm_churn_window_must_be_ordered():
    with pytest.raises(ValueError, match=r"need s_tmin <= s_tmax \(s_tmax may be inf\), got s_tmin=nan"):
        sample_edm(_predicts_zero, (2, 3), steps=2, s_tmin=NAN)
    assert torch.isfinite(sample_edm(_predicts_zero, (2, 3), steps=2, s_churn=5.0, s_tmax=INF).samples).all()


@pytest.mark.parametrize("bad", [INF, NAN])
@pytest.mark.parametrize(
    "name, kind",
    [("sigma_data", "> 0"), ("s_min", "> 0"), ("s_max", "> 0"), ("p", "> 0"), ("gamma_0", ">= 0"),
     ("noise_scale", ">= 0"), ("step_scale", ">= 0"), ("s_trans", ">= 0")],
)  # fmt: skip
def test_sample_af3_rejects_non_finite_levels(name, kind, bad):
    with pytest.raises(ValueError, match=f"{name} must be finite and {kind}, got {bad}"):
        sample_af3(_predicts_zero, (2, 4, 3), steps=2, **{name: bad})


@pytest.mark.parametrize("bad", [INF, NAN])
def test_sample_af3_gamma_min_must_be_finite(bad):
    with pytest.raises(ValueError, match=f"gamma_min must be finite, got {bad}"):
        sample_af3(_predicts_zero, (2, 4, 3), steps=2, gamma_min=bad)


@pytest.mark.parametrize("bad", [INF, NAN])
def test_sample_ddim_rejects_non_finite_schedule(bad):
    abar = vp_alphas_cumprod(20)
    abar[5] = bad
    message = r"alphas_cumprod must be decreasing and inside \(0, 1\), without NaN"
    with pytest.raises(ValueError, match=message):
        sample_ddim(_predicts_zero, (2, 3), steps=4, alphas_cumprod=abar)
    with pytest.raises(ValueError, match=rf"eta must be in \[0, 1\] .*got {bad}"):
        sample_ddim(_predicts_zero, (2, 3), steps=4, eta=bad)
