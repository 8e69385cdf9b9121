"""The ``diffuserve generate`` and ``train`` CLI, run as a user would (a subprocess), and its argument parsing."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from models.cli import output_paths, parse_lora, parse_size
from models.errors import InvalidRequest


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True,
                          timeout=240, cwd=cwd)


def test_generate_writes_pngs_equal_to_the_engine(tmp_path, tiny_model_dir, lora_dir, engine):
    from models.engine import GenerationRequest

    out = tmp_path / "img.png"
    r = run_cli("generate", "a red circle", "--model", str(tiny_model_dir), "--steps", "6", "--seed", "7",
                "--sampler", "DPM++ 2M", "--guidance", "5", "--size", "32x32", "-n", "2", "--lora", "style_a:0.5",
                "--lora-dir", str(lora_dir), "--engine-mode", "exact", "-o", str(out))
    assert r.returncode == 0, r.stderr
    files = [tmp_path / "img-0.png", tmp_path / "img-1.png"]
    assert all(f.exists() for f in files)
    assert "seed 7" in r.stdout and "seed 8" in r.stdout
    want = engine.generate([GenerationRequest("a red circle", steps=6, seed=7, sampler="dpmpp_2m", guidance=5.0,
                                              width=32, height=32, n=2, loras=(("style_a", 0.5),))])[0]
    for f, ref in zip(files, want.images, strict=True):
        assert np.array_equal(np.asarray(Image.open(f)), ref)


def test_generate_reports_bad_input_without_traceback(tmp_path, tiny_model_dir):
    r = run_cli("generate", "x", "--model", str(tiny_model_dir), "--sampler", "nope", "-o", str(tmp_path / "a.png"))
    assert r.returncode == 2
    assert "sampler 'nope' is not supported" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("generate", "x", "--model", str(tmp_path / "missing"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    # The sampler is checked before the model is looked at (or torch imported): a typo fails at once.
    r = run_cli("generate", "x", "--model", str(tmp_path / "missing"), "--sampler", "nope")
    assert r.returncode == 2 and "sampler 'nope'" in r.stderr and "does not exist" not in r.stderr


def test_make_test_model_then_generate(tmp_path):
    r = run_cli("make-test-model", str(tmp_path / "m"), "--scale", "tiny")
    assert r.returncode == 0, r.stderr
    r = run_cli("generate", "a cat", "--model", str(tmp_path / "m"), "--steps", "2", "-o", str(tmp_path / "c.png"))
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "c.png").size == (32, 32)


def test_train_reports_its_progress_without_verbose(tmp_path):
    # `diffuserve` logs warnings only unless -v; a training run's stops and stage times must still be shown.
    r = run_cli("train", "shapes", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--minutes", "0")
    assert r.returncode == 0, r.stderr
    assert "--minutes spent: stopping before stage vae" in r.stderr
    assert not (tmp_path / "out").exists()


def test_train_reports_a_bad_flag_without_traceback(tmp_path):
    r = run_cli("train", "shapes", "--run-dir", str(tmp_path / "bad"), "--base-detail-share", "2", "--minutes", "0")
    assert r.returncode == 2 and "--base-detail-share must be within [0, 1], got 2.0" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "bad").exists()


def test_train_reports_a_missing_earlier_stage_without_traceback(tmp_path):
    r = run_cli("train", "shapes", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--stage",
                "polish")
    assert r.returncode == 2 and "Hint: run the decoder stage first (--stage decoder)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_argument_parsers():
    assert parse_size("64x48") == (64, 48)
    assert parse_lora("outline:0.5") == ("outline", 0.5)
    assert parse_lora("outline") == ("outline", 1.0)
    with pytest.raises(InvalidRequest):
        parse_size("big")
    with pytest.raises(InvalidRequest):
        parse_lora("x:y")
    assert [p.name for p in output_paths("o/a.png", 2)] == ["a-0.png", "a-1.png"]
