"""The refine stage: the decoder (encoder frozen) trained on what the finished model generates, each plain image's
object fitted with the scene it was asked for and its outlined render the target."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil

import numpy as np
import pytest
import torch

from models.shapes.data import SHAPES, random_scene, render
from models.shapes.train import STAGES, TrainConfig, export_pipeline, run, train_lora
from models.shapes.train_refine import drawn_object, fit_scene, refine_targets
from models.shapes.train_vae import load_vae
from tests.test_shapes_train import copy_run, trained  # noqa: F401  (the module's tiny trained run)


def test_fit_scene_moves_and_sizes_the_scene_to_the_drawn_object():
    rng = random.Random(4)
    for shape in SHAPES:
        for size in ("small", "large"):
            drawn = random_scene(rng, "plain", shape=shape, size=size, color="green", background="purple")
            # What the prompt asked for: the same attributes, another jitter and size within the range.
            asked = dataclasses.replace(drawn, cx=drawn.cx + 1.7, cy=drawn.cy - 1.3,
                                        size_px=drawn.size_px + (2 if size == "small" else -3))
            fitted, iou = fit_scene(asked, drawn_object(render(drawn), asked))
            assert abs(fitted.cx - drawn.cx) <= 0.75 and abs(fitted.cy - drawn.cy) <= 0.75, (shape, size)
            assert abs(fitted.size_px - drawn.size_px) <= 1 and iou > 0.9, (shape, size, iou)
            assert (fitted.shape, fitted.color, fitted.position) == (asked.shape, asked.color, asked.position)
            # A drawing of another shape fits its box but not its mask.
            other = dataclasses.replace(drawn, shape=next(s for s in SHAPES if s != shape))
            assert fit_scene(asked, drawn_object(render(other), asked))[1] < 0.9
    blank = np.zeros((64, 64, 3), np.uint8) + np.array([140, 70, 190], np.uint8)  # all background
    assert fit_scene(asked, drawn_object(blank, asked))[1] == 0.0


def test_refine_targets_are_the_outlined_renders_of_the_drawn_objects():
    rng = random.Random(5)
    scenes = [random_scene(rng, "outline", color=c, background=b)
              for c, b in (("green", "purple"), ("red", "orange"), ("white", "black"), ("orange", "yellow"))]
    plain = np.stack([render(dataclasses.replace(s, style="plain")) for s in scenes])
    targets, fitted, ious = refine_targets(plain, scenes)
    assert targets.shape == (4, 3, 64, 64) and (ious > 0.9).all()
    assert all(f.style == "outline" for f in fitted)
    truth = torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    # Each target is its scene's outline render (up to the fit's sub-pixel rounding at the ring's edge).
    err = (targets - truth).abs().mean(dim=(1, 2, 3))
    assert (err < 0.02).all(), err
    ring_px = (truth - torch.from_numpy(plain).permute(0, 3, 1, 2).float() / 127.5 + 1).abs().sum(1) > 0.1
    assert ring_px.flatten(1).any(1).all()  # the targets are outlines, not the plain images read back


@pytest.fixture(scope="module")
def refined(trained, tmp_path_factory):  # noqa: F811
    pytest.importorskip("peft")
    d = tmp_path_factory.mktemp("refine")
    cfg = TrainConfig(run_dir=d / "run", out_dir=d / "out", vae_batch=4, lora_steps=1, lora_batch=4,
                      lora_images=8, refine_steps=2, refine_images=4, refine_lr=3e-3, refine_min_iou=0.0,
                      checkpoint_minutes=60)
    copy_run(trained, cfg.run_dir)
    # A decoder stage's checkpoint with an outline code, made cheaply as tests/test_shapes_polish.py does.
    shutil.copytree(cfg.run_dir / "vae", cfg.run_dir / "decoder")
    state = json.loads((cfg.run_dir / "decoder" / "state.json").read_text())
    state.update({"outline_code": [1.0, -0.5, 0.25, 2.0]})
    (cfg.run_dir / "decoder" / "state.json").write_text(json.dumps(state))
    export_pipeline(cfg)
    with pytest.raises(Exception, match=r"outline adapter.*--stage outline"):
        run(cfg, ("refine",))  # no outline adapter yet
    assert not (cfg.run_dir / "refine").exists()
    train_lora(cfg, "outline")
    start = {k: v.clone() for k, v in load_vae(cfg).state_dict().items()}
    run(cfg, ("refine",))
    return cfg, start


def test_refine_stage_trains_the_decoder_alone_and_exports_it(refined):
    from safetensors.torch import load_file

    cfg, start = refined
    assert STAGES[-1] == "refine"
    assert json.loads((cfg.run_dir / "refine" / "state.json").read_text())["step"] == 2
    done = load_file(cfg.run_dir / "refine" / "vae.safetensors")
    frozen = [k for k in start if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(start[k], done[k]) for k in frozen)  # the latents do not move
    assert any(not torch.equal(start[k], done[k]) for k in start if k.startswith("decoder."))
    assert all(torch.equal(load_vae(cfg).state_dict()[k], v) for k, v in done.items())
    assert all(torch.equal(load_vae(cfg, refined=False).state_dict()[k], v) for k, v in start.items())
    exported = load_file(next((cfg.out_dir / "vae").glob("*.safetensors")))
    assert all(torch.equal(exported[k], v) for k, v in done.items())


def test_refine_stage_generates_its_latents_once_with_and_without_the_adapter(refined):
    from safetensors.torch import load_file

    from models.engine import Engine, GenerationRequest
    from models.loading import load_pipeline
    from models.shapes.data import full_caption
    from models.shapes.train_refine import NOISE_SEED, SCENE_SEED

    cfg, _ = refined
    lat = load_file(cfg.run_dir / "refine_latents.safetensors")
    assert lat["plain"].shape == lat["outline"].shape == (4, 4, 16, 16)
    assert not torch.equal(lat["plain"], lat["outline"])  # the adapter's latents, not the plain ones again
    # The cached latents are the engine's for the stage's scenes and seeds (undecoded, in VAE units).
    scene = random_scene(random.Random(cfg.seed + SCENE_SEED), "outline")
    model = load_pipeline(cfg.out_dir, dtype="fp32")
    engine = Engine(model, lora_dir=str(cfg.out_dir / "loras"))
    req = GenerationRequest(full_caption(scene), seed=cfg.seed + NOISE_SEED, loras=(("outline", 1.0),))
    x = engine.denoise([req])[0][0].x / model.vae.config.scaling_factor
    torch.testing.assert_close(x[0], lat["outline"][0])


def test_an_unfinished_refine_stage_is_not_used_and_resumes(refined, tmp_path):
    cfg, start = refined
    cfg = dataclasses.replace(cfg, run_dir=tmp_path / "run", out_dir=tmp_path / "out", refine_steps=3)
    shutil.copytree(refined[0].run_dir, cfg.run_dir)
    shutil.copytree(refined[0].out_dir, cfg.out_dir)
    assert all(torch.equal(load_vae(cfg).state_dict()[k], v) for k, v in start.items())
    run(cfg, ("refine",))
    assert json.loads((cfg.run_dir / "refine" / "state.json").read_text())["step"] == 3


def test_a_refine_stage_stopped_and_resumed_ends_as_one_run_straight_through(refined, tmp_path, monkeypatch):
    """Its checkpoint holds the optimizer state and the random streams, and its generated latents are cached
    (or generated again alike), so a stopped and resumed stage trains on the same batches as one that was not."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    import models.shapes.train_common as common
    from models.shapes.train_refine import train_refine

    def config(name: str) -> TrainConfig:
        cfg = dataclasses.replace(refined[0], run_dir=tmp_path / name / "run", out_dir=tmp_path / name / "out",
                                  refine_steps=4)
        shutil.copytree(refined[0].run_dir, cfg.run_dir, ignore=shutil.ignore_patterns("refine"))
        shutil.copytree(refined[0].out_dir, cfg.out_dir)
        return cfg

    straight = config("straight")
    assert train_refine(straight) is True
    split = config("split")
    (split.run_dir / "refine_latents.safetensors").unlink()  # generated again: the same latents
    clock = iter(range(0, 10_000, 10))  # a fake clock, 10 s a reading: --minutes 1 stops the loop part-way
    with monkeypatch.context() as m:
        m.setattr(common, "time", SimpleNamespace(monotonic=lambda: next(clock)))
        assert train_refine(split, 1.0) is False
    assert 0 < json.loads((split.run_dir / "refine" / "state.json").read_text())["step"] < 4
    assert train_refine(split) is True
    a = load_file(straight.run_dir / "refine" / "vae.safetensors")
    b = load_file(split.run_dir / "refine" / "vae.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
