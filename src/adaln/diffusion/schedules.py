"""Noise-level schedules: AlphaFold3's, Karras et al. (EDM) and the DDPM linear-beta (VP) schedule.

EDM's sigma is the common scale: ``x = x0 + sigma * n``. A VP/DDPM state ``x_vp = sqrt(abar) x0 +
sqrt(1 - abar) eps`` is the same point as ``x = x_vp / sqrt(abar)`` with ``sigma = sqrt((1 - abar) / abar)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adaln.diffusion._utils import check_positive, check_steps


def af3_noise_schedule(
    t: float | Tensor, sigma_data: float = 16.0, s_min: float = 4e-4, s_max: float = 160.0, p: float = 7.0
) -> float | Tensor:
    """AF3 ``diffusion_head.noise_schedule``: ``sd (s_max^(1/p) + t (s_min^(1/p) - s_max^(1/p)))^p``.

    ``sd = sigma_data``; ``t`` in [0, 1] runs from ``sd * s_max`` (2560 with the defaults) to ``sd * s_min``
    (0.0064).
    """
    lo, hi = s_min ** (1 / p), s_max ** (1 / p)
    return sigma_data * (hi + t * (lo - hi)) ** p


def karras_sigmas(
    n: int,
    sigma_min: float,
    sigma_max: float,
    rho: float = 7.0,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """EDM time steps (Karras et al. 2022, eq. 5): ``n`` levels from ``sigma_max`` to ``sigma_min``, then 0.

    Returns ``(n + 1,)`` descending. With ``n == 1`` the only level is ``sigma_max`` (EDM's formula
    divides by ``n - 1``).
    """
    check_steps(n, "n")
    check_positive(sigma_min, "sigma_min")
    check_positive(sigma_max, "sigma_max")
    check_positive(rho, "rho")
    if sigma_max < sigma_min:
        raise ValueError(f"sigma_max must be >= sigma_min, got sigma_max={sigma_max}, sigma_min={sigma_min}")
    ramp = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype=dtype, device=device)


def vp_alphas_cumprod(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """``abar_t = prod_{s<=t} (1 - beta_s)`` for DDPM's linear betas, float64 ``(num_steps,)``.

    Matches fb DiT ``get_named_beta_schedule("linear", 1000)``; for other step counts fb scales both
    betas by ``1000 / num_steps``; pass the scaled values to reproduce that.
    """
    check_steps(num_steps, "num_steps")
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def _check_alphas_cumprod(alphas_cumprod: Tensor | None) -> Tensor:
    if alphas_cumprod is None:
        return vp_alphas_cumprod()
    if not isinstance(alphas_cumprod, Tensor) or alphas_cumprod.dim() != 1 or alphas_cumprod.numel() < 2:
        raise ValueError("alphas_cumprod must be a 1-D tensor with at least 2 entries")
    abar = alphas_cumprod.detach().to("cpu", torch.float64)
    # written as "not inside" so that NaN entries fail too
    if not bool(((abar > 0) & (abar < 1)).all()) or bool((abar[1:] > abar[:-1]).any()):
        raise ValueError("alphas_cumprod must be decreasing and inside (0, 1), without NaN")
    return abar


def vp_sigmas(alphas_cumprod: Tensor | None = None) -> Tensor:
    """EDM noise level of every DDPM step, ``sqrt((1 - abar) / abar)``, float64 ascending ``(T,)``."""
    abar = _check_alphas_cumprod(alphas_cumprod)
    return ((1 - abar) / abar).sqrt()


def sigma_to_vp_timestep(sigma: float | Tensor, alphas_cumprod: Tensor | None = None) -> float | Tensor:
    """Continuous DDPM timestep of a noise level: linear interpolation of ``log sigma`` between steps.

    Grid levels map to their integer step; levels outside the grid clamp to 0 or T-1. Computed in
    float64; a tensor comes back in its own floating dtype (float32 for integer input).
    """
    device = sigma.device if isinstance(sigma, Tensor) else None
    log_grid = vp_sigmas(alphas_cumprod).log().to(device)
    log_s = torch.as_tensor(sigma, dtype=torch.float64, device=device).log()
    high = torch.searchsorted(log_grid, log_s).clamp(1, log_grid.numel() - 1)
    low = high - 1
    w = ((log_s - log_grid[low]) / (log_grid[high] - log_grid[low])).clamp(0, 1)
    t = low + w
    if not isinstance(sigma, Tensor):
        return float(t)
    out_dtype = sigma.dtype if sigma.is_floating_point() else torch.float32
    return t.to(out_dtype)


def vp_timestep_to_sigma(t: float | Tensor, alphas_cumprod: Tensor | None = None) -> float | Tensor:
    """Noise level of a (fractional) DDPM timestep in [0, T-1]: ``log sigma`` interpolated linearly."""
    log_grid = vp_sigmas(alphas_cumprod).log()
    tt = torch.as_tensor(t, dtype=torch.float64).to("cpu")
    last = log_grid.numel() - 1
    if bool(((tt < 0) | (tt > last)).any()):
        raise ValueError(f"t must lie in [0, {last}]")
    low = tt.floor().long().clamp(max=last - 1)
    w = tt - low
    sigma = ((1 - w) * log_grid[low] + w * log_grid[low + 1]).exp()
    if not isinstance(t, Tensor):
        return float(sigma)
    out_dtype = t.dtype if t.is_floating_point() else torch.float32
    return sigma.to(device=t.device, dtype=out_dtype)


def vp_respaced_timesteps(steps: int, num_steps: int = 1000) -> list[int]:
    """fb DiT ``space_timesteps(num_steps, [steps])``: ``steps`` evenly strided DDPM steps, ascending.

    Rounding and the running float stride follow the source exactly (Python's round-half-even).
    """
    check_steps(steps)
    if steps > num_steps:
        raise ValueError(f"steps must be <= the {num_steps} DDPM steps, got {steps}")
    stride = (num_steps - 1) / (steps - 1) if steps > 1 else 1
    taken, cur = [], 0.0
    for _ in range(steps):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))
