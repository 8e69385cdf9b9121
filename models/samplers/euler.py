"""Euler's method on the probability-flow ODE in the sigma parameterisation (Karras et al. 2022, Alg. 1).

With x = x_0 + sigma eps (x scaled by 1/sqrt(abar)), the ODE is dx/dsigma = (x - D(x; sigma)) / sigma,
where D is the denoiser (predicted x_0). One step: d = (x - x_0^) / sigma_i, x <- x + d (sigma_{i+1} - sigma_i).
The UNet sees x / sqrt(sigma^2 + 1) (back in the abar parameterisation) at timestep t(sigma).
"""

from __future__ import annotations

import torch

from models.samplers.base import NoiseFn, Plan, Sampler, SamplerState, check_steps, x0_from_sigma_output
from models.schedules import NoiseSchedule, float_timesteps, interpolated_sigmas


def sigma_plan(schedule: NoiseSchedule, num_steps: int, spacing: str) -> Plan:
    check_steps(num_steps)
    ts = float_timesteps(schedule, num_steps, spacing)
    return Plan(schedule, ts, {"sigma": interpolated_sigmas(schedule, ts)})


class SigmaSampler(Sampler):
    """Shared plumbing of the samplers that integrate in sigma space."""

    default_spacing = "linspace"

    def plan(self, schedule: NoiseSchedule, num_steps: int) -> Plan:
        return sigma_plan(schedule, num_steps, schedule.spacing(self.default_spacing))

    def init_noise_sigma(self, plan: Plan) -> float:
        s_max = float(plan.coef["sigma"].max())
        if plan.schedule.spacing(self.default_spacing) in ("linspace", "trailing"):
            return s_max
        return (s_max**2 + 1) ** 0.5

    def input_scale(self, plan: Plan, i: int) -> float:
        return 1.0 / (plan.c("sigma", i) ** 2 + 1) ** 0.5

    def add_noise(self, plan: Plan, i: int, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x0 + plan.c("sigma", i) * noise


class Euler(SigmaSampler):
    name = "euler"

    def step(
        self, plan: Plan, i: int, x: torch.Tensor, model_output: torch.Tensor, state: SamplerState, noise: NoiseFn
    ) -> torch.Tensor:
        sigma, sigma_next = plan.c("sigma", i), plan.c("sigma", i + 1)
        x0 = x0_from_sigma_output(plan.schedule.prediction_type, x, model_output, sigma)
        d = (x - x0) / sigma
        return x + d * (sigma_next - sigma)
