"""DDIM (Song, Meng & Ermon 2021), Eq. 12, with eta interpolating between DDIM (0) and DDPM-like (1).

    x_0^ = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)                      "predicted x_0"
    sigma_t = eta * sqrt((1 - abar_t') / (1 - abar_t)) * sqrt(1 - abar_t / abar_t')
    x_t' = sqrt(abar_t') x_0^ + sqrt(1 - abar_t' - sigma_t^2) eps + sigma_t z  "direction pointing to x_t"

The previous timestep is t' = t - T // N as in diffusers, and abar of a negative t' is 1
(``set_alpha_to_one``) or abar_0.
"""

from __future__ import annotations

import numpy as np
import torch

from models.samplers.base import (
    NoiseFn,
    Plan,
    Sampler,
    SamplerState,
    check_steps,
    maybe_clip,
    x0_eps_from_output,
)
from models.schedules import NoiseSchedule, discrete_timesteps


class DDIM(Sampler):
    name = "ddim"
    default_spacing = "leading"

    def __init__(self, eta: float = 0.0) -> None:
        self.eta = float(eta)
        self.stochastic = self.eta > 0

    def plan(self, schedule: NoiseSchedule, num_steps: int) -> Plan:
        check_steps(num_steps)
        ts = discrete_timesteps(schedule, num_steps, schedule.spacing(self.default_spacing))
        prev = ts - schedule.num_train_timesteps // num_steps
        abar = schedule.alphas_cumprod.astype(np.float64)
        final = 1.0 if schedule.set_alpha_to_one else abar[0]
        a_prev = np.where(prev >= 0, abar[np.clip(prev, 0, None)], final)
        return Plan(schedule, ts.astype(np.float32), {"abar": abar[ts], "abar_prev": a_prev})

    def step(
        self, plan: Plan, i: int, x: torch.Tensor, model_output: torch.Tensor, state: SamplerState, noise: NoiseFn
    ) -> torch.Tensor:
        a_t, a_prev = plan.c("abar", i), plan.c("abar_prev", i)
        x0, eps = x0_eps_from_output(plan.schedule.prediction_type, x, model_output, a_t)
        x0 = maybe_clip(plan, x0)
        sigma = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x_prev = a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x_prev = x_prev + sigma * noise()
        return x_prev
