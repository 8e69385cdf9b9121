"""The shapes training code runs end to end on a few steps, resumes, and exports a stock-loadable model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from models.shapes.train import TrainConfig, export_pipeline, run, train_lora


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    cfg = TrainConfig(run_dir=d / "run", out_dir=d / "out", vae_steps=2, vae_batch=4, base_steps=2, base_batch=4,
                      base_images=16, lora_steps=2, lora_batch=4, lora_images=16,
                      checkpoint_minutes=60)
    run(cfg, ("vae", "base"))
    return cfg


def test_stages_checkpoint_and_resume(trained):
    cfg = trained
    assert json.loads((cfg.run_dir / "vae" / "state.json").read_text())["step"] == 2
    cfg.vae_steps = 3
    run(cfg, ("vae",))  # resumes at step 2, runs one more
    assert json.loads((cfg.run_dir / "vae" / "state.json").read_text())["step"] == 3
    assert not (cfg.run_dir / "vae.tmp").exists()


def test_minutes_stop_the_run_before_the_next_stage(trained, tmp_path):
    """Once --minutes are spent, a later stage does not start (it used to get 0.1 min, after encoding its
    whole dataset and exporting); the stage that ran out checkpointed where it stopped."""
    cfg = TrainConfig(**{**trained.__dict__, "run_dir": tmp_path / "run8", "out_dir": tmp_path / "out8",
                         "vae_steps": 10_000})
    run(cfg, ("vae", "base"), minutes=0.05)  # 3 s, set-up and data encoding included: room for some steps
    step = json.loads((cfg.run_dir / "vae" / "state.json").read_text())["step"]
    assert 0 < step < 10_000
    assert not (cfg.run_dir / "base").exists() and not cfg.out_dir.exists()


def test_a_stage_stopped_by_minutes_exports_nothing(trained, tmp_path):
    """A base or adapter stage that runs out of --minutes checkpoints and resumes later, but does not export:
    the output (by default the shipped model) never gets a partly trained UNet or adapter."""
    pytest.importorskip("peft")
    cfg = TrainConfig(**{**trained.__dict__, "run_dir": tmp_path / "run9", "out_dir": tmp_path / "out9",
                         "base_steps": 10_000, "lora_steps": 10_000})
    copy_run(trained, cfg.run_dir)
    run(cfg, ("base", "stripes"), minutes=0.05)
    step = json.loads((cfg.run_dir / "base" / "state.json").read_text())["step"]
    assert 2 < step < 10_000  # resumed from the copied checkpoint and trained on
    assert not cfg.out_dir.exists()

    export_pipeline(trained, cfg.out_dir)  # a finished base for the adapter stage
    run(cfg, ("stripes",), minutes=0.05)
    assert 0 < json.loads((cfg.run_dir / "lora_stripes" / "state.json").read_text())["step"] < 10_000
    assert not (cfg.out_dir / "loras").exists()


def test_minutes_count_from_a_stages_start(trained, tmp_path, monkeypatch):
    """A stage's clock starts on entry, so building its models and encoding its data count against --minutes
    (the clock used to start only after encoding: resumed base runs overran by ~4 min). A budget spent
    while encoding trains nothing, but checkpoints step 0 beside the latent cache, so the next run resumes
    without encoding again and trains from the same start."""
    import time

    from models.shapes import train as train_mod

    encode = train_mod.encode_dataset

    def slow_encode(*args, **kwargs):  # encoding that outlasts the budget below (it used to get all of it after)
        time.sleep(3)
        return encode(*args, **kwargs)

    monkeypatch.setattr(train_mod, "encode_dataset", slow_encode)
    cfg = TrainConfig(**{**trained.__dict__, "run_dir": tmp_path / "run10", "out_dir": tmp_path / "out10"})
    copy_run(trained, cfg.run_dir)
    shutil.rmtree(cfg.run_dir / "base")
    (cfg.run_dir / "base_latents.safetensors").unlink(missing_ok=True)
    assert train_mod.train_base(cfg, minutes=2 / 60) is False
    assert json.loads((cfg.run_dir / "base" / "state.json").read_text())["step"] == 0
    assert (cfg.run_dir / "base_latents.safetensors").is_file()
    assert train_mod.train_base(cfg) is True
    assert json.loads((cfg.run_dir / "base" / "state.json").read_text())["step"] == cfg.base_steps


def test_export_loads_in_our_engine_and_stock_diffusers(trained):
    from diffusers import StableDiffusionPipeline

    from models.engine import Engine, GenerationRequest
    from models.loading import load_pipeline

    out = export_pipeline(trained)
    scale = json.loads((trained.run_dir / "latent_scale.json").read_text())["scaling_factor"]
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == pytest.approx(scale)
    model = load_pipeline(out)
    assert model.native_size == (64, 64) and model.vae_scale_factor == 4
    img = Engine(model).generate([GenerationRequest("a red circle", steps=2, seed=0)])[0].images[0]
    assert img.shape == (64, 64, 3)
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red circle", num_inference_steps=2, guidance_scale=4.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images[0]
    assert ref.shape == (64, 64, 3)


def test_lora_stage_writes_a_diffusers_lora(trained):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    from models.engine import Engine, GenerationRequest
    from models.loading import load_pipeline

    export_pipeline(trained)
    path = train_lora(trained, "outline")
    assert path.name == "outline.safetensors"
    eng = Engine(load_pipeline(trained.out_dir), lora_dir=str(path.parent))
    base = eng.generate([GenerationRequest("a red circle", steps=2, seed=0)])[0].images[0]
    styled = eng.generate([GenerationRequest("a red circle", steps=2, seed=0, loras=(("outline", 1.0),))])[0]
    assert styled.images[0].shape == base.shape
    pipe = StableDiffusionPipeline.from_pretrained(trained.out_dir, local_files_only=True)
    pipe.load_lora_weights(str(path.parent), weight_name="outline.safetensors", adapter_name="outline")
    assert "outline" in pipe.get_list_adapters()["unet"]
    assert np.isfinite(styled.images[0]).all()


def test_the_stripes_stage_has_its_own_timestep_weighting(trained, tmp_path, monkeypatch):
    """The stripes adapter trains with its own loss weight cap (by default every timestep weighed 1) and share
    of timesteps from [0, 400) (its stripes came out faint with the outline adapter's cap 5); the outline
    adapter keeps lora_snr_cap and uniform timesteps."""
    pytest.importorskip("peft")
    import math

    from models.shapes import train as train_mod

    made = []

    class Recording(train_mod.Denoising):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append((self.snr_cap, self.detail_share, self.detail_t))

    monkeypatch.setattr(train_mod, "Denoising", Recording)
    cfg = TrainConfig(**{**trained.__dict__, "run_dir": tmp_path / "run11", "out_dir": tmp_path / "out11",
                         "lora_steps": 1, "stripes_detail_share": 0.3})
    export_pipeline(trained, cfg.out_dir)
    assert train_lora(cfg, "stripes").is_file() and train_lora(cfg, "outline").is_file()
    assert made == [(math.inf, 0.3, 400), (5.0, 0.0, 0)]
    assert (TrainConfig().stripes_snr_cap, TrainConfig().stripes_detail_share) == (math.inf, 0.0)


def test_merged_adapter_adds_a_trained_lora_as_stock_diffusers_does(trained, tmp_path):
    """The outline stage's pair steps: a stripes adapter merged into the frozen weights of a UNet that PEFT
    wraps for the outline adapter gives what stock diffusers gives with that adapter loaded, and leaving the
    context restores the weights exactly."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    from models.loading import load_pipeline
    from models.shapes import architecture as arch
    from models.shapes.train import MergedAdapter

    out = export_pipeline(trained)
    if not (out / "loras" / "stripes.safetensors").is_file():
        train_lora(trained, "stripes")
    gen = torch.Generator().manual_seed(0)
    sd = {k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in load_file(out / "loras" / "stripes.safetensors").items()}
    save_file(sd, tmp_path / "stripes.safetensors")  # a trained-looking adapter: the few-step one is nearly zero

    unet = load_pipeline(out, device="cpu").unet
    unet.add_adapter(LoraConfig(r=arch.LORA_RANK, lora_alpha=arch.LORA_RANK, init_lora_weights="gaussian",
                                target_modules=list(arch.LORA_TARGETS)))  # B = 0: adds nothing yet
    merged = MergedAdapter(unet, tmp_path / "stripes.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.load_lora_weights(str(tmp_path), weight_name="stripes.safetensors")
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([500, 20])
    c = torch.randn(2, 8, 128, generator=gen)
    with torch.no_grad():
        plain = unet(x, t, c).sample
        with merged.on():
            both = unet(x, t, c).sample
        stock = pipe.unet(x, t, c).sample
        after = unet(x, t, c).sample
    assert (both - plain).abs().max() > 1e-2
    assert torch.allclose(both, stock, atol=1e-4), (both - stock).abs().max()
    assert torch.equal(after, plain)


def test_outline_stage_trains_part_of_its_steps_with_the_stripes_adapter(trained, tmp_path):
    pytest.importorskip("peft")
    from unittest import mock

    from models.shapes import train

    export_pipeline(trained)
    if not (trained.out_dir / "loras" / "stripes.safetensors").is_file():
        train_lora(trained, "stripes")
    cfg = TrainConfig(**{**trained.__dict__, "run_dir": tmp_path / "run7", "lora_steps": 4, "lora_pairs": 0.5})
    entered = []
    real_on = train.MergedAdapter.on

    def on(self):
        entered.append(True)
        return real_on(self)

    with mock.patch.object(train.MergedAdapter, "on", on):
        path = train_lora(cfg, "outline")
    assert path.is_file() and len(entered) == 2  # steps 1 and 3 of 4


@pytest.mark.parametrize("stage", ["vae", "base"])
def test_a_resumed_stage_continues_the_run_it_stopped(trained, tmp_path, monkeypatch, stage):
    """Checkpoints hold the optimizer state and the random streams, so a stage that the timer stopped (at
    whatever step it reached) and that was run again continues the same run: the VAE stage ends bit-identical
    to a run straight through. The base stage ends within float rounding of it (weights ~3e-7 apart here,
    from a cause not found; the optimizer's moments 8e-7 apart relatively), where a resume that drew new
    random streams (as before they were checkpointed) trains on other batches: moments 36% apart here."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    import models.shapes.train_common as common
    from models.shapes.train import train_base
    from models.shapes.train_vae import train_vae

    train = {"vae": train_vae, "base": train_base}[stage]

    def config(name: str) -> TrainConfig:
        cfg = TrainConfig(**{**trained.__dict__, "run_dir": tmp_path / name, "vae_steps": 6, "base_steps": 6})
        for part in ("vae", "tokenizer"):  # the base stage's VAE and tokenizer; no base checkpoint
            shutil.copytree(trained.run_dir / part, cfg.run_dir / part)
        if stage == "vae":
            shutil.rmtree(cfg.run_dir / "vae")
        return cfg

    def resumed(name: str) -> dict[str, torch.Tensor]:
        cfg = config(name)
        clock = iter(range(0, 10_000, 10))  # a fake clock, 10 s a reading: --minutes 1 stops the loop part-way
        with monkeypatch.context() as m:
            m.setattr(common, "time", SimpleNamespace(monotonic=lambda: next(clock)))
            assert train(cfg, 1.0) is False
        assert 0 < json.loads((cfg.run_dir / stage / "state.json").read_text())["step"] < 6
        assert train(cfg) is True
        return load_file(cfg.run_dir / stage / "optimizer.safetensors")

    def apart(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        keys = [k for k in a if k.endswith("exp_avg")]
        return float(torch.cat([a[k].flatten() - b[k].flatten() for k in keys]).norm()
                     / torch.cat([a[k].flatten() for k in keys]).norm())

    straight = config("straight")
    assert train(straight) is True
    reference = load_file(straight.run_dir / stage / "optimizer.safetensors")
    if stage == "vae":
        got = resumed("split")
        assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
        a = load_file(straight.run_dir / "vae" / "vae.safetensors")
        b = load_file(tmp_path / "split" / "vae" / "vae.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:
        assert apart(reference, resumed("split")) < 1e-3
        monkeypatch.setattr(common.Randomness, "restore", lambda self, state: None)
        assert apart(reference, resumed("fresh streams")) > 0.1


def test_base_stage_can_start_from_an_exported_pipeline(trained, tmp_path):
    from safetensors.torch import load_file

    from models.shapes.train import train_base

    out = export_pipeline(trained)
    cfg = TrainConfig(run_dir=tmp_path / "run2", out_dir=tmp_path / "out2", base_steps=0, base_batch=4,
                      base_images=16, init_from=out, checkpoint_minutes=60)
    import shutil

    shutil.copytree(trained.run_dir / "vae", cfg.run_dir / "vae")
    train_base(cfg)  # zero steps: the checkpoint holds exactly the initial weights
    saved = load_file(cfg.run_dir / "base" / "ema_unet.safetensors")
    exported = load_file(next((out / "unet").glob("*.safetensors")))
    assert all(torch.equal(saved[k], exported[k]) for k in exported)


def copy_run(trained, run_dir):
    import shutil

    for part in ("vae", "base", "tokenizer", "latent_scale.json"):
        src = trained.run_dir / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, run_dir / part)


def test_base_stage_weights_the_object(trained, tmp_path):
    """The base stage's loss is weighted near the object (``base_object_weight``): one step from the same
    checkpoint, seed and batch moves the UNet differently with and without it, and identically twice without."""
    from safetensors.torch import load_file

    from models.shapes.train import train_base

    def one_step(name: str, weight: float, below_t: int = 1000, everywhere: int = 0) -> dict[str, torch.Tensor]:
        cfg = TrainConfig(**{**trained.__dict__, "run_dir": tmp_path / name, "base_steps": 3,
                             "base_object_weight": weight, "base_object_weight_t": below_t,
                             "base_object_weight_everywhere": everywhere})
        copy_run(trained, cfg.run_dir)  # its base checkpoint is at step 2: one more step
        train_base(cfg)
        return load_file(cfg.run_dir / "base" / "unet.safetensors")

    plain, again, weighted = one_step("a", 0.0), one_step("b", 0.0), one_step("c", 3.0)
    key = "conv_out.weight"
    assert torch.equal(plain[key], again[key])
    assert not torch.allclose(plain[key], weighted[key])
    # ``base_object_weight_t``: the weight applies only at timesteps below it (0: never; 1000: always).
    assert torch.equal(one_step("d", 3.0, 0)[key], plain[key])
    assert torch.equal(one_step("e", 3.0, 1000)[key], weighted[key])
    # ``base_object_weight_everywhere``: before that step the gate is lifted (this step is step 2: 3 lifts it).
    assert torch.equal(one_step("f", 3.0, 0, everywhere=3)[key], weighted[key])
    assert torch.equal(one_step("g", 3.0, 0, everywhere=2)[key], plain[key])


def test_vae_stage_weights_the_object(tmp_path):
    """The VAE stage's loss is weighted by ``object_weight`` (``vae_object_weight``): one step from the same
    seed and batch moves the weights differently with and without it."""
    from safetensors.torch import load_file

    from models.shapes.train_vae import train_vae

    def one_step(name: str, weight: float) -> dict[str, torch.Tensor]:
        cfg = TrainConfig(run_dir=tmp_path / name, vae_steps=1, vae_batch=2, vae_object_weight=weight,
                          checkpoint_minutes=60)
        train_vae(cfg)
        return load_file(cfg.run_dir / "vae" / "vae.safetensors")

    plain, again, weighted = one_step("a", 0.0), one_step("b", 0.0), one_step("c", 3.0)
    key = "decoder.conv_out.weight"
    assert torch.equal(plain[key], again[key])  # deterministic, so the difference below is the weighting
    assert not torch.allclose(plain[key], weighted[key])


def test_train_device_flag(monkeypatch):
    """``--device`` picks where training runs: auto is the CPU here; asking for CUDA on a machine without it
    fails at once with the flag named, not after a stage has encoded its data."""
    import argparse

    from models.errors import DiffuserveError
    from models.shapes.cli import add_parsers, config_from

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    assert config_from(parser.parse_args(["train", "shapes"])).device == "cpu"
    assert config_from(parser.parse_args(["train", "shapes", "--device", "cpu"])).device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DiffuserveError, match="--device cpu"):
        config_from(parser.parse_args(["train", "shapes", "--device", "cuda"]))


def test_compiled_base_stage_trains_the_same_weights(trained, tmp_path):
    """--compile traces the UNet and text encoder in place: a compiled step (traced with aot_eager, which
    runs the traced graphs without generating kernels) gives the eager step's weights under the same keys."""
    from safetensors.torch import load_file

    from models.shapes.train import train_base

    def one_step(name: str, backend: str) -> dict[str, torch.Tensor]:
        cfg = TrainConfig(**{**trained.__dict__, "run_dir": tmp_path / name, "base_steps": 3, "compile": backend})
        copy_run(trained, cfg.run_dir)  # its base checkpoint is at step 2: one more step
        train_base(cfg)
        return load_file(cfg.run_dir / "base" / "unet.safetensors") | load_file(cfg.run_dir / "base" / "text_encoder.safetensors")

    eager, traced = one_step("eager", ""), one_step("traced", "aot_eager")
    assert set(traced) == set(eager)
    assert all(torch.equal(traced[k], eager[k]) for k in eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did trace


def _bare_denoising(**kw):
    from models.shapes.train import Denoising

    return Denoising(None, None, None, TrainConfig(), seed=5, snr_cap=5.0, **kw)


def test_base_timesteps_detail_share():
    """``base_detail_share`` of the timesteps come from [0, base_detail_t): with share 0.5 and 400, 0.5 + 0.5 * 0.4
    of them are below 400 (0.4 with share 0). Share 0 draws exactly the stream it drew before the option."""
    plain, detail = _bare_denoising(), _bare_denoising(detail=(0.5, 400))
    t_plain, t_detail = plain.timesteps(20000), detail.timesteps(20000)
    assert torch.equal(t_plain, torch.randint(0, 1000, (20000,), generator=torch.Generator().manual_seed(5)))
    assert (t_plain < 400).float().mean().item() == pytest.approx(0.4, abs=0.02)
    assert (t_detail < 400).float().mean().item() == pytest.approx(0.7, abs=0.02)
    assert int(t_detail.min()) >= 0 and int(t_detail.max()) <= 999


def test_attribute_drop_sets_how_often_captions_leave_attributes_out():
    """``attribute_drop`` reaches ``data.caption``: at 1 every caption names nothing ("a shape", or "" when the
    whole caption is dropped for CFG); at 0 every one names all five; at 0.2 (the default) the stream of
    captions is the one the stage drew before the option."""
    import random

    from models.shapes.data import caption, random_scene
    from models.shapes.train import Denoising

    scenes = [random_scene(random.Random(i)) for i in range(200)]
    job = Denoising(None, None, None, TrainConfig(attribute_drop=1.0), seed=5, snr_cap=5.0)
    assert set(job.captions(scenes)) <= {"", "a shape", "shape"}
    job = Denoising(None, None, None, TrainConfig(attribute_drop=0.0), seed=5, snr_cap=5.0)
    captions = job.captions(scenes)
    assert sum(bool(c) for c in captions) > 150
    assert all(s.color in c and s.background in c for s, c in zip(scenes, captions, strict=True) if c)
    default, rng = _bare_denoising().captions(scenes), _bare_denoising().rand.py
    assert default == ["" if rng.random() < 0.1 else caption(s, rng) for s in scenes]


def test_base_batches_favour_small_objects():
    """``Denoising.latents`` with odds draws images in proportion to them: small objects at odds 2 against
    large at 1, half the images small, make 2/3 of the draws; each latent is its image's."""
    job = _bare_denoising()
    mean = torch.arange(1000, dtype=torch.float32).view(1000, 1, 1, 1)
    small = torch.arange(1000) % 2 == 0
    idx, z0 = job.latents(mean, torch.zeros_like(mean), 20000, 1.0, torch.where(small, 2.0, 1.0))
    assert small[idx].float().mean().item() == pytest.approx(2 / 3, abs=0.02)
    assert torch.equal(z0.view(-1), torch.tensor(idx, dtype=torch.float32))
    idx, _ = job.latents(mean, torch.zeros_like(mean), 20000, 1.0)
    assert small[idx].float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_train_cli_base_sampling_flags():
    import argparse

    from models.shapes.cli import add_parsers, config_from

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    cfg = config_from(parser.parse_args(["train", "shapes"]))
    assert (cfg.base_small_weight, cfg.base_detail_share) == (1.0, 0.0)
    cfg = config_from(parser.parse_args(["train", "shapes", "--base-small-weight", "2", "--base-detail-share", "0.3",
                                         "--stripes-detail-share", "0", "--stripes-snr-cap", "5",
                                         "--stripes-code", "0.5", "--stripes-checker", "0", "--attribute-drop", "0.4",
                                         "--base-object-weight-t", "1000", "--base-object-weight-everywhere", "0"]))
    assert (cfg.base_small_weight, cfg.base_detail_share) == (2.0, 0.3)
    assert (cfg.stripes_detail_share, cfg.stripes_snr_cap) == (0.0, 5.0)
    assert (cfg.stripes_code, cfg.stripes_checker, cfg.outline_code, cfg.attribute_drop) == (0.5, 0.0, 2.0, 0.4)
    assert (cfg.base_object_weight_t, config_from(parser.parse_args(["train", "shapes"])).base_object_weight_t) == (1000, 400)
    default = config_from(parser.parse_args(["train", "shapes"]))
    assert (cfg.base_object_weight_everywhere, default.base_object_weight_everywhere) == (0, 6000)
    refine = config_from(parser.parse_args(["train", "shapes", "--refine-steps", "5", "--refine-images", "32",
                                            "--refine-min-iou", "0"]))
    assert (refine.refine_steps, refine.refine_images, refine.refine_min_iou) == (5, 32, 0.0)
    assert (default.refine_steps, default.refine_images, default.refine_min_iou) == (600, 1536, 0.8)
    from models.errors import InvalidRequest

    for flag, value in (("--base-small-weight", "0"), ("--base-detail-share", "1.5"), ("--base-detail-share", "-0.1"),
                        ("--stripes-detail-share", "2"), ("--attribute-drop", "1.5"), ("--refine-min-iou", "1.2")):
        with pytest.raises(InvalidRequest, match=flag):
            config_from(parser.parse_args(["train", "shapes", flag, value]))
