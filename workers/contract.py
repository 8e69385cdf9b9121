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
| {p}:workers                  | sorted set                | worker names by last heartbeat (the index)      |
| {p}:finished                 | stream, capped            | "job X reached a final state" for waiters       |
"""

from __future__ import annotations

import json
import math
import time
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

CONTRACT_VERSION = 2  # 2: workers are found through the {p}:workers index, not by scanning the keyspace
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

    def finished(self) -> str:
        """Stream of (id, status) as jobs reach a final state: one stream for an API process's waiters to read,
        however many jobs they wait on. A notification only (capped); the job hash is the truth."""
        return f"{self.p}:finished"

    def workers(self) -> str:
        """Sorted set: worker name -> time of its last heartbeat. The API finds live workers here with one
        range read; scanning the keyspace for ``worker:*`` costs a round trip per 100 keys of *all* keys (job
        records, images), which under load stalled every request that needed a fresh count."""
        return f"{self.p}:workers"

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


FINISHED_MAXLEN = 10_000  # notifications kept; a waiter that misses one still finds the final state in the hash


def announce_final(pipe: Any, keys: Keys, job_id: str, status: str, ttl_s: int, **data: Any) -> None:
    """Queue on a pipeline what every writer of a final state does after writing the hash: the final event on
    the job's own stream (SSE, replayable) and on the shared ``finished`` stream (what synchronous waiters
    read), and the TTL of the job's hash and event stream."""
    pipe.xadd(keys.events(job_id), encode_event(status, **data))
    pipe.xadd(keys.finished(), {"id": job_id, "status": status}, maxlen=FINISHED_MAXLEN, approximate=True)
    pipe.expire(keys.job(job_id), ttl_s)
    pipe.expire(keys.events(job_id), ttl_s)


def decode_event(raw: dict[bytes | str, bytes | str]) -> dict[str, Any]:
    d = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
         for k, v in raw.items()}
    return {"kind": d["kind"], "at": float(d["at"]), **json.loads(d.get("data") or "{}")}


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# Enqueue atomically, refusing when the model's queue already holds ``max_queue`` jobs: the check and the
# writes happen in one step on the server, so concurrent API replicas cannot overshoot the bound.
# KEYS: queued zset, job hash, job events stream, model jobs stream.
# ARGV: max_queue (-1: no bound), job id, created, request JSON, model, then the 'queued' event's fields.
# Returns 1 when enqueued; when full, -1 - depth (so the caller learns the depth in the same round trip).
ENQUEUE_SCRIPT = """
local depth = redis.call('ZCARD', KEYS[1])
if tonumber(ARGV[1]) >= 0 and depth >= tonumber(ARGV[1]) then return -1 - depth end
redis.call('HSET', KEYS[2], 'id', ARGV[2], 'status', 'queued', 'created', ARGV[3], 'request', ARGV[4],
           'attempts', 0, 'model', ARGV[5])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('XADD', KEYS[3], '*', unpack(ARGV, 6))
redis.call('XADD', KEYS[4], '*', 'id', ARGV[2])
return 1
"""


def queue_job(pipe: Any, keys: Keys, job_id: str, request: JobRequest, now: float | None = None,
              max_queue: int | None = None) -> None:
    """Queue the enqueue script on a (sync or async) Redis client or pipeline; it returns 1 when the job was
    enqueued, and -1 - depth when the queue was full (and nothing was written)."""
    now = time.time() if now is None else now
    event = [x for kv in encode_event(JobStatus.queued.value).items() for x in kv]
    return pipe.eval(ENQUEUE_SCRIPT, 4, keys.queued(request.model), keys.job(job_id), keys.events(job_id),
                     keys.jobs(request.model), -1 if max_queue is None else max_queue, job_id, f"{now:.6f}",
                     request.model_dump_json(), request.model, *event)
