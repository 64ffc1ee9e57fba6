"""Schedules, EDM scalings and the two preconditioners against float64 references of the source formulas."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from adaln.diffusion import (
    EDMPrecond,
    VPEpsDenoiser,
    af3_noise_schedule,
    edm_scalings,
    karras_sigmas,
    sigma_to_vp_timestep,
    vp_alphas_cumprod,
    vp_respaced_timesteps,
    vp_sigmas,
    vp_timestep_to_sigma,
)

SIGMAS = [0.002, 0.05, 0.5, 1.0, 3.0, 16.0, 80.0, 2560.0]
SIGMA_DATAS = [0.5, 1.0, 16.0]


# ----------------------------------------------------------------------------- schedules


def test_af3_schedule_endpoints_monotone_and_formula():
    assert af3_noise_schedule(0.0) == pytest.approx(2560.0, rel=1e-12)
    assert af3_noise_schedule(1.0) == pytest.approx(0.0064, rel=1e-12)
    t = np.linspace(0, 1, 201)
    ref = 16.0 * (160.0 ** (1 / 7) + t * (4e-4 ** (1 / 7) - 160.0 ** (1 / 7))) ** 7
    got = af3_noise_schedule(torch.from_numpy(t)).numpy()
    assert np.max(np.abs(got - ref) / ref) < 1e-13
    assert np.all(np.diff(got) < 0)
    # sigma_data scales the whole schedule (AF3's SIGMA_DATA multiplies it).
    assert af3_noise_schedule(0.3, sigma_data=0.5) == pytest.approx(af3_noise_schedule(0.3) / 32, rel=1e-13)


def test_karras_sigmas_endpoints_and_edm_formula():
    n, smin, smax, rho = 18, 0.002, 80.0, 7.0
    got = karras_sigmas(n, smin, smax, rho)
    assert got.dtype == torch.float64 and got.shape == (n + 1,)
    i = np.arange(n)
    ref = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    assert np.max(np.abs(got[:-1].numpy() - ref) / ref) < 1e-14
    assert got[0].item() == pytest.approx(smax, rel=1e-14)
    assert got[-2].item() == pytest.approx(smin, rel=1e-12)
    assert got[-1].item() == 0.0 and bool((got[1:] < got[:-1]).all())
    assert karras_sigmas(1, smin, smax).tolist() == [pytest.approx(smax), 0.0]
    assert karras_sigmas(4, smin, smax, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("bad", [dict(n=0), dict(sigma_min=-0.1), dict(sigma_min=0.0), dict(sigma_max=0.001)])
def test_karras_sigmas_bad_inputs(bad):
    args = dict(n=10, sigma_min=0.002, sigma_max=80.0) | bad
    with pytest.raises(ValueError):
        karras_sigmas(**args)


def test_vp_schedule_matches_ddpm_linear_betas():
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    assert np.max(np.abs(vp_alphas_cumprod().numpy() - abar)) < 1e-15
    sig = np.sqrt((1 - abar) / abar)
    assert np.max(np.abs(vp_sigmas().numpy() - sig) / sig) < 1e-13
    assert sig[0] == pytest.approx(0.0100005, rel=1e-5) and sig[-1] == pytest.approx(157.407, rel=1e-5)


def test_vp_timestep_sigma_interpolation():
    log_sig = np.log(vp_sigmas().numpy())
    grid = np.exp(log_sig)
    # Grid levels map to their integer steps; geometric midpoints to half steps.
    t_grid = sigma_to_vp_timestep(torch.from_numpy(grid))
    assert torch.max(torch.abs(t_grid - torch.arange(1000, dtype=torch.float64))).item() < 1e-9
    mid = np.exp(0.5 * (log_sig[:-1] + log_sig[1:]))
    t_mid = sigma_to_vp_timestep(torch.from_numpy(mid)).numpy()
    assert np.max(np.abs(t_mid - (np.arange(999) + 0.5))) < 1e-9
    # Fractional t: log-sigma interpolated linearly (np.interp reference).
    t = np.array([0.0, 0.25, 10.5, 499.9, 998.75, 999.0])
    ref = np.exp(np.interp(t, np.arange(1000), log_sig))
    got = vp_timestep_to_sigma(torch.from_numpy(t)).numpy()
    assert np.max(np.abs(got - ref) / ref) < 1e-13
    # Round trip and clamping outside the grid; floats come back as floats.
    s = torch.logspace(-1.9, 2.1, 50, dtype=torch.float64)
    assert torch.max(torch.abs(vp_timestep_to_sigma(sigma_to_vp_timestep(s)) / s - 1)).item() < 1e-12
    assert sigma_to_vp_timestep(1e-4) == 0.0 and sigma_to_vp_timestep(1e4) == 999.0
    assert isinstance(vp_timestep_to_sigma(3.5), float)
    assert sigma_to_vp_timestep(torch.tensor([1.0])).dtype == torch.float32
    with pytest.raises(ValueError):
        vp_timestep_to_sigma(1000.5)


def _fb_space_timesteps(num_timesteps, count):
    """fb DiT respace.space_timesteps(num_timesteps, [count]) for one section."""
    frac_stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    cur, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur))
        cur += frac_stride
    return set(taken)


@pytest.mark.parametrize("steps", [1, 7, 25, 50, 250, 1000])
def test_vp_respaced_timesteps_matches_fb(steps):
    got = vp_respaced_timesteps(steps)
    assert got == sorted(_fb_space_timesteps(1000, steps)) and len(got) == steps


def test_vp_respaced_timesteps_bad():
    with pytest.raises(ValueError):
        vp_respaced_timesteps(0)
    with pytest.raises(ValueError):
        vp_respaced_timesteps(1001)


# ----------------------------------------------------------------------------- EDM scalings


@pytest.mark.parametrize("sd", SIGMA_DATAS)
def test_edm_scalings_unit_variance_identities(sd):
    s = torch.tensor(SIGMAS, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_scalings(s, sd)
    # Network input c_in (x0 + s n) has unit variance: c_in^2 (s^2 + sd^2) = 1.
    assert torch.max(torch.abs(c_in**2 * (s**2 + sd**2) - 1)).item() < 1e-13
    # Effective target F = (x0 - c_skip x) / c_out with x = x0 + s n:
    # Var F = ((1 - c_skip)^2 sd^2 + c_skip^2 s^2) / c_out^2 = 1.
    var_target = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * s**2) / c_out**2
    assert torch.max(torch.abs(var_target - 1)).item() < 1e-12
    # c_skip minimises Var F, and EDM's loss weight 1/c_out^2 makes the weighted target unit-variance.
    assert torch.max(torch.abs((c_out**2 + c_skip * sd**2) / sd**2 - 1)).item() < 1e-13
    assert torch.max(torch.abs(c_noise - torch.log(s) / 4)).item() < 1e-15
    for k, sig in enumerate(SIGMAS):  # float path agrees with the tensor path
        floats = edm_scalings(sig, sd)
        for f, t in zip(floats, (c_skip, c_out, c_in, c_noise)):
            assert f == pytest.approx(t[k].item(), rel=1e-14)


def test_edm_scalings_monte_carlo_unit_variance():
    g = torch.Generator().manual_seed(1)
    sd, n = 16.0, 200_000
    # Non-Gaussian data with std sd: the identities only use second moments.
    x0 = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * sd * math.sqrt(3)
    for s in (0.1, 16.0, 500.0):
        c_skip, c_out, c_in, _ = edm_scalings(s, sd)
        x = x0 + s * torch.randn(n, generator=g, dtype=torch.float64)
        for v in ((c_in * x).std().item(), ((x0 - c_skip * x) / c_out).std().item()):
            assert abs(v - 1) < 5 / math.sqrt(2 * n)  # 5 standard errors of a std (kurtosis <= 3 here)


def test_edm_scalings_bad_inputs():
    with pytest.raises(ValueError):
        edm_scalings(-1.0, 0.5)
    with pytest.raises(ValueError):
        edm_scalings(1.0, 0.0)


# ----------------------------------------------------------------------------- EDMPrecond


class _Net(nn.Module):
    """Random channels-last MLP that uses its noise input, records what it was called with."""

    def __init__(self, c):
        super().__init__()
        self.lin = nn.Linear(c, c)
        self.emb = nn.Linear(1, c)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.5)
        self.calls = []

    def forward(self, x, c_noise, *, shift=None):
        self.calls.append((x, c_noise))
        out = self.lin(x) + self.emb(c_noise.to(self.lin.weight.dtype)[:, None])[:, None, :]
        return out if shift is None else out + shift


def _ref_edm(net, x, sigma, sd, c_noise_fn):
    """EDM eq. 7 in float64 with the float64 network."""
    x, s = x.double(), sigma.double()
    total = s**2 + sd**2
    c_skip, c_out, c_in = sd**2 / total, s * sd / total.sqrt(), 1 / total.sqrt()
    v = lambda c: c[:, None, None]  # noqa: E731
    netd = _Net(x.shape[-1]).double()
    netd.load_state_dict(net.state_dict())
    return v(c_skip) * x + v(c_out) * netd(v(c_in) * x, c_noise_fn(s))


@pytest.mark.parametrize("noise_input", ["edm", "af3", "callable"])
def test_edm_precond_matches_float64_reference(noise_input):
    sd = 16.0 if noise_input == "af3" else 0.5
    fns = {"edm": lambda s: s.log() / 4, "af3": lambda s: s / sd, "callable": lambda s: torch.sin(s)}
    net = _Net(6)
    precond = EDMPrecond(net, sd, noise_input=torch.sin if noise_input == "callable" else noise_input)
    x = torch.randn(5, 7, 6) * 3
    sigma = torch.tensor([0.002, 0.3, 1.0, 17.0, 80.0])
    out = precond(x, sigma)
    ref = _ref_edm(net, x, sigma, sd, fns[noise_input])
    err = (out.double() - ref).abs().max().item()
    assert out.dtype == torch.float32 and err < 1e-4 * (1 + ref.abs().max().item())
    # The net got c_in x and the documented noise input.
    got_cn = net.calls[-1][1]
    assert torch.allclose(got_cn.double(), fns[noise_input](sigma.double()), rtol=1e-6, atol=1e-7)
    # float64 in, float64 out, to rounding.
    out64 = EDMPrecond(net.double(), sd, noise_input=precond.noise_input)(x.double(), sigma.double())
    assert (out64 - ref).abs().max().item() < 1e-12


def test_edm_precond_float_sigma_cond_passthrough_and_half_inputs():
    net = _Net(4)
    precond = EDMPrecond(net, 0.5)
    x = torch.randn(3, 2, 4)
    shift = torch.randn(3, 2, 4)
    a = precond(x, 0.7, shift=shift)
    b = precond(x, torch.full((3,), 0.7), shift=shift)
    assert torch.equal(a, b)
    xb = x.bfloat16()
    out = EDMPrecond(net.bfloat16(), 0.5)(xb, torch.full((3,), 0.7))
    x_in, c_noise = net.calls[-1]
    assert out.dtype == torch.bfloat16 and x_in.dtype == torch.bfloat16 and c_noise.dtype == torch.float32


def test_edm_precond_bad_inputs():
    precond = EDMPrecond(_Net(4), 0.5)
    x = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match="sigma"):
        precond(x, -0.5)
    with pytest.raises(ValueError, match="sigma"):
        precond(x, torch.tensor([0.1, -0.2, 0.3]))
    with pytest.raises(ValueError, match="sigma"):
        precond(x, torch.ones(4))
    with pytest.raises(ValueError, match="noise_input"):
        EDMPrecond(_Net(4), 0.5, noise_input="vp")


# ----------------------------------------------------------------------------- VPEpsDenoiser

MU, S = 0.4, 0.8  # data N(MU, S^2)


class _AnalyticEps(nn.Module):
    """Exact E[eps | x_vp] for data N(MU, S^2) at a (fractional) DDPM timestep t, channels-first."""

    def __init__(self, learned_sigma=False):
        super().__init__()
        self.log_sig = np.log(vp_sigmas().numpy())
        self.learned_sigma = learned_sigma
        self.seen_t = []

    def forward(self, x_vp, t, y=None):
        self.seen_t.append(t)
        sig = np.exp(np.interp(t.double().numpy(), np.arange(1000), self.log_sig))
        abar = torch.from_numpy(1 / (1 + sig**2)).to(x_vp.dtype).view(-1, *[1] * (x_vp.dim() - 1))
        # x_vp = sqrt(abar) x0 + sqrt(1-abar) eps: Cov(eps, x_vp) = sqrt(1-abar), Var = abar S^2 + 1 - abar.
        eps = (1 - abar).sqrt() * (x_vp - abar.sqrt() * MU) / (abar * S**2 + 1 - abar)
        if y is not None:
            eps = eps + 0 * y.view(-1, *[1] * (x_vp.dim() - 1))
        return torch.cat([eps, torch.randn_like(eps)], 1) if self.learned_sigma else eps


def _analytic_d(x, sigma):
    s = sigma.view(-1, *[1] * (x.dim() - 1))
    return (S**2 * x + s**2 * MU) / (S**2 + s**2)


@pytest.mark.parametrize("learned_sigma", [False, True])
def test_vp_eps_denoiser_equals_analytic_denoiser(learned_sigma):
    model = _AnalyticEps(learned_sigma)
    den = VPEpsDenoiser(model, learned_sigma_channels=learned_sigma)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64) * 5
    sigma = torch.tensor([0.0101, 0.07, 0.9, 3.3, 40.0, 150.0], dtype=torch.float64)
    err = (den(x, sigma, y=torch.arange(6)) - _analytic_d(x, sigma)).abs().max().item()
    assert err < 1e-11


def test_vp_eps_denoiser_round_timesteps_feeds_integer_steps():
    model = _AnalyticEps()
    den = VPEpsDenoiser(model, round_timesteps=True)
    steps = torch.tensor([0, 17, 500, 999])
    sigma = vp_sigmas()[steps].float()
    x = torch.randn(4, 3, 2, 2)
    out = den(x, sigma)
    assert model.seen_t[-1].dtype == torch.int64 and torch.equal(model.seen_t[-1], steps)
    assert (out.double() - _analytic_d(x.double(), sigma.double())).abs().max().item() < 1e-4


def test_vp_eps_denoiser_bad_channels():
    den = VPEpsDenoiser(_AnalyticEps(learned_sigma=True))  # returns 2C but wrapper expects C
    with pytest.raises(ValueError, match="channels"):
        den(torch.randn(2, 3, 2, 2), 1.0)
