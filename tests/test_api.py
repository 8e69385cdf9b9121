"""The real FastAPI app against a real Redis and a real worker (in a thread) on the tiny model."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models.engine import GenerationRequest
from server.app import create_app
from server.settings import Settings
from workers.contract import Keys
from workers.worker import Worker, WorkerSettings

KEYS = Keys()


@pytest.fixture()
def settings(redis_server):
    return Settings(redis_url=redis_server.url, default_model="tiny", request_timeout_s=60)


@pytest.fixture()
def worker(r, redis_server, engine):
    """A live worker in a background thread (registered model + heartbeats)."""
    w = Worker(WorkerSettings(redis_url=redis_server.url, model_name="tiny", block_ms=20, heartbeat_s=0.2), engine)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    yield w
    w.stop()
    t.join(timeout=30)


@pytest.fixture()
def registered(r, redis_server, engine):
    """The model registered (as a worker does at start) but no worker running: jobs stay queued."""
    Worker(WorkerSettings(redis_url=redis_server.url, model_name="tiny"), engine, r)
    return r


def client(settings, **overrides):
    return TestClient(create_app(settings.model_copy(update=overrides)))


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_openai_b64_response_equals_engine_image(settings, worker, engine):
    with client(settings) as c:
        resp = c.post("/v1/images/generations", json={"prompt": "a red circle", "size": "32x32", "n": 2, "seed": 5,
                                                      "steps": 6, "guidance_scale": 4.0, "sampler": "Euler a",
                                                      "response_format": "b64_json"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    want = engine.generate([GenerationRequest("a red circle", steps=6, guidance=4.0, seed=5, sampler="euler_a",
                                              width=32, height=32, n=2)])[0].images
    for item, ref in zip(body["data"], want, strict=True):
        assert np.array_equal(png(base64.b64decode(item["b64_json"])), ref)


def test_url_response_points_to_png(settings, worker):
    with client(settings) as c:
        resp = c.post("/v1/images/generations", json={"prompt": "a cat", "steps": 3})
        assert resp.status_code == 200, resp.text
        url = resp.json()["data"][0]["url"]
        assert url.startswith("http://testserver/v1/jobs/")
        img = c.get(url)
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert png(img.content).shape == (32, 32, 3)


def test_lora_tags_in_prompt_equal_the_loras_field(settings, worker):
    with client(settings) as c:
        a = c.post("/v1/images/generations", json={"prompt": "a dog <lora:style_a:0.5>", "steps": 4, "seed": 2,
                                                   "response_format": "b64_json"}).json()
        b = c.post("/v1/images/generations", json={"prompt": "a dog", "steps": 4, "seed": 2, "response_format":
                                                   "b64_json", "loras": [{"name": "style_a", "scale": 0.5}]}).json()
        base = c.post("/v1/images/generations", json={"prompt": "a dog", "steps": 4, "seed": 2,
                                                      "response_format": "b64_json"}).json()
    assert a["data"][0]["b64_json"] == b["data"][0]["b64_json"] != base["data"][0]["b64_json"]
    assert a["data"][0]["revised_prompt"] == "a dog"


def test_async_job_status_events_and_images(settings, worker):
    with client(settings) as c:
        created = c.post("/v1/jobs", json={"prompt": "a blue square", "steps": 5})
        assert created.status_code == 202
        job_id = created.json()["id"]
        with c.stream("GET", f"/v1/jobs/{job_id}/events") as s:
            events = [line[7:] for line in s.iter_lines() if line.startswith("event: ")]
        assert events[0] == "queued" and "progress" in events and events[-1] == "succeeded"
        st = c.get(f"/v1/jobs/{job_id}").json()
        assert st["status"] == "succeeded" and st["progress"] == {"step": 5, "total": 5}
        assert len(st["images"]) == 1 and st["started"] and st["finished"] and st["seeds"]
        assert c.get(st["images"][0]).status_code == 200
        late = c.get(f"/v1/jobs/{job_id}/events")  # a late SSE client replays to the final state
        assert "event: succeeded" in late.text


def test_cancel_queued_job_never_starts(settings, registered, r):
    with client(settings) as c:
        job_id = c.post("/v1/jobs", json={"prompt": "x", "steps": 3}).json()["id"]
        st = c.get(f"/v1/jobs/{job_id}").json()
        assert st["status"] == "queued" and st["position"] == 0
        assert c.delete(f"/v1/jobs/{job_id}").json()["status"] == "canceled"
    assert r.zcard(KEYS.queued("tiny")) == 0


def test_img2img_job(settings, worker):
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(buf, format="PNG")
    with client(settings) as c:
        job = c.post("/v1/jobs", json={"prompt": "x", "steps": 10, "init_image": base64.b64encode(buf.getvalue())
                                       .decode(), "strength": 0.3}).json()["id"]
        with c.stream("GET", f"/v1/jobs/{job}/events") as s:
            list(s.iter_lines())
        st = c.get(f"/v1/jobs/{job}").json()
    assert st["status"] == "succeeded" and st["progress"]["total"] == 3


@pytest.mark.parametrize(
    ("body", "param", "status"),
    [
        ({"prompt": ""}, "prompt", 422),
        ({"prompt": "x" * 3000}, "prompt", 422),
        ({"prompt": "x", "steps": 0}, "steps", 422),
        ({"prompt": "x", "steps": 10_000}, "steps", 422),
        ({"prompt": "x", "n": 99}, "n", 422),
        ({"prompt": "x", "size": "30x32"}, "size", 422),
        ({"prompt": "x", "size": "4096x8"}, "size", 422),
        ({"prompt": "x", "size": "2048x2048"}, "size", 422),
        ({"prompt": "x", "size": "big"}, "size", 422),
        ({"prompt": "x", "guidance_scale": 99}, "guidance_scale", 422),
        ({"prompt": "x", "sampler": "plms"}, "sampler", 422),
        ({"prompt": "x", "seed": -1}, "seed", 422),
        ({"prompt": "x", "loras": [{"name": "../../etc/passwd", "scale": 1}]}, "loras", 422),
        ({"prompt": "x", "loras": [{"name": "style_a", "scale": 100}]}, "loras", 422),
        ({"prompt": "x <lora:nope:1>"}, "loras", 422),
        ({"prompt": "x", "model": "sdxl"}, "model", 404),
        ({"prompt": 5}, "prompt", 422),
        ({}, "prompt", 422),
    ],
)
def test_bad_input_is_refused_before_enqueue(settings, registered, r, body, param, status):
    with client(settings) as c:
        resp = c.post("/v1/images/generations", json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]
    assert r.zcard(KEYS.queued("tiny")) == 0 and r.xlen(KEYS.jobs("tiny")) == 0


def test_nan_and_infinity_refused(settings, registered, r):
    with client(settings) as c:
        for raw in ('{"prompt": "x", "guidance_scale": NaN}', '{"prompt": "x", "guidance_scale": Infinity}'):
            resp = c.post("/v1/jobs", content=raw, headers={"content-type": "application/json"})
            assert resp.status_code == 422, resp.text
            assert resp.json()["error"]["param"] == "guidance_scale"
        resp = c.post("/v1/jobs", content="{not json", headers={"content-type": "application/json"})
        assert resp.status_code == 422
    assert r.zcard(KEYS.queued("tiny")) == 0


def test_body_too_large_413(settings, registered, r):
    with client(settings, max_body_bytes=2048) as c:
        resp = c.post("/v1/jobs", json={"prompt": "x", "init_image": "A" * 5000})
        text = c.get("/metrics").text
    assert 'diffuserve_http_requests_total{method="POST",route="unmatched",status="413"}' in text
    assert resp.status_code == 413 and resp.json()["error"]["type"] == "request_too_large"
    assert r.zcard(KEYS.queued("tiny")) == 0


def test_chunked_body_without_length_is_bounded_too(settings, registered, r):
    def chunks(n):  # a generator body: sent with Transfer-Encoding: chunked, no Content-Length
        for _ in range(n):
            yield b" " * 1024
        yield b'{"prompt": "x"}'

    with client(settings, max_body_bytes=4096) as c:
        big = c.post("/v1/jobs", content=chunks(16), headers={"content-type": "application/json"})
        small = c.post("/v1/jobs", content=chunks(2), headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["type"] == "request_too_large"
    assert small.status_code == 202, small.text  # within the limit: read and handed on whole
    assert r.zcard(KEYS.queued("tiny")) == 1


def test_queue_full_429_with_retry_after(settings, registered, r):
    with client(settings, max_queue=2) as c:
        assert c.post("/v1/jobs", json={"prompt": "x"}).status_code == 202
        assert c.post("/v1/jobs", json={"prompt": "x"}).status_code == 202
        resp = c.post("/v1/jobs", json={"prompt": "x"})
        text = c.get("/metrics").text
    assert resp.status_code == 429 and int(resp.headers["retry-after"]) >= 1
    # counted under its route template and status by the ASGI middleware
    assert 'diffuserve_http_requests_total{method="POST",route="/v1/jobs",status="429"}' in text
    assert 'diffuserve_http_requests_total{method="POST",route="/v1/jobs",status="202"}' in text
    assert resp.json()["error"]["type"] == "overloaded_error"
    assert r.zcard(KEYS.queued("tiny")) == 2
    assert 'diffuserve_rejected_total{model="tiny"} 1.0' in text
    assert 'diffuserve_queue_depth{model="tiny"} 2.0' in text  # read from Redis at scrape time
    assert 'diffuserve_pending_jobs{model="tiny"} 0.0' in text  # no worker has claimed them


def test_queue_bound_in_seconds_of_work_follows_measured_speed(settings, registered, r):
    # A live worker of 'tiny' that has measured 2 images/s: with a 1.5 s wait bound the queue holds 3 jobs.
    r.hset(KEYS.worker("fast-one"), mapping={"model": "tiny", "heartbeat": time.time(), "images_per_s": "2.0"})
    r.zadd(KEYS.workers(), {"fast-one": time.time()})
    try:
        with client(settings, max_queue=100, max_queue_wait_s=1.5) as c:
            codes = [c.post("/v1/jobs", json={"prompt": "x"}).status_code for _ in range(3)]
            resp = c.post("/v1/jobs", json={"prompt": "x"})
        assert codes == [202, 202, 202]
        assert resp.status_code == 429 and resp.headers["retry-after"] == "2"  # ceil(3 jobs / 2 per s)
        assert r.zcard(KEYS.queued("tiny")) == 3
        # Nothing measured (a fresh worker): only the count bound applies.
        r.hset(KEYS.worker("fast-one"), "images_per_s", "0")
        with client(settings, max_queue=4, max_queue_wait_s=1.5) as c:
            assert c.post("/v1/jobs", json={"prompt": "x"}).status_code == 202
            assert c.post("/v1/jobs", json={"prompt": "x"}).status_code == 429
    finally:
        r.delete(KEYS.worker("fast-one"))
        r.zrem(KEYS.workers(), "fast-one")


def test_timeout_504_returns_job_id(settings, registered):
    with client(settings, request_timeout_s=0.3) as c:
        resp = c.post("/v1/images/generations", json={"prompt": "x"})
        assert resp.status_code == 504
        job_id = resp.json()["error"]["job_id"]
        assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"


def test_api_keys(settings, registered):
    with client(settings, api_keys=["k1", "k2"]) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code in (200, 503)
        for path in ("/v1/models", "/v1/workers", "/v1/loras", "/metrics", "/v1/jobs/abc"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401, path
        assert c.post("/v1/jobs", json={"prompt": "x"}).status_code == 401
        assert c.post("/v1/images/generations", json={"prompt": "x"}).status_code == 401
        assert c.delete("/v1/jobs/abc").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200


def test_readiness_and_listings(settings, registered, worker):
    with client(settings) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        import time

        for _ in range(50):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        assert c.get("/readyz").json()["ready"] is True
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
        assert models["data"][0]["native_size"] == "32x32" and models["data"][0]["workers"] == 1
        assert {"name": "style_a", "model": "tiny"} in c.get("/v1/loras").json()["data"]
        ws = c.get("/v1/workers").json()["data"]
        assert ws[0]["model"] == "tiny" and ws[0]["device"] == "cpu"
        text = c.get("/metrics").text
    assert "diffuserve_http_requests_total" in text and "diffuserve_live_workers 1.0" in text


def test_not_ready_without_workers(settings, registered):
    with client(settings) as c:
        assert c.get("/readyz").status_code == 503


def test_redis_down_is_503_not_500(settings, tmp_path):
    with client(settings, redis_url=f"unix://{tmp_path}/nothing.sock") as c:
        resp = c.post("/v1/jobs", json={"prompt": "x"})
        assert resp.status_code == 503 and resp.headers["retry-after"]
        assert c.get("/readyz").status_code == 503
        assert c.get("/healthz").status_code == 200


def test_unknown_job_404(settings, registered):
    with client(settings) as c:
        assert c.get("/v1/jobs/deadbeef").status_code == 404
        assert c.get("/v1/jobs/../../etc").status_code == 404
        assert c.get("/v1/jobs/deadbeef/images/0").status_code == 404


def test_openapi_is_served(settings):
    with client(settings) as c:
        spec = c.get("/openapi.json").json()
    assert "/v1/images/generations" in spec["paths"] and json.dumps(spec)


def test_queue_bound_is_atomic_under_concurrent_enqueues(redis_server, r):
    """The bound is checked inside Redis with the writes: 32 concurrent enqueues into a queue of 5 admit 5."""
    from concurrent.futures import ThreadPoolExecutor

    from workers.contract import JobRequest, queue_job

    req = JobRequest(model="tiny", prompt="x", width=32, height=32, steps=2, guidance_scale=3.0, seed=1,
                     sampler="ddim")

    def enqueue(i: int) -> int:
        client = redis_server.client()
        return queue_job(client, KEYS, f"job{i}", req, max_queue=5)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(enqueue, range(32)))
    assert results.count(1) == 5
    assert sorted(set(results) - {1}) == [-6]  # the rest learn the depth (5) from the same call
    assert r.zcard(KEYS.queued("tiny")) == 5 and r.xlen(KEYS.jobs("tiny")) == 5
    assert sum(1 for i in range(32) if r.exists(KEYS.job(f"job{i}"))) == 5


def test_waiters_wake_on_the_finished_stream_and_recover_missed_notifications(redis_server, r):
    """Synchronous waiters read one shared stream; a final state they missed, or a record that vanished,
    is still found by the periodic check of the hashes."""
    import asyncio
    import time

    import redis.asyncio as aioredis

    from server.app import Waiters
    from workers.contract import announce_final

    for j in ("w1", "w2", "w3", "w4"):
        r.hset(KEYS.job(j), mapping={"status": "queued"})
    r.hset(KEYS.job("w0"), mapping={"status": "succeeded"})

    async def scenario() -> dict:
        ar = aioredis.Redis.from_url(redis_server.url)
        hub = Waiters(ar, KEYS)
        hub.CHECK_S = 3600.0  # first: the stream alone must wake the waiter
        try:
            out = {"already": await hub.wait("w0", 5)}  # final before anyone waited
            t0 = time.monotonic()
            task = asyncio.create_task(hub.wait("w1", 10))
            await asyncio.sleep(0.3)
            with r.pipeline() as p:
                p.hset(KEYS.job("w1"), "status", "failed")
                announce_final(p, KEYS, "w1", "failed", 60, error="x")
                p.execute()
            out["notified"] = await task
            out["notified_s"] = time.monotonic() - t0 - 0.3
            hub.CHECK_S = 0.2  # then: no notification at all, only the hashes
            t2, t3 = asyncio.create_task(hub.wait("w2", 10)), asyncio.create_task(hub.wait("w3", 10))
            await asyncio.sleep(0.3)
            r.hset(KEYS.job("w2"), "status", "canceled")  # written without announcing
            r.delete(KEYS.job("w3"))  # the record vanished
            out["missed"], out["vanished"] = await t2, await t3
            out["timeout"] = await hub.wait("w4", 0.2)  # still queued: the caller's timeout
            return out
        finally:
            await hub.close()
            await ar.aclose()

    out = asyncio.run(scenario())
    assert out["already"] == "succeeded"
    assert out["notified"] == "failed" and out["notified_s"] < 0.5
    assert out["missed"] == "canceled" and out["vanished"] == "lost"
    assert out["timeout"] is None


def test_refusals_read_the_worker_index_never_scan_the_keyspace(settings, registered, r):
    """Admission and Retry-After read the workers' speed from the ``workers`` index: no SCAN, however many
    keys Redis holds. (The API once scanned every key for ``worker:*`` whenever its 2 s cache was stale,
    once per request in flight; with 12k job keys under 160 requests/s that held 429s for seconds.)"""
    now = time.time()
    r.hset(KEYS.worker("fast-one"), mapping={"name": "fast-one", "model": "tiny", "heartbeat": now,
                                             "images_per_s": "2.0"})
    r.zadd(KEYS.workers(), {"fast-one": now, "ghost": now, "long-gone": now - 3000})  # ghost: its hash expired
    r.hset(KEYS.worker("long-gone"), mapping={"name": "long-gone", "model": "tiny", "heartbeat": now - 3000})
    with r.pipeline(transaction=False) as p:
        for i in range(3000):
            p.set(f"diffuserve:job:filler{i}:img:0", b"x", ex=120)
        p.execute()
    r.config_resetstat()
    try:
        with client(settings, max_queue=0) as c:
            resps = [c.post("/v1/jobs", json={"prompt": "x"}) for _ in range(30)]
            listed = [w["name"] for w in c.get("/v1/workers").json()["data"]]
        stats = r.info("commandstats")
        assert {x.status_code for x in resps} == {429}
        assert {x.headers["retry-after"] for x in resps} == {"1"}  # ceil(0 queued / 2 per s), at least 1
        assert listed == ["fast-one"]  # the ghost and the stale entry are not live workers
        assert "cmdstat_scan" not in stats
        assert stats["cmdstat_zrangebyscore"]["calls"] <= 3  # the 2 s speed cache (one read) and /v1/workers
    finally:
        r.delete(KEYS.worker("fast-one"), KEYS.worker("long-gone"))
        r.zrem(KEYS.workers(), "fast-one", "ghost", "long-gone")


def test_stale_cached_values_share_one_read():
    import asyncio

    from server.cache import Refreshed

    calls: list[str] = []

    async def fetch(r, key):
        calls.append(key)
        await asyncio.sleep(0.05)
        if key == "broken":
            raise ConnectionError("redis down")
        return None if key.startswith("made-up") else len(calls)

    async def main():
        c = Refreshed(0.3, fetch, max_keys=3, keep=lambda v: v is not None)
        got = await asyncio.gather(*(c.get(None, "m") for _ in range(50)))
        assert got == [1] * 50 and calls == ["m"]  # fifty readers of a stale key, one read
        assert await c.get(None, "m") == 1 and c.reads == 1  # fresh: from the cache
        await asyncio.sleep(0.35)
        assert await c.get(None, "m") == 2  # stale again: read again
        results = await asyncio.gather(*(c.get(None, "broken") for _ in range(5)), return_exceptions=True)
        assert all(isinstance(x, ConnectionError) for x in results) and calls.count("broken") == 1
        assert not c.inflight  # a failed read is not left behind: the next reader tries again
        for i in range(5):  # unknown names are read but take no slot beyond max_keys
            assert await c.get(None, f"made-up{i}") is None
        assert len(c.values) == 3

    asyncio.run(main())
