"""Sampler names and aliases, torch-free so that the API validates them without importing the engine.

Canonical names: ddpm, ddim, euler, euler_a, dpmpp_2m. AUTOMATIC1111's display names ("Euler a",
"DPM++ 2M", ...) are accepted as aliases, case-insensitively.
"""

from __future__ import annotations

from models.errors import InvalidRequest

SAMPLER_NAMES = ("ddpm", "ddim", "euler", "euler_a", "dpmpp_2m")

ALIASES = {
    "euler a": "euler_a",
    "euler_ancestral": "euler_a",
    "euler-a": "euler_a",
    "dpm++ 2m": "dpmpp_2m",
    "dpm++2m": "dpmpp_2m",
    "dpmpp2m": "dpmpp_2m",
    "dpm-solver++": "dpmpp_2m",
}


def canonical_sampler(name: str, allowed: tuple[str, ...] | list[str] = SAMPLER_NAMES) -> str:
    """Map a user-supplied sampler name to its canonical name, or raise InvalidRequest naming the choices."""
    key = " ".join(str(name).strip().lower().split())
    key = ALIASES.get(key, key)
    if key not in allowed:
        raise InvalidRequest(
            f"sampler {name!r} is not supported. Hint: use one of {', '.join(allowed)} "
            "(or AUTOMATIC1111's 'Euler a', 'DPM++ 2M').",
            param="sampler",
        )
    return key
