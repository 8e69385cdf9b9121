"""Loading a pipeline directory: clear errors for missing or unsafe pieces; devices and dtypes."""

from __future__ import annotations

import shutil

import pytest
import torch

from models.errors import InvalidModel
from models.loading import load_pipeline, resolve_device, resolve_dtype


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_loads_on_cpu_in_fp32_with_sdpa(tiny_model):
    assert tiny_model.device.type == "cpu"
    assert tiny_model.dtype == torch.float32
    assert tiny_model.attention == "sdpa"
    assert tiny_model.native_size == (32, 32)
    assert tiny_model.describe()["attention"] == "sdpa"


def test_missing_directory_named(tmp_path):
    with pytest.raises(InvalidModel) as e:
        load_pipeline(tmp_path / "nope")
    assert "nope" in e.value.message


def test_not_a_pipeline(tmp_path):
    with pytest.raises(InvalidModel) as e:
        load_pipeline(tmp_path)
    assert "model_index.json" in e.value.message


def test_malformed_index(tmp_path, tiny_model_dir):
    d = copy_model(tiny_model_dir, tmp_path / "m")
    (d / "model_index.json").write_text("{not json")
    with pytest.raises(InvalidModel) as e:
        load_pipeline(d)
    assert "not valid JSON" in e.value.message


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_component_named(tmp_path, tiny_model_dir, component):
    d = copy_model(tiny_model_dir, tmp_path / "m")
    shutil.rmtree(d / component)
    with pytest.raises(InvalidModel) as e:
        load_pipeline(d)
    assert component in e.value.message


def test_pickle_weights_never_loaded(tmp_path, tiny_model_dir):
    d = copy_model(tiny_model_dir, tmp_path / "m")
    for f in (d / "unet").glob("*.safetensors"):
        f.unlink()
    torch.save({}, d / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(InvalidModel) as e:
        load_pipeline(d)
    assert "safetensors" in e.value.message and "diffusion_pytorch_model.bin" in e.value.message


def test_corrupt_weights_are_a_clear_error(tmp_path, tiny_model_dir):
    d = copy_model(tiny_model_dir, tmp_path / "m")
    next((d / "vae").glob("*.safetensors")).write_bytes(b"garbage")
    with pytest.raises(InvalidModel) as e:
        load_pipeline(d)
    assert "vae" in e.value.message and str(d) in e.value.message


def test_device_and_dtype_resolution():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype(torch.device("cpu")) == torch.float32
    assert resolve_dtype(torch.device("cuda")) == torch.float16
    assert resolve_dtype(torch.device("cuda"), "bf16") == torch.bfloat16
    with pytest.raises(InvalidModel):
        resolve_dtype(torch.device("cpu"), "fp16")
    with pytest.raises(InvalidModel):
        resolve_dtype(torch.device("cpu"), "int3")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidModel):
            resolve_device("cuda")


def test_model_defaults_file_fills_requests(tmp_path):
    from models.engine import Engine, GenerationRequest
    from models.testing import build_random_pipeline

    d = build_random_pipeline(tmp_path / "m", defaults={"steps": 7, "sampler": "DDIM", "guidance": 3.0,
                                                         "width": 48, "height": 40})
    eng = Engine(load_pipeline(d))
    r = eng.resolve(GenerationRequest("a"))
    assert (r.steps, r.sampler, r.guidance, r.width, r.height) == (7, "ddim", 3.0, 48, 40)
    assert eng.model.native_size == (48, 40)
    r = eng.resolve(GenerationRequest("a", steps=3, sampler="euler", guidance=1.0, width=32, height=32))
    assert (r.steps, r.sampler, r.guidance, r.width, r.height) == (3, "euler", 1.0, 32, 32)
