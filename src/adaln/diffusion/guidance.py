"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser or velocity wrapper, in one batched call.

Guidance is linear in the prediction, so the same wrapper guides an EDM denoiser ``D(x, sigma)``, an
epsilon model or a flow velocity ``v(x, sigma)``; ``interval`` is in the sigma the wrapped callable gets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from adaln.checks import check_tensor, compute_dtype
from adaln.diffusion._utils import as_sigma, expand_to


RENORMS = (None, "rescale", "cap")


class ClassifierFreeGuidance:
    """``guided(x, sigma, **cond) = D_u + scale * (D_c - D_u)``, conditional and unconditional batched.

    One call ``denoiser(cat[x, x], cat[sigma, sigma], **cond2)``: for every key of ``null_cond``,
    ``cond2[k] = cat[cond[k], null_cond[k] broadcast to cond[k]]`` (e.g. ``{"y": num_classes}``);
    other tensors with a leading batch dim ``B`` are duplicated, everything else is passed as is.

    - ``interval=(lo, hi)``: guide only samples with ``lo <= sigma <= hi``; the others get ``D_c``.
    - ``guided_channels``: a slice or index list on dim 1 (every index must exist there and a slice must
      select a channel, else ``ValueError`` at the call); other channels get ``D_c``. ``slice(0, 3)``
      reproduces fb DiT ``forward_with_cfg`` on its 4-channel latents (guiding eps or D is the same,
      ``D = x - sigma eps`` is affine in eps per channel).
    - ``scale`` must be finite (``inf`` would give ``inf * 0 = NaN`` where the two predictions agree).
    - ``scale == 1`` is exactly conditional and makes one plain call of batch ``B``; ``scale == 0`` is
      unconditional. Output in ``x``'s dtype; the combination is computed in float32 (float64).
    - ``renorm`` (CFG renormalisation of Lumina 2 / Z-Image, applied to the guided prediction ``g`` against
      the conditional ``c``, norms over ``renorm_dims``, default every non-batch dim):
      ``"rescale"``: ``g * |c| / |g|`` (diffusers ``Lumina2Pipeline``, ``cfg_normalization=True``, which
      takes the norm over the last dim: ``renorm_dims=-1``); ``"cap"``: ``g * min(1, renorm_max |c| / |g|)``
      per sample (diffusers ``ZImagePipeline``, ``cfg_normalization=renorm_max``). Z-Image writes guidance
      as ``c + s (c - u)``: its ``guidance_scale`` ``s`` is our ``scale - 1``.
    - Truncation (guidance only on part of the trajectory) is an ``interval``: see
      :func:`zimage_cfg_interval` and :func:`lumina2_cfg_interval`.
    - ``skip_layers`` (SD3.5's skip-layer guidance, diffusers ``StableDiffusion3Pipeline``): where
      ``skip_interval[0] <= sigma <= skip_interval[1]`` (:func:`sd3_skip_layer_interval`), one more call
      ``denoiser(x, sigma, **cond, skip_layers=skip_layers)`` gives ``s`` and the result gains
      ``skip_scale * (D_c - s)``; elsewhere nothing is added and no call is made.
    """

    def __init__(
        self,
        denoiser: Callable[..., Tensor],
        scale: float,
        *,
        null_cond: Mapping[str, object],
        interval: tuple[float, float] | None = None,
        guided_channels: slice | Sequence[int] | None = None,
        renorm: str | None = None,
        renorm_max: float = 1.0,
        renorm_dims: int | Sequence[int] | None = None,
        skip_layers: Sequence[int] | None = None,
        skip_scale: float = 2.8,
        skip_interval: tuple[float, float] = (0.0, math.inf),
    ):
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable D(x, sigma, **cond), got {type(denoiser).__name__}")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise TypeError(f"scale must be a float, got {type(scale).__name__}")
        if not 0 <= scale < math.inf:
            raise ValueError(f"scale must be finite and >= 0 (0: unconditional, 1: conditional), got {scale}")
        if not isinstance(null_cond, Mapping) or not null_cond:
            raise ValueError("null_cond must be a non-empty dict of the keys to null, e.g. {'y': 1000}")
        if interval is not None:
            if len(interval) != 2 or not interval[0] <= interval[1]:
                raise ValueError(f"interval must be (lo, hi) with lo <= hi, got {interval!r}")
            interval = (float(interval[0]), float(interval[1]))
        if guided_channels is not None and not isinstance(guided_channels, slice):
            if not isinstance(guided_channels, Sequence) or not all(
                isinstance(c, int) and not isinstance(c, bool) for c in guided_channels
            ):
                raise TypeError(f"guided_channels must be a slice or a list of ints, got {guided_channels!r}")
            guided_channels = list(guided_channels)
        if renorm not in RENORMS:
            raise ValueError(f"renorm must be one of {RENORMS}, got {renorm!r}")
        if not 0 < renorm_max < math.inf:
            raise ValueError(f"renorm_max must be finite and > 0, got {renorm_max}")
        if renorm_dims is not None:
            dims = (renorm_dims,) if isinstance(renorm_dims, int) else tuple(renorm_dims)
            if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d != 0 for d in dims):
                raise ValueError(f"renorm_dims must be non-batch dims (ints other than 0), got {renorm_dims!r}")
            renorm_dims = dims
        self.renorm, self.renorm_max, self.renorm_dims = renorm, float(renorm_max), renorm_dims
        if skip_layers is not None:
            skip_layers = list(skip_layers)
            if not skip_layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in skip_layers):
                raise ValueError(f"skip_layers must be a non-empty list of block indices, got {skip_layers!r}")
            if not 0 <= skip_scale < math.inf:
                raise ValueError(f"skip_scale must be finite and >= 0, got {skip_scale}")
            if len(skip_interval) != 2 or not skip_interval[0] <= skip_interval[1]:
                raise ValueError(f"skip_interval must be (lo, hi) with lo <= hi, got {skip_interval!r}")
        self.skip_layers, self.skip_scale = skip_layers, float(skip_scale)
        self.skip_interval = (float(skip_interval[0]), float(skip_interval[1]))
        self.denoiser = denoiser
        self.scale = float(scale)
        self.null_cond = dict(null_cond)
        self.interval = interval
        self.guided_channels = guided_channels

    def _batched_cond(self, cond: dict, b: int) -> dict:
        missing = [k for k in self.null_cond if k not in cond]
        if missing:
            raise ValueError(f"cond is missing {missing}, named in null_cond")
        out = {}
        for key, value in cond.items():
            if key in self.null_cond:
                if not isinstance(value, Tensor):
                    raise TypeError(f"cond[{key!r}] must be a tensor to null it, got {type(value).__name__}")
                null = torch.as_tensor(self.null_cond[key], device=value.device).to(value.dtype)
                try:
                    null = null.expand_as(value)
                except RuntimeError:
                    raise ValueError(
                        f"null_cond[{key!r}] of shape {tuple(null.shape)} does not broadcast to "
                        f"cond[{key!r}] of shape {tuple(value.shape)}"
                    ) from None
                out[key] = torch.cat([value, null])
            elif isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == b:
                out[key] = torch.cat([value, value])
            else:
                out[key] = value
        return out

    def _check_channels(self, x: Tensor) -> None:
        """``guided_channels`` must name channels that dim 1 of ``x`` has (checked on every call)."""
        c = x.shape[1]
        if isinstance(self.guided_channels, slice):
            if not range(c)[self.guided_channels]:
                raise ValueError(
                    f"guided_channels {self.guided_channels} selects none of the {c} channels on dim 1 of x "
                    f"{tuple(x.shape)}"
                )
            return
        bad = [i for i in self.guided_channels if not -c <= i < c]
        if bad:
            raise ValueError(
                f"guided_channels {bad} out of range for the {c} channels on dim 1 of x {tuple(x.shape)} "
                f"(valid: {-c} to {c - 1})"
            )

    def _renormalise(self, guided: Tensor, d_c: Tensor) -> Tensor:
        dims = self.renorm_dims or tuple(range(1, guided.dim()))
        if any(not -guided.dim() <= d < guided.dim() or d % guided.dim() == 0 for d in dims):
            raise ValueError(f"renorm_dims {dims} must name non-batch dims of the {guided.dim()}-D prediction")
        norm_c = torch.linalg.vector_norm(d_c, dim=dims, keepdim=True)
        norm_g = torch.linalg.vector_norm(guided, dim=dims, keepdim=True)
        if self.renorm == "rescale":
            return guided * (norm_c / norm_g)
        return guided * torch.clamp(self.renorm_max * norm_c / norm_g, max=1.0)

    def __call__(self, x: Tensor, sigma: float | Tensor, **cond) -> Tensor:
        check_tensor(x, "x", min_dim=2)
        b = x.shape[0]
        if self.guided_channels is not None:
            self._check_channels(x)
        if self.scale == 1.0 and self.skip_layers is None:
            return self.denoiser(x, sigma, **cond)
        ct = compute_dtype(x.dtype)
        sd = sigma.dtype if isinstance(sigma, Tensor) and sigma.is_floating_point() else ct
        sigma_b = as_sigma(sigma, b, dtype=sd, device=x.device)
        if self.scale == 1.0:
            out = self.denoiser(x, sigma, **cond).to(ct)
            return self._skip_layer(out, out, x, sigma_b, cond)
        out = self.denoiser(torch.cat([x, x]), torch.cat([sigma_b, sigma_b]), **self._batched_cond(cond, b))
        if not isinstance(out, Tensor) or out.shape != (2 * b, *x.shape[1:]):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            want = (2 * b, *x.shape[1:])
            raise ValueError(f"denoiser must return (2B, ...) = {want} on the batched call, got {got}")
        d_c, d_u = out.to(ct).chunk(2)
        guided = d_u + self.scale * (d_c - d_u)
        if self.renorm is not None:
            guided = self._renormalise(guided, d_c)
        if self.guided_channels is not None:
            full = d_c.clone()
            full[:, self.guided_channels] = guided[:, self.guided_channels]
            guided = full
        if self.interval is not None:
            lo, hi = self.interval
            inside = (sigma_b >= lo) & (sigma_b <= hi)
            guided = torch.where(expand_to(inside, x), guided, d_c)
        if self.skip_layers is not None:
            return self._skip_layer(guided, d_c, x, sigma_b, cond)
        return guided.to(x.dtype)

    def _skip_layer(self, guided: Tensor, d_c: Tensor, x: Tensor, sigma_b: Tensor, cond: dict) -> Tensor:
        """Add ``skip_scale (D_c - D_skip)`` where sigma is inside ``skip_interval`` (one host sync)."""
        lo, hi = self.skip_interval
        inside = (sigma_b >= lo) & (sigma_b <= hi)
        if bool(inside.any()):
            skipped = self.denoiser(x, sigma_b, **cond, skip_layers=self.skip_layers).to(guided.dtype)
            guided = guided + expand_to(inside, x) * (self.skip_scale * (d_c - skipped))
        return guided.to(x.dtype)


def zimage_cfg_interval(cfg_truncation: float) -> tuple[float, float]:
    """Z-Image's ``cfg_truncation`` (diffusers ``ZImagePipeline``) as a flow-sigma ``interval``: guidance
    while the model time ``1 - sigma <= cfg_truncation``, i.e. ``sigma >= 1 - cfg_truncation``."""
    if not 0 <= cfg_truncation <= 1:
        raise ValueError(f"cfg_truncation must lie in [0, 1] (1: guide every step), got {cfg_truncation}")
    return (1.0 - float(cfg_truncation), math.inf)


def lumina2_cfg_interval(sigmas: Sequence[float] | Tensor, cfg_trunc_ratio: float) -> tuple[float, float]:
    """Lumina 2's ``cfg_trunc_ratio`` (diffusers ``Lumina2Pipeline``: step ``i`` of ``N`` is guided while
    ``(i + 1) / N <= cfg_trunc_ratio``) as a sigma ``interval`` over the descending ``sigmas`` the sampler
    visits (``flow_sigmas(N, ...)``, with or without its final 0)."""
    levels = _descending_levels(sigmas)
    if not 0 <= cfg_trunc_ratio < math.inf:
        raise ValueError(f"cfg_trunc_ratio must be finite and >= 0 (>= 1: guide every step), got {cfg_trunc_ratio}")
    n = len(levels)
    guided = [i for i in range(n) if (i + 1) / n <= cfg_trunc_ratio]
    if not guided:
        return (math.inf, math.inf)
    return (levels[guided[-1]], math.inf)


def sd3_skip_layer_interval(sigmas: Sequence[float] | Tensor, start: float = 0.01, stop: float = 0.2
                            ) -> tuple[float, float]:
    """SD3.5's skip-layer window (diffusers ``StableDiffusion3Pipeline``: step ``i`` of ``N`` skips while
    ``N start < i < N stop``; defaults 0.01 and 0.2) as a sigma ``skip_interval`` over the sampler's
    descending ``sigmas`` (with or without the final 0)."""
    levels = _descending_levels(sigmas)
    n = len(levels)
    steps = [i for i in range(n) if n * start < i < n * stop]
    if not steps:
        return (math.inf, math.inf)
    return (levels[steps[-1]], levels[steps[0]])


def _descending_levels(sigmas: Sequence[float] | Tensor) -> list[float]:
    levels = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
    if levels and levels[-1] == 0:
        levels = levels[:-1]
    if not levels or any(a <= b for a, b in zip(levels[:-1], levels[1:])):
        raise ValueError("sigmas must be the sampler's strictly descending levels")
    return levels
