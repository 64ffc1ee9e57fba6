"""adaln.diffusion: EDM-language diffusion core (schedules, preconditioning, samplers, guidance, losses).

A denoiser is any callable ``D(x, sigma, **cond)`` predicting clean data from ``x = x0 + sigma * n``,
with ``x`` ``(B, ...)`` and ``sigma`` ``(B,)``. Nothing here depends on a model architecture.
"""

from adaln.diffusion.augmentation import centre_random_augmentation, random_rotation
from adaln.diffusion.guidance import ClassifierFreeGuidance
from adaln.diffusion.losses import denoising_loss, loss_weight, sample_training_sigmas
from adaln.diffusion.preconditioning import EDMPrecond, VPEpsDenoiser, edm_scalings
from adaln.diffusion.samplers import SampleResult, sample_af3, sample_ddim, sample_edm
from adaln.diffusion.schedules import (
    af3_noise_schedule,
    karras_sigmas,
    sigma_to_vp_timestep,
    vp_alphas_cumprod,
    vp_respaced_timesteps,
    vp_sigmas,
    vp_timestep_to_sigma,
)

__all__ = [
    "ClassifierFreeGuidance",
    "EDMPrecond",
    "SampleResult",
    "VPEpsDenoiser",
    "af3_noise_schedule",
    "centre_random_augmentation",
    "denoising_loss",
    "edm_scalings",
    "karras_sigmas",
    "loss_weight",
    "random_rotation",
    "sample_af3",
    "sample_ddim",
    "sample_edm",
    "sample_training_sigmas",
    "sigma_to_vp_timestep",
    "vp_alphas_cumprod",
    "vp_respaced_timesteps",
    "vp_sigmas",
    "vp_timestep_to_sigma",
]
