"""Shared fixtures: a tiny random Stable Diffusion pipeline written to disk by the suite (no network)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Servers and workers the suite starts run the exact engine unless a test asks otherwise: the default
# ("auto", fast for workers) would compile graphs in the background in every one of them, on CI's 2 cores.
# tests/test_respawn.py and tests/test_warm.py run the default and the fast mode on purpose.
os.environ.setdefault("DIFFUSERVE_ENGINE_MODE", "exact")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from models.testing import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("models") / "tiny", scale="tiny", seed=0)


@pytest.fixture(scope="session", autouse=True)
def _prewarm_fast_graphs(request, tiny_model_dir):
    """When a selected test asks for ``fast_graphs``: compile the tiny model's fast-mode graphs for a batch of
    one into inductor's on-disk cache from the start of the session, in the background at the lowest CPU
    priority (``python -m models.warm``, as a worker's BackgroundWarmup runs it), so the ~3 min of cold
    compiling on CI's 2 cores uses CPU the other tests leave idle instead of adding to the suite's time."""
    if not any("fast_graphs" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    import torch

    log = tempfile.TemporaryFile()  # noqa: SIM115 (read and closed when the session ends)
    # The test process's thread count: inductor specialises its C++ kernels to it, so that is what the tests'
    # engines (and a worker started with as many threads) look up in the cache.
    proc = subprocess.Popen([sys.executable, "-m", "models.warm", str(tiny_model_dir), "--max-batch", "1",
                             "--threads", str(torch.get_num_threads()), "--nice", "19", "--parent", str(os.getpid())],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    proc.output = log
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    log.close()


@pytest.fixture(scope="session")
def fast_graphs(_prewarm_fast_graphs):
    """The tiny model's fast-mode graphs for a batch of one, built in the session's background compile (which
    this waits for; it must succeed). Tests then build the same graphs themselves, from inductor's cache."""
    proc = _prewarm_fast_graphs
    rc = proc.wait(timeout=900)
    proc.output.seek(0)
    assert rc == 0, proc.output.read().decode(errors="replace")[-3000:]


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from models.loading import load_pipeline

    return load_pipeline(tiny_model_dir)


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, tiny_model):
    """Two adapters in different namings, plus a text-encoder-free one."""
    from safetensors.torch import save_file

    from models.testing import random_lora_state_dict

    d = tmp_path_factory.mktemp("loras")
    m = tiny_model
    save_file(random_lora_state_dict(m.unet, m.text_encoder, seed=1), d / "style_a.safetensors")
    save_file(random_lora_state_dict(m.unet, m.text_encoder, seed=1, naming="kohya"), d / "style_a_kohya.safetensors")
    save_file(random_lora_state_dict(m.unet, None, seed=2, rank=2, alpha=1.0), d / "style_b.safetensors")
    return d


@pytest.fixture(scope="session")
def engine(tiny_model, lora_dir):
    from models.engine import Engine

    return Engine(tiny_model, mode="exact", lora_dir=str(lora_dir))


@pytest.fixture(scope="session")
def stock_pipe(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def redis_server():
    from tests.redis_server import TestRedis

    server = TestRedis()
    yield server
    server.close()


@pytest.fixture()
def r(redis_server):
    client = redis_server.client()
    client.flushdb()
    yield client
    client.close()
