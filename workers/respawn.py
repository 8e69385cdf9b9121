"""A CPU worker's own fast restart: load the model once, fork the serving process, fork a new one when it dies.

Restarting a dead worker from scratch (start Python, import torch and diffusers, read the weights) takes
seconds, and meanwhile its jobs wait for the claim idle time before anyone takes them. Under a poison job
that kills every process that runs it, or a flaky kernel, that is most of the lost throughput. So on CPU,
``diffuserve worker`` keeps a parent that holds the loaded model and never serves: it forks a child that
does, and when the child dies abnormally the parent forks a fresh one at once (copy-on-write: no import, no
weight reading). The new child first hands the dead one's pending queue entries back (they are claimable at
once, not after ``claim_idle_ms``), then serves. The parent forwards SIGTERM/SIGINT and exits with the child.

Why CPU only: a CUDA context does not survive fork. And why the parent runs torch with one thread: GNU
OpenMP's thread pool is not fork-safe; a child that inherits a started pool hangs in its first parallel
region (measured here with torch 2.13). A parent that never ran a parallel region leaves no pool, and each
child sets its own thread count.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def can_fork(device: object) -> bool:
    return hasattr(os, "fork") and getattr(device, "type", "cpu") == "cpu"


def die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies (no orphaned child serving on its own)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


class Respawner:
    """Run ``serve(previous_pid, respawns, ready)`` in a forked child; fork again whenever it dies abnormally.

    ``serve`` returns the child's exit code; ``previous_pid`` is the pid of the child that died before it
    (None for the first), so the new one can take over its queue entries; it calls ``ready()`` once it is
    set up. A child that dies after that is replaced at once, however often (a poison job is bounded by
    its delivery count, not here); only children that die before they are ready (Redis unreachable, bad
    settings) back off exponentially, so a broken setup does not spin.
    """

    def __init__(self, serve: Callable[[int | None, int, Callable[[], None]], int],
                 on_death: Callable[[int], None] | None = None, max_backoff_s: float = 30.0) -> None:
        self.serve, self.on_death, self.max_backoff_s = serve, on_death, max_backoff_s
        self.child: int | None = None
        self.stopping = False
        self.respawns = 0

    def _forward(self, signum: int, _frame: object) -> None:
        self.stopping = True
        if self.child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signum)

    def _fork(self, previous: int | None) -> tuple[int, int]:
        """Fork a child; returns (pid, read end of its readiness pipe)."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: serve, and never return into the parent's loop
            os.close(r)
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                die_with_parent()
                code = self.serve(previous, self.respawns, lambda: os.write(w, b"1"))
            except BaseException:
                log.exception("worker child failed")
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(w)
        return pid, r

    @staticmethod
    def _was_ready(r: int) -> bool:
        try:
            return os.read(r, 1) == b"1"  # the child is gone: its write end is closed, so this never blocks
        finally:
            os.close(r)

    def run(self) -> int:
        saved = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._loop()
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    def _loop(self) -> int:
        previous: int | None = None
        failed_starts = 0
        while True:
            self.child, ready_pipe = self._fork(previous)
            _, status = os.waitpid(self.child, 0)  # a forwarded signal does not end the wait (PEP 475 retries)
            code = os.waitstatus_to_exitcode(status)
            dead, self.child = self.child, None
            was_ready = self._was_ready(ready_pipe)
            if self.on_death:
                self.on_death(dead)
            if self.stopping or code == 0:
                return max(code, 0)
            self.respawns += 1
            failed_starts = 0 if was_ready else failed_starts + 1
            delay = min(self.max_backoff_s, 0.5 * 2 ** (failed_starts - 1)) if failed_starts else 0.0
            log.warning("worker child %d died (%s); forking a new one%s", dead,
                        f"signal {-code}" if code < 0 else f"exit {code}", f" in {delay:.1f} s" if delay else "")
            if delay:
                time.sleep(delay)
                if self.stopping:
                    return 0
            previous = dead
