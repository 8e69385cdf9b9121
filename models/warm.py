"""Fast mode without the wait: serve eager at once, compile in a separate process, then switch graph by graph.

Compiling the fast mode's graphs cold takes minutes on a CPU (bundled model, 11 graphs for a max batch of
16: about ten minutes on 2 cores), and a worker that waited for it would be unavailable all that time.
``BackgroundWarmup`` instead:

1. starts ``python -m models.warm`` (this file), which loads the same pipeline, builds every graph of
   ``Engine.warm_plan`` at a lower CPU priority, and exits; inductor writes each one to its on-disk cache;
2. meanwhile the worker serves: calls whose graphs are not built run the eager modules;
3. once that process has exited, ``poll`` loads the graphs into the worker one at a time (``Engine.warm``,
   now a cache hit: seconds, not minutes), each when the worker is idle or at most one per ``gap_s`` while it
   is busy, so that no job waits on more than one load.

Why a process and not a thread: inductor's lowering and code generation are Python, and a thread doing
them holds the GIL so much that the serving thread's steps took 4x as long at the median and 27x at p90
(shapes model, 32 rows, measured here). A second process also survives a compiler crash, and a worker
that restarts finds the graphs in the cache. Two warm-up processes for one model (a worker respawned while
the previous one's is still running) take turns on a file lock, the second getting cache hits.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class BackgroundWarmup:
    """Compile an engine's fast-mode graphs in a child process while the engine serves eager."""

    def __init__(self, engine: Any, max_batch: int, *, device: str = "auto", dtype: str = "auto",
                 nice: int = 10, gap_s: float = 10.0) -> None:
        self.engine, self.gap_s = engine, gap_s
        self.plan: list[tuple[str, int]] = engine.warm_plan(max_batch)
        self.total = len(self.plan)
        self.failed = ""
        self._last_load = 0.0
        self.seconds = 0.0  # spent loading graphs in this process (the serving loop's pause)
        fd, name = tempfile.mkstemp(prefix="diffuserve-warm-", suffix=".log")
        self.log_path = Path(name)
        import torch

        # The same thread count as this process: inductor's cache key depends on it (with 1 thread here and 2
        # there, loading the tiny test model's 5 graphs took 83 s instead of 20: mostly misses).
        cmd = [sys.executable, "-m", "models.warm", str(engine.model.path), "--max-batch", str(max_batch),
               "--device", device, "--dtype", dtype, "--threads", str(torch.get_num_threads()),
               "--nice", str(nice), "--parent", str(os.getpid())]
        root = str(Path(__file__).resolve().parent.parent)  # so ``-m models.warm`` imports this checkout
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.proc: subprocess.Popen[bytes] | None = None
        if self.plan:
            self.proc = subprocess.Popen(cmd, stdout=fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        os.close(fd)  # the child has its own copy
        self.started = time.monotonic()

    @property
    def pending(self) -> int:
        return len(self.plan)

    def status(self) -> str:
        """``compiling`` (the child is at work), ``loading`` (graphs being loaded), ``done`` or ``failed``."""
        if self.failed:
            return "failed"
        if not self.plan:
            return "done"
        return "compiling" if self.proc is not None and self.proc.poll() is None else "loading"

    def poll(self, idle: bool) -> bool:
        """Load the next graph if the child has built them and the moment suits. Returns whether it did."""
        if not self.plan or self.failed or self.proc is None:
            return False
        rc = self.proc.poll()
        if rc is None:
            return False
        if rc != 0:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            self.failed = f"the warm-up process exited with {rc}"
            log.warning("fast mode stays eager: %s; its output ends:\n%s", self.failed, tail)
            return False
        now = time.monotonic()
        if not idle and now - self._last_load < self.gap_s:
            return False
        part, rows = self.plan[0]
        try:
            self.engine.warm(part, rows)
        except Exception as e:  # a graph that will not build: stay eager for it, keep serving
            self.failed = f"loading the {part} graph for {rows} rows: {e}"
            log.warning("fast mode stays eager for the remaining graphs: %s", self.failed)
            return False
        self.plan.pop(0)
        self._last_load = time.monotonic()
        self.seconds += self._last_load - now
        if not self.plan:
            log.warning("fast mode: all %d graphs compiled and in use %.0f s after start (%.1f s loading them here)",
                        self.total, self._last_load - self.started, self.seconds)
        return True

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log_path.unlink(missing_ok=True)


def lock_path(model_path: str) -> Path:
    """Beside inductor's cache when one is configured (a volume that several workers may share), so that
    workers sharing it take turns compiling and the later ones get cache hits; else in the temp directory."""
    key = hashlib.sha256(str(Path(model_path).resolve()).encode()).hexdigest()[:16]
    where = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or tempfile.gettempdir())
    where.mkdir(parents=True, exist_ok=True)
    return where / f"diffuserve-warm-{key}.lock"


def exit_with_parent(parent: int) -> None:
    """A thread: end this process when the worker that started it is gone (its compile would be wasted)."""
    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.warm", description="Build a pipeline's fast-mode graphs "
                                "into inductor's on-disk cache (run by a worker; see BackgroundWarmup).")
    p.add_argument("model")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (the worker's own count)")
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--parent", type=int, default=0, help="exit when this process is no longer our parent")
    args = p.parse_args(argv)
    if args.parent:
        exit_with_parent(args.parent)
    if args.nice > 0:
        os.nice(args.nice)  # inductor's compile workers, started later, inherit it
    import torch

    from models.engine import Engine
    from models.loading import load_pipeline

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    engine = Engine(load_pipeline(Path(args.model), device=args.device, dtype=args.dtype), mode="fast")
    path = lock_path(args.model)
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {path}: another process is compiling this model", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)  # then mostly cache hits
        took = engine.warmup(args.max_batch)
    print(f"built {len(engine.warm_plan(args.max_batch))} graphs in {took:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
