"""The versioned, torch-free contract between the API (server/) and the workers (workers/).

Both sides import this module and nothing else of each other: the job request, its status record, its
events, and every Redis key name. Bump ``CONTRACT_VERSION`` on any incompatible change; workers refuse
jobs of another version with a clear error instead of misreading them.

Redis layout (``prefix`` defaults to ``diffuserve``):

| key                          | type                      | holds                                           |
|------------------------------|---------------------------|-------------------------------------------------|
| {p}:jobs:{model}             | stream, group ``workers`` | job ids to run (at-least-once)                  |
| {p}:job:{id}                 | hash, TTL once final      | request JSON, status, progress, timings, error  |
| {p}:job:{id}:events          | stream, TTL once final    | progress and final state, replayable            |
| {p}:job:{id}:img:{i}         | string, TTL               | PNG bytes                                       |
| {p}:worker:{name}            | hash, short TTL           | heartbeat                                       |
"""

from __future__ import annotations

import json
import math
import time
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

CONTRACT_VERSION = 1
GROUP = "workers"


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"
    expired = "expired"

    @property
    def final(self) -> bool:
        return self in FINAL


FINAL = {JobStatus.succeeded, JobStatus.failed, JobStatus.canceled, JobStatus.expired}


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    scale: float = 1.0


class JobRequest(BaseModel):
    """A validated request as the worker receives it: every field resolved by the API."""

    model_config = ConfigDict(extra="forbid")
    version: int = CONTRACT_VERSION
    model: str
    prompt: str
    negative_prompt: str = ""
    n: int = 1
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    sampler: str
    loras: list[LoraSpec] = Field(default_factory=list)
    init_image: str | None = None  # base64 PNG/JPEG (img2img)
    strength: float = 1.0
    deadline: float | None = None  # epoch seconds: not started after this, it expires
    # Test-only fault injection, honoured only by a worker started with --enable-test-faults (never set by the
    # API): raise | oom (the forward pass fails), crash (kills every worker that takes it: poison),
    # crash_mid_step / crash_after_result (kills the first worker that takes it, at that moment).
    fault: str | None = None


class Keys:
    """Every Redis key name, in one place."""

    def __init__(self, prefix: str = "diffuserve") -> None:
        self.p = prefix

    def jobs(self, model: str) -> str:
        return f"{self.p}:jobs:{model}"

    def queued(self, model: str) -> str:
        """Sorted set of queued job ids by enqueue time: queue depth (ZCARD) and position (ZRANK)."""
        return f"{self.p}:queued:{model}"

    def job(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}:events"

    def image(self, job_id: str, i: int) -> str:
        return f"{self.p}:job:{job_id}:img:{i}"

    def worker(self, name: str) -> str:
        return f"{self.p}:worker:{name}"

    def workers_pattern(self) -> str:
        return f"{self.p}:worker:*"

    def models(self) -> str:
        """Hash: model name -> ModelInfo JSON, written by every worker that serves it (no TTL)."""
        return f"{self.p}:models"


class ModelInfo(BaseModel):
    """What the API needs to validate requests for a model and to fill their defaults."""

    name: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: str
    samplers: list[str]
    loras: list[str] = Field(default_factory=list)
    multiple_of: int = 8


def encode_event(kind: str, **fields: Any) -> dict[str, str]:
    return {"kind": kind, "at": f"{time.time():.3f}", "data": json.dumps(fields)}


def decode_event(raw: dict[bytes | str, bytes | str]) -> dict[str, Any]:
    d = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
         for k, v in raw.items()}
    return {"kind": d["kind"], "at": float(d["at"]), **json.loads(d.get("data") or "{}")}


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def queue_job(pipe: Any, keys: Keys, job_id: str, request: JobRequest, now: float | None = None) -> None:
    """Queue the commands that enqueue a job on a (sync or async) Redis pipeline; the caller executes it
    (in a MULTI transaction, so a job is either fully enqueued or not at all)."""
    now = time.time() if now is None else now
    pipe.hset(keys.job(job_id), mapping={"id": job_id, "status": JobStatus.queued.value, "created": f"{now:.6f}",
                                         "request": request.model_dump_json(), "attempts": 0, "model": request.model})
    pipe.zadd(keys.queued(request.model), {job_id: now})
    pipe.xadd(keys.events(job_id), encode_event("queued"))
    pipe.xadd(keys.jobs(request.model), {"id": job_id})
