"""The GPU (or CPU) worker: a Redis Streams consumer driving the engine's step API with continuous batching.

One loop, one tick at a time:
  1. admit   read new jobs (XREADGROUP) while the batch has room; between two denoising steps, not
             after a whole batch ("request" batching, for comparison, admits only when idle)
  2. cancel  drop the samples of jobs canceled since the last tick (DELETE /v1/jobs/{id})
  3. step    one UNet call for one group (same size and adapter set), oldest job's group first
  4. finish  decode finished jobs' samples, write PNGs and the final state, XACK, XDEL
  5. upkeep  heartbeat; keep in-flight entries' idle time fresh (XCLAIM JUSTID); claim the entries of
             dead workers (XAUTOCLAIM past ``claim_idle_ms``); fail a job as poison after N deliveries

Delivery is at least once; result writes are idempotent (a job already final is never rewritten), so every
accepted job ends in exactly one final state. A failure in a batch is bisected down to the job that causes
it (this also retries smaller batches on out-of-memory); other jobs and the worker carry on.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import redis

from models.errors import DiffuserveError
from workers import metrics as m
from workers.contract import (
    CONTRACT_VERSION,
    GROUP,
    JobRequest,
    JobStatus,
    Keys,
    ModelInfo,
    announce_final,
    encode_event,
)
from workers.pacing import StepCost

log = logging.getLogger(__name__)


# KEYS: the job stream. ARGV: group, dead consumer, idle to set. Moves the consumer's pending entries to the
# 'handoff' consumer with an idle time past the claim threshold, in one step.
TAKE_OVER_SCRIPT = """
local pend = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1000, ARGV[2])
if #pend == 0 then return 0 end
local args = {KEYS[1], ARGV[1], 'handoff', 0}
for _, e in ipairs(pend) do args[#args + 1] = e[1] end
args[#args + 1] = 'IDLE'
args[#args + 1] = ARGV[3]
args[#args + 1] = 'JUSTID'
redis.call('XCLAIM', unpack(args))
return #pend
"""


@dataclass
class WorkerSettings:
    redis_url: str
    model_name: str = "shapes"
    name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    max_batch: int = 16
    batching: str = "continuous"  # or "request"
    result_ttl_s: int = 3600
    claim_idle_ms: int = 15_000
    max_deliveries: int = 3
    heartbeat_s: float = 1.0
    stall_s: float = 300.0  # a loop stuck this long stops keeping its jobs claimed (others take them)
    block_ms: int = 200
    faults: bool = False  # test-only fault hooks (JobRequest.fault); never on in production
    prefix: str = "diffuserve"
    respawns: int = 0  # processes of this worker that died before this one (reported in the heartbeat)
    max_step_ms: float = 0.0  # > 0: cap the batch so a denoising step stays within this (workers/pacing.py)


@dataclass
class ActiveJob:
    id: str
    msg_id: str
    request: JobRequest
    samples: list[Any]
    created: float  # enqueue time
    started: float  # admission into the batch
    attempt: int = 1
    solo: bool = False  # a previous delivery died: quarantined, nothing else runs beside it
    last_progress: int = -1


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5, health_check_interval=10)


class Worker:
    def __init__(self, settings: WorkerSettings, engine: Any, r: redis.Redis | None = None, warm: Any = None) -> None:
        self.s = settings
        self.engine = engine
        self.warm = warm  # models.warm.BackgroundWarmup: fast-mode graphs still to load, one per upkeep
        self.r = r or connect(settings.redis_url)
        self.keys = Keys(settings.prefix)
        self.stream = self.keys.jobs(settings.model_name)
        self.active: dict[str, ActiveJob] = {}
        self.deferred: list[tuple[str, str]] = []  # (msg_id, job_id) waiting to run alone (quarantine)
        self.jobs_done = 0
        self.stopping = False
        self._grace_end = 0.0
        self._last_upkeep = 0.0
        self._finished: deque[tuple[float, int]] = deque()  # (time, images): the measured throughput
        self.step_cost = StepCost()  # step time by batch size: the latency-aware cap (max_step_ms)
        self._born = time.time()
        self._adapter_seen: dict[str, float] = {}
        self._model_info = ""
        self._last_tick = time.monotonic()
        self._reclaim_waiting = False
        self.ensure_group(self.r, self.stream)
        self.register_model()

    def register_model(self) -> None:
        from models.samplers import SAMPLER_NAMES, canonical_sampler

        m = self.engine.model
        w, h = m.native_size
        d = m.defaults
        info = ModelInfo(name=self.s.model_name, width=w, height=h, steps=d.steps, guidance_scale=d.guidance,
                         sampler=canonical_sampler(d.sampler), samplers=list(SAMPLER_NAMES),
                         loras=self.engine.registry.names())
        self._model_info = info.model_dump_json()
        self.r.hset(self.keys.models(), self.s.model_name, self._model_info)

    @staticmethod
    def ensure_group(r: redis.Redis, stream: str) -> None:
        try:
            r.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # -- the loop --------------------------------------------------------------------------------------
    def run(self, *, burst: bool = False, max_seconds: float | None = None) -> None:
        """Serve until ``stop()``; with ``burst``, return once the queue is drained (tests, arq-style).

        After ``stop(grace_s)`` no new job is admitted; in-flight jobs run on until they finish or the grace
        period ends, and whatever is left is handed back to the queue for another worker."""
        t_end = time.monotonic() + max_seconds if max_seconds else None
        backoff = 0.0
        done = threading.Event()
        keeper = threading.Thread(target=self._keep_claimed, args=(done,), daemon=True, name="keep-claimed")
        keeper.start()
        while True:
            self._last_tick = time.monotonic()
            if self.stopping and (not self.active or time.monotonic() > self._grace_end):
                break
            try:
                worked = self.tick()
                backoff = 0.0
            except (redis.ConnectionError, redis.TimeoutError) as e:
                # Redis restarting or unreachable: keep the model loaded and retry (redis-py reconnects on the
                # next command). In-flight jobs stay pending in Redis and finish here or on another worker.
                backoff = min(5.0, backoff * 2 or 0.2)
                log.warning("Redis unreachable (%s); retrying in %.1f s", e, backoff)
                time.sleep(backoff)
                continue
            except redis.ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                log.warning("the job stream vanished (Redis restarted without persistence?); recreating it")
                self.ensure_group(self.r, self.stream)
                self.register_model()
                continue
            if burst and not worked and not self.active:
                break
            if t_end and time.monotonic() > t_end:
                break
        done.set()
        keeper.join()
        try:
            self.shutdown()
        except (redis.ConnectionError, redis.TimeoutError):
            log.warning("Redis unreachable at shutdown; in-flight jobs will be reclaimed after the claim idle time")

    def _keep_claimed(self, done: threading.Event) -> None:
        """Reset the idle time of our in-flight entries several times per claim window, from a thread, so that
        a healthy job is never claimed away even when one tick (a big batch, a starved CPU) outlasts the
        window. A loop stalled past ``stall_s`` stops doing so, and its jobs go to live workers."""
        interval = max(0.05, min(self.s.heartbeat_s, self.s.claim_idle_ms / 4000))
        while not done.wait(interval):
            if time.monotonic() - self._last_tick > self.s.stall_s:
                continue
            try:
                if time.monotonic() - self._last_upkeep > 2 * self.s.heartbeat_s:
                    self.heartbeat(gauges=False)  # a long tick (a big step, a graph loading): still alive
                ids = [j.msg_id for j in list(self.active.values())] + [m for m, _ in list(self.deferred)]
                if ids:
                    self.r.xclaim(self.stream, GROUP, self.s.name, 0, ids, justid=True)
            except (RuntimeError, redis.RedisError):  # the dict changed under us, or Redis is away: next time
                continue

    def stop(self, grace_s: float = 0.0) -> None:
        """Safe from a signal handler: only sets flags; the next tick heartbeats 'stopping' (not ready)."""
        self._grace_end = time.monotonic() + grace_s
        self.stopping = True
        self._last_upkeep = 0.0

    def tick(self) -> bool:
        self.upkeep()
        admitted = self.admit()
        self.check_cancels()
        stepped = self.step()
        self.finish()
        return admitted or stepped

    # -- 1. admit ----------------------------------------------------------------------------------------
    def room(self) -> int:
        if self.deferred or any(j.solo for j in self.active.values()):
            return 0  # drain, then run the quarantined job alone
        used = sum(len(j.samples) for j in self.active.values())
        if self.s.batching == "request" and used:
            return 0
        cap = self.s.max_batch
        if self.s.max_step_ms > 0:
            cap = self.step_cost.cap(self.s.max_step_ms / 1000, self.s.max_batch)
        return max(0, cap - used)

    def admit(self, claimed: list[tuple[str, dict]] | None = None) -> bool:
        if self.deferred and not self.active:
            self.start(*self.deferred.pop(0))
            return True
        entries = claimed or []
        if not entries and self._reclaim_waiting and not self.stopping:
            if self.room() > 0:
                self.reclaim()  # a slot opened: dead workers' jobs first
            if self._reclaim_waiting:
                return False
        if not entries and self.room() > 0 and not self.stopping:
            block = None if self.active else self.s.block_ms
            resp = self.r.xreadgroup(GROUP, self.s.name, {self.stream: ">"}, count=max(1, self.room()), block=block)
            for _, items in resp or []:
                entries.extend(items)
        for msg_id, fields in entries:
            msg_id = msg_id.decode() if isinstance(msg_id, bytes) else msg_id
            job_id = (fields.get(b"id") or fields.get("id") or b"").decode() if fields else ""
            self.start(msg_id, job_id)
        return bool(entries)

    def start(self, msg_id: str, job_id: str) -> None:
        if job_id in self.active:  # our own in-flight entry came back through XAUTOCLAIM: already running here
            return
        key = self.keys.job(job_id)
        rec = {k.decode(): v.decode() for k, v in self.r.hgetall(key).items()}
        if not rec:  # the record vanished (e.g. Redis restarted without persistence): nothing to run
            log.warning("job %s has no record; dropping its queue entry", job_id)
            return self.ack(msg_id)
        status = JobStatus(rec.get("status", "queued"))
        if status.final:
            return self.ack(msg_id)  # a duplicate delivery of a finished job
        if rec.get("cancel") == "1":
            return self.final(job_id, msg_id, JobStatus.canceled, error="canceled before it started")
        request = JobRequest.model_validate_json(rec["request"])
        admitted = time.time()  # the start decision: recorded as 'started', so started <= deadline always holds
        if request.deadline and admitted > request.deadline:
            return self.final(job_id, msg_id, JobStatus.expired, error="deadline passed before the job started")
        # Deliveries that never finished mean workers died with this job on board. The first redelivery runs
        # batched as usual (a worker killed from outside is the common case); from then on the job runs alone
        # (quarantined, so if it is what kills workers it takes no one else's jobs along), and it is failed as
        # poison once it reaches max_deliveries with at least one death while alone: so bystanders of someone
        # else's crash are not failed as poison.
        prior, prior_solo = int(rec.get("attempts", 0) or 0), int(rec.get("solo", 0) or 0)
        if prior >= self.s.max_deliveries and prior_solo >= 1:
            return self.final(job_id, msg_id, JobStatus.failed, error=(
                f"poison job: delivered {prior} times and never finished; the worker died on it "
                f"{prior_solo} time(s) while it ran alone"))
        solo = prior >= max(1, self.s.max_deliveries - 1)
        if solo and self.active:
            if (msg_id, job_id) not in self.deferred:
                self.deferred.append((msg_id, job_id))
            return None
        with self.r.pipeline(transaction=True) as p:
            p.hincrby(key, "attempts", 1)
            p.hincrby(key, "solo", int(solo))
            attempts, _ = p.execute()
        if self.s.faults and request.fault == "crash":
            os._exit(17)  # test hook: a job that kills every worker that takes it
        try:
            samples = self.engine.prepare(to_generation_request(request), tag=job_id)
        except DiffuserveError as e:
            return self.final(job_id, msg_id, JobStatus.failed, error=e.message)
        now = admitted
        with self.r.pipeline(transaction=True) as p:  # one round trip
            p.hset(key, mapping={"status": "running", "started": f"{now:.6f}", "worker": self.s.name,
                                 "progress_step": 0, "progress_total": samples[0].steps_total})
            p.zrem(self.keys.queued(self.s.model_name), job_id)
            p.xadd(self.keys.events(job_id), encode_event("started", worker=self.s.name, total=samples[0].steps_total))
            p.execute()
        self.active[job_id] = ActiveJob(job_id, msg_id, request, samples, float(rec.get("created", now)), now,
                                        attempt=attempts, solo=solo)
        m.QUEUE_WAIT.observe(max(0.0, now - float(rec.get("created", now))))

    # -- 2. cancel ---------------------------------------------------------------------------------------
    def check_cancels(self) -> None:
        if not self.active:
            return
        ids = list(self.active)
        with self.r.pipeline(transaction=False) as p:
            for job_id in ids:
                p.hget(self.keys.job(job_id), "cancel")
            flags = p.execute()
        for job_id, flag in zip(ids, flags, strict=True):
            if flag == b"1":
                job = self.active.pop(job_id)
                self.final(job_id, job.msg_id, JobStatus.canceled, error="canceled while running")

    # -- 3. step -----------------------------------------------------------------------------------------
    def step(self) -> bool:
        samples = [s for j in self.active.values() for s in j.samples if not s.done]
        if not samples:
            return False
        groups = self.engine.groups(samples)
        oldest = min(self.active.values(), key=lambda j: j.created)
        key = next((s.group for s in oldest.samples if not s.done), next(iter(groups)))
        batch = groups[key][: self.s.max_batch]
        first = [self.active[s.tag] for s in batch if s.steps_done == 0 and s.tag in self.active]
        t0 = time.perf_counter()
        self.run_batch(batch)
        took = time.perf_counter() - t0
        self.step_cost.observe(len(batch), took)
        m.STEP_SECONDS.labels(f"{key[1]}x{key[0]}", str(len(batch))).observe(took)
        m.BATCH_SIZE.observe(len(batch))
        now = time.time()
        for job in {j.id: j for j in first}.values():
            m.FIRST_STEP.observe(max(0.0, now - job.created))
        self.report_progress({s.tag for s in batch})
        return True

    def run_batch(self, batch: list[Any]) -> None:
        try:
            if self.s.faults:
                for s in batch:
                    job = self.active[s.tag]
                    fault = job.request.fault
                    if fault == "crash_mid_step" and job.attempt == 1 and s.steps_done >= 2:
                        os._exit(17)  # test hook: the worker dies in the middle of a job, once
                    if fault in ("raise", "oom"):
                        raise RuntimeError(f"injected fault: {'CUDA out of memory' if fault == 'oom' else fault}")
            self.engine.step(batch)
        except Exception as e:  # bisect: isolate the job(s) that fail; OOM retries in smaller batches
            jobs = {s.tag for s in batch}
            if len(jobs) > 1:
                tags = sorted(jobs)
                half = set(tags[: len(tags) // 2])
                self.run_batch([s for s in batch if s.tag in half])
                self.run_batch([s for s in batch if s.tag not in half])
                return
            if len(batch) > 1 and is_oom(e):
                mid = len(batch) // 2
                self.run_batch(batch[:mid])
                self.run_batch(batch[mid:])
                return
            job = self.active.pop(batch[0].tag, None)
            if job:
                log.exception("job %s failed", job.id)
                self.final(job.id, job.msg_id, JobStatus.failed, error=f"generation failed: {type(e).__name__}: {e}")

    def report_progress(self, job_ids: set[str]) -> None:
        with self.r.pipeline(transaction=False) as p:
            for job_id in job_ids:
                job = self.active.get(job_id)
                if not job:
                    continue
                step = min(s.steps_done for s in job.samples)
                if step != job.last_progress:
                    job.last_progress = step
                    total = job.samples[0].steps_total
                    p.hset(self.keys.job(job_id), "progress_step", step)
                    p.xadd(self.keys.events(job_id), encode_event("progress", step=step, total=total))
            p.execute()

    # -- 4. finish ---------------------------------------------------------------------------------------
    def finish(self) -> None:
        from models.images import to_png

        done = [j for j in self.active.values() if all(s.done for s in j.samples)]
        if not done:
            return
        t0 = time.perf_counter()
        try:  # one VAE call for every job that ended this tick
            images_all = self.engine.decode([s for job in done for s in job.samples])
        except Exception as e:  # out of memory for the whole lot: one job at a time, as before
            if len(done) == 1 or not is_oom(e):
                raise
            images_all = [img for job in done for img in self.engine.decode(job.samples)]
        m.DECODE_SECONDS.observe(time.perf_counter() - t0)
        decoded = iter(images_all)
        for job in done:
            del self.active[job.id]
            images = [next(decoded) for _ in job.samples]
            warnings = sorted({w for s in job.samples for w in s.warnings})
            now = time.time()
            key = self.keys.job(job.id)
            current = self.r.hget(key, "status")
            if current is None or JobStatus(current.decode()).final:
                self.ack(job.msg_id)  # finished elsewhere after a reclaim, or expired: never two answers
                continue
            ttl = self.s.result_ttl_s
            with self.r.pipeline(transaction=True) as p:
                for i, img in enumerate(images):
                    p.set(self.keys.image(job.id, i), to_png(img), ex=ttl)
                p.hset(key, mapping={
                    "status": JobStatus.succeeded.value, "finished": f"{now:.3f}", "images": len(images),
                    "seeds": ",".join(str(s.seed) for s in job.samples), "warnings": "\n".join(warnings),
                    "progress_step": job.samples[0].steps_total,
                })
                announce_final(p, self.keys, job.id, JobStatus.succeeded.value, ttl, images=len(images))
                p.execute()
            if self.s.faults and job.request.fault == "crash_after_result" and job.attempt == 1:
                os._exit(17)  # test hook: dies between writing the result and acknowledging it, once
            self.ack(job.msg_id)
            self.jobs_done += 1
            self._finished.append((now, len(images)))
            m.INFERENCE.observe(now - job.started)
            m.IMAGES.labels(self.s.model_name).inc(len(images))
            m.JOBS.labels(self.s.model_name, "succeeded").inc()

    def final(self, job_id: str, msg_id: str, status: JobStatus, error: str = "") -> None:
        m.JOBS.labels(self.s.model_name, status.value).inc()
        if error.startswith("poison"):
            m.POISON.labels(self.s.model_name).inc()
        key = self.keys.job(job_id)
        with self.r.pipeline(transaction=True) as p:
            p.hset(key, mapping={"status": status.value, "finished": f"{time.time():.3f}", "error": error})
            announce_final(p, self.keys, job_id, status.value, self.s.result_ttl_s, error=error)
            p.zrem(self.keys.queued(self.s.model_name), job_id)
            p.execute()
        self.ack(msg_id)

    def ack(self, msg_id: str) -> None:
        with self.r.pipeline(transaction=True) as p:
            p.xack(self.stream, GROUP, msg_id)
            p.xdel(self.stream, msg_id)  # acknowledged: safe to delete (never trim pending entries)
            p.execute()

    # -- 5. upkeep ---------------------------------------------------------------------------------------
    def upkeep(self) -> None:
        now = time.monotonic()
        if now - self._last_upkeep < self.s.heartbeat_s:
            return
        self._last_upkeep = now
        self.heartbeat()
        if self.warm is not None and not self.stopping:
            self.warm.poll(idle=not self.active and not self.deferred)
        if self.active:  # reset our in-flight entries' idle time, so no one claims a healthy long job
            self.r.xclaim(self.stream, GROUP, self.s.name, 0, [j.msg_id for j in self.active.values()], justid=True)
        if not self.stopping:
            self.reclaim()

    def take_over(self, consumer: str) -> int:
        """Make the pending entries of a consumer known to be dead (this worker's previous process, whose exit
        the parent saw) claimable at once, instead of after ``claim_idle_ms``; this worker's first reclaim
        takes them. Atomic, so an entry another worker has just claimed is not taken from it."""
        n = int(self.r.eval(TAKE_OVER_SCRIPT, 1, self.stream, GROUP, consumer, self.s.claim_idle_ms + 1))
        if consumer != self.s.name:
            self.r.xgroup_delconsumer(self.stream, GROUP, consumer)  # it holds nothing now
            self.forget_worker(consumer)  # and leaves /v1/workers now, not at its heartbeat's TTL
        if n:
            log.warning("took over %d job(s) of dead process %s", n, consumer)
        return n

    def reclaim(self) -> None:
        """Claim dead workers' entries (idle past ``claim_idle_ms``). They are older than anything new, so while
        some wait and this worker is full, it admits nothing new: the next free slot goes to them."""
        room = self.room()
        if room <= 0:
            waiting = self.r.xpending_range(self.stream, GROUP, min="-", max="+", count=1, idle=self.s.claim_idle_ms)
            self._reclaim_waiting = bool(waiting) and not self.deferred
            return
        res = self.r.xautoclaim(self.stream, GROUP, self.s.name, self.s.claim_idle_ms, "0-0", count=room)
        self._reclaim_waiting = len(res[1]) >= room  # res: [cursor, entries(, deleted ids on Redis 7)]
        claimed = [(mid, f) for mid, f in res[1] if f]
        if claimed:
            log.warning("claimed %d job(s) from dead workers", len(claimed))
            m.RECLAIMS.labels(self.s.model_name).inc(len(claimed))
            self.admit(claimed)

    @property
    def images_per_s(self) -> float:
        """Images finished over the last minute (the API's Retry-After estimate)."""
        now = time.time()
        while self._finished and self._finished[0][0] < now - 60:
            self._finished.popleft()
        return sum(n for _, n in self._finished) / max(1.0, min(60.0, now - self._born))

    def export_gauges(self) -> None:
        m.RUNNING.labels(self.s.name).set(sum(len(j.samples) for j in self.active.values()))
        st = self.engine.adapters.stats
        for event in ("hits", "misses", "loads", "evictions"):
            delta = getattr(st, event) - self._adapter_seen.get(event, 0)
            if delta:
                m.ADAPTER.labels(event).inc(delta)
                self._adapter_seen[event] = getattr(st, event)
        if st.load_seconds > self._adapter_seen.get("load_seconds", 0.0):
            m.ADAPTER_LOAD_SECONDS.inc(st.load_seconds - self._adapter_seen.get("load_seconds", 0.0))
            self._adapter_seen["load_seconds"] = st.load_seconds
        m.DEVICE_MEMORY.labels(self.s.name).set(device_memory(self.engine.model.device))

    def heartbeat(self, gauges: bool = True) -> None:
        if gauges:
            self.export_gauges()
        # Set with the heartbeat's own value, also from the keep-alive thread (gauges=False): a graph loaded
        # between two upkeeps must not read 0 pending in the heartbeat and 1 on /metrics.
        pending = self.warm.pending if self.warm else 0
        m.GRAPHS_PENDING.labels(self.s.name).set(pending)
        info = self.engine.model.describe()
        key = self.keys.worker(self.s.name)
        now = time.time()
        with self.r.pipeline(transaction=False) as p:
            if self._model_info:  # re-registered every beat: survives a Redis restart without persistence
                p.hset(self.keys.models(), self.s.model_name, self._model_info)
            p.hset(key, mapping={
                "name": self.s.name, "host": socket.gethostname(), "pid": os.getpid(), "model": self.s.model_name,
                "device": info["device"], "dtype": info["dtype"], "batch": sum(len(j.samples) for j in self.active.values()),
                "jobs_done": self.jobs_done, "heartbeat": f"{now:.3f}", "version": package_version(),
                "contract": CONTRACT_VERSION,
                "stopping": int(self.stopping), "images_per_s": f"{self.images_per_s:.4f}",
                "max_batch": self.s.max_batch, "respawns": self.s.respawns,
                "engine_mode": getattr(self.engine, "mode", ""), "graphs_pending": pending,
                "compile": self.warm.status() if self.warm else "",
            })
            p.expire(key, max(3, int(self.s.heartbeat_s * 5)))
            p.zadd(self.keys.workers(), {self.s.name: now})
            p.zremrangebyscore(self.keys.workers(), "-inf", now - 3600)  # long-dead names (SIGKILLed workers)
            p.execute()

    def shutdown(self) -> None:
        """Hand in-flight jobs back (another worker claims them at once) and leave the live set."""
        for job in list(self.active.values()):
            with self.r.pipeline(transaction=True) as p:
                p.hset(self.keys.job(job.id), mapping={"status": "queued", "worker": ""})
                p.hincrby(self.keys.job(job.id), "attempts", -1)  # handed back, not died on: not a failed delivery
                p.hincrby(self.keys.job(job.id), "solo", -int(job.solo))
                p.xadd(self.keys.events(job.id), encode_event("requeued", reason="worker shutting down"))
                p.execute()
        ids = [j.msg_id for j in self.active.values()] + [m for m, _ in self.deferred]
        if ids:  # make the entries claimable now rather than after claim_idle_ms
            self.r.xclaim(self.stream, GROUP, "handoff", 0, ids, justid=True, idle=self.s.claim_idle_ms + 1)
        self.active.clear()
        self.deferred.clear()
        self.forget_worker(self.s.name)

    def forget_worker(self, name: str) -> None:
        """Remove a worker from the live set: its heartbeat hash and its entry in the index."""
        with self.r.pipeline(transaction=True) as p:
            p.delete(self.keys.worker(name))
            p.zrem(self.keys.workers(), name)
            p.execute()


@cache
def package_version() -> str:
    """diffuserve's installed version (heartbeats show which release each worker runs)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffuserve")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def device_memory(device: Any) -> int:
    """Bytes of accelerator memory in use (CUDA); the process's resident memory on CPU."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "out of memory" in str(e).lower()


def to_generation_request(req: JobRequest) -> Any:
    from models.engine import GenerationRequest

    init = base64.b64decode(req.init_image) if req.init_image else None
    return GenerationRequest(
        prompt=req.prompt, negative_prompt=req.negative_prompt, steps=req.steps, guidance=req.guidance_scale,
        seed=req.seed, sampler=req.sampler, width=req.width, height=req.height, n=req.n,
        loras=tuple((lora.name, lora.scale) for lora in req.loras), init_image=init,
        strength=req.strength if init else 1.0,
    )
