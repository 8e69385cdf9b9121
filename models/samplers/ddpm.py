"""DDPM ancestral sampling (Ho, Jain & Abbeel 2020, Algorithm 2), on a possibly strided timestep grid.

Notation: abar_t = prod alpha_s; on a grid t -> t' (t' < t, the next timestep of the plan), the effective step has
alpha_t = abar_t / abar_t', beta_t = 1 - alpha_t. The reverse step draws
    x_t' ~ N(mu~(x_t, x_0), sigma_t^2 I),
    mu~ = sqrt(abar_t') beta_t / (1 - abar_t) * x_0 + sqrt(alpha_t) (1 - abar_t') / (1 - abar_t) * x_t   (Eq. 7)
with x_0 predicted from the network's eps. Without clipping this is exactly Algorithm 2's line 4,
x_t' = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps) + sigma_t z.
Variance: ``fixed_large`` sigma_t^2 = beta_t (Algorithm 2), ``fixed_small`` the posterior variance
beta~_t = (1 - abar_t') / (1 - abar_t) beta_t (diffusers' default). No noise is added at t = 0.
"""

from __future__ import annotations

import numpy as np
import torch

from models.errors import InvalidRequest
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

VARIANCES = ("fixed_small", "fixed_large")


class DDPM(Sampler):
    name = "ddpm"
    stochastic = True
    default_spacing = "leading"

    def __init__(self, variance: str = "fixed_small") -> None:
        if variance not in VARIANCES:
            raise InvalidRequest(f"DDPM variance {variance!r} unknown. Hint: one of {VARIANCES}.", param="variance")
        self.variance = variance

    def plan(self, schedule: NoiseSchedule, num_steps: int) -> Plan:
        check_steps(num_steps)
        ts = discrete_timesteps(schedule, num_steps, schedule.spacing(self.default_spacing))
        prev = np.concatenate([ts[1:], [-1]])  # the next grid point; abar_{-1} = 1
        abar = schedule.alphas_cumprod.astype(np.float64)
        a_t = abar[ts]
        a_prev = np.where(prev >= 0, abar[np.clip(prev, 0, None)], 1.0)
        return Plan(schedule, ts.astype(np.float32), {"abar": a_t, "abar_prev": a_prev, "t": ts})

    def step(
        self, plan: Plan, i: int, x: torch.Tensor, model_output: torch.Tensor, state: SamplerState, noise: NoiseFn
    ) -> torch.Tensor:
        a_t, a_prev = plan.c("abar", i), plan.c("abar_prev", i)
        alpha_t = a_t / a_prev
        beta_t = 1 - alpha_t
        x0, _ = x0_eps_from_output(plan.schedule.prediction_type, x, model_output, a_t)
        x0 = maybe_clip(plan, x0)
        mean = (a_prev**0.5 * beta_t / (1 - a_t)) * x0 + (alpha_t**0.5 * (1 - a_prev) / (1 - a_t)) * x
        if plan.c("t", i) <= 0:
            return mean
        if self.variance == "fixed_large":
            var = beta_t
        else:
            var = max((1 - a_prev) / (1 - a_t) * beta_t, 1e-20)
        return mean + var**0.5 * noise()
