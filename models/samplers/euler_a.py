"""Euler ancestral: an Euler step down to sigma_down, then fresh noise back up to sigma_{i+1}.

From k-diffusion's ``sample_euler_ancestral`` (Karras et al. 2022 discuss the ancestral split):
    sigma_up   = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2)
    sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2)
    x <- x + (x - x_0^) / sigma_i * (sigma_down - sigma_i) + sigma_up z
so the marginal noise level after the step is exactly sigma_{i+1}.
"""

from __future__ import annotations

import torch

from models.samplers.base import NoiseFn, Plan, SamplerState, x0_from_sigma_output
from models.samplers.euler import SigmaSampler


class EulerAncestral(SigmaSampler):
    name = "euler_a"
    stochastic = True

    def step(
        self, plan: Plan, i: int, x: torch.Tensor, model_output: torch.Tensor, state: SamplerState, noise: NoiseFn
    ) -> torch.Tensor:
        s_from, s_to = plan.c("sigma", i), plan.c("sigma", i + 1)
        x0 = x0_from_sigma_output(plan.schedule.prediction_type, x, model_output, s_from)
        s_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
        s_down = (s_to**2 - s_up**2) ** 0.5
        d = (x - x0) / s_from
        # diffusers draws noise at every step, the last one too (where sigma_up = 0): keep the same
        # draw order so that a seeded generator gives the same trajectory.
        return x + d * (s_down - s_from) + noise() * s_up
