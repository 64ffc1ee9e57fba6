"""Samplers over any EDM denoiser ``D(x, sigma, **cond)`` (EDM Algorithm 2, DPM-Solver++(2M), AlphaFold3's,
DDIM) and over any flow velocity ``v(x, sigma, **cond)`` (Euler, Heun, DPM-Solver++(2M)).

Common contract:

- ``denoiser(x, sigma, **cond)`` (or ``velocity``) gets ``x`` ``(B, ...)`` in ``dtype`` and ``sigma`` a ``(B,)`` tensor of
  ``dtype``, and returns clean-data predictions of ``x``'s shape; ``**cond`` is passed through unchanged.
- ``generator``: None, one ``torch.Generator``, or a list with one per sample (sample ``i`` then depends
  only on generator ``i``: the same seed gives the same sample in a batch of 1 or 64, for a per-sample
  denoiser).
- Noise levels are shared by the batch, so step coefficients are Python floats (double precision) and
  the state stays in ``dtype``.
- The result is a :class:`SampleResult` with the exact number of denoiser evaluations (``nfe``).
- ``callback(info)`` runs after every step with ``info`` a dict: ``step`` (0-based), ``sigma`` (level
  the denoiser was called at), ``sigma_next``, ``x`` (state after the step), ``denoised`` (that call's
  prediction) and ``nfe`` (evaluations so far).
- Sampling runs under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from adaln.diffusion._utils import (
    GeneratorArg,
    check_generator,
    check_nonnegative,
    check_positive,
    check_shape,
    check_steps,
    randn,
)
from adaln.diffusion.augmentation import check_atom_mask, centre_random_augmentation
from adaln.diffusion.flow import flow_sigmas
from adaln.diffusion.schedules import af3_noise_schedule, karras_sigmas, vp_respaced_timesteps, vp_sigmas

Denoiser = Callable[..., Tensor]
SOLVERS = ("heun", "euler", "dpm++2m")


@dataclass
class SampleResult:
    """Final samples ``(B, ...)``, the number of denoiser evaluations, and optionally every state.

    ``trajectory`` is ``(levels, B, ...)``: the initial noise and the state after each step.
    """

    samples: Tensor
    nfe: int
    trajectory: Tensor | None = None


class _Run:
    """Book-keeping shared by the samplers: denoiser calls, NFE, callback, trajectory."""

    def __init__(self, denoiser: Denoiser, cond: dict, callback, keep_trajectory: bool, dtype: torch.dtype,
                 name: str = "denoiser"):
        if not callable(denoiser):
            sig = "v(x, sigma, **cond)" if name == "velocity" else "D(x, sigma, **cond)"
            raise TypeError(f"{name} must be callable {sig}, got {type(denoiser).__name__}")
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable or None")
        self.denoiser, self.cond, self.callback, self.dtype, self.name = denoiser, cond, callback, dtype, name
        self.nfe = 0
        self.states: list[Tensor] | None = [] if keep_trajectory else None

    def denoise(self, x: Tensor, sigma: float) -> Tensor:
        self.nfe += 1
        s = torch.full((x.shape[0],), sigma, dtype=self.dtype, device=x.device)
        out = self.denoiser(x, s, **self.cond)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{self.name} must return a tensor of x's shape {tuple(x.shape)}, got {got}")
        return out.to(self.dtype)

    def record(self, x: Tensor) -> None:
        if self.states is not None:
            self.states.append(x)

    def step_done(self, step: int, sigma: float, sigma_next: float, x: Tensor, denoised: Tensor) -> None:
        self.record(x)
        if self.callback is not None:
            self.callback(
                dict(step=step, sigma=sigma, sigma_next=sigma_next, x=x, denoised=denoised, nfe=self.nfe)
            )

    def result(self, x: Tensor) -> SampleResult:
        traj = torch.stack(self.states) if self.states is not None else None
        return SampleResult(samples=x, nfe=self.nfe, trajectory=traj)


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype


@torch.no_grad()
def sample_edm(
    denoiser: Denoiser,
    shape: tuple[int, ...],
    *,
    steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    solver: str = "heun",
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator: GeneratorArg = None,
    callback: Callable[[dict], None] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    return_trajectory: bool = False,
    **cond,
) -> SampleResult:
    """EDM Algorithm 2 (NVlabs/edm ``generate.py:edm_sampler``): Heun steps, the last one Euler.

    Levels ``karras_sigmas(steps, sigma_min, sigma_max, rho)`` end at 0. Churn
    ``gamma = min(s_churn / steps, sqrt(2) - 1)`` applies where ``s_tmin <= sigma <= s_tmax``.
    NFE: ``2 * steps - 1`` for Heun, ``steps`` for Euler and ``"dpm++2m"`` (:func:`dpmpp_2m_step`, no
    churn). Differs from the source only in that noise for churn is drawn only on steps with ``gamma > 0``.
    """
    shape = check_shape(shape)
    check_steps(steps)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    check_nonnegative(s_churn, "s_churn")
    check_nonnegative(s_noise, "s_noise")
    if not s_tmin <= s_tmax:  # also catches NaN
        raise ValueError(f"need s_tmin <= s_tmax (s_tmax may be inf), got s_tmin={s_tmin}, s_tmax={s_tmax}")
    dtype = _check_dtype(dtype)
    generator = check_generator(generator, shape[0])
    levels = karras_sigmas(steps, sigma_min, sigma_max, rho).tolist()
    run = _Run(denoiser, cond, callback, return_trajectory, dtype)

    x = randn(shape, generator, dtype=dtype, device=device) * levels[0]
    run.record(x)
    if solver == "dpm++2m":
        if s_churn > 0:
            raise ValueError("s_churn must be 0 with solver='dpm++2m' (a deterministic multistep solver)")
        return _dpmpp_2m(run, x, [(1.0, s) for s in levels])
    for i, (t_cur, t_next) in enumerate(zip(levels[:-1], levels[1:])):
        gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= t_cur <= s_tmax else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            eps = randn(shape, generator, dtype=dtype, device=x.device)
            x = x + math.sqrt(t_hat**2 - t_cur**2) * s_noise * eps
        denoised = run.denoise(x, t_hat)
        d_cur = (x - denoised) / t_hat
        x_next = x + (t_next - t_hat) * d_cur
        if solver == "heun" and i < steps - 1:
            d_prime = (x_next - run.denoise(x_next, t_next)) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
        run.step_done(i, t_hat, t_next, x, denoised)
    return run.result(x)


@torch.no_grad()
def sample_af3(
    denoiser: Denoiser,
    shape: tuple[int, ...],
    *,
    steps: int = 200,
    sigma_data: float = 16.0,
    gamma_0: float = 0.8,
    gamma_min: float = 1.0,
    noise_scale: float = 1.003,
    step_scale: float = 1.5,
    augment: bool = True,
    s_trans: float = 1.0,
    mask: Tensor | None = None,
    s_min: float = 4e-4,
    s_max: float = 160.0,
    p: float = 7.0,
    generator: GeneratorArg = None,
    callback: Callable[[dict], None] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    return_trajectory: bool = False,
    **cond,
) -> SampleResult:
    """AlphaFold3's sampler (``diffusion_head.sample``); NFE = ``steps``.

    Levels ``af3_noise_schedule(linspace(0, 1, steps + 1))`` run from ``sigma_data * s_max`` to
    ``sigma_data * s_min`` (0.0064 by default, not 0). Per step ``i`` (``sigma_prev -> sigma``):
    optional ``centre_random_augmentation``; ``gamma = gamma_0`` if ``sigma > gamma_min`` (the NEXT level,
    as in the source) else 0; ``t_hat = sigma_prev (1 + gamma)``; ``x_n = x + noise_scale
    sqrt(t_hat^2 - sigma_prev^2) eps``; ``x = x_n + step_scale (sigma - t_hat) (x_n - D(x_n, t_hat)) /
    t_hat``.

    ``shape`` is ``(B, *atoms, 3)`` when ``augment`` or ``mask`` is used, else any ``(B, ...)``.
    ``mask`` ``(*atoms)`` or ``(B, *atoms)``: masked atoms are held at 0 in the state, the noise and the
    output (AF3 leaves noise on them and relies on its denoiser and the returned mask to ignore them).
    ``mask`` is the sampler's own argument; a denoiser that needs it takes it under another keyword.
    Per-sample draws per step: rotation (9 normals), translation (3), then noise if ``t_hat > sigma_prev``.
    """
    shape = check_shape(shape)
    check_steps(steps)
    for name, value in (("sigma_data", sigma_data), ("s_min", s_min), ("s_max", s_max), ("p", p)):
        check_positive(value, name)
    for name, value in (("gamma_0", gamma_0), ("noise_scale", noise_scale), ("step_scale", step_scale)):
        check_nonnegative(value, name)
    if not math.isfinite(gamma_min):
        raise ValueError(f"gamma_min must be finite, got {gamma_min}")
    check_nonnegative(s_trans, "s_trans")
    dtype = _check_dtype(dtype)
    generator = check_generator(generator, shape[0])
    if (augment or mask is not None) and (len(shape) < 3 or shape[-1] != 3):
        raise ValueError(f"augment/mask need coordinates of shape (B, *atoms, 3), got shape {shape}")
    t = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    levels = af3_noise_schedule(t, sigma_data, s_min, s_max, p).tolist()
    run = _Run(denoiser, cond, callback, return_trajectory, dtype)

    x = randn(shape, generator, dtype=dtype, device=device) * levels[0]
    m = None
    if mask is not None:
        m = check_atom_mask(mask, x)[..., None]
        x = x * m
    run.record(x)
    for i, (sigma_prev, sigma) in enumerate(zip(levels[:-1], levels[1:])):
        if augment:
            x = centre_random_augmentation(x, None if m is None else m[..., 0], s_trans, generator)
        gamma = gamma_0 if sigma > gamma_min else 0.0
        t_hat = sigma_prev * (1 + gamma)
        # max(., 0): the source guards the sqrt of a tiny negative difference the same way.
        std = noise_scale * math.sqrt(max(t_hat**2 - sigma_prev**2, 0.0))
        if std > 0:
            noise = randn(shape, generator, dtype=dtype, device=x.device)
            x = x + std * (noise if m is None else noise * m)
        denoised = run.denoise(x, t_hat)
        x = x + step_scale * (sigma - t_hat) * (x - denoised) / t_hat
        if m is not None:
            x = x * m
        run.step_done(i, t_hat, sigma, x, denoised)
    return run.result(x)


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    shape: tuple[int, ...],
    *,
    steps: int = 50,
    eta: float = 0.0,
    alphas_cumprod: Tensor | None = None,
    clip_denoised: bool = False,
    generator: GeneratorArg = None,
    callback: Callable[[dict], None] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    return_trajectory: bool = False,
    **cond,
) -> SampleResult:
    """DDIM (fb DiT ``ddim_sample_loop`` over ``space_timesteps(T, [steps])``) driven by an EDM denoiser.

    Takes an EDM denoiser (e.g. a :class:`VPEpsDenoiser` around an fb DiT checkpoint, with
    ``round_timesteps=True`` for its integer steps) and runs the DDIM update in EDM coordinates, which
    is exact: with ``x_vp = sqrt(abar) x`` and ``sigma = sqrt((1 - abar) / abar)``, DDIM eq. 12 becomes
    ``x' = D + sqrt(sigma'^2 - c^2) (x - D) / sigma + c z`` with
    ``c = eta sigma' sqrt(sigma^2 - sigma'^2) / sigma``.
    The start ``x_vp = N(0, I)`` is ``x = z sqrt(1 + sigma_max^2)``; the last step lands on ``D``
    (``abar = 1``).
    ``clip_denoised`` clamps ``D`` to [-1, 1] like fb's ``clip_denoised=True``. NFE = ``steps``. Noise is
    drawn only when ``eta > 0`` (the source draws it every step and multiplies it by 0).
    """
    shape = check_shape(shape)
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    dtype = _check_dtype(dtype)
    generator = check_generator(generator, shape[0])
    grid = vp_sigmas(alphas_cumprod)
    timesteps = vp_respaced_timesteps(steps, grid.numel())
    levels = [grid[t].item() for t in reversed(timesteps)] + [0.0]
    run = _Run(denoiser, cond, callback, return_trajectory, dtype)

    x = randn(shape, generator, dtype=dtype, device=device) * math.sqrt(1 + levels[0] ** 2)
    run.record(x)
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        denoised = run.denoise(x, sigma)
        if clip_denoised:
            denoised = denoised.clamp(-1, 1)
        c = eta * sigma_next * math.sqrt(sigma**2 - sigma_next**2) / sigma
        # eta <= 1 keeps sigma_next^2 - c^2 >= 0; max() only absorbs rounding.
        x_next = denoised + math.sqrt(max(sigma_next**2 - c**2, 0.0)) * (x - denoised) / sigma
        if c > 0:
            x_next = x_next + c * randn(shape, generator, dtype=dtype, device=x.device)
        x = x_next
        run.step_done(i, sigma, sigma_next, x, denoised)
    return run.result(x)


def dpmpp_2m_step(
    x: Tensor, denoised: Tensor, previous: Tensor | None, level: tuple[float, float], level_next: tuple[float, float],
    h_previous: float,
) -> tuple[Tensor, float]:
    """One DPM-Solver++(2M) step (Lu et al. 2022, Algorithm 2; k-diffusion ``sample_dpmpp_2m``) on any path
    ``x = alpha x0 + sigma n`` (EDM: alpha 1; flow: alpha ``1 - sigma``). Returns the next state and ``h``.

    ``level`` = (alpha_s, sigma_s), ``lambda = log(alpha / sigma)``, ``h = lambda_t - lambda_s``;
    ``x_t = (sigma_t / sigma_s) x - alpha_t expm1(-h) D`` with ``D = (1 + 1/(2r)) D_0 - 1/(2r) D_prev``,
    ``r = h_prev / h`` (first order without a previous prediction or when ``h_prev`` is infinite, i.e.
    after a step from flow sigma 1). The step to sigma 0 returns ``D_0`` (first order, as k-diffusion and
    diffusers' ``lower_order_final``).
    """
    (a_s, s_s), (a_t, s_t) = level, level_next
    if s_t == 0:
        return denoised, math.inf
    lam = lambda a, s: -math.inf if a == 0 else math.log(a) - math.log(s)  # noqa: E731
    h = lam(a_t, s_t) - lam(a_s, s_s)
    d = denoised
    if previous is not None and math.isfinite(h_previous):
        half_inv_r = h / (2 * h_previous)
        d = (1 + half_inv_r) * denoised - half_inv_r * previous
    return (s_t / s_s) * x - a_t * math.expm1(-h) * d, h


def _dpmpp_2m(run: _Run, x: Tensor, levels: list[tuple[float, float]], to_denoised=None,
              first_order_into_last: bool = False) -> SampleResult:
    """DPM-Solver++(2M) over ``levels`` (alpha, sigma); ``to_denoised(x, out, sigma)`` turns the model's
    output into the clean-data prediction (default: the output is one). ``first_order_into_last``: the step
    onto the last nonzero level is first order too."""
    previous, h_prev = None, math.inf
    steps = len(levels) - 1
    for i, (lv, lv_next) in enumerate(zip(levels[:-1], levels[1:])):
        out = run.denoise(x, lv[1])
        denoised = out if to_denoised is None else to_denoised(x, out, lv[1])
        if first_order_into_last and i == steps - 2:
            previous = None
        x, h_prev = dpmpp_2m_step(x, denoised, previous, lv, lv_next, h_prev)
        previous = denoised
        run.step_done(i, lv[1], lv_next[1], x, denoised)
    return run.result(x)


FLOW_SOLVERS = ("euler", "heun", "dpm++2m")


@torch.no_grad()
def sample_flow(
    velocity: Denoiser,
    shape: tuple[int, ...],
    *,
    steps: int = 28,
    solver: str = "euler",
    shift: float = 1.0,
    mu: float | None = None,
    time_shift: str = "exponential",
    shift_terminal: float | None = None,
    sigmas: list[float] | None = None,
    generator: GeneratorArg = None,
    callback: Callable[[dict], None] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    return_trajectory: bool = False,
    **cond,
) -> SampleResult:
    """Integrate a flow velocity ``v(x, sigma, **cond)`` (predicting ``noise - data``) from noise to data.

    Levels :func:`adaln.diffusion.flow_sigmas` ``(steps, shift=, mu=, time_shift=, shift_terminal=, sigmas=)``,
    from 1 to 0; the start is ``randn(shape)`` (one generator: ``torch.randn(shape, generator=g)``).

    - ``"euler"``: ``x += (sigma_next - sigma) v``, diffusers' ``FlowMatchEulerDiscreteScheduler.step``;
      NFE ``steps``.
    - ``"heun"``: Euler predictor, trapezoid corrector with ``v`` at the next level, no corrector into
      sigma 0 (EDM Algorithm 1's rule); NFE ``2 steps - 1``.
    - ``"dpm++2m"``: :func:`dpmpp_2m_step` on the data prediction ``x - sigma v`` with alpha ``1 - sigma``;
      NFE ``steps``. The first step (from sigma 1) is DDIM, the second first order too (``h`` of the
      first is infinite), and so are the last two: the default grid's last nonzero level is ``1 / T``, where
      ``lambda`` jumps by several times the previous steps' ``h`` and the two-step extrapolation overshoots
      (Gaussian data, std error at 8 / 16 steps: +0.22 / +0.08 second order, -0.04 / +0.003 first order).

    The callback's ``denoised`` is the data prediction ``x - sigma v`` of that step's first call.
    """
    shape = check_shape(shape)
    check_steps(steps)
    if solver not in FLOW_SOLVERS:
        raise ValueError(f"solver must be one of {FLOW_SOLVERS}, got {solver!r}")
    dtype = _check_dtype(dtype)
    generator = check_generator(generator, shape[0])
    levels = flow_sigmas(steps, shift=shift, mu=mu, time_shift=time_shift, shift_terminal=shift_terminal,
                         sigmas=sigmas).tolist()
    run = _Run(velocity, cond, callback, return_trajectory, dtype, name="velocity")

    x = randn(shape, generator, dtype=dtype, device=device)
    run.record(x)
    if solver == "dpm++2m":
        return _dpmpp_2m(run, x, [(1.0 - s, s) for s in levels], to_denoised=lambda x, v, s: x - s * v,
                         first_order_into_last=True)
    for i, (s_cur, s_next) in enumerate(zip(levels[:-1], levels[1:])):
        v = run.denoise(x, s_cur)
        denoised = x - s_cur * v
        x_next = x + (s_next - s_cur) * v
        if solver == "heun" and s_next > 0:
            x_next = x + (s_next - s_cur) * 0.5 * (v + run.denoise(x_next, s_next))
        x = x_next
        run.step_done(i, s_cur, s_next, x, denoised)
    return run.result(x)
