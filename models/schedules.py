"""Noise schedules: the forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

A schedule is the sequence beta_1..beta_T (here indexed 0..T-1 as diffusers does), from which
alpha_t = 1 - beta_t and abar_t = prod_{s<=t} alpha_s. We compute them in float32 exactly as diffusers
does, so that our samplers and stock diffusers' schedulers see bit-identical abar_t.

Inference-time timestep selection (``timestep_spacing``) also lives here: it is shared by every sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.errors import InvalidModel

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
_SCHEDULE_ALIASES = {"squaredcos_cap_v2": "cosine"}
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def cosine_betas(num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021): abar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2).

    beta_t = 1 - abar(t+1)/abar(t), clipped at ``max_beta`` to avoid the singularity at t = T.
    """

    def f(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(kind: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    kind = _SCHEDULE_ALIASES.get(kind, kind)
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if kind == "scaled_linear":
        # Latent diffusion's schedule: linear in sqrt(beta).
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if kind == "cosine":
        return cosine_betas(num_train_timesteps)
    raise InvalidModel(
        f"beta_schedule {kind!r} is not supported. Hint: use one of {', '.join(BETA_SCHEDULES)}.",
        param="beta_schedule",
    )


@dataclass(frozen=True)
class NoiseSchedule:
    """Everything a sampler needs to know about the model's training-time diffusion process."""

    num_train_timesteps: int
    alphas_cumprod: np.ndarray  # float32, shape (T,): abar_t
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None  # None: each sampler's diffusers default
    steps_offset: int = 0
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = False
    beta_schedule: str = "scaled_linear"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NoiseSchedule:
        """Build from a diffusers ``scheduler_config.json`` (any scheduler class)."""
        T = int(config.get("num_train_timesteps", 1000))
        kind = str(config.get("beta_schedule", "linear"))
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
        else:
            betas = make_betas(kind, T, float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02)))
        prediction_type = str(config.get("prediction_type", "epsilon"))
        if prediction_type not in PREDICTION_TYPES:
            raise InvalidModel(
                f"prediction_type {prediction_type!r} is not supported. Hint: use one of {', '.join(PREDICTION_TYPES)}.",
                param="prediction_type",
            )
        spacing = config.get("timestep_spacing")
        if spacing is not None and spacing not in SPACINGS:
            raise InvalidModel(
                f"timestep_spacing {spacing!r} is not supported. Hint: use one of {', '.join(SPACINGS)}.",
                param="timestep_spacing",
            )
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        return cls(
            num_train_timesteps=T,
            alphas_cumprod=alphas_cumprod.numpy(),
            prediction_type=prediction_type,
            timestep_spacing=spacing,
            steps_offset=int(config.get("steps_offset", 0)),
            clip_sample=bool(config.get("clip_sample", False)),
            clip_sample_range=float(config.get("clip_sample_range", 1.0)),
            set_alpha_to_one=bool(config.get("set_alpha_to_one", False)),
            beta_schedule=_SCHEDULE_ALIASES.get(kind, kind),
        )

    # -- the forward process ------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: a draw from q(x_t | x_0) (training, img2img)."""
        abar = float(self.alphas_cumprod[t])
        return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise

    @property
    def sigmas(self) -> np.ndarray:
        """sigma_t = sqrt((1 - abar_t) / abar_t): the noise level of x_t / sqrt(abar_t) (Karras et al.)."""
        a = torch.from_numpy(self.alphas_cumprod)
        return (((1 - a) / a) ** 0.5).numpy()

    def spacing(self, default: str) -> str:
        return self.timestep_spacing or default


def discrete_timesteps(schedule: NoiseSchedule, num_steps: int, spacing: str) -> np.ndarray:
    """Integer timesteps, descending, for DDPM/DDIM (diffusers' DDIMScheduler.set_timesteps)."""
    T = schedule.num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, num_steps).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = T // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64)
        return ts + schedule.steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
    raise InvalidModel(f"timestep_spacing {spacing!r} is not supported", param="timestep_spacing")


def float_timesteps(schedule: NoiseSchedule, num_steps: int, spacing: str) -> np.ndarray:
    """Float timesteps, descending, for the sigma-space samplers (diffusers' EulerDiscreteScheduler)."""
    T = schedule.num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = T // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.float32)
        return ts + schedule.steps_offset
    if spacing == "trailing":
        ts = np.arange(T, 0, -T / num_steps).round().copy().astype(np.float32)
        return ts - 1
    raise InvalidModel(f"timestep_spacing {spacing!r} is not supported", param="timestep_spacing")


def interpolated_sigmas(schedule: NoiseSchedule, timesteps: np.ndarray) -> np.ndarray:
    """sigma at (possibly fractional) timesteps, with a final sigma of 0 appended (float32)."""
    all_sigmas = schedule.sigmas
    sig = np.interp(timesteps, np.arange(0, len(all_sigmas)), all_sigmas)
    return np.concatenate([sig, [0.0]]).astype(np.float32)
