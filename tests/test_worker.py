"""The worker against a real Redis: lifecycle, continuous batching, cancel, deadlines, reclaim, faults."""

from __future__ import annotations

import io
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from models.engine import GenerationRequest
from workers.contract import GROUP, JobRequest, Keys, queue_job
from workers.worker import Worker, WorkerSettings, to_generation_request

KEYS = Keys()


def make_request(**kw) -> JobRequest:
    base = dict(model="tiny", prompt="a red circle", width=32, height=32, steps=6, guidance_scale=5.0, seed=1,
                sampler="euler")
    base.update(kw)
    return JobRequest(**base)


def enqueue(r, req: JobRequest) -> str:
    job_id = uuid.uuid4().hex
    with r.pipeline(transaction=True) as p:
        queue_job(p, KEYS, job_id, req)
        p.execute()
    return job_id


def status(r, job_id):
    return {k.decode(): v.decode() for k, v in r.hgetall(KEYS.job(job_id)).items()}


def image(r, job_id, i=0):
    return np.asarray(Image.open(io.BytesIO(r.get(KEYS.image(job_id, i)))))


@pytest.fixture()
def worker(r, redis_server, engine):
    def make(**kw):
        settings = WorkerSettings(redis_url=redis_server.url, model_name="tiny", block_ms=10, **kw)
        return Worker(settings, engine, r)

    return make


def test_job_runs_to_success_with_the_engines_image(r, worker, engine):
    req = make_request(n=2, seed=40)
    job_id = enqueue(r, req)
    w = worker()
    w.run(burst=True)
    st = status(r, job_id)
    assert st["status"] == "succeeded" and st["images"] == "2" and st["seeds"] == "40,41"
    want = engine.generate([to_generation_request(req)])[0].images
    for i in range(2):
        assert np.array_equal(image(r, job_id, i), want[i])
    assert r.xlen(KEYS.jobs("tiny")) == 0  # acknowledged entries are deleted
    assert r.zcard(KEYS.queued("tiny")) == 0
    assert r.ttl(KEYS.job(job_id)) > 0
    kinds = [f[b"kind"] for _, f in r.xrange(KEYS.events(job_id))]
    assert kinds[0] == b"queued" and kinds[1] == b"started" and kinds[-1] == b"succeeded"
    assert kinds.count(b"progress") == 6


def test_joining_a_running_batch_gives_the_same_image(r, worker, engine):
    late = make_request(prompt="a blue square", seed=9, steps=8, sampler="dpmpp_2m")
    alone = engine.generate([to_generation_request(late)])[0].images[0]
    w = worker()
    long_job = enqueue(r, make_request(steps=20, seed=3))
    for _ in range(5):
        w.tick()
    assert status(r, long_job)["status"] == "running"
    late_id = enqueue(r, late)
    w.tick()
    assert late_id in w.active and long_job in w.active  # admitted between steps, not after the batch
    w.run(burst=True)
    assert status(r, late_id)["status"] == "succeeded"
    assert np.abs(image(r, late_id).astype(int) - alone.astype(int)).max() <= 2


def assert_images_as_alone(r, engine, ids, reqs):
    """Each job stored its n images, each within 2 levels of the same request generated alone (batch
    composition may move a pixel by rounding, never more)."""
    for job_id, q in zip(ids, reqs, strict=True):
        want = engine.generate([to_generation_request(q)])[0].images
        assert status(r, job_id)["images"] == str(q.n)
        for i in range(q.n):
            assert np.abs(image(r, job_id, i).astype(int) - want[i].astype(int)).max() <= 2


def test_jobs_finishing_in_one_tick_share_a_decode_and_keep_their_images(r, worker, engine, monkeypatch):
    reqs = [make_request(n=2, seed=50, prompt="a blue square"), make_request(seed=60),
            make_request(n=3, seed=70, prompt="a green triangle", sampler="ddim")]
    ids = [enqueue(r, q) for q in reqs]
    calls = []
    decode = engine.decode
    monkeypatch.setattr(engine, "decode", lambda samples: calls.append(len(samples)) or decode(samples))
    worker().run(burst=True)
    monkeypatch.undo()
    assert calls == [6]  # the three jobs ran in one batch and ended on the same step: one decode
    assert_images_as_alone(r, engine, ids, reqs)


def run_with_memory_for(rows: int, method: str, w, engine, monkeypatch) -> list[int]:
    """Run the worker to the end while ``engine.<method>`` runs out of memory on more than ``rows`` samples;
    returns the sample count of every call."""
    calls = []
    real = getattr(engine, method)

    def limited(samples):
        calls.append(len(samples))
        if len(samples) > rows:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(samples)

    monkeypatch.setattr(engine, method, limited)
    w.run(burst=True)
    monkeypatch.undo()
    return calls


def test_shared_decode_out_of_memory_falls_back_to_one_job_at_a_time(r, worker, engine, monkeypatch):
    reqs = [make_request(n=2, seed=80), make_request(n=2, seed=90, prompt="a blue square")]
    ids = [enqueue(r, q) for q in reqs]
    calls = run_with_memory_for(2, "decode", worker(), engine, monkeypatch)
    assert calls == [4, 2, 2]
    assert all(status(r, job_id)["status"] == "succeeded" for job_id in ids)
    assert_images_as_alone(r, engine, ids, reqs)


def test_request_level_batching_waits_for_the_batch(r, worker):
    w = worker(batching="request")
    first = enqueue(r, make_request(steps=10))
    for _ in range(3):
        w.tick()
    second = enqueue(r, make_request(steps=3))
    for _ in range(3):
        w.tick()
    assert first in w.active and second not in w.active
    w.run(burst=True)
    assert status(r, second)["status"] == "succeeded"


def test_cancel_queued_and_running(r, worker):
    queued = enqueue(r, make_request())
    r.hset(KEYS.job(queued), "cancel", 1)
    w = worker()
    w.tick()
    assert status(r, queued)["status"] == "canceled"
    running = enqueue(r, make_request(steps=30))
    w.tick()
    w.tick()
    r.hset(KEYS.job(running), "cancel", 1)
    w.tick()
    st = status(r, running)
    assert st["status"] == "canceled" and int(st["progress_step"]) < 30
    assert running not in w.active and r.get(KEYS.image(running, 0)) is None


def test_deadline_passed_never_starts(r, worker):
    job = enqueue(r, make_request(deadline=time.time() - 1))
    worker().run(burst=True)
    st = status(r, job)
    assert st["status"] == "expired" and "deadline" in st["error"] and st.get("started") is None


def test_invalid_job_fails_with_reason_and_others_continue(r, worker):
    bad = enqueue(r, make_request(loras=[{"name": "nope", "scale": 1.0}]))
    good = enqueue(r, make_request())
    worker().run(burst=True)
    assert status(r, bad)["status"] == "failed" and "nope" in status(r, bad)["error"]
    assert status(r, good)["status"] == "succeeded"


def test_fault_in_a_batch_fails_only_that_job(r, worker):
    jobs = [enqueue(r, make_request(seed=i)) for i in range(3)]
    faulty = enqueue(r, make_request(fault="raise"))
    oom = enqueue(r, make_request(n=2, fault="oom"))
    worker(faults=True).run(burst=True)
    assert status(r, faulty)["status"] == "failed" and "injected fault" in status(r, faulty)["error"]
    assert status(r, oom)["status"] == "failed"
    assert all(status(r, j)["status"] == "succeeded" for j in jobs)


def test_faults_ignored_unless_enabled(r, worker):
    job = enqueue(r, make_request(fault="raise"))
    worker().run(burst=True)
    assert status(r, job)["status"] == "succeeded"


def test_dead_workers_job_is_claimed_and_completed(r, worker):
    job = enqueue(r, make_request())
    Worker.ensure_group(r, KEYS.jobs("tiny"))
    r.xreadgroup(GROUP, "dead-worker", {KEYS.jobs("tiny"): ">"}, count=1)  # taken, never acknowledged
    r.hincrby(KEYS.job(job), "attempts", 1)
    w = worker(claim_idle_ms=100, heartbeat_s=0.0)
    w.tick()
    assert job not in w.active  # not idle long enough yet
    time.sleep(0.2)
    w.run(burst=True)
    st = status(r, job)
    assert st["status"] == "succeeded" and st["attempts"] == "2"


def test_healthy_long_job_is_not_claimed_away(r, worker, engine):
    job = enqueue(r, make_request(steps=40))
    a = worker(claim_idle_ms=1000, heartbeat_s=0.0)
    other = Worker(WorkerSettings(redis_url="unused", model_name="tiny", name="other", claim_idle_ms=1000,
                                  heartbeat_s=0.0, block_ms=10), engine, r)
    a.tick()
    for _ in range(6):  # 1.8 s in all, longer than claim_idle_ms: only the keep-alive protects the job
        time.sleep(0.3)
        a.tick()
        other.tick()
    assert job in a.active and job not in other.active
    time.sleep(1.1)  # control: once its worker stops ticking (dies), the same job is claimed
    other.tick()
    assert job in other.active


def test_poison_job_fails_after_max_deliveries(r, worker):
    job = enqueue(r, make_request())
    r.hset(KEYS.job(job), mapping={"attempts": 3, "solo": 1})  # three workers died on it, the last while it ran alone
    worker(max_deliveries=3).run(burst=True)
    st = status(r, job)
    assert st["status"] == "failed" and "poison" in st["error"] and "delivered 3 times" in st["error"]


def test_bystander_of_crashes_is_quarantined_not_failed(r, worker):
    """A job whose workers died while it shared their batches runs again, alone, and succeeds."""
    others = [enqueue(r, make_request(seed=i)) for i in range(3)]
    w = worker(max_deliveries=3)
    w.tick()
    assert set(others) <= set(w.active)
    job = enqueue(r, make_request())
    r.hset(KEYS.job(job), "attempts", 5)  # delivered 5 times, each worker died with others' jobs beside it
    w.tick()
    assert job not in w.active and w.deferred and w.room() == 0  # waits for the batch to drain
    later = enqueue(r, make_request(seed=9))
    while job not in w.active:
        w.tick()
    assert set(w.active) == {job}  # alone: nothing else admitted beside it
    w.run(burst=True)
    assert status(r, job)["status"] == "succeeded" and status(r, job)["solo"] == "1"
    assert all(status(r, j)["status"] == "succeeded" for j in [*others, later])


def test_duplicate_delivery_of_a_finished_job_is_acknowledged_only(r, worker):
    job = enqueue(r, make_request())
    w = worker()
    w.run(burst=True)
    png = r.get(KEYS.image(job, 0))
    r.xadd(KEYS.jobs("tiny"), {"id": job})  # at-least-once: delivered again
    w.run(burst=True)
    assert r.get(KEYS.image(job, 0)) == png and status(r, job)["status"] == "succeeded"


def test_missing_record_is_dropped_not_crashed(r, worker):
    Worker.ensure_group(r, KEYS.jobs("tiny"))
    r.xadd(KEYS.jobs("tiny"), {"id": "ghost"})
    w = worker()
    w.run(burst=True)
    assert r.xlen(KEYS.jobs("tiny")) == 0


def test_heartbeat_and_shutdown_hand_back(r, worker):
    job = enqueue(r, make_request(steps=30))
    w = worker(heartbeat_s=0.0, claim_idle_ms=10_000)
    w.tick()
    w.tick()  # the heartbeat is written at the start of a tick
    hb = {k.decode(): v.decode() for k, v in r.hgetall(KEYS.worker(w.s.name)).items()}
    assert hb["model"] == "tiny" and hb["device"] == "cpu" and int(hb["batch"]) == 1
    assert abs(r.zscore(KEYS.workers(), w.s.name) - float(hb["heartbeat"])) < 1  # indexed for the API
    from importlib.metadata import version

    from workers.contract import CONTRACT_VERSION

    assert hb["version"] == version("diffuserve") and hb["contract"] == str(CONTRACT_VERSION)
    w.stop()
    w.shutdown()
    assert r.exists(KEYS.worker(w.s.name)) == 0 and r.zscore(KEYS.workers(), w.s.name) is None
    assert status(r, job)["status"] == "queued"
    w2 = worker(heartbeat_s=0.0, claim_idle_ms=10_000)
    w2.s.name = "second"
    w2.run(burst=True)
    assert status(r, job)["status"] == "succeeded"


def test_generation_request_mapping():
    g = to_generation_request(make_request(loras=[{"name": "a", "scale": 0.5}], n=3))
    assert isinstance(g, GenerationRequest) and g.loras == (("a", 0.5),) and g.n == 3 and g.init_image is None


def test_per_sample_adapters_share_each_step(r, redis_server, engine, tiny_model_dir, lora_dir):
    """lora_mode per_sample: jobs with different adapter sets advance together in one UNet call per tick
    (merge mode steps one adapter set per tick), with the images of the merged path."""
    from models.engine import Engine
    from models.loading import load_pipeline

    per_sample = Engine(load_pipeline(tiny_model_dir), mode="exact", lora_dir=str(lora_dir), lora_mode="per_sample")
    sets = [[], [{"name": "style_a", "scale": 0.8}], [{"name": "style_b", "scale": 1.0}]]
    reqs = [make_request(seed=50 + k, loras=loras) for k, loras in enumerate(sets)]
    ids = [enqueue(r, req) for req in reqs]
    w = Worker(WorkerSettings(redis_url=redis_server.url, model_name="tiny", block_ms=10), per_sample, r)
    calls: list[set[str]] = []
    step = per_sample.step
    per_sample.step = lambda samples: (calls.append({s.tag for s in samples}), step(samples))[1]
    w.run(burst=True)
    assert calls and all(c == set(ids) for c in calls)  # every step carried all three jobs
    assert len(calls) == 6  # 6 steps for the three of them, not 18
    for job_id, req in zip(ids, reqs, strict=True):
        assert status(r, job_id)["status"] == "succeeded"
        want = engine.generate([to_generation_request(req)])[0].images[0].astype(int)
        assert np.abs(image(r, job_id).astype(int) - want).max() <= 2


def test_step_budget_caps_the_batch(r, worker):
    """--max-step-ms: with a budget no step can meet, samples run one at a time (and all still finish);
    without one, the same jobs share steps."""
    ids = [enqueue(r, make_request(steps=4, seed=i)) for i in range(4)]
    w = worker(max_step_ms=0.001)
    sizes = []
    while any(status(r, j)["status"] != "succeeded" for j in ids):
        w.tick()
        sizes.append(sum(len(j.samples) for j in w.active.values()))
    assert max(sizes) == 1 and len(w.step_cost.samples) == 16  # 4 jobs x 4 steps, each alone
    ids = [enqueue(r, make_request(steps=4, seed=i)) for i in range(4)]
    w = worker()
    w.tick()
    assert len(w.active) == 4
    w.run(burst=True)
    assert all(status(r, j)["status"] == "succeeded" for j in ids)


def test_worker_records_every_metric(r, redis_server, tiny_model_dir, lora_dir):
    """Each worker metric moves when its event happens: timings, batch sizes, images, final statuses,
    adapter cache misses/loads/hits with load time, reclaims, poison, running samples, memory."""
    from prometheus_client import REGISTRY

    from models.engine import Engine
    from models.loading import load_pipeline

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    names = ["diffuserve_queue_wait_seconds_count", "diffuserve_time_to_first_step_seconds_count",
             "diffuserve_inference_seconds_count", "diffuserve_batch_size_count",
             "diffuserve_vae_decode_seconds_count", "diffuserve_adapter_load_seconds_total"]
    before = {n: value(n) for n in names}
    step_before = value("diffuserve_denoise_step_seconds_count", resolution="32x32", batch="2")
    counted = {"images": ("diffuserve_images_generated_total", {"model": "tiny"}),
               "ok": ("diffuserve_jobs_total", {"model": "tiny", "status": "succeeded"}),
               "failed": ("diffuserve_jobs_total", {"model": "tiny", "status": "failed"}),
               "poison": ("diffuserve_poison_jobs_total", {"model": "tiny"}),
               "reclaims": ("diffuserve_reclaims_total", {"model": "tiny"}),
               **{e: ("diffuserve_adapter_cache_events_total", {"event": e}) for e in ("misses", "loads", "hits")}}
    c0 = {k: value(n, **lab) for k, (n, lab) in counted.items()}

    fresh = Engine(load_pipeline(tiny_model_dir), mode="exact", lora_dir=str(lora_dir))  # an empty adapter cache
    w = Worker(WorkerSettings(redis_url=redis_server.url, model_name="tiny", name="metered", block_ms=10,
                              claim_idle_ms=100, heartbeat_s=0.0, max_deliveries=3), fresh, r)
    lora = [{"name": "style_b", "scale": 1.0}]
    ids = [enqueue(r, make_request(seed=1, n=2, steps=4, loras=lora)), enqueue(r, make_request(seed=2, steps=4))]
    w.tick()
    w.tick()
    assert value("diffuserve_running_samples", worker="metered") == 3  # exported with each heartbeat
    w.run(burst=True)
    assert all(status(r, j)["status"] == "succeeded" for j in ids)
    later = enqueue(r, make_request(seed=3, steps=2, loras=lora))  # the adapter is cached by now
    poison = enqueue(r, make_request(seed=4))
    r.hset(KEYS.job(poison), mapping={"attempts": 3, "solo": 1})
    w.run(burst=True)
    orphan = enqueue(r, make_request(seed=5, steps=2))  # taken by a worker that died before acknowledging
    r.xreadgroup(GROUP, "dead-worker", {KEYS.jobs("tiny"): ">"}, count=1)
    r.hincrby(KEYS.job(orphan), "attempts", 1)
    time.sleep(0.2)
    w.run(burst=True)
    w.export_gauges()
    assert status(r, later)["status"] == "succeeded" and status(r, orphan)["status"] == "succeeded"

    c1 = {k: value(n, **lab) for k, (n, lab) in counted.items()}
    delta = {k: c1[k] - c0[k] for k in counted}
    hits = delta.pop("hits")  # one per adapter lookup after the first load: at least the later job's
    assert hits >= 1 and delta == {"images": 5, "ok": 4, "failed": 1, "poison": 1, "reclaims": 1, "misses": 1,
                                   "loads": 1}, (hits, delta)
    after = {n: value(n) for n in names}
    assert after["diffuserve_queue_wait_seconds_count"] - before["diffuserve_queue_wait_seconds_count"] == 4
    assert after["diffuserve_time_to_first_step_seconds_count"] - before[
        "diffuserve_time_to_first_step_seconds_count"] == 4
    assert after["diffuserve_inference_seconds_count"] - before["diffuserve_inference_seconds_count"] == 4
    assert after["diffuserve_batch_size_count"] - before["diffuserve_batch_size_count"] >= 4 + 2 + 2
    assert after["diffuserve_vae_decode_seconds_count"] > before["diffuserve_vae_decode_seconds_count"]
    assert after["diffuserve_adapter_load_seconds_total"] > before["diffuserve_adapter_load_seconds_total"]
    # the first two jobs ran side by side: the adapter job and the plain one are separate groups, so a
    # 32x32 step of batch 2 is the two-image adapter job
    assert value("diffuserve_denoise_step_seconds_count", resolution="32x32", batch="2") - step_before >= 4
    assert value("diffuserve_running_samples", worker="metered") == 0
    assert value("diffuserve_device_memory_bytes", worker="metered") > 10_000_000  # the process's RSS on CPU


def test_out_of_memory_step_splits_the_batch_and_every_job_succeeds(r, worker, engine, monkeypatch):
    """A step that runs out of memory for more than two samples is retried in halves (within one job too),
    and each image is what the job gives alone."""
    reqs = [make_request(n=4, seed=110, prompt="a blue square"), make_request(seed=120)]
    ids = [enqueue(r, q) for q in reqs]
    sizes = run_with_memory_for(2, "step", worker(), engine, monkeypatch)
    assert all(status(r, j)["status"] == "succeeded" for j in ids)
    assert max(sizes) == 5 and {1, 2} <= set(sizes)  # tried whole, then in halves that fit
    assert_images_as_alone(r, engine, ids, reqs)
