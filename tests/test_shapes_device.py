"""The shapes training code's GPU path, run on the CPU: the device script end to end, render workers and the
foreach optimizer and EMA (the compiled step is in test_shapes_train.py, beside its fixture)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def test_device_script_resumes_across_calls_and_packs_the_pipeline(tmp_path):
    """models/shapes/device_train.sh, as the GPU box runs it but on the CPU with tiny step counts: a call that
    runs out of minutes packs nothing; the next resumes, and once the base stage is done returns its pipeline
    (for the adapters to be trained elsewhere if need be); the last returns the whole pipeline, in parts that
    reassemble into a directory our loader reads."""
    import os
    import subprocess
    import sys
    import tarfile

    from models.loading import load_pipeline

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "RUN_DIR": str(tmp_path / "run"), "PYTHON": sys.executable, "WHEELS": str(tmp_path / "none"),
           "RENDER_WORKERS": "2", "COMPILE": ""}
    tiny = ["--device", "cpu", "--vae-steps", "2", "--decoder-steps", "2", "--polish-steps", "2", "--base-steps", "2",
            "--base-images", "16", "--lora-steps", "2", "--lora-images", "16", "--refine-steps", "2",
            "--refine-images", "4", "--refine-min-iou", "0", "--batch", "4"]

    def call(minutes: str, out: Path, *extra: str) -> tuple[str, Path | None]:
        r = subprocess.run(["bash", "models/shapes/device_train.sh", *tiny, *extra], cwd=root, capture_output=True,
                           text=True, env={**env, "MINUTES": minutes, "OUT": str(out)}, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        parts = sorted(out.glob("shapes.tar.part-*"))
        if not parts:
            return r.stdout, None
        assert all(p.stat().st_size <= 15 * 2**20 for p in parts)
        tar, model = out / "shapes.tar", out / "model"
        tar.write_bytes(b"".join(p.read_bytes() for p in parts))
        with tarfile.open(tar) as t:
            t.extractall(model, filter="data")
        return r.stdout, model

    first, model = call("0.00001", tmp_path / "out1")  # stops in the VAE stage, after checkpointing it
    assert "not finished" in first and model is None
    stopped_at = json.loads((tmp_path / "run" / "vae" / "state.json").read_text())["step"]

    second, model = call("30", tmp_path / "out2", "--stage", "vae", "--stage", "decoder", "--stage", "base")
    assert "pipeline packed (base only" in second and "not finished" in second, second[-2000:]
    assert (model / "model_index.json").is_file() and not (model / "loras").exists()
    log = (tmp_path / "out2" / "train.log").read_text()
    first_bar = next(line for line in log.splitlines() if line.startswith("vae:"))
    assert f"| {stopped_at}/2 [" in first_bar  # the VAE stage resumed where the first call checkpointed it

    third, model = call("30", tmp_path / "out3")
    assert "pipeline packed (complete)" in third and "not finished" not in third, third[-2000:]
    assert "stage refine done" in (tmp_path / "out3" / "train.log").read_text()
    assert (model / "loras" / "stripes.safetensors").is_file()
    assert load_pipeline(model).unet.config.cross_attention_dim == 128


def test_render_workers_render_the_same_batches():
    import random

    from models.shapes.train_common import render_batch, render_tensor, render_workers

    x, scenes = render_batch(random.Random(3), 37, ("plain", "outline+stripes"))
    with render_workers(2):
        pooled = render_tensor(scenes)
        again, _ = render_batch(random.Random(3), 37, ("plain", "outline+stripes"))
    assert torch.equal(pooled, x) and torch.equal(again, x)


def test_ema_update_and_adamw_match_their_per_parameter_forms():
    """ema_update is one foreach lerp and adamw a foreach AdamW on the CPU: the same numbers as the loops."""
    from models.shapes.train_common import adamw, descend, ema_update

    torch.manual_seed(0)
    ema, model = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    expected = [e.detach() + 0.1 * (p.detach() - e.detach()) for e, p in zip(ema.parameters(), model.parameters(), strict=True)]
    ema_update(ema, model, 0.9)
    assert all(torch.allclose(e, x) for e, x in zip(ema.parameters(), expected, strict=True))

    twin = torch.nn.Linear(5, 3)
    twin.load_state_dict(model.state_dict())
    ours, loop = adamw(list(model.parameters()), 1e-2, 1e-2, "cpu"), torch.optim.AdamW(twin.parameters(), 1e-2,
                                                                                       weight_decay=1e-2, foreach=False)
    x = torch.randn(8, 5)
    for _ in range(3):
        loss = descend(ours, model(x).square().mean())
        descend(loop, twin(x).square().mean())
    assert isinstance(loss, torch.Tensor) and not loss.requires_grad  # read only when the progress bar shows it
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    assert not torch.equal(model.weight, ema.weight)
