"""Flow matching (rectified flow): the path, its schedules, training draws, loss, and the bridges to EDM.

The path is SD3's and Flux's (Esser et al. 2024, eq. 3; Lipman et al. 2023): ``x_sigma = (1 - sigma) x0 +
sigma eps`` for ``sigma`` in [0, 1], and a velocity model ``v(x, sigma, **cond)`` predicts ``eps - x0``.
Its clean-data prediction is ``x0 = x - sigma v``.

Other systems write the same path differently, and :class:`FlowVelocity` converts:

- SD3 / SD3.5 transformers receive ``t = 1000 sigma`` and predict ``eps - x0``
  (``FlowVelocity(model, timestep_scale=1000)``).
- Flux receives ``t = sigma`` (its transformer multiplies by 1000 inside) and predicts ``eps - x0``.
- Lumina 2 writes ``x_t = (1 - t) eps + t x0`` with ``t = 1 - sigma`` and predicts ``x0 - eps``; Z-Image
  receives ``t = (1000 - timestep) / 1000 = 1 - sigma`` and also predicts ``x0 - eps``: both are
  ``FlowVelocity(model, reverse_time=True, sign=-1)`` (their diffusers pipelines negate the output).

An EDM state ``x_e = x0 + s n`` is the flow state ``x = x_e / (1 + s)`` at ``sigma = s / (1 + s)``
(``s = sigma / (1 - sigma)``): :class:`VelocityDenoiser` makes an EDM denoiser of a velocity model (so
``sample_edm``, ``sample_ddim`` and every guidance wrapper run flow models), :class:`DenoiserVelocity` a
velocity of an EDM denoiser (defined for sigma < 1).

Schedules follow diffusers' ``FlowMatchEulerDiscreteScheduler`` (``set_timesteps``), training draws and
loss weightings SD3's paper (section 3.1) and diffusers' ``training_utils``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from adaln.checks import check_choice, check_tensor, check_values, compute_dtype
from adaln.diffusion.losses import masked_sample_mean
from adaln.diffusion._utils import (
    GeneratorArg,
    as_sigma,
    check_generator,
    check_positive,
    check_steps,
    expand_to,
    rand,
    randn,
)

TIME_SHIFTS = ("exponential", "linear")
FLOW_SIGMA_KINDS = ("uniform", "logit_normal", "mode")
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
REDUCTIONS = ("mean", "sum", "none")


#################################################################################
#                                   Schedules                                   #
#################################################################################


def shift_sigma(sigma: float | Tensor, shift: float) -> float | Tensor:
    """SD3's static timestep shift ``s sigma / (1 + (s - 1) sigma)`` (SD3 paper eq. 23; s = 3 for SD3 1024²)."""
    check_positive(shift, "shift")
    return shift * sigma / (1 + (shift - 1) * sigma)


def dynamic_shift(sigma: float | Tensor, mu: float, kind: str = "exponential") -> float | Tensor:
    """Flux's resolution-dependent shift: ``e^mu / (e^mu + (1/sigma - 1))`` ("exponential", the static shift
    with ``s = e^mu``) or ``mu / (mu + (1/sigma - 1))`` ("linear"), diffusers' ``time_shift(mu, 1.0, t)``."""
    check_choice(kind, "time_shift", TIME_SHIFTS)
    if not math.isfinite(mu):
        raise ValueError(f"mu must be finite, got {mu}")
    m = math.exp(mu) if kind == "exponential" else mu
    if kind == "linear" and mu <= 0:
        raise ValueError(f"mu must be > 0 for the linear time shift, got {mu}")
    return m / (m + (1 / sigma - 1))


def flow_shift_mu(
    image_seq_len: int,
    *,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """``mu`` for a token count: linear from ``base_shift`` at ``base_seq_len`` tokens to ``max_shift`` at
    ``max_seq_len`` (diffusers ``pipeline_flux.calculate_shift``; Flux's defaults), extrapolated outside."""
    if not isinstance(image_seq_len, int) or image_seq_len < 1:
        raise ValueError(f"image_seq_len must be an int >= 1 (latent tokens after patching), got {image_seq_len!r}")
    if not base_seq_len < max_seq_len:
        raise ValueError(f"need base_seq_len < max_seq_len, got {base_seq_len} and {max_seq_len}")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def flow_sigmas(
    steps: int,
    *,
    shift: float = 1.0,
    mu: float | None = None,
    time_shift: str = "exponential",
    shift_terminal: float | None = None,
    sigmas: Sequence[float] | None = None,
    num_train_timesteps: int = 1000,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``(steps + 1,)`` descending flow sigmas ending in 0, as diffusers'
    ``FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=mu is not None,
    time_shift_type=time_shift, shift_terminal=shift_terminal).set_timesteps(steps, sigmas=sigmas, mu=mu).sigmas``.

    Base grid: ``linspace(1, sigma_min, steps)`` with diffusers' ``sigma_min``, the last of its 1000 training
    levels (``1 / T``, itself statically shifted when ``mu`` is None), or the given ``sigmas`` (Flux and
    Lumina 2 pipelines pass ``linspace(1, 1 / steps, steps)``). Then the static ``shift`` (``mu`` None) or
    the resolution-dependent ``time_shift`` with ``mu`` (``flow_shift_mu``), then the optional
    ``shift_terminal`` stretch ``1 - (1 - s) (1 - shift_terminal) / (1 - s[-1])`` so the last level before
    0 equals ``shift_terminal``. Computed in float64 (diffusers: float32, agreement ~1e-7).
    """
    check_steps(steps)
    check_positive(shift, "shift")
    if mu is not None and shift != 1.0:
        raise ValueError(f"pass shift (static) or mu (resolution-dependent), not both: shift={shift}, mu={mu}")
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be an int >= 1, got {num_train_timesteps!r}")
    if sigmas is None:
        lowest = 1.0 / num_train_timesteps
        if mu is None:
            lowest = shift_sigma(lowest, shift)
        base = torch.linspace(1.0, lowest, steps, dtype=torch.float64)
    else:
        base = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        if base.numel() != steps:
            raise ValueError(f"sigmas must have one level per step ({steps}), got {base.numel()}")
        if not bool(((base > 0) & (base <= 1)).all()):
            raise ValueError("sigmas must lie in (0, 1]")
    s = shift_sigma(base, shift) if mu is None else dynamic_shift(base, mu, time_shift)
    if shift_terminal is not None:
        if not 0 < shift_terminal < 1:
            raise ValueError(f"shift_terminal must lie in (0, 1), got {shift_terminal}")
        if steps < 2:
            raise ValueError("shift_terminal needs steps >= 2 (with one step the only level is 1, which it keeps)")
        s = 1 - (1 - s) / ((1 - s[-1]) / (1 - shift_terminal))
    return torch.cat([s, s.new_zeros(1)]).to(dtype)


#################################################################################
#                             Training draws and loss                           #
#################################################################################


def sample_flow_training_sigmas(
    n: int,
    kind: str = "logit_normal",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 1.0,
    generator: GeneratorArg = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(n,)`` training sigmas in (0, 1) (SD3 paper section 3.1), then statically ``shift``-ed.

    ``"uniform"``: U(0, 1). ``"logit_normal"``: ``sigmoid(N(logit_mean, logit_std^2))`` (SD3's rf/lognorm(0, 1)).
    ``"mode"``: ``1 - u - s (cos^2(pi u / 2) - 1 + u)`` with ``u ~ U(0, 1)``, ``s = mode_scale`` in
    [-1, 2 / (pi - 2)] (SD3 uses 1.29). A generator list gives sigma ``i`` from generator ``i``.

    Differences from diffusers' training scripts, which draw the same ``u`` (``compute_density_for_timestep_
    sampling``) but use it as an index into the 1000 training levels counted from sigma = 1 (so their sigma is
    ``1 - u`` on a grid): ours is continuous and ``sigma = u`` as in the paper. For uniform, mode and
    logit-normal with mean 0 the two distributions agree; for ``logit_mean != 0`` ours shifts towards noise
    for positive means, as the paper intends.
    """
    check_choice(kind, "kind", FLOW_SIGMA_KINDS)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    generator = check_generator(generator, n)
    if kind == "logit_normal":
        check_positive(logit_std, "logit_std")
        if not math.isfinite(logit_mean):
            raise ValueError(f"logit_mean must be finite, got {logit_mean}")
        u = torch.sigmoid(logit_mean + logit_std * randn((n,), generator, dtype=torch.float64, device=device))
    else:
        u = rand((n,), generator, dtype=torch.float64, device=device)
        if kind == "mode":
            if not -1 <= mode_scale <= 2 / (math.pi - 2):
                raise ValueError(f"mode_scale must lie in [-1, {2 / (math.pi - 2):.4f}] so sigma stays in [0, 1], "
                                 f"got {mode_scale}")
            u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return shift_sigma(u, shift).to(dtype)


def flow_loss_weight(sigma: Tensor, weighting: str = "none") -> Tensor:
    """diffusers ``compute_loss_weighting_for_sd3``: "none" 1, "sigma_sqrt" ``sigma^-2``, "cosmap"
    ``2 / (pi (1 - 2 sigma + 2 sigma^2))``; same shape as ``sigma``."""
    check_choice(weighting, "weighting", FLOW_WEIGHTINGS)
    if weighting == "sigma_sqrt":
        return sigma**-2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    return torch.ones_like(sigma)


def flow_matching_loss(
    velocity: Callable[..., Tensor],
    x0: Tensor,
    sigma: float | Tensor,
    *,
    weighting: str = "none",
    mask: Tensor | None = None,
    noise: Tensor | None = None,
    generator: GeneratorArg = None,
    reduction: str = "mean",
    **cond,
) -> Tensor:
    """``w(sigma) * masked_mean((v(x_sigma, sigma) - (eps - x0))^2)`` per sample, then reduced.

    ``x_sigma = (1 - sigma) x0 + sigma eps``; ``x0`` ``(B, ...)``; ``sigma`` a float or ``(B,)`` in [0, 1];
    ``noise`` ``eps`` defaults to ``N(0, I)`` from ``generator`` (a list: sample ``i`` from generator ``i``);
    ``mask`` as :func:`adaln.diffusion.denoising_loss`; ``weighting`` from :func:`flow_loss_weight`.
    Computed in float32 (float64 for float64 data). diffusers' SD3 script regresses ``x0`` instead
    (``precondition_outputs``), which is this loss times ``sigma^2``.
    """
    check_tensor(x0, "x0", min_dim=2)
    check_choice(reduction, "reduction", REDUCTIONS)
    b, ct = x0.shape[0], compute_dtype(x0.dtype)
    sigma = as_sigma(sigma, b, dtype=ct, device=x0.device)
    if noise is None:
        noise = randn(tuple(x0.shape), check_generator(generator, b), dtype=x0.dtype, device=x0.device)
    elif not isinstance(noise, Tensor) or noise.shape != x0.shape:
        got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a tensor of x0's shape {tuple(x0.shape)}, got {got}")
    s = expand_to(sigma, x0)
    x = ((1 - s) * x0.to(ct) + s * noise.to(ct)).to(x0.dtype)
    out = velocity(x, sigma, **cond)
    if not isinstance(out, Tensor) or out.shape != x0.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"velocity must return a tensor of x0's shape {tuple(x0.shape)}, got {got}")
    err = (out.to(ct) - (noise.to(ct) - x0.to(ct))) ** 2
    per_sample = flow_loss_weight(sigma, weighting) * masked_sample_mean(err, mask, x0)
    if reduction == "none":
        return per_sample
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


#################################################################################
#                        Model time, and the EDM bridges                        #
#################################################################################


class FlowVelocity:
    """``velocity(x, sigma, **cond) = sign * model(x, timestep_scale * (1 - sigma if reverse_time else sigma),
    **cond)``: a flow transformer in its own time convention as a velocity ``eps - x0`` (see the module
    docstring: SD3 ``timestep_scale=1000``; Flux the defaults; Lumina 2 / Z-Image ``reverse_time=True,
    sign=-1``; our DiTs trained with flow ``timestep_scale=1000``)."""

    def __init__(self, model: Callable[..., Tensor], *, timestep_scale: float = 1.0, reverse_time: bool = False,
                 sign: float = 1.0) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable model(x, t, **cond), got {type(model).__name__}")
        check_positive(timestep_scale, "timestep_scale")
        if sign not in (1.0, -1.0):
            raise ValueError(f"sign must be 1 (model predicts eps - x0) or -1 (x0 - eps), got {sign}")
        self.model, self.timestep_scale, self.reverse_time, self.sign = model, timestep_scale, reverse_time, sign

    def timestep(self, sigma: Tensor) -> Tensor:
        """The model's time at flow level ``sigma`` (B,)."""
        return self.timestep_scale * ((1 - sigma) if self.reverse_time else sigma)

    def __call__(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        out = self.model(x, self.timestep(sigma), **cond)
        return out if self.sign == 1.0 else -out

    def __repr__(self) -> str:
        return (f"FlowVelocity(timestep_scale={self.timestep_scale}, reverse_time={self.reverse_time}, "
                f"sign={self.sign})")


def flow_to_edm_sigma(sigma: Tensor) -> Tensor:
    """The EDM level of a flow level: ``s = sigma / (1 - sigma)`` (inverse ``sigma = s / (1 + s)``)."""
    return sigma / (1 - sigma)


class VelocityDenoiser:
    """EDM denoiser ``D(x_e, s, **cond) = x - sigma v(x, sigma, **cond)`` with ``x = x_e / (1 + s)`` and
    ``sigma = s / (1 + s)``: the velocity model's clean-data prediction on the EDM state (exact, no
    approximation; ``D(x_e, 0) = x_e`` up to ``v``'s value times 0)."""

    def __init__(self, velocity: Callable[..., Tensor]) -> None:
        if not callable(velocity):
            raise TypeError(f"velocity must be callable v(x, sigma, **cond), got {type(velocity).__name__}")
        self.velocity = velocity

    def __call__(self, x: Tensor, sigma: float | Tensor, **cond) -> Tensor:
        check_tensor(x, "x", min_dim=2)
        ct = compute_dtype(x.dtype)
        s_edm = as_sigma(sigma, x.shape[0], dtype=ct, device=x.device)  # rejects inf
        s = s_edm / (1 + s_edm)
        xf = x.to(ct) / expand_to(1 + s_edm, x)
        v = self.velocity(xf.to(x.dtype), s.to(_sigma_dtype(sigma, ct)), **cond)
        return (xf - expand_to(s, x) * v.to(ct)).to(x.dtype)


def _sigma_dtype(sigma: float | Tensor, ct: torch.dtype) -> torch.dtype:
    """The dtype to hand a wrapped model its sigma in: the caller's for floating tensors, else ``ct``."""
    return sigma.dtype if isinstance(sigma, Tensor) and sigma.is_floating_point() else ct


class DenoiserVelocity:
    """Velocity ``v(x, sigma, **cond) = (x - D(x / (1 - sigma), sigma / (1 - sigma))) / sigma`` of an EDM denoiser
    (its prediction of ``eps - x0`` on the flow state); defined for ``0 < sigma < 1``: an EDM denoiser cannot
    be evaluated at EDM sigma ``inf`` (flow 1) nor divide by 0."""

    def __init__(self, denoiser: Callable[..., Tensor]) -> None:
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable D(x, sigma, **cond), got {type(denoiser).__name__}")
        self.denoiser = denoiser

    def __call__(self, x: Tensor, sigma: float | Tensor, **cond) -> Tensor:
        check_tensor(x, "x", min_dim=2)
        ct = compute_dtype(x.dtype)
        s = as_sigma(sigma, x.shape[0], dtype=ct, device=x.device)
        if check_values() and not bool(((s > 0) & (s < 1)).all()):
            raise ValueError("DenoiserVelocity needs flow sigmas in (0, 1): EDM sigma is inf at 1 and v is 0/0 at 0")
        s_edm = flow_to_edm_sigma(s)
        d = self.denoiser((x.to(ct) / expand_to(1 - s, x)).to(x.dtype), s_edm.to(_sigma_dtype(sigma, ct)), **cond)
        return ((x.to(ct) - d.to(ct)) / expand_to(s, x)).to(x.dtype)
