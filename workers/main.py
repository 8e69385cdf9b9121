"""``diffuserve worker``: one worker process (one per GPU, or per CPU box) against a given Redis."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def add_worker_args(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--redis-url", default=env("DIFFUSERVE_REDIS_URL", "redis://localhost:6379/0"))
    p.add_argument("--model", default=env("DIFFUSERVE_MODEL"), help="pipeline directory (default: bundled shapes)")
    p.add_argument("--model-name", default=env("DIFFUSERVE_MODEL_NAME"), help="name clients use (default: dir name)")
    p.add_argument("--lora-dir", default=env("DIFFUSERVE_LORA_DIR"))
    p.add_argument("--device", default=env("DIFFUSERVE_DEVICE", "auto"))
    p.add_argument("--dtype", default=env("DIFFUSERVE_DTYPE", "auto"))
    p.add_argument("--engine-mode", default=env("DIFFUSERVE_ENGINE_MODE", "auto"), choices=["auto", "exact", "fast"])
    p.add_argument("--warmup", default=env("DIFFUSERVE_WARMUP", "background"), choices=["background", "blocking"],
                   help="fast mode: serve at once, eager, while a child process compiles the graphs, then switch "
                        "to each as it is built (background, the default); or compile all before taking jobs")
    p.add_argument("--compile-nice", type=int, default=int(env("DIFFUSERVE_COMPILE_NICE", "10")),
                   help="niceness added to the background compile process (serving keeps the CPU first)")
    p.add_argument("--lora-mode", default=env("DIFFUSERVE_LORA_MODE", "merge"), choices=["merge", "per_sample"],
                   help="merge: adapters merged into the weights, one adapter set per UNet call (exact, the "
                        "default); per_sample: applied per sample by hooks, mixed sets share UNet calls (exact mode)")
    p.add_argument("--max-batch", type=int, default=int(env("DIFFUSERVE_MAX_BATCH", "16")))
    p.add_argument("--batching", default=env("DIFFUSERVE_BATCHING", "continuous"), choices=["continuous", "request"])
    p.add_argument("--max-step-ms", type=float, default=float(env("DIFFUSERVE_MAX_STEP_MS", "0")),
                   help="latency budget per denoising step: admit samples only while the measured step time "
                        "stays within it (0: off, batches fill to --max-batch for throughput)")
    p.add_argument("--claim-idle-ms", type=int, default=int(env("DIFFUSERVE_CLAIM_IDLE_MS", "15000")))
    p.add_argument("--max-deliveries", type=int, default=int(env("DIFFUSERVE_MAX_DELIVERIES", "3")))
    p.add_argument("--result-ttl-s", type=int, default=int(env("DIFFUSERVE_RESULT_TTL_S", "3600")))
    p.add_argument("--grace-s", type=float, default=float(env("DIFFUSERVE_GRACE_S", "20")),
                   help="on SIGTERM: finish in-flight jobs for at most this long, then hand them back")
    p.add_argument("--prefix", default=env("DIFFUSERVE_PREFIX", "diffuserve"))
    p.add_argument("--name", default=env("DIFFUSERVE_WORKER_NAME"))
    p.add_argument("--metrics-port", type=int, default=int(env("DIFFUSERVE_METRICS_PORT", "0")),
                   help="serve this worker's Prometheus metrics on this port (standalone workers)")
    p.add_argument("--threads", type=int, default=int(env("DIFFUSERVE_THREADS", "0")),
                   help="CPU threads for torch in this worker (0: torch's default; serve splits the cores "
                        "between its CPU workers so they do not oversubscribe them)")
    p.add_argument("--nice", type=int, default=int(env("DIFFUSERVE_NICE", "0")),
                   help="raise this process's niceness by N (serve uses 10: the API it shares the box with stays "
                        "responsive while workers keep every core busy)")
    p.add_argument("--respawn", action=argparse.BooleanOptionalAction,
                   default=env("DIFFUSERVE_RESPAWN", "1") not in ("0", "false", "no"),
                   help="CPU: serve from a forked process and fork a new one at once when it dies (default on)")
    p.add_argument("--enable-test-faults", action="store_true", default=env("DIFFUSERVE_TEST_FAULTS") == "1",
                   help=argparse.SUPPRESS)


def run_worker(args: argparse.Namespace) -> int:
    import torch

    from models.cli import DEFAULT_MODEL, default_lora_dir
    from models.engine import Engine, default_engine_mode
    from models.errors import DiffuserveError
    from models.loading import load_pipeline, resolve_device
    from workers.respawn import Respawner, can_fork

    if args.nice > 0:
        os.nice(args.nice)
    threads = args.threads if args.threads > 0 else torch.get_num_threads()
    respawn = args.respawn and can_fork(resolve_device(args.device))
    # A parent that forks must never start OpenMP's thread pool (see workers/respawn.py): one thread while
    # loading; each serving process sets its own.
    torch.set_num_threads(1 if respawn else threads)
    model_dir = Path(args.model) if args.model else DEFAULT_MODEL
    model = load_pipeline(model_dir, device=args.device, dtype=args.dtype, name=args.model_name)
    lora_dir = args.lora_dir or default_lora_dir(model_dir)
    if args.engine_mode != "auto":
        mode = args.engine_mode
    else:  # per-sample adapters run in exact mode (see models/engine.py)
        mode = "exact" if args.lora_mode == "per_sample" else default_engine_mode(model.device, long_running=True)
    try:
        engine = Engine(model, mode=mode, lora_dir=str(lora_dir) if lora_dir else None, lora_mode=args.lora_mode)
    except DiffuserveError as e:
        raise SystemExit(f"diffuserve worker: {e.message}") from None

    def serve(previous: int | None, respawns: int, ready: Callable[[], None]) -> int:
        torch.set_num_threads(threads)
        return serve_worker(args, engine, mode, respawns, worker_name(args, previous) if previous else None, ready)

    if not respawn:
        return serve_worker(args, engine, mode, 0)
    from workers.supervisor import mark_dead

    return Respawner(serve, on_death=lambda pid: mark_dead(pid, dict(os.environ))).run()


def worker_name(args: argparse.Namespace, pid: int | None = None) -> str:
    return args.name or f"{socket.gethostname()}-{pid or os.getpid()}"


def serve_worker(args: argparse.Namespace, engine: object, mode: str, respawns: int,
                 previous_name: str | None = None, ready: Callable[[], None] | None = None) -> int:
    from workers.worker import Worker, WorkerSettings

    model = engine.model  # type: ignore[attr-defined]
    settings = WorkerSettings(
        redis_url=args.redis_url, model_name=model.name, max_batch=args.max_batch, batching=args.batching,
        max_step_ms=args.max_step_ms,
        result_ttl_s=args.result_ttl_s, claim_idle_ms=args.claim_idle_ms, max_deliveries=args.max_deliveries,
        faults=args.enable_test_faults, prefix=args.prefix, name=worker_name(args), respawns=respawns,
    )
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port)
    warm = None
    if mode == "fast" and args.warmup == "blocking":  # every graph now, before this worker takes jobs
        print(f"worker {settings.name}: compiling the fast mode's batch sizes...", flush=True)
        took = engine.warmup(args.max_batch)  # type: ignore[attr-defined]
        log.warning("worker %s: fast mode compiled in %.1f s", settings.name, took)
    elif mode == "fast":  # serve eager now; a child process compiles (models/warm.py)
        from models.warm import BackgroundWarmup

        warm = BackgroundWarmup(engine, args.max_batch, device=args.device, dtype=args.dtype, nice=args.compile_nice)
    worker = Worker(settings, engine, warm=warm)
    if previous_name:
        worker.take_over(previous_name)
    if ready:
        ready()
    signal.signal(signal.SIGTERM, lambda *_: worker.stop(args.grace_s))
    signal.signal(signal.SIGINT, lambda *_: worker.stop(args.grace_s))
    log.warning("worker %s serving %r on %s (%s mode)", settings.name, model.name, model.device, mode)
    print(f"worker {settings.name} ready: model {model.name!r} on {model.device}", flush=True)
    try:
        worker.run()
    finally:
        if warm is not None:
            warm.close()
    return 0
