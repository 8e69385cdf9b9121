"""One Settings object for the API, read from CLI flags and ``DIFFUSERVE_*`` environment variables.

Built in ``main()`` / the app factory and passed down; never read at import time. Bad values fail fast at
startup with the variable's name.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "DIFFUSERVE_"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    redis_url: str = "redis://localhost:6379/0"
    prefix: str = "diffuserve"
    default_model: str = "shapes"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    public_url: str | None = None  # base of absolute image URLs when behind a proxy

    # Limits (every one a field with a sane default).
    max_prompt_chars: int = Field(2000, ge=1)
    max_steps: int = Field(150, ge=1)
    max_n: int = Field(8, ge=1)
    max_side: int = Field(2048, ge=8)
    max_pixels: int = Field(1024 * 1024, ge=64)
    min_guidance: float = 0.0
    max_guidance: float = 30.0
    max_loras: int = Field(8, ge=0)
    max_lora_scale: float = 4.0
    max_body_bytes: int = Field(16 * 2**20, ge=1024)
    max_queue: int = Field(256, ge=0)  # queued jobs per model before 429
    # Also 429 when a new job's estimated wait (queued jobs / the live workers' measured images per second)
    # would pass this many seconds: a bound that follows the workers' speed. None: the count bound only.
    max_queue_wait_s: float | None = Field(None, gt=0)

    request_timeout_s: float = Field(300.0, gt=0)  # the synchronous endpoint's wait, then 504 + job id
    default_deadline_s: float | None = None  # a job not started within this expires
    result_ttl_s: int = Field(3600, ge=1)
    worker_stale_s: float = Field(10.0, gt=0)
    shutdown_drain_s: float = Field(0.0, ge=0)  # on SIGTERM: /readyz says 503 this long before shutting down

    api_keys: list[str] = Field(default_factory=list)  # empty: auth off

    @field_validator("api_keys", mode="before")
    @classmethod
    def split_keys(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            key = ENV_PREFIX + name.upper()
            if key in env:
                values[name] = env[key]
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as e:
            problems = "; ".join(f"{ENV_PREFIX}{'.'.join(map(str, err['loc'])).upper()}: {err['msg']}"
                                 for err in e.errors())
            raise SystemExit(f"invalid settings: {problems}") from None
