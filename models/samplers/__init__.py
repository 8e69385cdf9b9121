"""Samplers written from the math, one per file, behind one registry.

Canonical names: ddpm, ddim, euler, euler_a, dpmpp_2m. AUTOMATIC1111's display names ("Euler a",
"DPM++ 2M", ...) are accepted as aliases, case-insensitively.
"""

from __future__ import annotations

from models.errors import InvalidRequest
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

ALIASES = {
    "euler a": "euler_a",
    "euler_ancestral": "euler_a",
    "euler-a": "euler_a",
    "dpm++ 2m": "dpmpp_2m",
    "dpm++2m": "dpmpp_2m",
    "dpmpp2m": "dpmpp_2m",
    "dpm-solver++": "dpmpp_2m",
}

SAMPLER_NAMES = tuple(SAMPLERS)


def canonical_sampler(name: str) -> str:
    """Map a user-supplied sampler name to its canonical name, or raise InvalidRequest naming the choices."""
    key = " ".join(str(name).strip().lower().split())
    key = ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise InvalidRequest(
            f"sampler {name!r} is not supported. Hint: use one of {', '.join(SAMPLER_NAMES)} "
            "(or AUTOMATIC1111's 'Euler a', 'DPM++ 2M').",
            param="sampler",
        )
    return key


def get_sampler(name: str) -> Sampler:
    return SAMPLERS[canonical_sampler(name)]()


__all__ = ["SAMPLERS", "SAMPLER_NAMES", "Plan", "Sampler", "SamplerState", "canonical_sampler", "get_sampler"]
