"""adaln.diffusion: the diffusion core (schedules, preconditioning, samplers, guidance, losses) for EDM
denoisers and flow-matching velocities.

A denoiser is any callable ``D(x, sigma, **cond)`` predicting clean data from ``x = x0 + sigma * n``; a
velocity is any callable ``v(x, sigma, **cond)`` predicting ``n - x0`` at ``x = (1 - sigma) x0 + sigma n``
(``adaln.diffusion.flow``); ``x`` is ``(B, ...)`` and ``sigma`` ``(B,)``. Nothing here depends on a model
architecture.
"""

from adaln.diffusion.augmentation import centre_random_augmentation, random_rotation
from adaln.diffusion.flow import (
    DenoiserVelocity,
    FlowVelocity,
    VelocityDenoiser,
    dynamic_shift,
    flow_loss_weight,
    flow_matching_loss,
    flow_shift_mu,
    flow_sigmas,
    flow_to_edm_sigma,
    sample_flow_training_sigmas,
    shift_sigma,
)
from adaln.diffusion.guidance import (
    ClassifierFreeGuidance,
    lumina2_cfg_interval,
    sd3_skip_layer_interval,
    zimage_cfg_interval,
)
from adaln.diffusion.losses import denoising_loss, loss_weight, sample_training_sigmas
from adaln.diffusion.preconditioning import EDMPrecond, VPEpsDenoiser, edm_scalings
from adaln.diffusion.samplers import SampleResult, dpmpp_2m_step, sample_af3, sample_ddim, sample_edm, sample_flow
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
    "DenoiserVelocity",
    "EDMPrecond",
    "FlowVelocity",
    "SampleResult",
    "VPEpsDenoiser",
    "VelocityDenoiser",
    "af3_noise_schedule",
    "centre_random_augmentation",
    "denoising_loss",
    "dpmpp_2m_step",
    "dynamic_shift",
    "edm_scalings",
    "flow_loss_weight",
    "flow_matching_loss",
    "flow_shift_mu",
    "flow_sigmas",
    "flow_to_edm_sigma",
    "karras_sigmas",
    "loss_weight",
    "lumina2_cfg_interval",
    "random_rotation",
    "sample_af3",
    "sample_ddim",
    "sample_edm",
    "sample_flow",
    "sample_flow_training_sigmas",
    "sample_training_sigmas",
    "sd3_skip_layer_interval",
    "shift_sigma",
    "sigma_to_vp_timestep",
    "vp_alphas_cumprod",
    "vp_respaced_timesteps",
    "vp_sigmas",
    "vp_timestep_to_sigma",
    "zimage_cfg_interval",
]
