"""Samplers written from the math, one per file, behind one registry (names in models.sampler_names)."""

from __future__ import annotations

from models.sampler_names import ALIASES, SAMPLER_NAMES, canonical_sampler
from models.samplers.base import Plan, Sampler, SamplerState
from models.samplers.ddim import DDIM
from models.samplers.ddpm import DDPM
from models.samplers.dpmpp_2m import DPMSolverPP2M
from models.samplers.euler import Euler
from models.samplers.euler_a import EulerAncestral

SAMPLERS: dict[str, type[Sampler]] = {
    "ddpm": DDPM,
    "ddim": DDIM,
    "euler": Euler,
    "euler_a": EulerAncestral,
    "dpmpp_2m": DPMSolverPP2M,
}

assert tuple(SAMPLERS) == SAMPLER_NAMES


def get_sampler(name: str) -> Sampler:
    return SAMPLERS[canonical_sampler(name)]()


__all__ = ["ALIASES", "SAMPLERS", "SAMPLER_NAMES", "Plan", "Sampler", "SamplerState", "canonical_sampler", "get_sampler"]
