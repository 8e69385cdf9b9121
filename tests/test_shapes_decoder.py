"""The decoder stage: it fine-tunes the decoder, teaches the VAE the outline and stripes codes, keeps plain
latents where they were, records the codes and writes them beside the exported VAE."""

from __future__ import annotations

import json
import random

import pytest
import torch

from models.shapes.data import random_scene
from models.shapes.latent_code import latent_offset, twin
from models.shapes.train import TrainConfig, export_pipeline, run
from models.shapes.train_common import render_tensor
from models.shapes.train_vae import CODE_FILE, CODES, decoder_targets, load_vae, source_vae, train_decoder
from tests.test_shapes_train import copy_run, trained  # noqa: F401  (the module's tiny trained run)


def codes_of(cfg: TrainConfig) -> dict:
    state = json.loads((cfg.run_dir / "decoder" / "state.json").read_text())
    return {k: state[k] for k in CODES if state.get(k)}


def test_decoder_stage_records_the_codes_and_export_uses_its_vae(trained, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    cfg = TrainConfig(run_dir=tmp_path / "run3", out_dir=tmp_path / "out3", vae_batch=4, decoder_steps=2,
                      checkpoint_minutes=60)
    copy_run(trained, cfg.run_dir)
    train_decoder(cfg)
    state = json.loads((cfg.run_dir / "decoder" / "state.json").read_text())
    codes = codes_of(cfg)
    assert state["step"] == 2 and sorted(codes) == sorted(CODES)
    assert all(len(c) == 4 and any(c) for c in codes.values())
    # The stripes code's two parts share a direction, at the configured lengths; the outline code is orthogonal.
    flat, checker, outline = (torch.tensor(codes[k]) for k in ("stripes_flat", "stripes_checker", "outline_code"))
    assert checker.norm() / flat.norm() == pytest.approx(cfg.stripes_checker / cfg.stripes_code, rel=1e-4)
    assert torch.dot(flat, checker) / (flat.norm() * checker.norm()) == pytest.approx(1.0, abs=1e-5)
    assert abs(torch.dot(flat, outline).item()) < 1e-4 * flat.norm() * outline.norm()
    before = load_file(cfg.run_dir / "vae" / "vae.safetensors")
    after = load_file(cfg.run_dir / "decoder" / "vae.safetensors")
    dec = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert any(not torch.equal(before[k], after[k]) for k in dec)
    tuned = load_vae(cfg).state_dict()
    assert all(torch.equal(tuned[k], after[k]) for k in after)
    exported = load_file(next((export_pipeline(cfg) / "vae").glob("*.safetensors")))
    assert all(torch.equal(exported[k], after[k]) for k in after)
    assert json.loads((cfg.out_dir / "vae" / CODE_FILE).read_text()) == codes
    cfg.decoder_steps = 3
    train_decoder(cfg)  # resumes with the codes it fitted, not new ones
    assert codes_of(cfg) == codes


def test_decoder_stage_moves_styles_to_their_codes_and_keeps_plain_latents(trained, tmp_path):  # noqa: F811
    """The encoder learns outline -> filled object + outline code and stripes -> plain background + stripes
    code, while plain latents stay near where the starting VAE put them (the base UNet's latent space). The
    full-length stage's figures are in the model card; this checks the direction of travel on a few steps."""
    cfg = TrainConfig(run_dir=tmp_path / "run4", out_dir=tmp_path / "out4", vae_batch=4, decoder_steps=60,
                      decoder_lr=3e-3, checkpoint_minutes=60)
    copy_run(trained, cfg.run_dir)
    train_decoder(cfg)
    codes = codes_of(cfg)
    source, tuned = source_vae(cfg), load_vae(cfg)
    rng = random.Random(99)
    plain = [random_scene(rng) for _ in range(32)]
    with torch.no_grad():
        def mean(vae, scenes):
            return vae.encode(render_tensor(scenes)).latent_dist.mean

        drift = (mean(tuned, plain) - mean(source, plain)).pow(2).mean()
        before = {}
        for style in ("outline", "stripes"):
            styled = [random_scene(rng, style) for _ in range(32)]
            target = mean(source, [twin(s, codes) for s in styled]) + latent_offset(styled, codes)
            before[style] = (mean(source, styled) - target).pow(2).mean()
            after = (mean(tuned, styled) - target).pow(2).mean()
            assert after < 0.75 * before[style], (style, before[style], after)
    # Measured on this barely trained VAE (60 steps at lr 3e-3, still warming up): outline 0.035 -> 0.024,
    # stripes 0.066 -> 0.026, plain drift 0.018. The full-length stage's: plain latents moved 0.044 sd rms.
    assert drift < 0.6 * min(before.values()), (drift, before)


def test_decoder_targets_with_and_without_the_codes(trained):  # noqa: F811
    """With the codes, an outlined scene is aimed at its filled twin's latent plus the outline code over the
    object, a striped one at its plain twin's plus the stripes code over the background; without them
    (``--outline-code 0 --stripes-code 0 --stripes-checker 0``), every image at its own latent, as drawn."""
    source = source_vae(trained)
    rng = random.Random(7)
    scenes = [random_scene(rng, s, size="large") for s in ("outline", "plain", "outline+stripes", "stripes")]
    x = render_tensor(scenes)
    codes = {"outline_code": [1.0, -0.5, 0.25, 2.0], "stripes_flat": [0.0, 1.0, 0.0, 0.0],
             "stripes_checker": [0.0, 0.0, 1.5, 0.0]}
    with torch.no_grad():
        own = source.encode(x).latent_dist.mean
        plain = source.encode(render_tensor([twin(s, {"outline_code": 1, "stripes_flat": 1}) for s in scenes]))
    ref, offset = decoder_targets(source, x, scenes, codes)
    assert torch.allclose(ref.mean, plain.latent_dist.mean) and torch.equal(offset, latent_offset(scenes, codes))
    assert not torch.allclose(ref.mean[[0, 2, 3]], own[[0, 2, 3]])  # styled scenes aim at their plain twins
    assert torch.allclose(ref.mean[1], own[1]) and offset[1].abs().max() == 0
    # Outline only: a striped scene keeps its own latent (as before the stripes code).
    ref, offset = decoder_targets(source, x, scenes, {"outline_code": codes["outline_code"]})
    assert torch.allclose(ref.mean[[1, 3]], own[[1, 3]]) and offset[[1, 3]].abs().max() == 0
    ref, offset = decoder_targets(source, x, scenes, None)
    assert torch.allclose(ref.mean, own) and float(offset.abs().max()) == 0


def test_zero_lengths_teach_no_codes(trained, tmp_path):  # noqa: F811
    cfg = TrainConfig(run_dir=tmp_path / "run7", out_dir=tmp_path / "out7", vae_batch=4, decoder_steps=1,
                      outline_code=0.0, stripes_code=0.0, stripes_checker=0.0, checkpoint_minutes=60)
    copy_run(trained, cfg.run_dir)
    train_decoder(cfg)
    assert codes_of(cfg) == {}
    export_pipeline(cfg)
    assert not (cfg.out_dir / "vae" / CODE_FILE).exists()


def test_decoder_stage_can_continue_an_exported_pipeline(trained, tmp_path):  # noqa: F811
    """``--init-from`` without a VAE checkpoint: the stage starts from the pipeline's VAE and writes the tuned
    one (with the scale that pipeline's UNet was trained with) into --out, for the adapters to train on."""
    from safetensors.torch import load_file

    out = export_pipeline(trained)
    cfg = TrainConfig(run_dir=tmp_path / "run5", out_dir=tmp_path / "out5", vae_batch=4, decoder_steps=2,
                      init_from=out, checkpoint_minutes=60)
    run(cfg, ("decoder",))
    assert not (cfg.run_dir / "vae").exists()
    assert (cfg.out_dir / "model_index.json").is_file() and (cfg.out_dir / "unet").is_dir()
    start = load_file(next((out / "vae").glob("*.safetensors")))
    written = load_file(next((cfg.out_dir / "vae").glob("*.safetensors")))
    assert all(torch.equal(written[k], v) for k, v in load_file(cfg.run_dir / "decoder" / "vae.safetensors").items())
    assert any(not torch.equal(written[k], start[k]) for k in start)
    scale = json.loads((out / "vae" / "config.json").read_text())["scaling_factor"]
    assert json.loads((cfg.out_dir / "vae" / "config.json").read_text())["scaling_factor"] == pytest.approx(scale)
    # The codes the VAE was taught are written beside it, and a decoder stage continuing that pipeline keeps them.
    codes = codes_of(cfg)
    assert json.loads((cfg.out_dir / "vae" / CODE_FILE).read_text()) == codes
    again = TrainConfig(run_dir=tmp_path / "run6", out_dir=tmp_path / "out6", vae_batch=4, decoder_steps=1,
                        init_from=cfg.out_dir, checkpoint_minutes=60, seed=5)
    run(again, ("decoder",))
    assert codes_of(again) == codes
    # A pipeline from before the stripes code has only outline_code.json; a continuation keeps that code alone.
    (cfg.out_dir / "vae" / CODE_FILE).unlink()
    (cfg.out_dir / "vae" / "outline_code.json").write_text(json.dumps({"outline_code": codes["outline_code"]}))
    old = TrainConfig(run_dir=tmp_path / "run8", out_dir=tmp_path / "out8", vae_batch=4, decoder_steps=1,
                      init_from=cfg.out_dir, checkpoint_minutes=60)
    run(old, ("decoder",))
    assert codes_of(old) == {"outline_code": codes["outline_code"]}
