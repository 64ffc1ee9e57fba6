"""Flow matching against diffusers (schedules, Euler loop, training weightings, Lumina 2 / Z-Image guidance
formulas), the exact velocity of Gaussian data, float64 re-derivations of DPM-Solver++(2M), NFE, per-sample
seeding and bad inputs.

For data N(mu, s^2 I) on the path x = (1 - sigma) x0 + sigma eps the marginal is N(m, V) with
m = (1 - sigma) mu and V = (1 - sigma)^2 s^2 + sigma^2, and the exact velocity E[eps - x0 | x] is
-mu + (sigma - (1 - sigma) s^2) (x - m) / V. Every solver is then affine in the initial noise z, so the
exact output of each discretisation is p z + q: the samplers must reproduce it, and its (q, |p|) must
approach (mu, s) at the rate of the solver.
"""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from adaln.diffusion import (
    ClassifierFreeGuidance,
    DenoiserVelocity,
    FlowVelocity,
    VelocityDenoiser,
    dpmpp_2m_step,
    flow_loss_weight,
    flow_matching_loss,
    flow_shift_mu,
    flow_sigmas,
    lumina2_cfg_interval,
    sample_edm,
    sample_flow,
    sample_flow_training_sigmas,
    zimage_cfg_interval,
)

MU, S = 0.7, 0.4


def _g(seed):
    return torch.Generator().manual_seed(seed)


def exact_velocity(x, sigma, mu=MU, s=S):
    sg = sigma.view(-1, *[1] * (x.dim() - 1)) if isinstance(sigma, torch.Tensor) else sigma
    m, v = (1 - sg) * mu, (1 - sg) ** 2 * s**2 + sg**2
    return -mu + (sg - (1 - sg) * s**2) * (x - m) / v


class Counting:
    def __init__(self, fn):
        self.fn, self.calls, self.batches = fn, 0, []

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        self.batches.append(x.shape[0])
        assert sigma.shape == (x.shape[0],)
        return self.fn(x, sigma)


# ----------------------------------------------------------------------------- schedules vs diffusers


@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize(
    "config,ours",
    [
        ({}, {}),
        ({"shift": 3.0}, {"shift": 3.0}),
        ({"use_dynamic_shifting": True}, {"mu": 0.8}),
        ({"use_dynamic_shifting": True}, {"mu": 1.15}),
        ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, {"mu": 0.8, "time_shift": "linear"}),
        ({"shift": 3.0, "shift_terminal": 0.02}, {"shift": 3.0, "shift_terminal": 0.02}),
        ({"use_dynamic_shifting": True, "shift_terminal": 0.1}, {"mu": 0.5, "shift_terminal": 0.1}),
    ],
)
def test_flow_sigmas_equal_diffusers(steps, config, ours):
    if steps == 1 and "shift_terminal" in ours:  # diffusers divides 0 by 0 here
        with pytest.raises(ValueError, match="shift_terminal needs steps >= 2"):
            flow_sigmas(steps, **ours)
        return
    sched = FlowMatchEulerDiscreteScheduler(**config)
    sched.set_timesteps(steps, mu=ours.get("mu"))
    got = flow_sigmas(steps, **ours)
    assert got.shape == (steps + 1,) and got[0] == 1 and got[-1] == 0
    assert (got - sched.sigmas.double()).abs().max().item() < 1e-6


@pytest.mark.parametrize("seq_len", [16, 256, 1024, 4096, 8192])
def test_custom_sigmas_with_mu_equal_flux_pipeline(seq_len):
    """Flux / Lumina 2 pipelines: sigmas linspace(1, 1/N, N), mu from the latent token count."""
    steps = 8
    mu = flow_shift_mu(seq_len)
    assert mu == pytest.approx(calculate_shift(seq_len), abs=1e-12)
    base = torch.linspace(1.0, 1 / steps, steps).tolist()
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(steps, sigmas=base, mu=mu)
    got = flow_sigmas(steps, mu=mu, sigmas=base)
    assert (got - sched.sigmas.double()).abs().max().item() < 1e-6


def test_euler_trajectory_equals_diffusers_scheduler_loop():
    """The same velocity, the same noise: every state of sample_flow equals diffusers' step loop."""
    shape, steps = (3, 2, 4, 4), 10
    noise = torch.randn(shape, generator=_g(5))

    def velocity(x, sigma):
        return torch.tanh(x) * (1 + sigma.view(-1, 1, 1, 1)) - 0.3 * x

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    x, theirs = noise.clone(), [noise.clone()]
    for t in sched.timesteps:
        v = velocity(x, (t / 1000).expand(shape[0]))
        x = sched.step(v, t, x, return_dict=False)[0]
        theirs.append(x)
    res = sample_flow(velocity, shape, steps=steps, shift=3.0, generator=_g(5), return_trajectory=True)
    assert res.nfe == steps
    assert (res.trajectory - torch.stack(theirs)).abs().max().item() < 2e-6


# ----------------------------------------------------------------------------- Gaussian data


def _reference(solver, levels, x):
    """float64 re-derivation: Euler, Heun (EDM Algorithm 1's rule, no corrector into 0), DPM-Solver++(2M)
    in flow coordinates (Lu et al. 2022 Alg. 2 with alpha = 1 - sigma, lambda = log(alpha / sigma))."""
    prev_d, h_prev = None, math.inf
    n = len(levels) - 1
    for i, (s, t) in enumerate(zip(levels[:-1], levels[1:])):
        v = exact_velocity(x, s)
        if solver == "euler":
            x = x + (t - s) * v
        elif solver == "heun":
            xe = x + (t - s) * v
            x = xe if t == 0 else x + (t - s) * (v + exact_velocity(xe, t)) / 2
        else:
            d = x - s * v
            if t == 0:
                x = d
                continue
            lam_s = -math.inf if s == 1 else math.log((1 - s) / s)
            h = math.log((1 - t) / t) - lam_s
            first_order = prev_d is None or math.isinf(h_prev) or i == n - 2  # first order into the last level
            dd = d if first_order else d + h / (2 * h_prev) * (d - prev_d)
            x = (t / s) * x - (1 - t) * math.expm1(-h) * dd
            prev_d, h_prev = d, h
    return x


@pytest.mark.parametrize("solver", ["euler", "heun", "dpm++2m"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sample_flow_gaussian_equals_exact_discretisation(solver, shift):
    steps, shape = 12, (2048, 4)
    levels = flow_sigmas(steps, shift=shift).tolist()
    z = torch.randn(shape, generator=_g(1), dtype=torch.float64)
    vel = Counting(exact_velocity)
    res = sample_flow(vel, shape, steps=steps, solver=solver, shift=shift, generator=_g(1), dtype=torch.float64)
    assert (res.samples - _reference(solver, levels, z)).abs().max().item() < 1e-12
    assert res.nfe == vel.calls == (2 * steps - 1 if solver == "heun" else steps)
    # every scheme is affine in z: output p z + q, moments (q, |p|) known exactly
    q = _reference(solver, levels, torch.zeros(1, dtype=torch.float64)).item()
    p = _reference(solver, levels, torch.ones(1, dtype=torch.float64)).item() - q
    n = res.samples.numel()
    assert abs(res.samples.mean().item() - q) < 4 * abs(p) / math.sqrt(n)
    assert abs(res.samples.std().item() - abs(p)) < 4 * abs(p) / math.sqrt(2 * n)


def _moment_error(solver, steps):
    levels = flow_sigmas(steps).tolist()
    q = _reference(solver, levels, torch.zeros(1, dtype=torch.float64)).item()
    p = _reference(solver, levels, torch.ones(1, dtype=torch.float64)).item() - q
    return max(abs(q - MU), abs(abs(p) - S))


def test_solver_orders_on_gaussian_data():
    """Halving the step: Euler's moment error halves (first order), Heun's quarters; DPM++(2M), with its
    first-order steps at both ends, is at least 5x closer than Euler from 16 steps on."""
    for solver, order in (("euler", 1), ("heun", 2)):
        e1, e2 = _moment_error(solver, 32), _moment_error(solver, 64)
        assert 2 ** (order - 0.3) < e1 / e2 < 2 ** (order + 0.3), (solver, e1, e2)
    for steps in (16, 32, 64):
        assert _moment_error("dpm++2m", steps) < 0.2 * _moment_error("euler", steps)


def test_dpmpp_2m_in_edm_equals_kdiffusion_formula():
    """sample_edm(solver="dpm++2m") against k-diffusion sample_dpmpp_2m re-derived in float64."""
    steps, shape, s = 10, (64, 3), 1.3
    den = lambda x, sg: (s**2 * x + sg.view(-1, 1) ** 2 * MU) / (s**2 + sg.view(-1, 1) ** 2)  # noqa: E731
    counted = Counting(den)
    res = sample_edm(counted, shape, steps=steps, solver="dpm++2m", generator=_g(2), dtype=torch.float64)
    sig = (80 ** (1 / 7) + torch.arange(steps, dtype=torch.float64) / (steps - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    sig = torch.cat([sig, torch.zeros(1, dtype=torch.float64)]).tolist()
    x = torch.randn(shape, generator=_g(2), dtype=torch.float64) * sig[0]
    old = None
    for i in range(steps):
        d = den(x, torch.full((shape[0],), sig[i], dtype=torch.float64))
        if old is None or sig[i + 1] == 0:
            x = d if sig[i + 1] == 0 else (sig[i + 1] / sig[i]) * x - math.expm1(-(math.log(sig[i]) - math.log(sig[i + 1]))) * d
        else:
            h = math.log(sig[i]) - math.log(sig[i + 1])
            r = (math.log(sig[i - 1]) - math.log(sig[i])) / h
            x = (sig[i + 1] / sig[i]) * x - math.expm1(-h) * ((1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old)
        old = d
    assert (res.samples - x).abs().max().item() < 1e-12
    assert res.nfe == counted.calls == steps


def test_dpmpp_2m_step_is_the_same_in_flow_and_edm_coordinates():
    """DPM-Solver++ is invariant to the path's scale: a flow step equals the EDM step of the scaled state."""
    levels = [0.9, 0.6, 0.3, 0.1]
    x = torch.randn(5, 3, generator=_g(3), dtype=torch.float64)
    xe = x / (1 - levels[0])
    prev_f = prev_e = None
    hf = he = math.inf
    for s, t in zip(levels[:-1], levels[1:]):
        d = x - s * exact_velocity(x, s)
        x, hf = dpmpp_2m_step(x, d, prev_f, (1 - s, s), (1 - t, t), hf)
        xe, he = dpmpp_2m_step(xe, d, prev_e, (1.0, s / (1 - s)), (1.0, t / (1 - t)), he)
        prev_f = prev_e = d
        assert hf == pytest.approx(he, rel=1e-12)
        assert torch.allclose(x, (1 - t) * xe, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- bridges and conventions


def test_velocity_denoiser_is_the_exact_edm_denoiser_and_round_trips():
    x = torch.randn(6, 5, generator=_g(4), dtype=torch.float64) * 3
    s_edm = torch.tensor([0.0, 0.01, 0.3, 1.0, 7.0, 80.0], dtype=torch.float64)
    d = VelocityDenoiser(exact_velocity)(x, s_edm)
    sg = s_edm.view(-1, 1)
    assert torch.allclose(d, (S**2 * x + sg**2 * MU) / (S**2 + sg**2), rtol=0, atol=1e-12)
    sigma = torch.tensor([0.01, 0.2, 0.5, 0.7, 0.9, 0.999], dtype=torch.float64)
    back = DenoiserVelocity(VelocityDenoiser(exact_velocity))(x, sigma)
    assert torch.allclose(back, exact_velocity(x, sigma), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="flow sigmas in \\(0, 1\\)"):
        DenoiserVelocity(VelocityDenoiser(exact_velocity))(x, torch.ones(6, dtype=torch.float64))


def test_flow_model_sampled_by_edm_heun_reaches_the_data():
    """A velocity model runs through sample_edm (via VelocityDenoiser): Heun 32 steps gets the moments."""
    res = sample_edm(VelocityDenoiser(exact_velocity), (4096, 4), steps=32, generator=_g(6), dtype=torch.float64)
    assert abs(res.samples.mean().item() - MU) < 0.01 and abs(res.samples.std().item() - S) < 0.01


@pytest.mark.parametrize("scale,reverse,sign,t_of", [
    (1000.0, False, 1.0, lambda s: 1000 * s),  # SD3
    (1.0, False, 1.0, lambda s: s),  # Flux
    (1.0, True, -1.0, lambda s: 1 - s),  # Lumina 2, Z-Image
])
def test_flow_velocity_time_conventions(scale, reverse, sign, t_of):
    seen = {}

    def model(x, t):
        seen["t"] = t
        return x * 2

    x, sigma = torch.randn(3, 2), torch.tensor([0.1, 0.5, 0.9])
    out = FlowVelocity(model, timestep_scale=scale, reverse_time=reverse, sign=sign)(x, sigma)
    assert torch.allclose(seen["t"], t_of(sigma)) and torch.equal(out, sign * 2 * x)


def test_reversed_lumina_path_is_our_path():
    """Lumina 2: x_t = (1 - t) eps + t x0 and target x0 - eps; at t = 1 - sigma it is our state, -our target."""
    x0, eps, sigma = torch.randn(4, 3), torch.randn(4, 3), torch.rand(4, 1)
    t = 1 - sigma
    assert torch.allclose((1 - t) * eps + t * x0, (1 - sigma) * x0 + sigma * eps)
    oracle = lambda x, t_model: x0 - eps  # noqa: E731  a perfect Lumina-convention model
    v = FlowVelocity(oracle, reverse_time=True, sign=-1.0)
    loss = flow_matching_loss(v, x0, sigma.flatten(), noise=eps)
    assert loss.item() == 0.0


# ----------------------------------------------------------------------------- training


def test_training_sigmas_match_their_formulas_and_diffusers_weightings():
    gens = lambda: [_g(i) for i in range(64)]  # noqa: E731  fresh per draw
    ln = sample_flow_training_sigmas(64, "logit_normal", logit_mean=0.3, logit_std=1.2, generator=gens(),
                                     dtype=torch.float64)
    z = torch.stack([torch.randn((), generator=_g(i), dtype=torch.float64) for i in range(64)])
    assert torch.allclose(ln, torch.sigmoid(0.3 + 1.2 * z), rtol=0, atol=1e-15)
    u = torch.stack([torch.rand((), generator=_g(i), dtype=torch.float64) for i in range(64)])
    mode = sample_flow_training_sigmas(64, "mode", mode_scale=1.29, generator=gens(), dtype=torch.float64)
    assert torch.allclose(mode, 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u), rtol=0, atol=1e-15)
    shifted = sample_flow_training_sigmas(64, "uniform", shift=3.0, generator=gens(), dtype=torch.float64)
    assert torch.allclose(shifted, 3 * u / (1 + 2 * u), rtol=0, atol=1e-15)
    assert bool(((mode >= 0) & (mode <= 1)).all())
    # diffusers' mode density is the same map of u
    u32 = torch.rand(16, generator=_g(9))
    theirs = compute_density_for_timestep_sampling("mode", 16, mode_scale=1.29, generator=_g(9))
    assert torch.allclose(1 - u32 - 1.29 * (torch.cos(math.pi * u32 / 2) ** 2 - 1 + u32), theirs)
    sig = torch.linspace(0.01, 0.99, 50)
    for w in ("none", "sigma_sqrt", "cosmap"):
        assert torch.allclose(flow_loss_weight(sig, w), compute_loss_weighting_for_sd3(w, sig), rtol=1e-6)


def test_training_sigma_distributions():
    n = 20000
    ln = sample_flow_training_sigmas(n, "logit_normal", generator=_g(0), dtype=torch.float64)
    logit = torch.log(ln / (1 - ln))
    assert abs(logit.mean().item()) < 0.05 and abs(logit.std().item() - 1) < 0.05
    mode = sample_flow_training_sigmas(n, "mode", mode_scale=1.29, generator=_g(0), dtype=torch.float64)
    assert abs(mode.mean().item() - 0.5) < 0.01  # symmetric about 1/2, heavier in the middle than uniform
    assert ((mode - 0.5).abs() < 0.25).double().mean().item() > 0.6


def test_flow_matching_loss_value_mask_and_weighting():
    x0, eps = torch.randn(4, 2, 3, generator=_g(1)), torch.randn(4, 2, 3, generator=_g(2))
    sigma = torch.tensor([0.1, 0.4, 0.6, 0.9])
    net = lambda x, s, scale: scale * x  # noqa: E731
    x = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * eps
    err = ((2.0 * x - (eps - x0)) ** 2).mean(dim=(1, 2))
    got = flow_matching_loss(net, x0, sigma, noise=eps, reduction="none", scale=2.0)
    assert torch.allclose(got, err)
    w = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    assert torch.allclose(flow_matching_loss(net, x0, sigma, noise=eps, weighting="cosmap", scale=2.0), (w * err).mean())
    mask = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 1]], dtype=torch.float32)
    masked = flow_matching_loss(net, x0, sigma, noise=eps, mask=mask, reduction="none", scale=2.0)
    e = (2.0 * x - (eps - x0)) ** 2
    assert masked[2] == 0 and torch.allclose(masked[0], e[0, 0].mean()) and torch.allclose(masked[1], err[1])
    with pytest.raises(ValueError, match="velocity must return"):
        flow_matching_loss(lambda x, s: x[:, :1], x0, sigma)


# ----------------------------------------------------------------------------- sampling details


@pytest.mark.parametrize("solver", ["euler", "heun", "dpm++2m"])
def test_per_sample_generators_are_batch_invariant(solver):
    vel = lambda x, s: torch.sin(x) - s.view(-1, 1, 1)  # noqa: E731
    batch = sample_flow(vel, (4, 3, 2), steps=5, solver=solver, generator=[_g(10 + i) for i in range(4)])
    one = sample_flow(vel, (1, 3, 2), steps=5, solver=solver, generator=[_g(12)])
    assert torch.equal(batch.samples[2:3], one.samples)


def test_callback_and_cond_passthrough():
    infos = []
    vel = lambda x, s, y: x * 0 + y.view(-1, 1)  # noqa: E731
    y = torch.tensor([1.0, -1.0])
    res = sample_flow(vel, (2, 3), steps=4, generator=_g(0), callback=infos.append, y=y)
    assert [i["step"] for i in infos] == [0, 1, 2, 3] and infos[-1]["sigma_next"] == 0 and infos[-1]["nfe"] == 4
    assert torch.allclose(infos[0]["denoised"], infos[0]["x"] * 0 + infos[0]["denoised"])
    start = torch.randn(2, 3, generator=_g(0))
    assert torch.allclose(res.samples, start - y.view(-1, 1))  # sum of dt = -1: x0 = z - v


def test_bad_inputs():
    vel = lambda x, s: x  # noqa: E731
    with pytest.raises(ValueError, match="solver must be one of"):
        sample_flow(vel, (2, 3), solver="rk4")
    with pytest.raises(ValueError, match="shift must be finite and > 0"):
        flow_sigmas(4, shift=0.0)
    with pytest.raises(ValueError, match="not both"):
        flow_sigmas(4, shift=3.0, mu=0.5)
    with pytest.raises(ValueError, match="one level per step"):
        flow_sigmas(4, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="shift_terminal must lie in"):
        flow_sigmas(4, shift_terminal=1.0)
    with pytest.raises(TypeError, match="steps must be an int"):
        sample_flow(vel, (2, 3), steps=2.5)
    with pytest.raises(TypeError, match="velocity must be callable"):
        sample_flow(None, (2, 3))
    with pytest.raises(ValueError, match="velocity must return"):
        sample_flow(lambda x, s: x[:1], (2, 3), steps=2)
    with pytest.raises(ValueError, match="mode_scale must lie in"):
        sample_flow_training_sigmas(4, "mode", mode_scale=3.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        sample_flow_training_sigmas(4, "cosine")
    with pytest.raises(ValueError, match="weighting must be one of"):
        flow_loss_weight(torch.rand(3), "edm")
    with pytest.raises(ValueError, match="s_churn must be 0"):
        sample_edm(vel, (2, 3), solver="dpm++2m", s_churn=1.0)
    with pytest.raises(ValueError, match="image_seq_len"):
        flow_shift_mu(0)
    with pytest.raises(ValueError, match="skip_layers must be a non-empty list"):
        ClassifierFreeGuidance(vel, 2.0, null_cond={"y": 0}, skip_layers=[])
    with pytest.raises(ValueError, match="renorm must be one of"):
        ClassifierFreeGuidance(vel, 2.0, null_cond={"y": 0}, renorm="clip")


# ----------------------------------------------------------------------------- guidance for flow models


def _two_headed(x, sigma, y):
    """A toy conditional velocity: cond and uncond differ and have different norms per row."""
    return torch.tanh(x) * (1 + y.view(-1, 1, 1, 1)) + 0.2 * y.view(-1, 1, 1, 1)


def test_cfg_rescale_equals_lumina2_pipeline_formula():
    x, sigma = torch.randn(2, 3, 4, 5, generator=_g(0)), torch.full((2,), 0.6)
    y = torch.tensor([1.0, 2.0])
    guided = ClassifierFreeGuidance(_two_headed, 4.0, null_cond={"y": 0.0}, renorm="rescale", renorm_dims=-1)
    cond, uncond = _two_headed(x, sigma, y), _two_headed(x, sigma, torch.zeros(2))
    pred = uncond + 4.0 * (cond - uncond)
    ref = pred * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(pred, dim=-1, keepdim=True))
    assert torch.allclose(guided(x, sigma, y=y), ref, atol=1e-6)


@pytest.mark.parametrize("cap", [1.0, 1.3, 100.0])
def test_cfg_cap_equals_zimage_pipeline_formula(cap):
    x, sigma = torch.randn(2, 3, 4, 5, generator=_g(1)), torch.full((2,), 0.6)
    y = torch.tensor([1.0, 0.1])
    zimage_scale = 3.0  # Z-Image: pred = pos + g (pos - neg)
    guided = ClassifierFreeGuidance(_two_headed, zimage_scale + 1, null_cond={"y": 0.0}, renorm="cap", renorm_max=cap)
    pos, neg = _two_headed(x, sigma, y), _two_headed(x, sigma, torch.zeros(2))
    ref = []
    for j in range(2):
        pred = pos[j] + zimage_scale * (pos[j] - neg[j])
        ori, new = torch.linalg.vector_norm(pos[j]), torch.linalg.vector_norm(pred)
        ref.append(pred * (ori * cap / new) if new > ori * cap else pred)
    assert torch.allclose(guided(x, sigma, y=y), torch.stack(ref), atol=1e-5)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_lumina2_truncation_interval_equals_its_step_rule(ratio):
    steps = 10
    sigmas = flow_sigmas(steps, mu=0.9, sigmas=torch.linspace(1, 1 / steps, steps).tolist())
    lo, hi = lumina2_cfg_interval(sigmas, ratio)
    for i in range(steps):
        guided_by_diffusers = not ((i + 1) / steps > ratio)
        assert (lo <= sigmas[i].item() <= hi) == guided_by_diffusers


@pytest.mark.parametrize("truncation", [0.0, 0.3, 0.9, 1.0])
def test_zimage_truncation_interval_equals_its_time_rule(truncation):
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(12)
    lo, hi = zimage_cfg_interval(truncation)
    for t, sigma in zip(sched.timesteps, sched.sigmas[:-1]):
        guided_by_diffusers = not ((1000 - t.float()) / 1000 > truncation)
        assert (lo <= sigma.item() <= hi) == guided_by_diffusers


def test_guided_flow_sampling_in_one_batched_call():
    calls = []

    def vel(x, sigma, y):
        calls.append(x.shape[0])
        return x - y.view(-1, 1)

    res = sample_flow(ClassifierFreeGuidance(vel, 2.0, null_cond={"y": 0.0}, interval=(0.5, 1.0)), (3, 2), steps=6,
                      generator=_g(0), y=torch.ones(3))
    assert res.nfe == 6 and calls == [6] * 6


def test_skip_layer_guidance_equals_the_sd3_pipeline():
    """SD3.5's skip-layer guidance on our converted MMDiT against diffusers' pipeline formula on its own
    transformer, inside and outside the step window."""
    from diffusers import SD3Transformer2DModel

    from adaln.models import SystemVelocity, from_diffusers
    from adaln.diffusion import sd3_skip_layer_interval

    torch.manual_seed(0)
    theirs = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                                   pooled_projection_dim=6, out_channels=4, pos_embed_max_size=8).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ours = from_diffusers(theirs)
    x, ctx, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12), torch.randn(2, 6)
    neg_ctx, neg_pooled = torch.randn(1, 5, 12), torch.randn(1, 6)
    w, slg, layers, steps = 5.0, 2.8, [1], 20
    sigmas = flow_sigmas(steps, shift=3.0)
    lo, hi = sd3_skip_layer_interval(sigmas)
    guided = ClassifierFreeGuidance(SystemVelocity(ours), w, null_cond={"context": neg_ctx, "pooled": neg_pooled},
                                    skip_layers=layers, skip_scale=slg, skip_interval=(lo, hi))
    for i in (0, 1, 3, 4, 10):
        sigma = sigmas[i].float()
        t = (1000 * sigma).expand(2)
        with torch.no_grad():
            run = lambda c, p, **k: theirs(x, timestep=t, encoder_hidden_states=c, pooled_projections=p,  # noqa: E731
                                           return_dict=False, **k)[0]
            text, uncond = run(ctx, pooled), run(neg_ctx.expand(2, -1, -1), neg_pooled.expand(2, -1))
            ref = uncond + w * (text - uncond)
            if i > steps * 0.01 and i < steps * 0.2:
                ref = ref + (text - run(ctx, pooled, skip_layers=layers)) * slg
            got = guided(x, sigma.expand(2), context=ctx, pooled=pooled)
        assert (got - ref).abs().max().item() < 1e-5 * ref.abs().max().item(), i
