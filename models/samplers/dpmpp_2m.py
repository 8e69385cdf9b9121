"""DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), the multistep second-order data-prediction solver.

With alpha_t = 1/sqrt(sigma^2 + 1), sigma_t = sigma alpha_t and lambda_t = log(alpha_t / sigma_t):
    h = lambda_t - lambda_s0,  r0 = (lambda_s0 - lambda_s1) / h
    D0 = x_0^(s0),  D1 = (x_0^(s0) - x_0^(s1)) / r0
    x_t = (sigma_t / sigma_s0) x - alpha_t (e^{-h} - 1) D0 - 0.5 alpha_t (e^{-h} - 1) D1
The first step (no history yet) and the last step (sigma_t = 0) are first order (DPM-Solver++(1),
i.e. DDIM), as diffusers does with ``final_sigmas_type="zero"``. Per-sample memory: x_0^(s1).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from models.samplers.base import NoiseFn, Plan, Sampler, SamplerState, check_steps, x0_eps_from_output
from models.schedules import NoiseSchedule, interpolated_sigmas


def dpm_timesteps(schedule: NoiseSchedule, num_steps: int, spacing: str) -> np.ndarray:
    T = schedule.num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = T // (num_steps + 1)
        ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        return ts + schedule.steps_offset
    ts = np.arange(T, 0, -T / num_steps).round().copy().astype(np.int64)
    return ts - 1


class DPMSolverPP2M(Sampler):
    name = "dpmpp_2m"
    default_spacing = "linspace"

    def plan(self, schedule: NoiseSchedule, num_steps: int) -> Plan:
        check_steps(num_steps)
        ts = dpm_timesteps(schedule, num_steps, schedule.spacing(self.default_spacing))
        sig = interpolated_sigmas(schedule, ts).astype(np.float64)
        alpha = 1.0 / np.sqrt(sig**2 + 1)
        sigma_t = sig * alpha
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma_t)  # +inf at the final sigma = 0
        return Plan(schedule, ts.astype(np.float32), {"alpha": alpha, "sigma_t": sigma_t, "lambda": lam})

    def step(
        self, plan: Plan, i: int, x: torch.Tensor, model_output: torch.Tensor, state: SamplerState, noise: NoiseFn
    ) -> torch.Tensor:
        a_s0 = plan.c("alpha", i)
        x0, _ = x0_eps_from_output(plan.schedule.prediction_type, x, model_output, a_s0**2)
        prev_x0, state.prev_x0 = state.prev_x0, x0
        s_t = plan.c("sigma_t", i + 1)
        if s_t == 0.0:  # last step to sigma = 0: the ODE solution is the data prediction itself
            return x0
        a_t, s_s0 = plan.c("alpha", i + 1), plan.c("sigma_t", i)
        h = plan.c("lambda", i + 1) - plan.c("lambda", i)
        phi = math.expm1(-h)  # e^{-h} - 1
        x_t = (s_t / s_s0) * x - (a_t * phi) * x0
        if prev_x0 is None:
            return x_t
        r0 = (plan.c("lambda", i) - plan.c("lambda", i - 1)) / h
        return x_t - (0.5 * a_t * phi / r0) * (x0 - prev_x0)
