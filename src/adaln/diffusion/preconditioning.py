"""Denoisers ``D(x, sigma, **cond)`` built from raw networks: EDM preconditioning and a VP/DDPM wrapper.

Every denoiser here takes ``x`` ``(B, ...)`` and ``sigma`` (float or ``(B,)``) and predicts clean data.
Scalings are computed in float32 (float64 for float64 inputs), never in half precision; the result is
returned in ``x``'s dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from adaln.checks import check_tensor, compute_dtype
from adaln.diffusion._utils import as_sigma, check_nonnegative, check_positive, expand_to
from adaln.diffusion.schedules import sigma_to_vp_timestep, vp_sigmas

NOISE_INPUTS = ("edm", "af3")


def edm_scalings(sigma: float | Tensor, sigma_data: float) -> tuple[float | Tensor, ...]:
    """EDM Table 1 preconditioning ``(c_skip, c_out, c_in, c_noise)``; same type and shape as ``sigma``.

    ``c_skip = sd^2/(s^2+sd^2)``, ``c_out = s sd/sqrt(s^2+sd^2)``, ``c_in = 1/sqrt(s^2+sd^2)``,
    ``c_noise = ln(s)/4``. They give the network unit-variance input and target (see the tests).
    """
    check_positive(sigma_data, "sigma_data")
    if isinstance(sigma, Tensor):
        total = sigma**2 + sigma_data**2
        return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), total.rsqrt(), sigma.log() / 4
    sigma = check_nonnegative(sigma, "sigma")
    total = sigma**2 + sigma_data**2
    c_noise = math.log(sigma) / 4 if sigma > 0 else -math.inf
    return sigma_data**2 / total, sigma * sigma_data / total**0.5, total**-0.5, c_noise


class EDMPrecond(nn.Module):
    """EDM preconditioned denoiser ``D(x, sigma) = c_skip x + c_out net(c_in x, c_noise, **cond)``.

    Matches NVlabs/edm ``training/networks.py:EDMPrecond``. ``noise_input`` picks what ``net`` receives
    as its second argument, a ``(B,)`` float tensor:

    - ``"edm"``: ``ln(sigma) / 4`` (EDM's ``c_noise``);
    - ``"af3"``: ``sigma / sigma_data``. AF3's ``noise_embeddings`` computes ``1/4 ln(sigma / sigma_data)``
      inside the network (``diffusion_head._single_conditioning``), so the net gets the raw ratio;
    - a callable ``f(sigma) -> (B,) tensor``.

    ``x`` ``(B, ...)``; ``sigma`` a float or ``(B,)``; the scalings broadcast over ``x``'s non-batch dims.
    ``sigma = 0`` is exact, ``D(x, 0) = x`` (``c_skip(0) = 1``, ``c_out(0) = 0``): the network is called
    at ``sigma_data`` for those samples and its output discarded, so ``ln(0)`` never reaches its noise
    embedding (the source returns NaN there).
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float = 0.5,
        *,
        noise_input: str | Callable[[Tensor], Tensor] = "edm",
    ):
        super().__init__()
        if not callable(noise_input) and noise_input not in NOISE_INPUTS:
            raise ValueError(f"noise_input must be one of {NOISE_INPUTS} or a callable, got {noise_input!r}")
        self.net = net
        self.sigma_data = check_positive(sigma_data, "sigma_data")
        self.noise_input = noise_input

    def c_noise(self, sigma: Tensor) -> Tensor:
        """The network's noise input for ``sigma`` ``(B,)``."""
        if self.noise_input == "edm":
            return sigma.log() / 4
        if self.noise_input == "af3":
            return sigma / self.sigma_data
        return self.noise_input(sigma)

    def forward(self, x: Tensor, sigma: float | Tensor, **cond) -> Tensor:
        check_tensor(x, "x", min_dim=2)
        ct = compute_dtype(x.dtype)
        sigma = as_sigma(sigma, x.shape[0], dtype=ct, device=x.device)
        c_skip, c_out, c_in, _ = (expand_to(c, x) for c in edm_scalings(sigma, self.sigma_data))
        x32 = x.to(ct)
        # sigma = 0 without a host sync: a finite stand-in level for the net, x itself as the output
        # (0 * NaN would be NaN, and a NaN in the discarded branch would still poison the gradients)
        clean = sigma == 0
        net_sigma = torch.where(clean, torch.full_like(sigma, self.sigma_data), sigma)
        f = self.net((c_in * x32).to(x.dtype), self.c_noise(net_sigma), **cond)
        out = torch.where(expand_to(clean, x), x32, c_skip * x32 + c_out * f.to(ct))
        return out.to(x.dtype)


class VPEpsDenoiser(nn.Module):
    """Wrap a DDPM epsilon-predictor ``eps_model(x_vp, t, **cond)`` (fb DiT) into an EDM denoiser.

    ``x_vp = x / sqrt(1 + sigma^2)`` (= ``sqrt(abar) x``), ``t = sigma_to_vp_timestep(sigma)`` (fractional;
    with ``round_timesteps`` the nearest integer step as int64, which is what fb DiT feeds its model),
    ``D = x - sigma * eps``. With ``learned_sigma_channels`` the model outputs ``2C`` channels on dim 1
    (fb DiT's channels-first ``learn_sigma=True``) and the first ``C`` are epsilon; the variance channels
    are unused.
    """

    def __init__(
        self,
        eps_model: nn.Module,
        *,
        alphas_cumprod: Tensor | None = None,
        learned_sigma_channels: bool = False,
        round_timesteps: bool = False,
    ):
        super().__init__()
        self.eps_model = eps_model
        if alphas_cumprod is not None:
            vp_sigmas(alphas_cumprod)  # validates the schedule once, here
            alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float64)
        self.alphas_cumprod = alphas_cumprod  # None: fb DiT's linear betas; a plain CPU tensor, not a buffer
        self.learned_sigma_channels = learned_sigma_channels
        self.round_timesteps = round_timesteps

    def forward(self, x: Tensor, sigma: float | Tensor, **cond) -> Tensor:
        check_tensor(x, "x", min_dim=2)
        ct = compute_dtype(x.dtype)
        sigma = as_sigma(sigma, x.shape[0], dtype=ct, device=x.device)
        t = sigma_to_vp_timestep(sigma, self.alphas_cumprod)
        if self.round_timesteps:
            t = t.round().long()
        s = expand_to(sigma, x)
        x32 = x.to(ct)
        eps = self.eps_model((x32 * (1 + s**2).rsqrt()).to(x.dtype), t, **cond)
        c = x.shape[1]
        want = 2 * c if self.learned_sigma_channels else c
        if eps.shape[0] != x.shape[0] or eps.shape[1] != want or eps.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"eps_model must return {want} channels on dim 1 for x of shape {tuple(x.shape)} "
                f"(learned_sigma_channels={self.learned_sigma_channels}), got {tuple(eps.shape)}"
            )
        return (x32 - s * eps[:, :c].to(ct)).to(x.dtype)
