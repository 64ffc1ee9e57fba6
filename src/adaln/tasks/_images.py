"""What the image tasks (digits, text-digits) share: the DiT config sections, their checks, the training
objective (EDM or flow matching) and guided sampling of image batches. Not a task itself.

``objective: edm`` trains the EDM-preconditioned denoiser (timestep ``1000 ln(sigma) / 4``); ``objective:
flow`` trains the network as a rectified-flow velocity ``eps - x0`` at ``x = (1 - sigma) x0 + sigma eps``,
called with ``t = 1000 sigma`` (SD3's convention) and no preconditioning (SiT, SD3)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from adaln.diffusion import (
    ClassifierFreeGuidance,
    EDMPrecond,
    FlowVelocity,
    denoising_loss,
    flow_matching_loss,
    sample_af3,
    sample_ddim,
    sample_edm,
    sample_flow,
    sample_flow_training_sigmas,
    sample_training_sigmas,
)
from adaln.diffusion.flow import FLOW_SIGMA_KINDS, FLOW_WEIGHTINGS
from adaln.engine.config import RunConfig, option
from adaln.errors import ConfigError
from adaln.models.dit import EDMTimestep
from adaln.models.systems import SystemVelocity, is_system

OBJECTIVES = ("edm", "flow")
SAMPLERS = ("heun", "euler", "dpm++2m", "af3", "ddim")  # EDM; flow takes the first three
FLOW_SAMPLERS = ("heun", "euler", "dpm++2m")
FLOW_TIMESTEP_SCALE = 1000.0  # a flow-trained DiT sees t = 1000 sigma


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
    sampler: str = option("heun", choices=SAMPLERS)  # objective flow: heun, euler or dpm++2m
    per_class: int = option(100, ge=1)  # eval: samples per class (or per caption for text-digits)
    shift: float = option(1.0, gt=0)  # objective flow: static shift of the sampling sigmas (SD3: 3)


@dataclass
class FlowSection:
    """Flow-matching training draws (SD3 paper section 3.1) and loss weighting (diffusers training_utils)."""

    sigma_sampling: str = option("logit_normal", choices=FLOW_SIGMA_KINDS)
    logit_mean: float = 0.0  # logit_normal: sigma = sigmoid(N(logit_mean, logit_std^2))
    logit_std: float = option(1.0, gt=0)
    mode_scale: float = option(1.29, ge=-1, le=1.75)  # mode: SD3's 1.29
    shift: float = option(1.0, gt=0)  # static shift of the training sigmas
    weighting: str = option("none", choices=FLOW_WEIGHTINGS)


@dataclass
class ImageDiffusionConfig(RunConfig):
    """The keys both image tasks share: the DiT, its sampler, the objective, EDM's data scale and training
    sigmas, flow matching's draws."""

    model: ImageModelConfig = field(default_factory=ImageModelConfig)
    sample: ImageSampleConfig = option(resumable=True, default_factory=ImageSampleConfig)
    objective: str = option("edm", choices=OBJECTIVES)
    sigma_data: float = option(0.5, gt=0)  # images scaled to [-1, 1]
    p_mean: float = -1.2  # EDM log-normal training sigmas: ln sigma ~ N(p_mean, p_std^2)
    p_std: float = option(1.2, gt=0)
    flow: FlowSection = field(default_factory=FlowSection)


def check_objective(cfg: ImageDiffusionConfig) -> None:
    if cfg.objective == "flow" and cfg.sample.sampler not in FLOW_SAMPLERS:
        raise ConfigError(f"sample.sampler must be one of {FLOW_SAMPLERS} for objective flow, "
                          f"got {cfg.sample.sampler!r}")


def training_loss(cfg: ImageDiffusionConfig, net: nn.Module, x0: Tensor, gens: list[torch.Generator],
                  dropout: torch.Generator, **cond: Tensor) -> Tensor:
    """The run's objective on ``x0`` (B, C, H, W): example ``i`` draws its sigma, then its noise, from
    ``gens[i]``; the network's own dropout draws from ``dropout``. ``net`` may be a DDP wrapper.

    Our DiTs see ``t = 1000 sigma`` (flow) or EDM's noise input; a converted system (``is_system``:
    MMDiT, Flux, ...) is trained in its own time convention (``SystemVelocity``) and has no dropout."""
    if is_system(net):
        if cfg.objective == "flow":
            return flow_matching_loss(SystemVelocity(net), x0, _flow_sigmas(cfg, x0, gens),
                                      weighting=cfg.flow.weighting, generator=gens, **cond)
        return denoising_loss(EDMPrecond(net, cfg.sigma_data, noise_input=EDMTimestep()), x0,
                              _edm_sigmas(cfg, x0, gens), sigma_data=cfg.sigma_data, generator=gens, **cond)
    if cfg.objective == "flow":
        velocity = FlowVelocity(net, timestep_scale=FLOW_TIMESTEP_SCALE)
        return flow_matching_loss(partial(velocity, generator=dropout), x0, _flow_sigmas(cfg, x0, gens),
                                  weighting=cfg.flow.weighting, generator=gens, **cond)
    denoiser = EDMPrecond(net, cfg.sigma_data, noise_input=EDMTimestep())
    return denoising_loss(partial(denoiser, generator=dropout), x0, _edm_sigmas(cfg, x0, gens),
                          sigma_data=cfg.sigma_data, generator=gens, **cond)


def _flow_sigmas(cfg: ImageDiffusionConfig, x0: Tensor, gens: list[torch.Generator]) -> Tensor:
    f = cfg.flow
    return sample_flow_training_sigmas(len(x0), f.sigma_sampling, logit_mean=f.logit_mean, logit_std=f.logit_std,
                                       mode_scale=f.mode_scale, shift=f.shift, generator=gens, device=x0.device)


def _edm_sigmas(cfg: ImageDiffusionConfig, x0: Tensor, gens: list[torch.Generator]) -> Tensor:
    return sample_training_sigmas(len(x0), "edm", p_mean=cfg.p_mean, p_std=cfg.p_std, generator=gens,
                                  device=x0.device)


def sampling_model(cfg: ImageDiffusionConfig, model: nn.Module) -> Callable[..., Tensor]:
    """The trained network as the samplers' callable: a flow velocity or an EDM denoiser."""
    if getattr(model, "learn_sigma", False):
        raise ValueError("the model must predict C channels (learn_sigma=False)")
    if cfg.objective == "flow":
        return SystemVelocity(model) if is_system(model) else FlowVelocity(model, timestep_scale=FLOW_TIMESTEP_SCALE)
    return EDMPrecond(model, cfg.sigma_data, noise_input=EDMTimestep())


def check_image_model(m: ImageModelConfig, image_size: int) -> None:
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size {m.hidden_size} must be divisible by model.num_heads {m.num_heads}")
    if image_size % m.patch_size:
        raise ConfigError(f"data.image_size {image_size} must be divisible by model.patch_size {m.patch_size}")


@dataclass(frozen=True)
class Sampling:
    """How to sample: guidance scale, steps, sampler (solver), and the flow shift."""

    scale: float
    steps: int
    sampler: str
    shift: float = 1.0


def sampling_options(cfg: Any, options: dict[str, Any]) -> Sampling:
    """The command's options, else the run's ``sample`` section; the sampler must suit the objective."""
    s = cfg.sample
    scale = options.get("cfg", s.cfg)
    if not isinstance(scale, (int, float)) or not 0 <= scale < float("inf"):
        raise ConfigError(f"--cfg must be a finite number >= 0, got {scale}")
    steps = options.get("steps", s.steps)
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    sampler = options.get("sampler", s.sampler)
    allowed = FLOW_SAMPLERS if cfg.objective == "flow" else SAMPLERS
    if sampler not in allowed:
        raise ConfigError(f"--solver must be one of {allowed} for a run trained with objective {cfg.objective}, "
                          f"got {sampler!r}")
    shift = options.get("shift", s.shift)
    if not 0 < shift < float("inf"):
        raise ConfigError(f"--shift must be a finite number > 0, got {shift}")
    if shift != 1.0 and cfg.objective != "flow":
        raise ConfigError("--shift applies to runs trained with objective flow only")
    return Sampling(float(scale), int(steps), sampler, float(shift))


def count_option(options: dict[str, Any], default: int, flag: str = "--n") -> int:
    n = options.get("n", default)
    if n < 1:
        raise ConfigError(f"{flag} must be >= 1, got {n}")
    return int(n)


@torch.no_grad()
def generate(
    model: Callable[..., Tensor], shape: tuple[int, ...], conds: Iterator[dict[str, Tensor]], gens: list[torch.Generator],
    *, how: Sampling, cfg: ImageDiffusionConfig, null_cond: dict[str, Any], chunk: int, device: torch.device,
) -> tuple[Tensor, int]:
    """Guided samples in [-1, 1], ``chunk`` at a time, one generator per sample; returns (samples, NFE).

    ``model`` is the trained network (``sampling_model`` makes it a velocity or denoiser per ``cfg``);
    ``conds`` yields the condition keywords of each chunk; ``shape`` is one sample's (C, H, W)."""
    guided = ClassifierFreeGuidance(sampling_model(cfg, model), how.scale, null_cond=null_cond)
    out, nfe = [], 0
    for i, cond in zip(range(0, len(gens), chunk), conds):
        g = gens[i : i + chunk]
        full = (len(g), *shape)
        common = dict(steps=how.steps, generator=g, device=device, **cond)
        if cfg.objective == "flow":
            res = sample_flow(guided, full, solver=how.sampler, shift=how.shift, **common)
        elif how.sampler in ("heun", "euler", "dpm++2m"):
            res = sample_edm(guided, full, solver=how.sampler, **common)
        elif how.sampler == "af3":
            res = sample_af3(guided, full, sigma_data=cfg.sigma_data, augment=False, **common)
        else:
            res = sample_ddim(guided, full, **common)
        out.append(res.samples.clamp(-1, 1))
        nfe = res.nfe
    return torch.cat(out), nfe
