"""A training run packed into committable files and unpacked elsewhere resumes as the original would."""

from __future__ import annotations

import json

import pytest
import torch

from models.shapes.carry import MANIFEST, CarryError, pack, unpack
from models.shapes.train import TrainConfig, run


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A tiny run with the VAE stage done and the base stage checkpointed part-way (2 of 4 steps)."""
    d = tmp_path_factory.mktemp("carry")
    cfg = TrainConfig(run_dir=d / "run", out_dir=d / "out", vae_steps=2, vae_batch=4,
                      base_steps=2, base_batch=4, base_images=16, checkpoint_minutes=60)
    run(cfg, ("vae", "base"))
    return cfg


def test_pack_splits_large_files_and_unpack_rebuilds_them(stopped, tmp_path):
    packed, rebuilt = tmp_path / "packed", tmp_path / "rebuilt"
    manifest = pack(stopped.run_dir, packed, part_bytes=256 * 1024)
    assert manifest["steps"] == {"vae": 2, "base": 2}
    assert (stopped.run_dir / "base_latents.safetensors").is_file()
    assert "base_latents.safetensors" not in manifest["files"]  # re-encoded on resume, not carried
    split = {rel for rel, m in manifest["files"].items() if m["parts"] > 1}
    assert "base/optimizer.safetensors" in split
    assert max(p.stat().st_size for p in packed.rglob("*") if p.is_file()) <= 256 * 1024
    assert not (packed / "base" / "optimizer.safetensors").exists()

    unpack(packed, rebuilt)
    for rel in manifest["files"]:
        assert (rebuilt / rel).read_bytes() == (stopped.run_dir / rel).read_bytes()
    assert not (rebuilt / "base_latents.safetensors").exists()


def test_an_unpacked_run_resumes_as_the_original(stopped, tmp_path):
    """The base stage resumed from the unpacked copy (latents encoded again from the carried VAE) ends where
    the original run directory, resumed in place, ends."""
    import shutil

    from safetensors.torch import load_file

    original = tmp_path / "original"
    shutil.copytree(stopped.run_dir, original)
    pack(stopped.run_dir, tmp_path / "packed")
    unpack(tmp_path / "packed", tmp_path / "carried")
    ends = []
    for run_dir in (original, tmp_path / "carried"):
        cfg = TrainConfig(**{**stopped.__dict__, "run_dir": run_dir, "out_dir": tmp_path / f"out-{run_dir.name}",
                             "base_steps": 4})
        run(cfg, ("base",))
        assert json.loads((run_dir / "base" / "state.json").read_text())["step"] == 4
        ends.append(load_file(run_dir / "base" / "unet.safetensors"))
    a, b = ends
    assert a.keys() == b.keys()
    # Within float rounding (the base stage's resume is, see test_shapes_train); another batch would be far off.
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_unpack_refuses_a_damaged_pack_and_keeps_the_run_dir(stopped, tmp_path):
    packed = tmp_path / "packed"
    pack(stopped.run_dir, packed)
    target = packed / "vae" / "vae.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CarryError, match="vae/vae.safetensors"):
        unpack(packed, tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.unpacking").exists()

    existing = tmp_path / "busy"
    existing.mkdir()
    (existing / "keep").write_text("further on")
    pack(stopped.run_dir, packed)  # a fresh pack replaces the damaged one
    with pytest.raises(CarryError, match="not empty"):
        unpack(packed, existing)
    assert (existing / "keep").read_text() == "further on"
    unpack(packed, existing, force=True)
    assert not (existing / "keep").exists() and (existing / "base" / "state.json").is_file()


def test_a_manifest_cannot_write_outside_the_run_dir(stopped, tmp_path):
    packed = tmp_path / "packed"
    pack(stopped.run_dir, packed)
    manifest = json.loads((packed / MANIFEST).read_text())
    manifest["files"]["../escaped"] = manifest["files"]["config.json"]
    (packed / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CarryError, match="outside the run directory"):
        unpack(packed, tmp_path / "run" / "inner")
    assert not (tmp_path / "run" / "escaped").exists()


def test_pack_refuses_to_clear_an_unrelated_directory(stopped, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a pack")
    with pytest.raises(CarryError, match="refusing"):
        pack(stopped.run_dir, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").is_file()
    with pytest.raises(CarryError, match="not a training run"):
        pack(tmp_path / "mine", tmp_path / "elsewhere")


def test_carry_command(stopped, tmp_path, capsys):
    from workers.cli import main

    assert main(["carry", "pack", str(stopped.run_dir), str(tmp_path / "p")]) == 0
    assert '"base": 2' in capsys.readouterr().out
    assert main(["carry", "unpack", str(tmp_path / "p"), str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "base" / "state.json").is_file()
    assert main(["carry", "unpack", str(tmp_path / "p"), str(tmp_path / "r")]) == 2
    assert "not empty" in capsys.readouterr().err
