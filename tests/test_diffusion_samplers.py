"""Samplers against the exact denoiser of a Gaussian, float64 re-implementations of the sources, NFE,
per-sample seeding and bad inputs.

For data N(mu, s^2 I) the exact denoiser is D(x, sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2). Every
sampler step is then affine in the state and its fresh noise, so the mean and variance a sampler
produces are known exactly (``_moments``): the gap between those and (mu, s) is the sampler's
discretisation error, and the measured sample moments must match them within Monte-Carlo error.
"""

import math

import numpy as np
import pytest
import torch

from adaln.diffusion import VPEpsDenoiser, sample_af3, sample_ddim, sample_edm, vp_sigmas

N_SAMPLES, DIMS = 4096, 8  # 32768 iid values per run
SE_SIGMAS = 4.0  # tolerance in standard errors: fixed seeds, so a pass is deterministic


class Gaussian:
    """Exact per-sample denoiser of N(mu, s^2 I); records calls, batch sizes and sigma dtypes."""

    def __init__(self, mu, s):
        self.mu, self.s = mu, s
        self.calls, self.batches = 0, []

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        self.batches.append(x.shape[0])
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        sg = sigma.view(-1, *[1] * (x.dim() - 1))
        return (self.s**2 * x + sg**2 * self.mu) / (self.s**2 + sg**2)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _d(x, t, mu, s):
    return (s * s * x + t * t * mu) / (s * s + t * t)


# -- float64 references of the sources: each returns (initial std, [(step(x, eps), draws_noise)]) --


def _edm_reference(
    mu, s, steps, smin=0.002, smax=80.0, rho=7.0, solver="heun", s_churn=0.0, s_tmin=0.0, s_tmax=math.inf,
    s_noise=1.0,
):
    """NVlabs/edm generate.py edm_sampler (Algorithm 2)."""
    i = np.arange(steps)
    t = (smax ** (1 / rho) + i / max(steps - 1, 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    t = np.append(t, 0.0)
    fns = []
    for k in range(steps):
        t_cur, t_next = t[k], t[k + 1]
        gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= t_cur <= s_tmax else 0
        t_hat = t_cur + gamma * t_cur
        c = math.sqrt(t_hat**2 - t_cur**2) * s_noise

        def f(x, eps, k=k, t_hat=t_hat, t_next=t_next, c=c):
            x_hat = x + c * eps
            d_cur = (x_hat - _d(x_hat, t_hat, mu, s)) / t_hat
            x_next = x_hat + (t_next - t_hat) * d_cur
            if solver == "heun" and k < steps - 1:
                d_prime = (x_next - _d(x_next, t_next, mu, s)) / t_next
                x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
            return x_next

        fns.append((f, c > 0))
    return t[0], fns


def _af3_reference(mu, s, steps=200, sd=16.0, gamma_0=0.8, gamma_min=1.0, noise_scale=1.003, step_scale=1.5):
    """AF3 diffusion_head.sample without augmentation (gamma tested on the next level)."""
    t = np.linspace(0, 1, steps + 1)
    levels = sd * (160.0 ** (1 / 7) + t * (4e-4 ** (1 / 7) - 160.0 ** (1 / 7))) ** 7
    fns = []
    for prev, nxt in zip(levels[:-1], levels[1:]):
        gamma = gamma_0 * (nxt > gamma_min)
        t_hat = prev * (1 + gamma)
        c = noise_scale * math.sqrt(max(t_hat**2 - prev**2, 0.0))

        def f(x, eps, nxt=nxt, t_hat=t_hat, c=c):
            x_noisy = x + c * eps
            grad = (x_noisy - _d(x_noisy, t_hat, mu, s)) / t_hat
            return x_noisy + step_scale * (nxt - t_hat) * grad

        fns.append((f, c > 0))
    return levels[0], fns


def _ddim_reference(mu, s, steps, eta=0.0):
    """fb DiT ddim_sample in VP space with the exact epsilon of the Gaussian; x_vp(T) = z."""
    abar_all = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    stride = (1000 - 1) / (steps - 1) if steps > 1 else 1
    ts = sorted({round(k * stride) for k in range(steps)})
    fns = []
    for k in reversed(range(len(ts))):
        abar = abar_all[ts[k]]
        abar_prev = abar_all[ts[k - 1]] if k > 0 else 1.0
        sig = eta * math.sqrt((1 - abar_prev) / (1 - abar)) * math.sqrt(1 - abar / abar_prev)

        def f(x, noise, abar=abar, abar_prev=abar_prev, sig=sig):
            eps = math.sqrt(1 - abar) * (x - math.sqrt(abar) * mu) / (abar * s * s + 1 - abar)
            x0 = math.sqrt(1 / abar) * x - math.sqrt(1 / abar - 1) * eps
            return x0 * math.sqrt(abar_prev) + math.sqrt(1 - abar_prev - sig**2) * eps + sig * noise

        fns.append((f, sig > 0))
    return 1.0, fns


def _moments(init_std, fns):
    """Exact mean and std of the output: every step is x -> a x + b + c eps."""
    m, v = 0.0, init_std**2
    for f, _ in fns:
        a, c = f(1.0, 0.0) - f(0.0, 0.0), f(0.0, 1.0) - f(0.0, 0.0)
        m, v = f(m, 0.0), a * a * v + c * c
    return m, math.sqrt(v)


def _run_reference(init_std, fns, shape, seed):
    """Per-sample float64 trajectory drawing noise from one generator like the samplers do."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * init_std
    for f, noisy in fns:
        x = f(x, torch.randn(shape, generator=g, dtype=torch.float64) if noisy else 0.0)
    return x


def _check_statistics(samples, mu, s, pred_mean, pred_std):
    n = samples.numel()
    mean, std = samples.mean().item(), samples.std().item()
    se_mean, se_std = pred_std / math.sqrt(n), pred_std / math.sqrt(2 * n)
    assert abs(mean - pred_mean) < SE_SIGMAS * se_mean
    assert abs(std - pred_std) < SE_SIGMAS * se_std
    # Against the data distribution: Monte-Carlo error plus the sampler's exact discretisation error.
    assert abs(mean - mu) < SE_SIGMAS * se_mean + abs(pred_mean - mu)
    assert abs(std - s) < SE_SIGMAS * se_std + abs(pred_std - s)


# ----------------------------------------------------------------------------- sample_edm


@pytest.mark.parametrize("solver,steps,disc_bound", [("heun", 32, 0.015), ("euler", 32, 0.08)])
def test_sample_edm_gaussian(solver, steps, disc_bound):
    mu, s, seed = 0.7, 1.3, 0
    den = Gaussian(mu, s)
    shape = (N_SAMPLES, DIMS)
    res = sample_edm(den, shape, steps=steps, solver=solver, generator=_g(seed), dtype=torch.float64)
    init, fns = _edm_reference(mu, s, steps, solver=solver)
    ref = _run_reference(init, fns, shape, seed)
    assert (res.samples - ref).abs().max().item() < 1e-11
    pm, ps = _moments(init, fns)
    _check_statistics(res.samples, mu, s, pm, ps)
    assert abs(ps - s) / s < disc_bound  # exact std error of the scheme: Heun 32 steps +1.2 %, Euler -7 %
    assert res.nfe == den.calls == (2 * steps - 1 if solver == "heun" else steps)


def test_sample_edm_churn_matches_reference():
    mu, s, seed = -0.3, 0.6, 3
    shape = (64, 5)
    res = sample_edm(
        Gaussian(mu, s), shape, steps=12, s_churn=6.0, s_noise=1.007,
        generator=torch.Generator().manual_seed(seed), dtype=torch.float64,
    )
    init, fns = _edm_reference(mu, s, 12, s_churn=6.0, s_noise=1.007)
    assert (res.samples - _run_reference(init, fns, shape, seed)).abs().max().item() < 1e-11


def test_sample_edm_float32_close_to_float64_reference():
    a = sample_edm(Gaussian(0.7, 1.3), (16, 4), steps=18, generator=torch.Generator().manual_seed(5)).samples
    init, fns = _edm_reference(0.7, 1.3, 18)
    x = torch.randn((16, 4), generator=torch.Generator().manual_seed(5)).double() * init
    for f, _ in fns:
        x = f(x, 0.0)
    assert a.dtype == torch.float32 and (a.double() - x).abs().max().item() < 1e-5


# ----------------------------------------------------------------------------- sample_af3


def test_sample_af3_euler_gaussian():
    mu, s, seed = 3.0, 10.0, 1
    den = Gaussian(mu, s)
    shape = (N_SAMPLES, DIMS)
    kw = dict(gamma_0=0.0, noise_scale=1.0, step_scale=1.0)
    res = sample_af3(den, shape, augment=False, generator=_g(seed), dtype=torch.float64, **kw)
    init, fns = _af3_reference(mu, s, **kw)
    assert (res.samples - _run_reference(init, fns, shape, seed)).abs().max().item() < 1e-10
    pm, ps = _moments(init, fns)
    _check_statistics(res.samples, mu, s, pm, ps)
    assert abs(ps - s) / s < 0.02  # Euler over AF3's 200 levels: -1.6 % in std
    assert res.nfe == den.calls == 200


def test_sample_af3_defaults_are_sharper_than_data():
    """step_scale 1.5 (with churn gamma_0 0.8, noise_scale 1.003) shrinks the spread below the data's."""
    mu, s, seed = 3.0, 10.0, 2
    den = Gaussian(mu, s)
    shape = (N_SAMPLES, DIMS)
    res = sample_af3(den, shape, augment=False, generator=_g(seed), dtype=torch.float64)
    init, fns = _af3_reference(mu, s)
    assert (res.samples - _run_reference(init, fns, shape, seed)).abs().max().item() < 1e-10
    pm, ps = _moments(init, fns)
    n = res.samples.numel()
    assert abs(res.samples.mean().item() - pm) < SE_SIGMAS * ps / math.sqrt(n)
    assert abs(res.samples.std().item() - ps) < SE_SIGMAS * ps / math.sqrt(2 * n)
    assert res.samples.std().item() < 0.75 * s and ps < 0.75 * s  # predicted 6.80 for s = 10
    assert res.nfe == 200


def test_sample_af3_last_level_and_gamma_on_next_level():
    seen = []

    def den(x, sigma):
        seen.append(sigma[0].item())
        return torch.zeros_like(x)

    steps = 50
    sample_af3(den, (2, 3, 3), steps=steps, augment=False, dtype=torch.float64)
    t = np.linspace(0, 1, steps + 1)
    levels = 16 * (160 ** (1 / 7) + t * (4e-4 ** (1 / 7) - 160 ** (1 / 7))) ** 7
    # The denoiser sees t_hat = sigma_prev (1 + gamma), gamma = 0.8 iff the NEXT level exceeds gamma_min = 1.
    expect = [p * (1.8 if n > 1.0 else 1.0) for p, n in zip(levels[:-1], levels[1:])]
    assert np.allclose(seen, expect, rtol=1e-12)
    assert levels[-1] == pytest.approx(0.0064) and levels[0] == pytest.approx(2560.0)


def _af3_augmented_reference(x0_seed_gens, shape, mask, steps, mu, s):
    """AF3 sample with Algorithm 19 each step, float64, per-sample generators; numpy QR for rotations."""
    b = shape[0]
    t = np.linspace(0, 1, steps + 1)
    levels = 16 * (160 ** (1 / 7) + t * (4e-4 ** (1 / 7) - 160 ** (1 / 7))) ** 7
    out = []
    for i in range(b):
        g = x0_seed_gens[i]
        m = mask[i].double()[:, None]
        x = torch.randn(shape[1:], generator=g, dtype=torch.float64) * levels[0] * m
        for prev, nxt in zip(levels[:-1], levels[1:]):
            a = torch.randn((3, 3), generator=g, dtype=torch.float64).numpy()
            q, r = np.linalg.qr(a)
            q = q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]
            if np.linalg.det(q) < 0:
                q[:, 2] *= -1
            trans = torch.randn(3, generator=g, dtype=torch.float64)
            centre = (x * m).sum(0) / max(m.sum().item(), 1e-6)
            x = ((x - centre) @ torch.from_numpy(q) + trans) * m
            gamma = 0.8 if nxt > 1.0 else 0.0
            t_hat = prev * (1 + gamma)
            std = 1.003 * math.sqrt(max(t_hat**2 - prev**2, 0.0))
            if std > 0:
                x = x + std * torch.randn(shape[1:], generator=g, dtype=torch.float64) * m
            x = (x + 1.5 * (nxt - t_hat) * (x - _d(x, t_hat, mu, s)) / t_hat) * m
        out.append(x)
    return torch.stack(out)


def test_sample_af3_with_augmentation_and_mask_matches_reference():
    shape, steps = (3, 11, 3), 30
    mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(9)) > 0.3
    gens = lambda: [torch.Generator().manual_seed(40 + i) for i in range(3)]  # noqa: E731
    res = sample_af3(Gaussian(0.5, 4.0), shape, steps=steps, mask=mask, generator=gens(), dtype=torch.float64)
    ref = _af3_augmented_reference(gens(), shape, mask, steps, 0.5, 4.0)
    assert (res.samples - ref).abs().max().item() < 1e-9
    assert bool((res.samples[~mask] == 0).all())


def test_sample_af3_unbatched_mask_and_image_shapes():
    mask = torch.tensor([True, True, False, True])
    res = sample_af3(Gaussian(0.0, 1.0), (2, 4, 3), steps=5, mask=mask, generator=_g(0))
    assert bool((res.samples[:, 2] == 0).all()) and res.samples.shape == (2, 4, 3)
    img = sample_af3(Gaussian(0.0, 0.5), (2, 1, 4, 4), steps=5, sigma_data=0.5, augment=False)
    assert img.samples.shape == (2, 1, 4, 4) and torch.isfinite(img.samples).all()


# ----------------------------------------------------------------------------- sample_ddim


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sample_ddim_gaussian_matches_fb_reference(eta):
    mu, s, seed, steps = 0.7, 1.3, 4, 50
    den = Gaussian(mu, s)
    shape = (N_SAMPLES, DIMS)
    res = sample_ddim(den, shape, steps=steps, eta=eta, generator=_g(seed), dtype=torch.float64)
    init, fns = _ddim_reference(mu, s, steps, eta)
    assert (res.samples - _run_reference(init, fns, shape, seed)).abs().max().item() < 1e-10
    pm, ps = _moments(init, fns)
    _check_statistics(res.samples, mu, s, pm, ps)
    assert abs(ps - s) / s < (0.04 if eta == 0 else 0.08)  # exact std error of DDIM 50 steps: -3.3 % (eta 0)
    assert res.nfe == den.calls == steps


def test_sample_ddim_through_vp_eps_wrapper_with_integer_steps():
    """An fb-style epsilon model at its own integer steps reproduces fb's VP-space DDIM."""
    mu, s = 0.2, 0.9
    log_sig = np.log(vp_sigmas().numpy())
    seen = []

    def eps_model(x_vp, t, y):
        seen.append(t)
        assert t.dtype == torch.int64 and y.shape == (x_vp.shape[0],)
        abar = torch.from_numpy(1 / (1 + np.exp(log_sig[t.numpy()]) ** 2)).view(-1, 1, 1, 1)
        return (1 - abar).sqrt() * (x_vp - abar.sqrt() * mu) / (abar * s * s + 1 - abar)

    shape = (8, 2, 3, 3)
    den = VPEpsDenoiser(eps_model, round_timesteps=True)
    res = sample_ddim(den, shape, steps=25, generator=_g(1), dtype=torch.float64, y=torch.zeros(8))
    init, fns = _ddim_reference(mu, s, 25)
    assert (res.samples - _run_reference(init, fns, shape, 1)).abs().max().item() < 1e-10
    ts = sorted({round(k * 999 / 24) for k in range(25)})
    assert [int(t[0]) for t in seen] == ts[::-1]


def test_sample_ddim_clip_denoised():
    res = sample_ddim(Gaussian(3.0, 0.1), (32, 2), steps=10, clip_denoised=True)
    assert res.samples.max().item() <= 1.0


# ----------------------------------------------------------------------------- shared contract

SAMPLERS = {
    "edm_heun_churn": lambda den, shape, **kw: sample_edm(den, shape, steps=8, s_churn=5.0, **kw),
    "edm_euler": lambda den, shape, **kw: sample_edm(den, shape, steps=8, solver="euler", **kw),
    "af3": lambda den, shape, **kw: sample_af3(den, shape, steps=12, **kw),
    "ddim_eta": lambda den, shape, **kw: sample_ddim(den, shape, steps=8, eta=0.5, **kw),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_per_sample_generators_are_batch_invariant(name):
    sampler = SAMPLERS[name]
    b, shape = 6, (13, 3)
    mask = torch.rand(b, 13, generator=torch.Generator().manual_seed(0)) > 0.25
    extra = (lambda i: {"mask": mask[i]}) if name == "af3" else (lambda i: {})
    gens = lambda idx: [torch.Generator().manual_seed(1000 + i) for i in idx]  # noqa: E731
    full = sampler(Gaussian(0.3, 2.0), (b, *shape), generator=gens(range(b)), **(extra(slice(None)))).samples
    for i in (0, 3, 5):
        one = sampler(Gaussian(0.3, 2.0), (1, *shape), generator=gens([i]), **extra(slice(i, i + 1))).samples
        assert torch.equal(one[0], full[i])
    pair = sampler(Gaussian(0.3, 2.0), (2, *shape), generator=gens([5, 0]), **extra([5, 0])).samples
    assert torch.equal(pair[0], full[5]) and torch.equal(pair[1], full[0])


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_single_generator_reproducible_and_callback(name):
    sampler = SAMPLERS[name]
    infos = []
    a = sampler(Gaussian(0.0, 1.0), (4, 5, 3), generator=_g(7), callback=infos.append)
    b = sampler(Gaussian(0.0, 1.0), (4, 5, 3), generator=_g(7), return_trajectory=True)
    assert torch.equal(a.samples, b.samples) and a.trajectory is None
    assert b.trajectory.shape == (len(infos) + 1, 4, 5, 3) and torch.equal(b.trajectory[-1], b.samples)
    assert [i["step"] for i in infos] == list(range(len(infos))) and infos[-1]["nfe"] == a.nfe
    assert all(i["x"].shape == (4, 5, 3) and i["denoised"].shape == (4, 5, 3) for i in infos)


def test_cond_is_passed_through():
    seen = []

    def den(x, sigma, y, flag):
        seen.append((y, flag))
        return torch.zeros_like(x)

    y = torch.arange(3)
    for sampler in (sample_edm, sample_af3, sample_ddim):
        sampler(den, (3, 2, 3), steps=2, y=y, flag="on")
        assert seen[-1][0] is y and seen[-1][1] == "on"


@pytest.mark.parametrize("sampler", [sample_edm, sample_af3, sample_ddim])
def test_bad_inputs(sampler):
    den, shape = Gaussian(0.0, 1.0), (2, 4, 3)
    with pytest.raises(ValueError, match="steps"):
        sampler(den, shape, steps=0)
    with pytest.raises(TypeError, match="steps"):
        sampler(den, shape, steps=2.5)
    with pytest.raises(ValueError, match="generator"):
        sampler(den, shape, steps=2, generator=[torch.Generator()])
    with pytest.raises(TypeError, match="generator"):
        sampler(den, shape, steps=2, generator=[torch.Generator(), 3])
    with pytest.raises(TypeError, match="shape"):
        sampler(den, "2x4x3", steps=2)
    with pytest.raises(ValueError, match="shape"):
        sampler(den, (0, 4, 3), steps=2)
    with pytest.raises(ValueError, match="denoiser must return"):
        sampler(lambda x, s: x[:, :1], shape, steps=2)
    with pytest.raises(TypeError, match="denoiser"):
        sampler("not callable", shape, steps=2)
    with pytest.raises(TypeError, match="dtype"):
        sampler(den, shape, steps=2, dtype=torch.int64)


def test_bad_sampler_specific_inputs():
    den = Gaussian(0.0, 1.0)
    with pytest.raises(ValueError, match="sigma_min"):
        sample_edm(den, (2, 3), sigma_min=-0.1)
    with pytest.raises(ValueError, match="solver"):
        sample_edm(den, (2, 3), solver="rk4")
    with pytest.raises(ValueError, match="s_churn"):
        sample_edm(den, (2, 3), s_churn=-1.0)
    with pytest.raises(ValueError, match="mask"):
        sample_af3(den, (2, 4, 3), steps=2, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="mask"):
        sample_af3(den, (2, 4, 3), steps=2, mask=torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"\(B, \*atoms, 3\)"):
        sample_af3(den, (2, 4, 2), steps=2)
    with pytest.raises(ValueError, match="sigma_data"):
        sample_af3(den, (2, 4, 3), steps=2, sigma_data=-16.0)
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(den, (2, 3), eta=1.5)
    with pytest.raises(ValueError, match="steps"):
        sample_ddim(den, (2, 3), steps=1001)
