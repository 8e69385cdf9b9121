"""The FastAPI front end: validate, authenticate, admit, enqueue through Redis, answer. Never imports torch."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import DiffuserveError, NotFound
from server import metrics
from server.cache import Refreshed
from server.middleware import LimitsAndMetrics
from server.schemas import ImageRequest, JobCreate, to_job
from server.settings import Settings
from workers.contract import FINAL, GROUP, JobStatus, Keys, ModelInfo, announce_final, decode_event, queue_job

# One mapping table: domain error kind -> HTTP status (and the failure metric's label).
STATUS = {
    "invalid_request_error": 422,
    "not_found_error": 404,
    "model_not_found": 404,
    "adapter_not_found": 404,
    "authentication_error": 401,
    "request_too_large": 413,
    "overloaded_error": 429,
    "service_unavailable": 503,
    "timeout": 504,
    "generation_failed": 500,
    "internal_error": 500,
}


class ApiError(DiffuserveError):
    def __init__(self, kind: str, message: str, *, param: str | None = None, headers: dict | None = None,
                 extra: dict | None = None) -> None:
        super().__init__(message, param=param)
        self.kind = kind
        self.headers = headers or {}
        self.extra = extra or {}


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. job_id on 504
    type: str
    message: str
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


# Every error the API can answer, documented once for every route (the OpenAPI schema clients and fuzzers see).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": desc} for code, desc in (
        (401, "missing or invalid API key"), (404, "unknown model, job, image or adapter"),
        (413, "request body too large"), (422, "invalid request: the field is named in error.param"),
        (429, "queue full: retry after the Retry-After header's seconds"),
        (500, "the job failed in the worker (error.job_id)"), (503, "Redis unreachable"),
        (504, "the job did not finish in time; it continues (error.job_id)"))
}


def error_response(kind: str, message: str, param: str | None = None, headers: dict | None = None,
                   extra: dict | None = None) -> JSONResponse:
    body = {"error": {"type": kind, "message": message, "param": param, **(extra or {})}}
    return JSONResponse(body, status_code=STATUS.get(kind, 500), headers=headers)


FINAL_NAMES = {s.value for s in FINAL}


class Waiters:
    """Every synchronous request of this API process waits on one Redis connection: a single task reads the
    shared ``finished`` stream (one XREAD, however many jobs are waited on; progress events never wake it),
    instead of each request holding a blocking connection (under 5x overload those ran the pool dry). Every
    ``CHECK_S`` the hashes of the waited-for jobs are read as a safety net: a final state whose notification
    was missed resolves, and a record that vanished (Redis restarted without persistence) resolves as "lost".
    A Redis error fails every waiter (a 503)."""

    BLOCK_MS = 1000
    CHECK_S = 1.0

    def __init__(self, r: aioredis.Redis, keys: Keys) -> None:
        self.r, self.keys = r, keys
        self.pending: dict[str, list[asyncio.Future]] = {}  # job id -> waiters
        self.task: asyncio.Task | None = None
        self.wake = asyncio.Event()

    async def wait(self, job_id: str, timeout: float) -> str | None:
        fut = asyncio.get_running_loop().create_future()
        self.pending.setdefault(job_id, []).append(fut)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run())
        self.wake.set()
        try:
            # Registered first, then read: a job that finished before the reader's position is seen here,
            # one that finishes later is seen by the reader.
            status = await self.r.hget(self.keys.job(job_id), "status")
            self._check(job_id, status)
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            futs = self.pending.get(job_id)
            if futs and fut in futs:
                futs.remove(fut)
                if not futs:
                    del self.pending[job_id]

    def _check(self, job_id: str, status: bytes | None) -> None:
        if status is None:
            self._resolve(job_id, "lost")
        elif status.decode() in FINAL_NAMES:
            self._resolve(job_id, status.decode())

    def _resolve(self, job_id: str, result: str | None = None, error: BaseException | None = None) -> None:
        for f in self.pending.pop(job_id, []):
            if not f.done():
                f.set_exception(error) if error else f.set_result(result)

    async def _run(self) -> None:
        last: str | None = None
        last_check = time.monotonic()
        while True:
            if not self.pending:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), 30)
                except asyncio.TimeoutError:
                    return  # idle: the next waiter starts a new task (and re-reads the stream's end)
                continue
            try:
                if last is None:  # start at the stream's current end; earlier finishes are in the hashes
                    newest = await self.r.xrevrange(self.keys.finished(), count=1)
                    last = newest[0][0] if newest else "0-0"
                resp = await self.r.xread({self.keys.finished(): last}, block=self.BLOCK_MS, count=1000)
                for _, entries in resp or []:
                    for eid, fields in entries:
                        last = eid
                        job_id = (fields.get(b"id") or b"").decode()
                        if job_id in self.pending:
                            self._resolve(job_id, (fields.get(b"status") or b"").decode())
                if time.monotonic() - last_check > self.CHECK_S and self.pending:
                    last_check = time.monotonic()
                    ids = list(self.pending)
                    async with self.r.pipeline(transaction=False) as p:
                        for j in ids:
                            p.hget(self.keys.job(j), "status")
                        statuses = await p.execute()
                    for j, status in zip(ids, statuses, strict=True):
                        self._check(j, status)
            except (RedisConnectionError, RedisTimeoutError) as e:
                for j in list(self.pending):
                    self._resolve(j, error=e)
                last = None
                await asyncio.sleep(0.1)

    async def close(self) -> None:
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


def create_app(settings: Settings) -> FastAPI:
    keys = Keys(settings.prefix)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Retries: after a Redis restart every pooled connection is stale; each is re-opened on first use
        # instead of failing that request (without them, requests got 503s after Redis was back).
        app.state.redis = aioredis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=2, socket_timeout=30, max_connections=1024,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError])
        app.state.waiters = Waiters(app.state.redis, keys)
        yield
        await app.state.waiters.close()
        await app.state.redis.aclose()

    app = FastAPI(title="diffuserve", version="0.1.0", lifespan=lifespan, responses=ERROR_RESPONSES,
                  description="Text-to-image latent diffusion, served with continuous batching.")
    app.state.settings = settings
    app.state.draining = False  # set on SIGTERM by server.main.draining_server

    def rds(request: Request) -> aioredis.Redis:
        return request.app.state.redis

    async def auth(request: Request) -> None:
        if not settings.api_keys:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        # Compare against every key in constant time (no early exit that leaks which prefix matched).
        ok = False
        for key in settings.api_keys:
            ok |= hmac.compare_digest(token.encode(), key.encode())
        if not ok:
            raise ApiError("authentication_error", "missing or invalid API key. Hint: send 'Authorization: "
                           "Bearer <key>'.", headers={"WWW-Authenticate": "Bearer"})

    # -- error mapping ---------------------------------------------------------------------------------
    @app.exception_handler(DiffuserveError)
    async def on_domain_error(request: Request, e: DiffuserveError) -> JSONResponse:
        headers = getattr(e, "headers", None)
        return error_response(e.kind, e.message, e.param, headers, getattr(e, "extra", None))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return error_response("invalid_request_error", f"{param or 'body'}: {err.get('msg')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large"}.get(
            e.status_code, "invalid_request_error")
        if e.status_code == 400:  # an unparseable body (e.g. not UTF-8): a validation error like any other
            return error_response("invalid_request_error", f"body: {e.detail}", "body")
        resp = error_response(kind, str(e.detail))
        resp.status_code = e.status_code
        return resp

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def on_redis_down(request: Request, e: Exception) -> JSONResponse:
        return error_response("service_unavailable", "the job store (Redis) is unreachable; retry shortly.",
                              headers={"Retry-After": "2"})

    app.add_middleware(LimitsAndMetrics, max_body_bytes=settings.max_body_bytes)

    # -- helpers ---------------------------------------------------------------------------------------
    async def read_model_info(r: aioredis.Redis, name: str) -> ModelInfo | None:
        raw = await r.hget(keys.models(), name)
        return ModelInfo.model_validate_json(raw) if raw else None

    async def read_throughput(r: aioredis.Redis, model: str) -> float:
        """Images/s of the model's live workers (the queue bound in seconds, Retry-After)."""
        return sum(float(w.get("images_per_s", 0) or 0) for w in await live_workers(r) if w.get("model") == model)

    # a flood of made-up model names cannot grow the cache: unknown names only while there is room
    models_seen = Refreshed(1.0, read_model_info, keep=lambda info: info is not None)
    rates_seen = Refreshed(2.0, read_throughput)

    async def live_workers(r: aioredis.Redis) -> list[dict[str, str]]:
        """Workers with a fresh heartbeat: one range read of the index, then their hashes in one round trip."""
        now = time.time()
        names = await r.zrangebyscore(keys.workers(), now - settings.worker_stale_s, "+inf")
        if not names:
            return []
        async with r.pipeline(transaction=False) as p:
            for name in names:
                p.hgetall(keys.worker(name.decode()))
            rows = await p.execute()
        out = []
        for row in rows:
            h = {k.decode(): v.decode() for k, v in row.items()}
            if h and now - float(h.get("heartbeat", 0)) < settings.worker_stale_s:
                out.append(h)
        return out

    async def admit(r: aioredis.Redis, body: ImageRequest) -> tuple[str, Any]:
        model = body.model or settings.default_model
        job = to_job(body, await models_seen.get(r, model), settings, model)
        job_id = uuid.uuid4().hex
        bound = settings.max_queue
        if settings.max_queue_wait_s is not None:  # the bound in seconds of work, at the measured speed
            rate = await rates_seen.get(r, model)
            if rate > 0:  # nothing measured yet (a fresh worker): the count bound alone
                bound = min(bound, max(1, math.floor(settings.max_queue_wait_s * rate)))
        result = await queue_job(r, keys, job_id, job, max_queue=bound)
        if result != 1:  # full: one round trip told us so and the depth; the rate is cached
            depth = -1 - int(result)
            rate = await rates_seen.get(r, model)
            retry = max(1, math.ceil(depth / rate)) if rate > 0 else 5
            metrics.REJECTED.labels(model).inc()
            raise ApiError("overloaded_error", f"the queue for {model!r} is full ({depth} jobs). Hint: retry after "
                           f"{retry} s.", headers={"Retry-After": str(retry)})
        return job_id, job

    async def job_record(r: aioredis.Redis, job_id: str) -> dict[str, str]:
        if not job_id.isalnum() or len(job_id) > 64:
            raise NotFound(f"job {job_id!r} not found.", param="id")
        h = {k.decode(): v.decode() for k, v in (await r.hgetall(keys.job(job_id))).items()}
        if not h:
            raise NotFound(f"job {job_id!r} not found (it may have expired, or its record was lost).", param="id")
        return h

    def base_url(request: Request) -> str:
        return (settings.public_url or str(request.base_url)).rstrip("/")

    def job_view(request: Request, h: dict[str, str], position: int | None) -> dict[str, Any]:
        status = h.get("status", "queued")
        n = int(h.get("images", 0) or 0)
        req = json.loads(h.get("request", "{}"))
        view: dict[str, Any] = {
            "id": h["id"], "status": status, "model": h.get("model"),
            "progress": {"step": int(h.get("progress_step", 0) or 0), "total": int(h.get("progress_total", 0) or 0)
                         or req.get("steps")},
            "created": float(h.get("created", 0)), "started": float(h["started"]) if h.get("started") else None,
            "finished": float(h["finished"]) if h.get("finished") else None,
            "attempts": int(h.get("attempts", 0) or 0), "error": h.get("error") or None,
            "seeds": [int(x) for x in h["seeds"].split(",")] if h.get("seeds") else None,
            "warnings": h["warnings"].split("\n") if h.get("warnings") else [],
            "images": [f"{base_url(request)}/v1/jobs/{h['id']}/images/{i}" for i in range(n)],
        }
        if status == "queued":
            view["position"] = position
        return view

    async def wait_final(r: aioredis.Redis, job_id: str, timeout: float) -> str | None:
        return await app.state.waiters.wait(job_id, timeout)

    # -- routes ----------------------------------------------------------------------------------------
    @app.post("/v1/images/generations", dependencies=[Depends(auth)])
    async def generations(body: ImageRequest, request: Request) -> dict[str, Any]:
        r = rds(request)
        t0 = time.perf_counter()
        job_id, job = await admit(r, body)
        final = await wait_final(r, job_id, settings.request_timeout_s)
        if final is None:
            raise ApiError("timeout", f"the job did not finish within {settings.request_timeout_s} s; it continues. "
                           f"Hint: poll GET /v1/jobs/{job_id}.", extra={"job_id": job_id})
        h = await job_record(r, job_id)
        if final != JobStatus.succeeded.value:
            raise ApiError("generation_failed", f"job {job_id} {final}: {h.get('error') or 'no reason given'}",
                           extra={"job_id": job_id})
        metrics.LATENCY.labels(job.model).observe(time.perf_counter() - t0)
        data = []
        for i in range(int(h.get("images", 0))):
            if body.response_format == "b64_json":
                png = await r.get(keys.image(job_id, i))
                data.append({"b64_json": base64.b64encode(png).decode(), "revised_prompt": job.prompt})
            else:
                data.append({"url": f"{base_url(request)}/v1/jobs/{job_id}/images/{i}", "revised_prompt": job.prompt})
        return {"created": int(time.time()), "data": data}

    @app.post("/v1/jobs", status_code=202, dependencies=[Depends(auth)])
    async def create_job(body: JobCreate, request: Request) -> dict[str, Any]:
        job_id, _ = await admit(rds(request), body)
        return {"id": job_id, "status": "queued"}

    @app.get("/v1/jobs/{job_id}", dependencies=[Depends(auth)])
    async def get_job(job_id: str, request: Request) -> dict[str, Any]:
        r = rds(request)
        h = await job_record(r, job_id)
        pos = await r.zrank(keys.queued(h.get("model", "")), job_id) if h.get("status") == "queued" else None
        return job_view(request, h, pos)

    @app.delete("/v1/jobs/{job_id}", dependencies=[Depends(auth)])
    async def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
        r = rds(request)
        h = await job_record(r, job_id)
        if JobStatus(h["status"]).final:
            return job_view(request, h, None)
        async with r.pipeline(transaction=True) as p:
            p.hset(keys.job(job_id), "cancel", 1)
            await p.execute()
        if h["status"] == "queued" and await r.zrem(keys.queued(h.get("model", "")), job_id):
            # Still queued: it never starts (the worker acknowledges the entry when it reads it).
            async with r.pipeline(transaction=True) as p:
                p.hset(keys.job(job_id), mapping={"status": "canceled", "finished": f"{time.time():.3f}",
                                                  "error": "canceled before it started"})
                announce_final(p, keys, job_id, "canceled", settings.result_ttl_s, error="canceled before it started")
                await p.execute()
        return job_view(request, await job_record(r, job_id), None)

    @app.get("/v1/jobs/{job_id}/images/{index}", dependencies=[Depends(auth)],
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def get_image(job_id: str, index: int, request: Request) -> Response:
        r = rds(request)
        await job_record(r, job_id)
        png = await r.get(keys.image(job_id, index)) if 0 <= index < 1024 else None
        if png is None:
            raise NotFound(f"job {job_id} has no image {index}.", param="index")
        return Response(png, media_type="image/png")

    @app.get("/v1/jobs/{job_id}/events", dependencies=[Depends(auth)], response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                              "description": "Server-Sent Events: progress, then the final state"}})
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        r = rds(request)
        await job_record(r, job_id)

        async def stream() -> AsyncIterator[bytes]:
            last = "0-0"  # replay from the start: a late client catches up
            while True:
                resp = await r.xread({keys.events(job_id): last}, block=15000, count=100)
                if not resp:
                    yield b": keep-alive\n\n"
                    if await request.is_disconnected() or not await r.exists(keys.job(job_id)):
                        return
                    continue
                for _, entries in resp:
                    for eid, fields in entries:
                        last = eid
                        ev = decode_event(fields)
                        yield f"event: {ev['kind']}\ndata: {json.dumps(ev)}\n\n".encode()
                        if ev["kind"] in FINAL_NAMES:
                            return

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/workers", dependencies=[Depends(auth)])
    async def workers(request: Request) -> dict[str, Any]:
        ws = await live_workers(rds(request))
        return {"data": [{"name": w["name"], "host": w.get("host"), "pid": int(w.get("pid", 0)), "model": w.get("model"),
                          "device": w.get("device"), "batch": int(w.get("batch", 0)),
                          "jobs_done": int(w.get("jobs_done", 0)), "last_heartbeat": float(w["heartbeat"]),
                          "engine_mode": w.get("engine_mode", ""), "compile": w.get("compile", ""),
                          "graphs_pending": int(w.get("graphs_pending", 0) or 0)}
                         for w in ws]}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def list_models(request: Request) -> dict[str, Any]:
        r = rds(request)
        ws = await live_workers(r)
        out = []
        for raw in (await r.hgetall(keys.models())).values():
            info = ModelInfo.model_validate_json(raw)
            out.append({"id": info.name, "object": "model", "created": 0, "owned_by": "diffuserve",
                        "native_size": f"{info.width}x{info.height}", "samplers": info.samplers,
                        "defaults": {"steps": info.steps, "guidance_scale": info.guidance_scale,
                                     "sampler": info.sampler},
                        "workers": sum(1 for w in ws if w.get("model") == info.name)})
        return {"object": "list", "data": sorted(out, key=lambda m: m["id"])}

    @app.get("/v1/loras", dependencies=[Depends(auth)])
    async def list_loras(request: Request) -> dict[str, Any]:
        r = rds(request)
        out = []
        for raw in (await r.hgetall(keys.models())).values():
            info = ModelInfo.model_validate_json(raw)
            out += [{"name": n, "model": info.name} for n in info.loras]
        return {"data": out}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        if request.app.state.draining:
            return JSONResponse({"ready": False, "reason": "shutting down"}, status_code=503)
        try:
            ws = await live_workers(rds(request))
        except (RedisConnectionError, RedisTimeoutError):
            return JSONResponse({"ready": False, "reason": "Redis unreachable"}, status_code=503)
        serving = [w for w in ws if w.get("model") == settings.default_model and w.get("stopping") != "1"]
        if not serving:
            return JSONResponse({"ready": False, "reason": f"no live worker serves {settings.default_model!r}"},
                                status_code=503)
        return JSONResponse({"ready": True, "workers": len(serving)})

    @app.get("/metrics", dependencies=[Depends(auth)], response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def prometheus(request: Request) -> Response:
        r = rds(request)
        try:
            ws = await live_workers(r)
            metrics.LIVE_WORKERS.set(len(ws))
            for name in await r.hkeys(keys.models()):
                model = name.decode()
                metrics.QUEUE_DEPTH.labels(model).set(await r.zcard(keys.queued(model)))
                try:
                    pending = (await r.xpending(keys.jobs(model), GROUP))["pending"]
                except Exception:  # no group yet
                    pending = 0
                metrics.PENDING.labels(model).set(pending)
        except (RedisConnectionError, RedisTimeoutError):
            pass
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


__all__ = ["STATUS", "ApiError", "create_app"]
