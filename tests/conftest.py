"""Shared fixtures: a tiny random Stable Diffusion pipeline written to disk by the suite (no network)."""

from __future__ import annotations

import os

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
