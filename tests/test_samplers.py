"""Each sampler against the diffusers scheduler of the same name, on the same inputs and noise draws."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from models.errors import InvalidRequest
from models.samplers import SamplerState, canonical_sampler, get_sampler
from models.samplers.ddim import DDIM
from models.samplers.ddpm import DDPM
from models.schedules import NoiseSchedule, cosine_betas

SHAPE = (2, 4, 8, 8)

SCHEDULES = {
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}

DIFFUSERS = {
    "ddim": lambda cfg: DDIMScheduler(**cfg, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    "euler": lambda cfg: EulerDiscreteScheduler(**cfg, steps_offset=1),
    "dpmpp_2m": lambda cfg: DPMSolverMultistepScheduler(
        **cfg, algorithm_type="dpmsolver++", solver_order=2, steps_offset=1
    ),
    "ddpm": lambda cfg: DDPMScheduler(**cfg, clip_sample=False, steps_offset=1),
    "euler_a": lambda cfg: EulerAncestralDiscreteScheduler(**cfg, steps_offset=1),
}


def fake_model(x: torch.Tensor, t: float) -> torch.Tensor:
    """A smooth, deterministic stand-in for a UNet that keeps trajectories bounded, as a trained one does:
    its input is mostly noise, and it predicts mostly that noise, plus a t-dependent structured part."""
    g = torch.Generator().manual_seed(1234)
    base = torch.randn(x.shape, generator=g)
    return 0.9 * x + 0.1 * torch.tanh(x) + 0.05 * math.sin(t / 150.0) * base


def run_both(name, sched_kind, prediction_type, steps, spacing=None):
    cfg = dict(SCHEDULES[sched_kind], num_train_timesteps=1000, prediction_type=prediction_type)
    if spacing:
        cfg["timestep_spacing"] = spacing
    ref = DIFFUSERS[name](cfg)
    ref.set_timesteps(steps)
    schedule = NoiseSchedule.from_config(dict(ref.config))
    sampler = get_sampler(name)
    plan = sampler.plan(schedule, steps)
    assert plan.timesteps.tolist() == pytest.approx(ref.timesteps.float().tolist(), abs=1e-3)
    assert sampler.init_noise_sigma(plan) == pytest.approx(float(ref.init_noise_sigma), rel=1e-5)

    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * sampler.init_noise_sigma(plan)
    x_ref, x_ours = x0.clone(), x0.clone()
    state = SamplerState()
    g_ref, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        out_ref = fake_model(ref.scale_model_input(x_ref, t), float(t))
        x_ref = ref.step(out_ref, t, x_ref, generator=g_ref).prev_sample
        inp = x_ours * sampler.input_scale(plan, i)
        out = fake_model(inp, float(plan.timesteps[i]))
        x_ours = sampler.step(plan, i, x_ours, out, state, lambda: torch.randn(SHAPE, generator=g_ours))
        worst = max(worst, deviation(x_ours, x_ref))
    return worst, deviation(x_ours, x_ref)


def deviation(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference, in units of the state's scale where that exceeds 1: sigma-space samplers
    carry x = x_0 + sigma eps with sigma_max ~ 10^3 under the cosine schedule, where float32's own
    resolution is ~1e-4 absolute."""
    return (x - ref).abs().max().item() / max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m", "ddpm", "euler_a"])
@pytest.mark.parametrize("sched_kind", list(SCHEDULES))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_matches_diffusers_over_20_steps(name, sched_kind, prediction_type):
    worst, final = run_both(name, sched_kind, prediction_type, 20)
    assert worst <= 1e-4, f"max per-step deviation {worst}"
    assert final <= 1e-4


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m", "ddpm", "euler_a"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_spacings_and_step_counts(name, spacing, steps):
    worst, _ = run_both(name, "scaled_linear", "epsilon", steps, spacing)
    assert worst <= 1e-4


def test_single_step_from_same_state():
    """One step from an identical (x, output) pair: the update rule itself, isolated from accumulation."""
    cfg = dict(SCHEDULES["scaled_linear"], num_train_timesteps=1000)
    for name in ["ddim", "euler", "dpmpp_2m"]:
        ref = DIFFUSERS[name](cfg)
        ref.set_timesteps(30)
        sampler = get_sampler(name)
        plan = sampler.plan(NoiseSchedule.from_config(dict(ref.config)), 30)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
        out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
        expected = ref.step(out, ref.timesteps[0], x).prev_sample
        got = sampler.step(plan, 0, x, out, SamplerState(), lambda: None)
        assert (got - expected).abs().max().item() <= 1e-5, name


def test_ddim_eta_matches_with_same_noise():
    cfg = dict(SCHEDULES["scaled_linear"], num_train_timesteps=1000)
    ref = DDIMScheduler(**cfg, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ref.set_timesteps(10)
    sampler = DDIM(eta=0.7)
    plan = sampler.plan(NoiseSchedule.from_config(dict(ref.config)), 10)
    x_ref = x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    state = SamplerState()
    for i, t in enumerate(ref.timesteps):
        out = fake_model(x_ref, float(t))
        x_ref = ref.step(out, t, x_ref, eta=0.7, generator=g1).prev_sample
        x = sampler.step(plan, i, x, fake_model(x, float(t)), state, lambda: torch.randn(SHAPE, generator=g2))
    assert (x - x_ref).abs().max().item() <= 1e-4


def test_ddpm_fixed_large_is_algorithm_2():
    """sigma_t^2 = beta_t; with full steps the x_0-form mean equals Algorithm 2's eps form."""
    cfg = dict(SCHEDULES["linear"], num_train_timesteps=1000)
    schedule = NoiseSchedule.from_config(cfg)
    sampler = DDPM(variance="fixed_large")
    plan = sampler.plan(schedule, 1000)
    i = 500
    t = int(plan.timesteps[i])
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    got = sampler.step(plan, i, x, eps, SamplerState(), lambda: z)
    abar = float(schedule.alphas_cumprod[t])
    beta = 1 - abar / float(schedule.alphas_cumprod[t - 1])
    expected = (x - beta / (1 - abar) ** 0.5 * eps) / (1 - beta) ** 0.5 + beta**0.5 * z
    assert (got - expected).abs().max().item() <= 1e-4


def test_ddpm_ancestral_moments():
    """The step's mean and variance are those of the posterior q(x_{t-1} | x_t, x_0)."""
    schedule = NoiseSchedule.from_config(dict(SCHEDULES["linear"], num_train_timesteps=1000))
    sampler = DDPM()
    plan = sampler.plan(schedule, 1000)
    i, n = 300, 20000
    t = int(plan.timesteps[i])
    x = torch.full((n, 1), 0.8)
    eps = torch.full((n, 1), 0.1)
    g = torch.Generator().manual_seed(0)
    out = sampler.step(plan, i, x, eps, SamplerState(), lambda: torch.randn((n, 1), generator=g))
    abar, abar_prev = float(schedule.alphas_cumprod[t]), float(schedule.alphas_cumprod[t - 1])
    beta = 1 - abar / abar_prev
    x0 = (0.8 - (1 - abar) ** 0.5 * 0.1) / abar**0.5
    mean = abar_prev**0.5 * beta / (1 - abar) * x0 + (1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar) * 0.8
    var = (1 - abar_prev) / (1 - abar) * beta
    assert out.mean().item() == pytest.approx(mean, abs=4 * (var / n) ** 0.5)
    assert out.var().item() == pytest.approx(var, rel=0.05)


def test_cosine_schedule_definition():
    T = 1000
    betas = cosine_betas(T).double()
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    abar = torch.cumprod(1 - betas, 0)
    for t in [0, 10, 500, 900]:
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-4)
    assert betas.max().item() == pytest.approx(0.999)  # clipped there (float32)


def test_forward_process_statistics():
    schedule = NoiseSchedule.from_config(dict(SCHEDULES["scaled_linear"], num_train_timesteps=1000))
    x0 = torch.full((50000,), 0.5)
    noise = torch.randn(50000, generator=torch.Generator().manual_seed(0))
    xt = schedule.q_sample(x0, 400, noise)
    abar = float(schedule.alphas_cumprod[400])
    assert xt.mean().item() == pytest.approx(abar**0.5 * 0.5, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.05)


def test_aliases_and_unknown_names():
    assert canonical_sampler("Euler a") == "euler_a"
    assert canonical_sampler("DPM++ 2M") == "dpmpp_2m"
    assert canonical_sampler(" DDIM ") == "ddim"
    with pytest.raises(InvalidRequest) as e:
        canonical_sampler("heun9")
    assert e.value.param == "sampler" and "heun9" in e.value.message and "dpmpp_2m" in e.value.message


def test_zero_steps_rejected():
    schedule = NoiseSchedule.from_config(SCHEDULES["linear"])
    with pytest.raises(InvalidRequest) as e:
        get_sampler("euler").plan(schedule, 0)
    assert e.value.param == "steps"
