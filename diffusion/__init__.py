"""Diffusion math: schedules, parameterizations, losses, guidance and solver steps.

Pure jnp functions over arrays; no Flax modules and no I/O, so everything here can sit inside
the jitted train step and sampler.
"""

from diffusion.guidance import classifier_free_guidance, rescale_guidance
from diffusion.loss import LOSS_WEIGHTINGS, diffusion_loss, min_snr_weight
from diffusion.parameterization import (
    PREDICTION_TYPES,
    add_noise,
    check_prediction_type,
    predict_x0_and_eps,
    snr,
    training_target,
)
from diffusion.schedules import SCHEDULES, NoiseSchedule, make_schedule
from diffusion.solvers import (
    TIMESTEP_SPACINGS,
    ddim_step,
    ddpm_step,
    previous_timesteps,
    sampling_timesteps,
)

__all__ = [
    "LOSS_WEIGHTINGS",
    "PREDICTION_TYPES",
    "SCHEDULES",
    "TIMESTEP_SPACINGS",
    "NoiseSchedule",
    "add_noise",
    "check_prediction_type",
    "classifier_free_guidance",
    "ddim_step",
    "ddpm_step",
    "diffusion_loss",
    "make_schedule",
    "min_snr_weight",
    "predict_x0_and_eps",
    "previous_timesteps",
    "rescale_guidance",
    "sampling_timesteps",
    "snr",
    "training_target",
]
