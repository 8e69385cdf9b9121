"""Hostile input against the live API (a real uvicorn server, a real Redis and a real worker on the tiny model).

- schemathesis fuzzes every operation in /openapi.json (and chains them statefully): no 5xx, and every
  response conforms to the schema (status codes, content types, bodies, headers);
- adapter-name attacks, a pickle renamed ``.safetensors`` in the adapter directory, oversized fields and
  bodies: all refused, nothing enqueued, nothing executed;
- with API keys on, every route but the health probes refuses a missing or wrong key.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import threading
import time
import uuid

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from server.app import create_app
from server.settings import Settings
from workers.contract import Keys
from workers.worker import Worker, WorkerSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Boom:
    """Unpickling this creates the marker file: proof that a pickle was executed."""

    def __reduce__(self):
        return (open, (os.environ["DIFFUSERVE_TEST_MARKER"], "w"))


@pytest.fixture(scope="module")
def marker(tmp_path_factory):
    path = tmp_path_factory.mktemp("marker") / "pwned"
    os.environ["DIFFUSERVE_TEST_MARKER"] = str(path)
    yield path
    os.environ.pop("DIFFUSERVE_TEST_MARKER", None)


@pytest.fixture(scope="module")
def hostile_lora_dir(lora_dir, tmp_path_factory, marker):
    """The suite's adapters, plus a pickle payload named like an adapter, and a symlink out of the directory."""
    d = tmp_path_factory.mktemp("hostile-loras")
    for f in lora_dir.glob("*.safetensors"):
        shutil.copy(f, d / f.name)
    (d / "evil.safetensors").write_bytes(pickle.dumps(_Boom()))
    outside = tmp_path_factory.mktemp("outside")
    shutil.copy(lora_dir / "style_b.safetensors", outside / "escape.safetensors")
    os.symlink(outside / "escape.safetensors", d / "escape.safetensors")
    return d


class LiveServer:
    def __init__(self, settings: Settings, engine, worker_settings: WorkerSettings) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings.model_copy(update={"port": self.port}))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.worker = Worker(worker_settings, engine)
        self.threads = [threading.Thread(target=self.server.run, daemon=True),
                        threading.Thread(target=self.worker.run, daemon=True)]

    def __enter__(self) -> LiveServer:
        for t in self.threads:
            t.start()
        t_end = time.monotonic() + 30
        while time.monotonic() < t_end:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the live server never became ready")

    def __exit__(self, *exc) -> None:
        self.worker.stop()
        self.server.should_exit = True
        for t in self.threads:
            t.join(timeout=30)


@pytest.fixture(scope="module")
def live(redis_server, tiny_model, hostile_lora_dir):
    from models.engine import Engine

    engine = Engine(tiny_model, mode="exact", lora_dir=str(hostile_lora_dir))
    prefix = f"hostile{uuid.uuid4().hex[:6]}"
    # Small limits so that every request the fuzzer can make valid runs in milliseconds on the tiny model.
    settings_ = Settings(redis_url=redis_server.url, prefix=prefix, default_model="tiny", max_steps=3, max_n=2,
                         max_side=64, max_pixels=64 * 64, max_prompt_chars=300, request_timeout_s=60,
                         max_body_bytes=64 * 1024, max_queue=64)
    ws = WorkerSettings(redis_url=redis_server.url, model_name="tiny", prefix=prefix, block_ms=20, heartbeat_s=0.2)
    with LiveServer(settings_, engine, ws) as srv:
        srv.keys = Keys(prefix)
        srv.r = redis_server.client()
        yield srv


def quiet(srv) -> tuple[int, int, int]:
    """Wait until earlier tests' jobs are done (the worker is still finishing them), then read the counters."""
    for _ in range(600):
        if srv.r.zcard(srv.keys.queued("tiny")) == 0 and not srv.worker.active:
            break
        time.sleep(0.05)
    return counters(srv)


def counters(srv) -> tuple[int, int, int]:
    """What an accepted request would change: queue depth, stream entries, job records."""
    r, k = srv.r, srv.keys
    return r.zcard(k.queued("tiny")), r.xlen(k.jobs("tiny")), sum(1 for _ in r.scan_iter(match=k.job("*")))


# -- schemathesis ---------------------------------------------------------------------------------------------
CHECKS = [schemathesis.checks.not_a_server_error, schemathesis.checks.status_code_conformance,
          schemathesis.checks.content_type_conformance, schemathesis.checks.response_schema_conformance,
          schemathesis.checks.response_headers_conformance, schemathesis.checks.negative_data_rejection]
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def api_schema(live):
    return schemathesis.openapi.from_url(f"{live.url}/openapi.json")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_every_operation(api_schema, live, mode):
    """No 5xx and no schema-breaking response for generated inputs, valid (positive) and invalid (negative)."""
    operations = [r.ok() for r in api_schema.get_all_operations()]
    assert len(operations) >= 12
    calls = 0
    for op in operations:
        @given(case=op.as_strategy(generation_mode=mode))
        @FUZZ
        def fuzz(case):
            nonlocal calls
            if case.operation.path.endswith("/events"):  # SSE: open until the job ends; bound the read
                resp = case.call(base_url=live.url, timeout=5)
            else:
                resp = case.call(base_url=live.url, timeout=60)
            case.validate_response(resp, checks=CHECKS)
            calls += 1

        try:
            fuzz()
        except Unsatisfiable:  # nothing to make invalid (e.g. GET /healthz has no parameters)
            assert mode is GenerationMode.NEGATIVE
    assert calls >= len(operations) if mode is GenerationMode.POSITIVE else calls > 0


def test_stateful_sequences(api_schema):
    """Chains of calls (create a job, then read, cancel, stream, fetch its images) stay within the schema."""

    class Machine(api_schema.as_state_machine()):
        def validate_response(self, response, case, **kwargs):
            case.validate_response(response, checks=CHECKS)

    Machine.run(settings=settings(max_examples=15, stateful_step_count=5, deadline=None, database=None,
                                  suppress_health_check=list(HealthCheck)))


# -- adapter-name attacks, pickle, oversize -----------------------------------------------------------------
ATTACKS = ["../style_a", "..", "../../etc/passwd", "%2e%2e/style_a", "%2e%2e%2fstyle_a", "..\\style_a", "a\\b",
           "/etc/passwd", "C:\\Windows\\win.ini", "style_a\x00", "x\x00y", "style_a/../style_a", ".", "",
           "escape", "evil", "STYLE_A" * 40]


@pytest.mark.parametrize("name", ATTACKS)
def test_adapter_name_attacks_refused(live, name, marker):
    bodies = [{"prompt": "x", "steps": 2, "loras": [{"name": name, "scale": 1}]}]
    if name:  # '<lora::1>' is no tag at all: just prompt text
        bodies.append({"prompt": f"x <lora:{name}:1>", "steps": 2})
    before = quiet(live)
    for body in bodies:
        resp = httpx.post(f"{live.url}/v1/jobs", json=body, timeout=30)
        assert resp.status_code in (404, 422), (name, resp.text)
        assert resp.json()["error"]["param"] in ("loras", "prompt")
    assert counters(live) == before
    assert not marker.exists()


def test_listing_offers_neither_the_pickle_nor_the_symlink(live):
    names = {x["name"] for x in httpx.get(f"{live.url}/v1/loras").json()["data"]}
    assert "style_a" in names and not {"evil", "escape"} & names


def test_pickle_payload_is_never_executed_even_when_a_worker_is_asked_directly(live, marker):
    """Bypass the API's check (enqueue as a compromised client of Redis would): the worker refuses it."""
    from workers.contract import JobRequest, queue_job

    job_id = uuid.uuid4().hex
    req = JobRequest(model="tiny", prompt="x", width=32, height=32, steps=2, guidance_scale=3.0, seed=1,
                     sampler="ddim", loras=[{"name": "evil", "scale": 1.0}])
    with live.r.pipeline(transaction=True) as p:
        queue_job(p, live.keys, job_id, req)
        p.execute()
    for _ in range(300):
        st = httpx.get(f"{live.url}/v1/jobs/{job_id}").json()
        if st["status"] not in ("queued", "running"):
            break
        time.sleep(0.05)
    assert st["status"] == "failed" and "adapter" in st["error"]
    assert not marker.exists()


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "size": "4096x64"}, "size"),
        ({"prompt": "x", "size": "64x4096"}, "size"),
        ({"prompt": "x", "size": "64x72"}, "size"),  # 4608 pixels > max_pixels
        ({"prompt": "x", "steps": 10**6}, "steps"),
        ({"prompt": "x", "n": 10**6}, "n"),
        ({"prompt": "x" * 10_000}, "prompt"),
        ({"prompt": "x", "negative_prompt": "y" * 10_000}, "negative_prompt"),
        ({"prompt": "x", "seed": 2**64}, "seed"),
        ({"prompt": "x", "loras": [{"name": "style_a", "scale": 1}] * 100}, "loras"),
    ],
)
def test_oversized_fields_refused_before_enqueue(live, body, param):
    body = {"steps": 2, **body}
    before = quiet(live)
    for path in ("/v1/jobs", "/v1/images/generations"):
        resp = httpx.post(f"{live.url}{path}", json=body, timeout=30)
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"]["param"] == param
    assert counters(live) == before


def test_oversized_body_refused_before_enqueue(live):
    before = quiet(live)
    resp = httpx.post(f"{live.url}/v1/jobs", json={"prompt": "x", "init_image": "A" * 200_000}, timeout=30)
    assert resp.status_code == 413 and resp.json()["error"]["type"] == "request_too_large"
    assert counters(live) == before


# -- auth on every route -----------------------------------------------------------------------------------------
def test_every_route_but_health_probes_needs_the_key(redis_server):
    from fastapi.routing import APIRoute
    from fastapi.testclient import TestClient

    app = create_app(Settings(redis_url=redis_server.url, api_keys="k1,k2", default_model="tiny"))
    open_paths = {"/healthz", "/readyz"}
    docs = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}  # the schema itself stays public
    checked = 0
    with TestClient(app) as c:
        for route in app.routes:
            if not isinstance(route, APIRoute) or route.path in docs:
                continue
            path = route.path.replace("{job_id}", "abc").replace("{index}", "0")
            for method in route.methods:
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k1"},
                                {"Authorization": "Basic azE6"}):
                    resp = c.request(method, path, json={"prompt": "x"}, headers=headers)
                    if route.path in open_paths:
                        assert resp.status_code != 401
                    else:
                        assert resp.status_code == 401, (method, path, headers, resp.status_code)
                        assert resp.headers["www-authenticate"] == "Bearer"
                        checked += 1
        assert c.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
    assert checked >= 4 * 9
