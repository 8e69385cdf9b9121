"""Fast mode without the compile wait: calls run eager until their graphs are built, a child process builds
them while the engine serves, and a worker stays visibly alive while it loads one."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from models.fast import FastUNet, warm_order
from workers.worker import Worker, WorkerSettings


def test_a_call_runs_compiled_only_once_every_graph_it_needs_is_built():
    calls: list[tuple[str, int]] = []

    def fn(kind):
        return lambda x, t, encoder_hidden_states, return_dict: (calls.append((kind, x.shape[0])) or x + 1,)

    unet = FastUNet(fn("compiled"), fn("eager"), (4, 4), buckets=(1, 2, 4, 8))
    x, t, e = torch.zeros(6, 3, 4, 4), torch.zeros(()), torch.zeros(6, 5, 7)
    assert unet(x, t, e)[0].shape == x.shape and calls == [("eager", 6)]  # nothing built: eager, unpadded
    unet.ready |= {8}
    calls.clear()
    unet(x, t, e)  # 6 rows pad to the 8-row graph
    assert calls == [("compiled", 8)]
    calls.clear()
    unet(x[:5], t, e[:5])  # 5 rows = 4 + 1: those graphs are missing, so the whole call runs eager
    assert calls == [("eager", 5)]
    unet.ready |= {4}
    calls.clear()
    unet(x[:5], t, e[:5])  # still one missing
    assert calls == [("eager", 5)]
    unet.ready |= {1}
    calls.clear()
    unet(x[:5], t, e[:5])
    assert calls == [("compiled", 4), ("compiled", 1)]
    calls.clear()
    unet(torch.zeros(2, 3, 8, 8), t, e[:2])  # another resolution: always eager
    assert calls == [("eager", 2)]
    dynamic = FastUNet(fn("compiled"), fn("eager"), (4, 4), buckets=())
    dynamic.planned, dynamic.ready = {1, 2, 32}, {2}
    assert dynamic.compiled_for(2) and not dynamic.compiled_for(5)  # a dynamic graph serves all once complete
    dynamic.ready |= {1, 32}
    assert dynamic.compiled_for(5)
    assert warm_order([1, 2, 4, 8, 16, 32], 2) == [2, 32, 16, 8, 4, 1] and warm_order([1], 2) == [1]


@pytest.mark.timeout(600)
def test_background_warmup_serves_eager_then_switches_to_built_graphs(tiny_model_dir):
    from torch._dynamo.utils import counters

    from models.engine import Engine, GenerationRequest
    from models.loading import load_pipeline
    from models.warm import BackgroundWarmup

    exact = Engine(load_pipeline(tiny_model_dir), mode="exact")
    fast = Engine(load_pipeline(tiny_model_dir), mode="fast")
    req = GenerationRequest("a red circle", steps=3, guidance=5.0, seed=7, sampler="euler")
    want = exact.generate([req])[0].images[0]
    most = 8 if fast.autocast is not None else 2  # bf16 rounding where the CPU has native bf16 (test_fast.py)
    graphs = counters["stats"]["unique_graphs"]
    warm = BackgroundWarmup(fast, 1, gap_s=0.0)
    try:
        assert warm.plan == [("unet", 2), ("unet", 1), ("decode", 1)] and warm.status() == "compiling"
        assert f"--threads {torch.get_num_threads()} " in " ".join(warm.proc.args)  # the cache key needs it
        got = fast.generate([req])[0].images[0]  # served at once, eager: nothing compiled in this process
        assert counters["stats"]["unique_graphs"] == graphs
        assert np.abs(got.astype(int) - want).max() <= most
        t_end = time.monotonic() + 500
        loaded = 0
        while warm.pending and not warm.failed and time.monotonic() < t_end:
            loaded += warm.poll(idle=True)
            assert loaded <= 3 - warm.pending  # one graph per poll at most
            time.sleep(0.1)
        assert warm.status() == "done" and loaded == 3, warm.failed
        assert fast._unet.ready == {1, 2} and fast._decode.ready == {1}
        graphs = counters["stats"]["unique_graphs"]
        got = fast.generate([req])[0].images[0]
        assert counters["stats"]["unique_graphs"] == graphs  # ran on the loaded graphs, compiled nothing new
        assert np.abs(got.astype(int) - want).max() <= most
    finally:
        warm.close()
    assert warm.proc is not None and warm.proc.poll() is not None and not warm.log_path.exists()


def test_a_failed_warmup_process_leaves_the_engine_serving_eager(tiny_model_dir):
    from models.engine import Engine, GenerationRequest
    from models.loading import load_pipeline
    from models.warm import BackgroundWarmup

    fast = Engine(load_pipeline(tiny_model_dir), mode="fast")
    warm = BackgroundWarmup(fast, 1, dtype="float7")  # the child cannot load the model
    try:
        assert warm.proc is not None and warm.proc.wait(120) != 0
        assert not warm.poll(idle=True)
        assert warm.status() == "failed" and "exited with" in warm.failed and warm.pending == 3
        res = fast.generate([GenerationRequest("a red circle", steps=2, seed=1)])[0]
        assert res.images[0].shape[2] == 3 and not fast._unet.ready
    finally:
        warm.close()


def test_workers_sharing_a_compile_cache_take_turns(tiny_model_dir, tmp_path, monkeypatch):
    """The compile lock lives beside inductor's cache (a volume several containers may share), so a second
    worker's child waits for the first one's graphs instead of compiling the same ones at the same time."""
    import fcntl

    from models.engine import Engine
    from models.loading import load_pipeline
    from models.warm import BackgroundWarmup, lock_path

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    path = lock_path(str(tiny_model_dir))
    assert path.parent == tmp_path / "inductor" and path == lock_path(str(tiny_model_dir / "." / "unet" / ".."))
    assert lock_path(str(tmp_path)) != path  # one lock per model
    with open(path, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # "another worker" is compiling this model
        warm = BackgroundWarmup(Engine(load_pipeline(tiny_model_dir), mode="fast"), 1)
        try:
            t_end = time.monotonic() + 120
            while "waiting for" not in warm.log_path.read_text() and time.monotonic() < t_end:
                assert warm.proc.poll() is None, warm.log_path.read_text()
                time.sleep(0.2)
            assert f"waiting for {path}" in warm.log_path.read_text()
            assert warm.status() == "compiling" and not warm.poll(idle=True) and warm.pending == 3
        finally:
            warm.close()


def test_exact_mode_has_no_plan_and_warmup_costs_nothing(engine):
    from models.warm import BackgroundWarmup

    warm = BackgroundWarmup(engine, 4)
    assert engine.warm_plan(4) == [] and warm.proc is None and warm.status() == "done" and not warm.poll(True)
    warm.close()


class SlowWarm:
    """A warm-up whose graph load blocks the serving loop for longer than a heartbeat's lifetime."""

    def __init__(self, block_s: float) -> None:
        self.block_s, self.pending, self.polls = block_s, 1, 0

    def status(self) -> str:
        return "loading" if self.pending else "done"

    def poll(self, idle: bool) -> bool:
        self.polls += 1
        if self.pending:
            time.sleep(self.block_s)
            self.pending = 0
            return True
        return False


def test_worker_stays_visible_while_a_long_tick_blocks_its_loop(r, redis_server, engine):
    """The heartbeat key lives 3 s; a 4.5 s graph load in the loop must not make the worker vanish."""
    settings = WorkerSettings(redis_url=redis_server.url, model_name="tiny", block_ms=10, heartbeat_s=0.2)
    warm = SlowWarm(4.5)
    w = Worker(settings, engine, r, warm=warm)
    key = w.keys.worker(w.s.name)
    seen: list[bool] = []
    t = threading.Thread(target=w.run, kwargs={"max_seconds": 7.0})
    t.start()
    time.sleep(0.5)
    t_end = time.monotonic() + 6.0  # the load runs from ~0 to ~4.5 s; the loop ends at 7 s
    while time.monotonic() < t_end:
        seen.append(bool(r.exists(key)))
        time.sleep(0.1)
    t.join()
    assert warm.polls >= 2 and not warm.pending
    assert len(seen) > 40 and all(seen), seen.count(False)
