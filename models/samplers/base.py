"""The sampler interface: a pure step function plus explicit per-sample state.

Unlike diffusers' schedulers, which keep the step index and solver history on ``self`` (so one scheduler
object cannot serve two requests at once), a sampler here is stateless. ``plan`` precomputes one sample's
timesteps and coefficients as host floats (so the step loop never syncs with the device), and the
per-sample ``SamplerState`` holds whatever a multistep method remembers. Samples in one UNet batch can
therefore be at different steps, with different step counts and different samplers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from models.errors import InvalidRequest
from models.schedules import NoiseSchedule

NoiseFn = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Plan:
    """One sample's trajectory: model timesteps and per-step host coefficients."""

    schedule: NoiseSchedule
    timesteps: np.ndarray  # float32, the value fed to the UNet at step i (descending)
    coef: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def c(self, name: str, i: int) -> float:
        return float(self.coef[name][i])


@dataclass
class SamplerState:
    """Per-sample solver memory (e.g. DPM-Solver++'s previous x_0 prediction)."""

    prev_x0: torch.Tensor | None = None


class Sampler(ABC):
    name: str
    stochastic: bool = False
    default_spacing: str = "leading"

    @abstractmethod
    def plan(self, schedule: NoiseSchedule, num_steps: int) -> Plan: ...

    @abstractmethod
    def step(
        self, plan: Plan, i: int, x: torch.Tensor, model_output: torch.Tensor, state: SamplerState, noise: NoiseFn
    ) -> torch.Tensor:
        """Advance x from plan step i to step i+1 given the (guided) model output at step i."""

    def init_noise_sigma(self, plan: Plan) -> float:
        """Standard deviation of x at the first step (pure noise)."""
        return 1.0

    def input_scale(self, plan: Plan, i: int) -> float:
        """Multiplier applied to x before it is fed to the UNet (c_in)."""
        return 1.0

    def add_noise(self, plan: Plan, i: int, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A draw of x at plan step i given clean x0: the forward process q(x_t | x_0) (img2img)."""
        abar = float(plan.schedule.alphas_cumprod[int(round(float(plan.timesteps[i])))])
        return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise


def check_steps(num_steps: int) -> None:
    if num_steps < 1:
        raise InvalidRequest(f"steps must be >= 1, got {num_steps}. Hint: use 20-50 steps.", param="steps")


def x0_eps_from_output(
    prediction_type: str, x_t: torch.Tensor, out: torch.Tensor, abar: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) implied by the model output at x_t, for x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps."""
    a, b = abar**0.5, (1 - abar) ** 0.5
    if prediction_type == "epsilon":
        return (x_t - b * out) / a, out
    # v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022)
    return a * x_t - b * out, a * out + b * x_t


def x0_from_sigma_output(prediction_type: str, x: torch.Tensor, out: torch.Tensor, sigma: float) -> torch.Tensor:
    """x_0 in the sigma parameterisation x = x_0 + sigma * eps (Karras et al. 2022)."""
    if prediction_type == "epsilon":
        return x - sigma * out
    return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)


def maybe_clip(plan: Plan, x0: torch.Tensor) -> torch.Tensor:
    s = plan.schedule
    return x0.clamp(-s.clip_sample_range, s.clip_sample_range) if s.clip_sample else x0
