"""End to end: the real ``diffuserve serve`` as a subprocess (embedded Redis, API, worker processes)."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_model_dir, lora_dir, tmp_path_factory):
    port = free_port()
    data = tmp_path_factory.mktemp("serve")
    log = open(data / "serve.log", "w")  # noqa: SIM115 (lives as long as the server; a pipe could fill and block)
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "serve", "--model", str(tiny_model_dir), "--lora-dir", str(lora_dir),
         "--port", str(port), "--data-dir", str(data), "--claim-idle-ms", "1500", "--grace-s", "2"],
        stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    proc.log_path = data / "serve.log"
    base = f"http://127.0.0.1:{port}"
    t_end = time.monotonic() + 120
    while time.monotonic() < t_end:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"serve exited: {proc.log_path.read_text()}")
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("serve never became ready")
    yield base, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def test_generate_through_the_whole_stack(served):
    base, _ = served
    resp = httpx.post(f"{base}/v1/images/generations", json={"prompt": "a red circle", "steps": 5, "seed": 1,
                                                              "response_format": "b64_json"}, timeout=120)
    assert resp.status_code == 200, resp.text
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(resp.json()["data"][0]["b64_json"]))))
    assert img.shape == (32, 32, 3)
    assert httpx.get(f"{base}/v1/models").json()["data"][0]["workers"] == 1


def test_the_official_openai_sdk_works_unchanged(served):
    from openai import OpenAI

    base, _ = served
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    res = client.images.generate(model="tiny", prompt="a red circle", n=2, size="32x32", response_format="b64_json",
                                 extra_body={"steps": 4, "seed": 5})
    assert len(res.data) == 2 and res.created > 0
    imgs = [np.asarray(Image.open(io.BytesIO(base64.b64decode(d.b64_json)))) for d in res.data]
    assert imgs[0].shape == (32, 32, 3) and not np.array_equal(imgs[0], imgs[1])  # seeds 5 and 6
    res = client.images.generate(model="tiny", prompt="a red circle", size="32x32", response_format="url",
                                 extra_body={"steps": 2})
    assert res.data[0].url.startswith(f"{base}/v1/jobs/")
    assert httpx.get(res.data[0].url).headers["content-type"] == "image/png"
    from openai import NotFoundError, UnprocessableEntityError

    with pytest.raises(NotFoundError):
        client.images.generate(model="no-such-model", prompt="x")
    with pytest.raises(UnprocessableEntityError) as e:
        client.images.generate(model="tiny", prompt="x", size="33x32")
    assert e.value.body["param"] == "size"


def test_workers_run_below_the_api_in_cpu_priority(served):
    base, proc = served
    pid = httpx.get(f"{base}/v1/workers").json()["data"][0]["pid"]
    assert os.getpriority(os.PRIO_PROCESS, pid) - os.getpriority(os.PRIO_PROCESS, proc.pid) == 10


def test_worker_sigkilled_mid_job_still_succeeds(served):
    base, _ = served
    job = httpx.post(f"{base}/v1/jobs", json={"prompt": "a long job", "steps": 60, "seed": 3}).json()["id"]
    for _ in range(200):
        st = httpx.get(f"{base}/v1/jobs/{job}").json()
        if st["status"] == "running" and st["progress"]["step"] >= 2:
            break
        time.sleep(0.05)
    victim = httpx.get(f"{base}/v1/workers").json()["data"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    t_end = time.monotonic() + 240  # the supervisor restarts the worker (model load), which claims the job
    while time.monotonic() < t_end:
        st = httpx.get(f"{base}/v1/jobs/{job}").json()
        if st["status"] in ("succeeded", "failed", "canceled", "expired"):
            break
        time.sleep(0.2)
    assert st["status"] == "succeeded", st
    assert st["attempts"] == 2  # delivered to the dead worker, then to its replacement
    assert httpx.get(st["images"][0]).status_code == 200
    workers = httpx.get(f"{base}/v1/workers").json()["data"]
    assert victim not in [w["pid"] for w in workers]


def test_one_scrape_includes_api_and_worker_metrics(served):
    base, _ = served
    text = httpx.get(f"{base}/metrics").text
    assert "diffuserve_http_requests_total" in text and "diffuserve_queue_depth" in text
    assert "diffuserve_denoise_step_seconds_bucket" in text and "diffuserve_vae_decode_seconds" in text
    images = [ln for ln in text.splitlines() if ln.startswith("diffuserve_images_generated_total{")]
    assert images and float(images[0].split()[-1]) >= 2  # the two jobs above, from the worker processes
    assert "diffuserve_reclaims_total" in text
    # the synchronous generations above were timed by the API, end to end
    e2e = [ln for ln in text.splitlines() if ln.startswith("diffuserve_end_to_end_seconds_count{")]
    assert e2e and float(e2e[0].split()[-1]) >= 2
    assert "diffuserve_time_to_first_step_seconds_count" in text and "diffuserve_batch_size_bucket" in text


def test_ctrl_c_stops_everything(served):
    base, proc = served
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("serve did not stop within 60 s of Ctrl-C")
    out = proc.log_path.read_text()
    assert proc.returncode == 0, out
    assert "diffuserve stopped" in out
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{base}/healthz", timeout=2)


def test_serve_counts_gpus_without_importing_torch_where_no_driver_is(tmp_path):
    """No GPU driver on the machine: the supervisor knows there are no GPUs without importing torch (so it
    starts its CPU workers that much sooner); with a driver's path present it asks torch."""
    code = ("import sys; from workers.supervisor import gpu_count; "
            "print(gpu_count(tuple(sys.argv[1:])), 'torch' in sys.modules)")
    absent = subprocess.run([sys.executable, "-c", code, str(tmp_path / "no-driver")], capture_output=True,
                            text=True, timeout=60)
    assert absent.stdout.split() == ["0", "False"], absent.stderr
    present = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    import torch

    assert present.stdout.split() == [str(torch.cuda.device_count()), "True"], present.stderr
