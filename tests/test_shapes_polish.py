"""The polish stage: the decoder alone trained once more (encoder frozen), its loss weighted on outline rings
and close colour pairs; the latents every later stage trains on stay as the decoder stage left them."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from models.shapes.data import random_scene
from models.shapes.train import STAGES, TrainConfig, export_pipeline, run
from models.shapes.train_vae import CODE_FILE, load_vae, object_weight, polish_weight
from tests.test_shapes_train import copy_run, trained  # noqa: F401  (the module's tiny trained run)


def test_polish_stage_trains_the_decoder_alone_and_exports_it(trained, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    cfg = TrainConfig(run_dir=tmp_path / "run", out_dir=tmp_path / "out", vae_batch=4, polish_steps=2,
                      polish_lr=3e-3, checkpoint_minutes=60)
    copy_run(trained, cfg.run_dir)
    # A decoder stage's checkpoint, made cheaply: the VAE stage's weights with codes recorded as a decoder
    # stage records them (tests/test_shapes_decoder.py trains the real one).
    shutil.copytree(cfg.run_dir / "vae", cfg.run_dir / "decoder")
    state = json.loads((cfg.run_dir / "decoder" / "state.json").read_text())
    state.update({"outline_code": [1.0, -0.5, 0.25, 2.0], "stripes_flat": [0.0, 1.0, 0.0, 0.0],
                  "stripes_checker": [0.0, 0.0, 1.5, 0.0]})
    (cfg.run_dir / "decoder" / "state.json").write_text(json.dumps(state))
    export_pipeline(cfg)  # a run whose pipeline was exported before the stage (as a resumed run's was)
    codes = json.loads((cfg.out_dir / "vae" / CODE_FILE).read_text())
    run(cfg, ("polish",))
    assert json.loads((cfg.run_dir / "polish" / "state.json").read_text())["step"] == 2
    tuned = load_file(cfg.run_dir / "decoder" / "vae.safetensors")
    polished = load_file(cfg.run_dir / "polish" / "vae.safetensors")
    frozen = [k for k in tuned if k.startswith(("encoder.", "quant_conv."))]
    trained_keys = [k for k in tuned if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and len(frozen) + len(trained_keys) == len(tuned)
    assert all(torch.equal(tuned[k], polished[k]) for k in frozen)  # the base's latents do not move
    assert any(not torch.equal(tuned[k], polished[k]) for k in trained_keys)
    # The finished stage's VAE is what load_vae gives and what the run's pipeline now holds, with the same codes.
    assert all(torch.equal(load_vae(cfg).state_dict()[k], v) for k, v in polished.items())
    exported = load_file(next((cfg.out_dir / "vae").glob("*.safetensors")))
    assert all(torch.equal(exported[k], v) for k, v in polished.items())
    assert json.loads((cfg.out_dir / "vae" / CODE_FILE).read_text()) == codes
    scale = json.loads((cfg.run_dir / "latent_scale.json").read_text())["scaling_factor"]
    assert json.loads((cfg.out_dir / "vae" / "config.json").read_text())["scaling_factor"] == pytest.approx(scale)
    # Unfinished (more steps asked for), it is not used: the decoder stage's VAE is; run again, it resumes.
    cfg.polish_steps = 3
    assert all(torch.equal(load_vae(cfg).state_dict()[k], v) for k, v in tuned.items())
    run(cfg, ("polish",))
    assert json.loads((cfg.run_dir / "polish" / "state.json").read_text())["step"] == 3
    assert any(not torch.equal(load_vae(cfg).state_dict()[k], polished[k]) for k in trained_keys)


def test_polish_stage_runs_between_the_decoder_and_the_base(trained, tmp_path):  # noqa: F811
    assert STAGES.index("decoder") < STAGES.index("polish") < STAGES.index("base")
    from models.errors import InvalidRequest

    cfg = TrainConfig(run_dir=tmp_path / "run", out_dir=tmp_path / "out", vae_batch=4, polish_steps=1)
    copy_run(trained, cfg.run_dir)  # a VAE stage, no decoder stage
    with pytest.raises(InvalidRequest, match=r"decoder stage's checkpoint.*--stage decoder"):
        run(cfg, ("polish",))
    assert not (cfg.run_dir / "polish").exists()


def test_polish_weight_favours_rings_and_close_colours():
    rng = random.Random(3)
    fixed = {"shape": "square", "size": "large", "position": "center"}
    close = random_scene(rng, "outline", color="orange", background="yellow", **fixed)  # 73 RGB levels apart
    far = random_scene(rng, "outline", color="blue", background="white", **fixed)  # 258 apart
    plain = random_scene(rng, "plain", color="orange", background="yellow", **fixed)
    scenes = [close, far, plain]
    w = polish_weight(scenes, near=3.0, ring=3.0, pair_cap=4.0)
    base = object_weight(scenes, 3.0)
    assert w.shape == base.shape and w.mean().item() == pytest.approx(1.0)
    # Within an outlined image, its ring weighs 1 + ring times the pixels just outside it (both near the object).
    from models.shapes.latent_code import object_masks

    m = object_masks([far])[0, 0]
    ys, xs = torch.nonzero(m > 0.99, as_tuple=True)
    top, left = int(ys.min()), int(xs.min())
    on_ring, outside = w[1, 0, top, left + 8], w[1, 0, top - 2, left + 8]
    assert on_ring / outside == pytest.approx(4.0, rel=1e-2)
    # A plain image has no ring term: its weights keep object_weight's proportions.
    assert torch.allclose(w[2] / w[2].mean(), base[2] / base[2].mean(), atol=1e-5)
    # Orange on yellow weighs (150 / 73)^2 = 4.2x capped at 4 against blue on white (factor 1).
    assert w[0].mean() / w[1].mean() == pytest.approx(4.0, rel=1e-4)
    # Cap 1: every image alike; no ring either: exactly object_weight.
    alike = polish_weight(scenes, near=3.0, ring=3.0, pair_cap=1.0)
    assert alike[0].mean() == pytest.approx(alike[1].mean().item(), rel=1e-5)
    assert torch.allclose(polish_weight(scenes, near=3.0, ring=0.0, pair_cap=1.0), base, atol=1e-6)


def test_train_cli_polish_flags():
    import argparse

    from models.shapes.cli import STAGES as CLI_STAGES
    from models.shapes.cli import add_parsers, config_from

    assert CLI_STAGES == STAGES
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    default = config_from(parser.parse_args(["train", "shapes"]))
    assert (default.polish_steps, default.polish_ring_weight, default.polish_pair_cap) == (1000, 3.0, 4.0)
    cfg = config_from(parser.parse_args(["train", "shapes", "--stage", "polish", "--polish-steps", "5",
                                         "--polish-ring-weight", "0", "--polish-pair-cap", "1"]))
    assert (cfg.polish_steps, cfg.polish_ring_weight, cfg.polish_pair_cap) == (5, 0.0, 1.0)
