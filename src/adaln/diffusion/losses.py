"""Training noise levels and the weighted denoising loss (EDM; AlphaFold3 supplement).

Weightings ``lambda(sigma)``:

- ``"edm"``: ``(sigma^2 + sd^2) / (sigma sd)^2`` = ``1 / c_out^2`` (Karras et al. 2022, Table 1), which makes
  the network's effective target unit-weighted. Protenix (``ProtenixLoss``: ``diffusion_per_sample_scale``)
  and Boltz (``AtomDiffusion.loss_weight``) train AF3-style models with this form.
- ``"af3_paper"``: ``(sigma^2 + sd^2) / (sigma + sd)^2`` as printed in the AF3 supplement's diffusion loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from adaln.checks import check_tensor, compute_dtype
from adaln.diffusion._utils import (
    GeneratorArg,
    as_sigma,
    check_generator,
    check_positive,
    expand_to,
    randn,
)

WEIGHTINGS = ("edm", "af3_paper")
REDUCTIONS = ("mean", "sum", "none")
SIGMA_KINDS = ("edm", "af3")


def sample_training_sigmas(
    n: int,
    kind: str = "edm",
    *,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    sigma_data: float = 16.0,
    af3_p_mean: float = -1.2,
    af3_p_std: float = 1.5,
    generator: GeneratorArg = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(n,)`` training noise levels.

    ``"edm"``: ``exp(p_mean + p_std N(0, 1))`` (EDM's log-normal). ``"af3"``:
    ``sigma_data * exp(af3_p_mean + af3_p_std N(0, 1))`` (AF3 supplement; Boltz ``noise_distribution``).
    A generator list gives sigma ``i`` from generator ``i``.
    """
    if kind not in SIGMA_KINDS:
        raise ValueError(f"kind must be one of {SIGMA_KINDS}, got {kind!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    generator = check_generator(generator, n)
    z = randn((n,), generator, dtype=torch.float64, device=device)
    if kind == "edm":
        sigma = (p_mean + p_std * z).exp()
    else:
        sigma = check_positive(sigma_data, "sigma_data") * (af3_p_mean + af3_p_std * z).exp()
    return sigma.to(dtype)


def loss_weight(sigma: Tensor, sigma_data: float, weighting: str = "edm") -> Tensor:
    """``lambda(sigma)`` for ``weighting`` in ``("edm", "af3_paper")``, same shape as ``sigma``."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    num = sigma**2 + sigma_data**2
    return num / (sigma * sigma_data) ** 2 if weighting == "edm" else num / (sigma + sigma_data) ** 2


def _check_loss_mask(mask: Tensor, x0: Tensor) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
    k = mask.dim()
    if k < 2 or tuple(mask.shape) != tuple(x0.shape[:k]):
        prefixes = [tuple(x0.shape[:j]) for j in range(2, x0.dim() + 1)]
        raise ValueError(
            f"mask must have one of the shapes {prefixes} for x0 {tuple(x0.shape)}, got {tuple(mask.shape)}"
        )
    return mask.reshape(*mask.shape, *([1] * (x0.dim() - k)))


def masked_sample_mean(err: Tensor, mask: Tensor | None, x0: Tensor) -> Tensor:
    """Per-sample mean ``(B,)`` of ``err`` (x0's shape) over the elements ``mask`` keeps (see denoising_loss);
    a sample with none gives 0."""
    dims = tuple(range(1, x0.dim()))
    if mask is None:
        return err.mean(dim=dims)
    m = _check_loss_mask(mask, x0).to(err.dtype)
    count = m.expand_as(err).sum(dim=dims)
    total = (err * m).sum(dim=dims)
    return torch.where(count > 0, total / count.clamp_min(torch.finfo(err.dtype).tiny), 0.0)


def denoising_loss(
    denoiser: Callable[..., Tensor],
    x0: Tensor,
    sigma: float | Tensor,
    *,
    weighting: str = "edm",
    sigma_data: float,
    mask: Tensor | None = None,
    noise: Tensor | None = None,
    generator: GeneratorArg = None,
    reduction: str = "mean",
    **cond,
) -> Tensor:
    """``lambda(sigma) * masked_mean((D(x0 + sigma n, sigma) - x0)^2)`` per sample, then reduced.

    ``x0`` ``(B, ...)``; ``sigma`` a float or ``(B,)``; ``noise`` ``n`` defaults to ``N(0, I)`` from
    ``generator`` (a list draws sample ``i``'s noise from generator ``i``). ``mask`` has shape
    ``x0.shape[:k]`` (``k >= 2``; e.g. ``(B, N)`` atoms for ``(B, N, 3)``), 0/1 or weights, and broadcasts
    over the rest; the per-sample mean runs over valid elements only (a sample with none contributes 0).
    ``reduction``: ``"mean"``/``"sum"`` over samples, or ``"none"`` for the ``(B,)`` per-sample losses.
    Computed in float32 (float64 for float64 data). AF3's rigid alignment of the target, per-atom-type
    weights, bond and smooth-LDDT terms are not part of this loss.
    """
    check_tensor(x0, "x0", min_dim=2)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_positive(sigma_data, "sigma_data")
    b, ct = x0.shape[0], compute_dtype(x0.dtype)
    sigma = as_sigma(sigma, b, dtype=ct, device=x0.device)
    weight = loss_weight(sigma, sigma_data, weighting)
    if noise is None:
        noise = randn(tuple(x0.shape), check_generator(generator, b), dtype=x0.dtype, device=x0.device)
    elif not isinstance(noise, Tensor) or noise.shape != x0.shape:
        got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a tensor of x0's shape {tuple(x0.shape)}, got {got}")
    x_noisy = (x0.to(ct) + expand_to(sigma, x0) * noise.to(ct)).to(x0.dtype)
    err = (denoiser(x_noisy, sigma, **cond).to(ct) - x0.to(ct)) ** 2
    per_sample = weight * masked_sample_mean(err, mask, x0)
    if reduction == "none":
        return per_sample
    return per_sample.mean() if reduction == "mean" else per_sample.sum()
