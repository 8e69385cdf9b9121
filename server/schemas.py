"""HTTP request bodies and their validation into the worker contract's ``JobRequest``.

``POST /v1/images/generations`` follows the OpenAI Images API (prompt, model, n, size, response_format,
user) so the official SDK works unchanged; our extensions ride in the same body. ``<lora:name:scale>`` tags
inside the prompt (AUTOMATIC1111's convention) are parsed out of the text into ``loras``.
"""

from __future__ import annotations

import random
import re
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.errors import InvalidRequest, ModelNotFound
from models.sampler_names import canonical_sampler
from server.settings import Settings
from workers.contract import JobRequest, LoraSpec, ModelInfo, is_finite_number

LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>", re.IGNORECASE)
MAX_SEED = 2**63 - 1


class ImageRequest(BaseModel):
    # Unknown OpenAI fields (quality, style, ...) are ignored, as the SDK may send them.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = Field(None, description="WIDTHxHEIGHT, e.g. 64x64; default: the model's native size")
    response_format: Literal["url", "b64_json"] = "url"
    user: str | None = None
    negative_prompt: str = ""
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    sampler: str | None = None
    loras: list[LoraSpec] = Field(default_factory=list)


class JobCreate(ImageRequest):
    init_image: str | None = Field(None, description="img2img: base64 PNG/JPEG")
    strength: float = Field(0.75, description="img2img: how much to change, (0, 1]")
    deadline_s: float | None = Field(None, description="expire if not started within this many seconds")


def parse_size(size: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", size)
    if not m:
        raise InvalidRequest(f"size {size!r} is not WIDTHxHEIGHT. Hint: e.g. '64x64'.", param="size")
    return int(m[1]), int(m[2])


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraSpec]]:
    specs = []
    for name, scale in LORA_TAG.findall(prompt):
        try:
            value = float(scale) if scale else 1.0
        except ValueError:
            raise InvalidRequest(f"<lora:{name}:{scale}>: scale must be a number.", param="prompt") from None
        specs.append(LoraSpec(name=name.strip(), scale=value))
    return " ".join(LORA_TAG.sub(" ", prompt).split()), specs


def to_job(body: ImageRequest, info: ModelInfo | None, settings: Settings, model: str) -> JobRequest:
    """Validate every field against Settings' limits and the model, filling the model's defaults."""
    if info is None:
        raise ModelNotFound(f"model {model!r} is not served here. Hint: GET /v1/models lists the models.",
                            param="model")
    s = settings
    if not body.prompt.strip():
        raise InvalidRequest("prompt must not be empty.", param="prompt")
    if len(body.prompt) > s.max_prompt_chars:
        raise InvalidRequest(f"prompt is {len(body.prompt)} characters; the limit is {s.max_prompt_chars}.",
                             param="prompt")
    if len(body.negative_prompt) > s.max_prompt_chars:
        raise InvalidRequest(f"negative_prompt is {len(body.negative_prompt)} characters; the limit is "
                             f"{s.max_prompt_chars}.", param="negative_prompt")
    prompt, tag_loras = extract_lora_tags(body.prompt)
    if not 1 <= body.n <= s.max_n:
        raise InvalidRequest(f"n must be between 1 and {s.max_n}, got {body.n}.", param="n")
    width, height = parse_size(body.size) if body.size else (info.width, info.height)
    for name, v in (("width", width), ("height", height)):
        if v < info.multiple_of or v % info.multiple_of:
            raise InvalidRequest(f"{name} {v} must be a positive multiple of {info.multiple_of}.", param="size")
        if v > s.max_side:
            raise InvalidRequest(f"{name} {v} exceeds the limit of {s.max_side}.", param="size")
    if width * height > s.max_pixels:
        raise InvalidRequest(f"size {width}x{height} is {width * height} pixels; the limit is {s.max_pixels}.",
                             param="size")
    steps = info.steps if body.steps is None else body.steps
    if not 1 <= steps <= s.max_steps:
        raise InvalidRequest(f"steps must be between 1 and {s.max_steps}, got {steps}.", param="steps")
    guidance = info.guidance_scale if body.guidance_scale is None else body.guidance_scale
    if not is_finite_number(guidance) or not s.min_guidance <= guidance <= s.max_guidance:
        raise InvalidRequest(f"guidance_scale must be between {s.min_guidance} and {s.max_guidance}, got "
                             f"{guidance}.", param="guidance_scale")
    sampler = canonical_sampler(body.sampler or info.sampler, info.samplers)
    seed = random.randrange(2**32) if body.seed is None else body.seed
    if not 0 <= seed <= MAX_SEED - body.n:
        raise InvalidRequest(f"seed must be between 0 and 2^63 - 1 - n, got {seed}.", param="seed")
    loras = list(body.loras) + tag_loras
    if len(loras) > s.max_loras:
        raise InvalidRequest(f"{len(loras)} adapters requested; the limit is {s.max_loras}.", param="loras")
    seen = set()
    for lora in loras:
        if lora.name in seen:
            raise InvalidRequest(f"adapter {lora.name!r} is listed twice.", param="loras")
        seen.add(lora.name)
        if lora.name not in info.loras:
            raise InvalidRequest(f"adapter {lora.name!r} not found. Hint: available: "
                                 f"{', '.join(info.loras) or '(none)'}; GET /v1/loras.", param="loras")
        if not is_finite_number(lora.scale) or abs(lora.scale) > s.max_lora_scale:
            raise InvalidRequest(f"adapter {lora.name!r} scale {lora.scale} must be within "
                                 f"[-{s.max_lora_scale}, {s.max_lora_scale}].", param="loras")
    init_image, strength, deadline = None, 1.0, None
    if isinstance(body, JobCreate):
        if body.init_image is not None:
            init_image = body.init_image
            strength = body.strength
            if not is_finite_number(strength) or not 0 < strength <= 1:
                raise InvalidRequest(f"strength must be in (0, 1], got {strength}.", param="strength")
            if int(steps * strength) < 1:
                raise InvalidRequest(f"strength {strength} x steps {steps} leaves no step to run.", param="strength")
        deadline_s = body.deadline_s if body.deadline_s is not None else s.default_deadline_s
        if deadline_s is not None:
            if not is_finite_number(deadline_s) or deadline_s <= 0:
                raise InvalidRequest(f"deadline_s must be > 0, got {deadline_s}.", param="deadline_s")
            deadline = time.time() + deadline_s
    elif s.default_deadline_s:
        deadline = time.time() + s.default_deadline_s
    return JobRequest(model=model, prompt=prompt, negative_prompt=body.negative_prompt, n=body.n, width=width,
                      height=height, steps=steps, guidance_scale=float(guidance), seed=seed, sampler=sampler,
                      loras=loras, init_image=init_image, strength=strength, deadline=deadline)
