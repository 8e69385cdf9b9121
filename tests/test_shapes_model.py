"""The bundled 'shapes' model: loads in stock diffusers unchanged (adapters too) and draws what it's told."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.cli import DEFAULT_MODEL

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL / "model_index.json").is_file(),
                                reason="the bundled shapes model is not in this checkout yet")

PROMPT = "a large red circle at the top left on a blue background"


@pytest.fixture(scope="module")
def shapes_engine():
    from models.engine import Engine
    from models.loading import load_pipeline

    return Engine(load_pipeline(DEFAULT_MODEL), lora_dir=str(DEFAULT_MODEL / "loras"))


def test_size_and_defaults(shapes_engine):
    m = shapes_engine.model
    assert m.native_size == (64, 64) and m.vae_scale_factor == 4
    total = sum(p.stat().st_size for p in DEFAULT_MODEL.rglob("*.safetensors"))
    assert total <= 30 * 2**20


def test_attention_heads_are_32_wide(shapes_engine):
    """diffusers reads ``attention_head_dim`` as a head count: the bundled UNet must have heads of size 32, not
    32 heads of size 2 and 4 (the first weights had those; their softmax was a third of the compiled UNet's
    CPU time)."""
    from diffusers.models.attention_processor import Attention

    attns = [m for m in shapes_engine.model.unet.modules() if isinstance(m, Attention)]
    assert len(attns) == 14
    assert {a.inner_dim // a.heads for a in attns} == {32}


def test_stock_diffusers_gives_the_same_image(shapes_engine):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from models.engine import GenerationRequest

    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             solver_order=2)
    ref = pipe(PROMPT, num_inference_steps=20, guidance_scale=4.0, generator=torch.Generator().manual_seed(3),
               output_type="np").images[0]
    ref = (ref * 255).round().astype(int)
    ours = shapes_engine.generate([GenerationRequest(PROMPT, steps=20, guidance=4.0, seed=3,
                                                     sampler="dpmpp_2m")])[0].images[0]
    assert np.abs(ours.astype(int) - ref).max() <= 2


@pytest.mark.parametrize("adapter", ["outline", "stripes"])
def test_stock_load_lora_weights_gives_the_same_image(shapes_engine, adapter):
    pytest.importorskip("peft")
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from models.engine import GenerationRequest

    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             solver_order=2)
    pipe.load_lora_weights(str(DEFAULT_MODEL / "loras"), weight_name=f"{adapter}.safetensors", adapter_name=adapter)
    ref = pipe(PROMPT, num_inference_steps=20, guidance_scale=4.0, generator=torch.Generator().manual_seed(3),
               output_type="np").images[0]
    ref = (ref * 255).round().astype(int)
    ours = shapes_engine.generate([GenerationRequest(PROMPT, steps=20, guidance=4.0, seed=3, sampler="dpmpp_2m",
                                                     loras=((adapter, 1.0),))])[0].images[0]
    assert np.abs(ours.astype(int) - ref).max() <= 2


def test_prompts_change_the_picture(shapes_engine):
    """A CI-sized adherence check on 24 held-out prompts (the full table is in the model card: 200 prompts
    gave background 100%, colour 100%, size 100%, shape 96.0%, position 100%; these 24: 100% each). The floors
    sit far above chance (1/8 background, 1/7 colour, 1/2 size, 1/3 shape, 1/9 position) and below the
    measured rates by about two standard errors at n = 24."""
    from models.shapes.evaluate import evaluate, held_out_scenes

    report = evaluate(shapes_engine, n=24, adapters=False)
    assert report["background"] >= 0.9 and report["color"] >= 0.9, report
    assert report["size"] >= 0.9 and report["shape"] >= 0.8 and report["position"] >= 0.85, report
    # Shape per size: both sizes occur in 24 held-out scenes, and the two rates average back to the whole.
    by_size = report["shape_by_size"]
    scenes = held_out_scenes(24)
    counts = {size: sum(s.size == size for s in scenes) for size in ("small", "large")}
    assert set(by_size) == {"small", "large"} and min(counts.values()) > 0
    assert sum(by_size[k] * counts[k] for k in counts) / 24 == pytest.approx(report["shape"]), report
    # Prompts naming colour and shape only ("a red circle", the README's first example): these weights draw
    # that colour and that shape in 23 / 24 each (95 / 91% of the evaluator's 100). The seed-0 run's base of
    # session 28 (object weight at every timestep) drew 17 / 24 each (65 / 67% of 100), often painting the
    # background in the object's colour, and would fail.
    assert report["partial"]["color"] >= 0.85 and report["partial"]["shape"] >= 0.8, report


def test_position_probe_centroid_and_estimates():
    from models.shapes.data import COLORS
    from models.shapes.probe import centroid, x0_estimates

    # The centroid of what differs from the background: a red square in the top-left cell of a blue image.
    img = np.zeros((64, 64, 3)) + np.array(COLORS["blue"]) / 255
    img[6:18, 4:16] = np.array(COLORS["red"]) / 255
    cx, cy = centroid(img, COLORS["blue"])
    assert abs(cx - 9.5) < 0.01 and abs(cy - 11.5) < 0.01
    assert np.isnan(centroid(np.zeros((8, 8, 3)), (0, 0, 0))[0])  # nothing but background
    est = x0_estimates(DEFAULT_MODEL, positions=("top left", "bottom right"), timesteps=(999, 600))
    assert set(est) == {(t, p) for t in (999, 600) for p in ("top left", "bottom right")}
    assert all(e.shape == (64, 64, 3) and e.min() >= 0 and e.max() <= 1 for e in est.values())


def test_vae_round_trip_is_the_ceiling_and_keeps_the_styles(shapes_engine):
    """The evaluator reading renders back after encode -> decode alone: colours and position survive, and
    each style reads as itself (the card's table gives the 200-render figures)."""
    from models.shapes.evaluate import format_report, vae_round_trip

    rt = vae_round_trip(shapes_engine.model.vae, n=16)
    assert set(rt) == {"plain", "outline", "stripes", "outline+stripes"}
    assert rt["plain"]["background"] >= 0.9 and rt["plain"]["position"] >= 0.9, rt
    assert rt["plain"]["outline"] <= 0.1 and rt["plain"]["stripes"] <= 0.1, rt
    # These 16 renders: outline 100%, outline on stripes 93.75% (a shallower decoder: ~79% of 200).
    assert rt["outline"]["outline"] >= 0.85 and rt["stripes"]["stripes"] >= 0.9, rt
    assert rt["outline+stripes"]["outline"] >= 0.8 and rt["outline+stripes"]["stripes"] >= 0.9, rt
    assert "VAE round trip, outline" in format_report({"n": 16, "vae_round_trip": rt})


def test_adapters_show_their_style_only_when_on(shapes_engine):
    """CI-sized version of the card's adapter rows (200 prompts there: outline 0 / 92.5% at scale 0 / 1,
    stripes 2 / 100%, both 90.5%; these 32: outline 0 / 87.5%, stripes 0 / 100%, both 81.25%), with room for
    three or four misses more (the link 9 weights gave 75% and 62.5% on the first 16 of these, and would fail)."""
    from models.shapes.evaluate import adapter_effect, by_distance, format_report, held_out_scenes

    scenes, hits = held_out_scenes(32), {}
    eff = adapter_effect(shapes_engine, scenes, 10_000, None, 16, scales=(0.0, 1.0), per_scene=hits)
    assert "outline@0.5" not in eff and "stripes@0" in eff  # one plain set read for both adapters at 0
    assert set(hits) == set(eff) and all(sum(hits[k]) / 32 == v for k, v in eff.items())
    # The same hits by the pair's colour distance, as the evaluator's report gives them.
    rows = {k: by_distance(scenes, hits[k]) for k in ("outline@1", "outline+stripes@1 both")}
    assert sum(h for h, _ in rows["outline@1"]["bins"].values()) == round(eff["outline@1"] * 32)
    assert sum(n for _, n in rows["outline@1"]["bins"].values()) == 32
    assert "outline@1 by colour distance: 0-90 " in format_report({"n": 32, "adapters_by_distance": rows})
    assert eff["stripes@1"] >= 0.9 and eff["stripes@0"] <= 0.1, eff
    assert eff["outline@1"] >= 0.75 and eff["outline@0"] <= 0.07, eff
    assert eff["outline+stripes@1 both"] >= 0.7, eff
    # The second reading (analyze(close_pairs=True)) of the same images: faint rings on close colours count.
    assert eff["(close pairs) outline@1"] >= 0.75 and eff["(close pairs) outline@0"] <= 0.07, eff
    assert eff["(close pairs) both"] >= 0.7, eff


def test_eval_cli_writes_the_report_the_vae_ceiling_and_the_pictures(tmp_path):
    import json
    import subprocess
    import sys

    def run(*args):
        out = subprocess.run([sys.executable, "-m", "workers.cli", "eval", "shapes", *args], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    text = run("--vae-only", "-n", "6", "--json", str(tmp_path / "vae.json"))
    assert "VAE round trip, stripes" in text
    assert set(json.loads((tmp_path / "vae.json").read_text())["vae_round_trip"]) == {"plain", "outline", "stripes", "outline+stripes"}
    text = run("-n", "2", "--seed", "20000", "--steps", "4", "--no-adapters", "--pictures", str(tmp_path), "--json",
               str(tmp_path / "eval.json"))
    # The model card's two pictures (models/shapes/card.py), at 2x: prompts x seeds 0-3, and each adapter's
    # three prompts at scales 0, 0.5, 1.
    from PIL import Image

    from models.shapes.card import PROMPTS

    assert Image.open(tmp_path / "grid.png").size == (64 * 2 * 4, 64 * 2 * len(PROMPTS))
    assert Image.open(tmp_path / "adapters.png").size == (64 * 2 * 3, 64 * 2 * 6)
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["n"] == 2 and 0 <= report["position"] <= 1 and "position:" in text
    assert report["seed"] == 20_000 and "held-out prompts: 2 from seed 20000" in text
    assert report["engine_mode"] == "exact" and "(engine mode exact)" in text
    assert all("->" in k and v >= 1 for k, v in report["shape_misreads"].items()), report
