"""What the image tasks (digits, text-digits) share: the DiT config sections, their checks, the EDM
training loss and guided sampling of image batches. Not a task itself."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from adaln.diffusion import ClassifierFreeGuidance, sample_af3, sample_ddim, sample_edm
from adaln.engine.config import RunConfig, option
from adaln.errors import ConfigError

SAMPLERS = ("heun", "euler", "af3", "ddim")


@dataclass
class ImageModelConfig:
    mixer: str = option("attention", choices=("attention", "hyena"))  # DiT, or the Hyena residual denoiser
    patch_size: int = option(2, ge=1)
    hidden_size: int = option(128, ge=1)
    depth: int = option(4, ge=1)
    num_heads: int = option(4, ge=1)
    mlp_ratio: float = option(4.0, gt=0)
    class_dropout_prob: float = option(0.1, ge=0, le=1)


@dataclass
class ImageSampleConfig:
    cfg: float = option(1.5, ge=0)  # default classifier-free guidance scale
    steps: int = option(32, ge=1)
    sampler: str = option("heun", choices=SAMPLERS)
    per_class: int = option(100, ge=1)  # eval: samples per class (or per caption for text-digits)


@dataclass
class ImageDiffusionConfig(RunConfig):
    """The keys both image tasks share: the DiT, its sampler, and EDM's data scale and training sigmas."""

    model: ImageModelConfig = field(default_factory=ImageModelConfig)
    sample: ImageSampleConfig = option(resumable=True, default_factory=ImageSampleConfig)
    sigma_data: float = option(0.5, gt=0)  # images scaled to [-1, 1]
    p_mean: float = -1.2  # EDM log-normal training sigmas: ln sigma ~ N(p_mean, p_std^2)
    p_std: float = option(1.2, gt=0)


def check_image_model(m: ImageModelConfig, image_size: int) -> None:
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size {m.hidden_size} must be divisible by model.num_heads {m.num_heads}")
    if image_size % m.patch_size:
        raise ConfigError(f"data.image_size {image_size} must be divisible by model.patch_size {m.patch_size}")


def sampling_options(cfg: Any, options: dict[str, Any]) -> tuple[float, int, str]:
    """(guidance scale, steps, sampler) from the command's options, else the run's ``sample`` section."""
    s = cfg.sample
    scale = options.get("cfg", s.cfg)
    if not isinstance(scale, (int, float)) or not 0 <= scale < float("inf"):
        raise ConfigError(f"--cfg must be a finite number >= 0, got {scale}")
    steps = options.get("steps", s.steps)
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    sampler = options.get("sampler", s.sampler)
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler must be one of {SAMPLERS}, got {sampler!r}")
    return float(scale), int(steps), sampler


def count_option(options: dict[str, Any], default: int, flag: str = "--n") -> int:
    n = options.get("n", default)
    if n < 1:
        raise ConfigError(f"{flag} must be >= 1, got {n}")
    return int(n)


@torch.no_grad()
def generate(
    denoiser: Callable[..., Tensor], shape: tuple[int, ...], conds: Iterator[dict[str, Tensor]], gens: list[torch.Generator],
    *, scale: float, null_cond: dict[str, Any], steps: int, sampler: str, sigma_data: float, chunk: int,
    device: torch.device,
) -> tuple[Tensor, int]:
    """Guided samples in [-1, 1], ``chunk`` at a time, one generator per sample; returns (samples, NFE).

    ``conds`` yields the condition keywords of each chunk; ``shape`` is one sample's (C, H, W)."""
    guided = ClassifierFreeGuidance(denoiser, scale, null_cond=null_cond)
    out, nfe = [], 0
    for i, cond in zip(range(0, len(gens), chunk), conds):
        g = gens[i : i + chunk]
        full = (len(g), *shape)
        if sampler in ("heun", "euler"):
            res = sample_edm(guided, full, steps=steps, solver=sampler, generator=g, device=device, **cond)
        elif sampler == "af3":
            res = sample_af3(guided, full, steps=steps, sigma_data=sigma_data, augment=False, generator=g,
                             device=device, **cond)
        else:
            res = sample_ddim(guided, full, steps=steps, generator=g, device=device, **cond)
        out.append(res.samples.clamp(-1, 1))
        nfe = res.nfe
    return torch.cat(out), nfe
