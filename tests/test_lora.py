"""LoRA adapters: exact activation, both namings, stock-diffusers equivalence, and hostile files and names."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models.engine import Engine, GenerationRequest
from models.errors import AdapterNotFound, InvalidAdapter, InvalidRequest
from models.lora import LoraRegistry, check_adapter_name, normalize_set
from models.testing import random_lora_state_dict

REQ = dict(prompt="a red circle", steps=6, guidance=5.0, seed=21, sampler="euler")


def img(engine, loras=()):
    return engine.generate([GenerationRequest(**REQ, loras=tuple(loras))])[0].images[0].astype(int)


def test_adapter_changes_image_and_switching_back_restores_exactly(engine):
    base = img(engine)
    styled = img(engine, [("style_a", 1.0)])
    assert np.abs(styled - base).max() > 10
    assert np.array_equal(img(engine), base)  # pristine weights restored, no drift
    assert np.array_equal(img(engine, [("style_a", 1.0)]), styled)


def test_scale_zero_is_the_base_model(engine):
    assert np.array_equal(img(engine, [("style_a", 0.0)]), img(engine))


def test_peft_and_kohya_namings_are_the_same_adapter(engine):
    assert np.abs(img(engine, [("style_a", 0.8)]) - img(engine, [("style_a_kohya", 0.8)])).max() <= 1


def test_merge_is_w_plus_scale_b_a(engine, lora_dir):
    from safetensors.torch import load_file

    sd = load_file(lora_dir / "style_b.safetensors")  # rank 2, alpha 1: factor alpha/r = 0.5
    name = next(k for k in sd if k.endswith("lora_A.weight"))
    module = name[len("unet.") : -len(".lora_A.weight")]
    w = dict(engine.model.unet.named_modules())[module].weight
    engine.lora.activate(())
    before = w.detach().clone()
    engine.lora.activate((("style_b", 0.6),))
    a, b = sd[name], sd[name.replace("lora_A", "lora_B")]
    assert torch.allclose(w, before + 0.6 * 0.5 * (b @ a), atol=1e-6)
    engine.lora.activate(())
    assert torch.equal(w, before)


def test_two_adapters_combine(engine):
    both = img(engine, [("style_a", 0.5), ("style_b", 1.0)])
    assert np.abs(both - img(engine, [("style_a", 0.5)])).max() > 0
    assert np.array_equal(both, img(engine, [("style_b", 1.0), ("style_a", 0.5)]))  # order-free


def test_text_encoder_part_changes_prompt_embedding_cache_key(engine):
    key = engine.lora.text_encoder_key((("style_a", 1.0), ("style_b", 1.0)))
    assert key == (("style_a", 1.0),)  # style_b has no text-encoder layers


def test_same_image_as_stock_diffusers_load_lora_weights(engine, tiny_model_dir, lora_dir):
    pytest.importorskip("peft")
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora_dir), weight_name="style_a.safetensors", adapter_name="style_a")
    pipe.set_adapters(["style_a"], adapter_weights=[0.7])
    ref = pipe(REQ["prompt"], num_inference_steps=6, guidance_scale=5.0,
               generator=torch.Generator("cpu").manual_seed(21), output_type="np").images[0]
    ref = (ref * 255).round().astype(int)
    assert np.abs(img(engine, [("style_a", 0.7)]) - ref).max() <= 2


def test_cache_is_lru_bounded_by_count_and_counts_events(tiny_model, lora_dir):
    eng = Engine(tiny_model, lora_dir=str(lora_dir), lora_cache_count=1)
    st = eng.adapters.stats
    eng.lora.load(normalize_set([("style_a", 1.0)]))
    eng.lora.load(normalize_set([("style_a", 1.0)]))
    eng.lora.load(normalize_set([("style_b", 1.0)]))
    assert (st.hits, st.misses, st.loads, st.evictions) == (1, 2, 2, 1)
    assert "style_a" not in eng.adapters and "style_b" in eng.adapters
    assert st.load_seconds > 0


def test_cache_bounded_by_bytes(tiny_model, lora_dir):
    eng = Engine(tiny_model, lora_dir=str(lora_dir), lora_cache_bytes=1)
    eng.lora.load(normalize_set([("style_a", 1.0)]))
    eng.lora.load(normalize_set([("style_b", 1.0)]))
    assert len(eng.adapters._items) == 1


@pytest.mark.parametrize(
    "name",
    ["../x", "..", "a/b", "a\\b", "/etc/passwd", "%2e%2e", "x\x00y", "", ".hidden", "a..b", "C:\\x", "x" * 200],
)
def test_hostile_names_refused(name):
    with pytest.raises(InvalidRequest) as e:
        check_adapter_name(name)
    assert e.value.param == "loras"


def test_symlink_out_of_directory_refused(tmp_path, lora_dir):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "reg").mkdir()
    save_file({"unet.x.lora_A.weight": torch.zeros(1, 1)}, outside / "evil.safetensors")
    os.symlink(outside / "evil.safetensors", tmp_path / "reg" / "evil.safetensors")
    reg = LoraRegistry(tmp_path / "reg")
    with pytest.raises(InvalidRequest):
        reg.path_for("evil")
    assert "evil" not in reg.names()


class _Boom:
    def __reduce__(self):
        return (open, (os.environ["DIFFUSERVE_TEST_MARKER"], "w"))


def test_pickle_renamed_safetensors_is_refused_and_never_executed(tmp_path, tiny_model, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("DIFFUSERVE_TEST_MARKER", str(marker))
    reg_dir = tmp_path / "reg"
    reg_dir.mkdir()
    (reg_dir / "evil.safetensors").write_bytes(pickle.dumps(_Boom()))
    torch.save({"x": torch.zeros(1)}, reg_dir / "torchsave.safetensors")
    eng = Engine(tiny_model, lora_dir=str(reg_dir))
    for name in ("evil", "torchsave"):
        with pytest.raises(InvalidAdapter):
            eng.prepare(GenerationRequest("a", steps=2, loras=((name, 1.0),)))
    assert not marker.exists()


def test_adapter_for_another_model_refused(tmp_path, tiny_model):
    reg = tmp_path / "reg"
    reg.mkdir()
    save_file({"unet.not.a.module.lora_A.weight": torch.zeros(2, 4), "unet.not.a.module.lora_B.weight":
               torch.zeros(4, 2)}, reg / "other.safetensors")
    sd = random_lora_state_dict(tiny_model.unet, None)
    k = next(iter(sd))
    sd[k] = torch.zeros(sd[k].shape[0], sd[k].shape[1] + 3)
    save_file(sd, reg / "wrongshape.safetensors")
    eng = Engine(tiny_model, lora_dir=str(reg))
    with pytest.raises(InvalidAdapter) as e:
        eng.prepare(GenerationRequest("a", steps=2, loras=(("other", 1.0),)))
    assert "not.a.module" in e.value.message
    with pytest.raises(InvalidAdapter):
        eng.generate([GenerationRequest("a", steps=2, loras=(("wrongshape", 1.0),))])
    assert eng.lora.active == ()  # a failed merge leaves the base weights in place


def test_unknown_and_duplicate_adapters(engine):
    with pytest.raises(AdapterNotFound) as e:
        engine.prepare(GenerationRequest("a", steps=2, loras=(("nope", 1.0),)))
    assert "style_a" in e.value.message  # lists what is available
    with pytest.raises(InvalidRequest):
        normalize_set([("style_a", 1.0), ("style_a", 0.5)])


def test_registry_lists_only_safetensors(lora_dir):
    (lora_dir / "notes.txt").write_text("x")
    assert LoraRegistry(lora_dir).names() == ["style_a", "style_a_kohya", "style_b"]


def test_reading_an_adapter_again_and_again_keeps_no_memory(tmp_path, lora_dir):
    """A worker cycling more adapters than its cache holds re-reads files all day: no per-read growth.
    (safe_open(...).get_tensor kept ~4 KB of Python objects and ~20 KB of RSS per read; the soak saw it.)"""
    import gc
    import tracemalloc

    from safetensors.torch import load_file

    sd = load_file(lora_dir / "style_b.safetensors")
    save_file(sd, tmp_path / "with_meta.safetensors", metadata={"ss_network_alpha": "1.0"})
    registry = LoraRegistry(tmp_path)
    read, metadata = registry.read("with_meta")
    assert metadata == {"ss_network_alpha": "1.0"}
    assert read.keys() == sd.keys() and all(torch.equal(read[k], sd[k]) for k in sd)
    save_file(sd, tmp_path / "no_meta.safetensors")
    assert registry.read("no_meta")[1] is None
    for _ in range(10):
        registry.read("with_meta")
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(300):
            registry.read("with_meta")
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes kept after 300 reads"


# -- per-sample adapters: one UNet call for samples with different adapter sets ------------------------------
MIXED = [(), (("style_a", 0.8),), (("style_b", 1.0),), (("style_a", 0.5), ("style_b", 1.0))]


@pytest.fixture(scope="module")
def per_sample_engine(tiny_model_dir, lora_dir):
    from models.loading import load_pipeline

    return Engine(load_pipeline(tiny_model_dir), mode="exact", lora_dir=str(lora_dir), lora_mode="per_sample")


def test_per_sample_adapters_batch_mixed_sets_and_match_merged(engine, per_sample_engine):
    reqs = [GenerationRequest(**{**REQ, "seed": 30 + k}, loras=loras) for k, loras in enumerate(MIXED)]
    samples = [s for r in reqs for s in per_sample_engine.prepare(r)]
    assert len(per_sample_engine.groups(samples)) == 1  # one group: every step is one UNet call for all four
    assert len(engine.groups([s for r in reqs for s in engine.prepare(r)])) == 4  # merge mode: one per set
    mixed = [res.images[0].astype(int) for res in per_sample_engine.generate(reqs)]
    merged = [engine.generate([r])[0].images[0].astype(int) for r in reqs]
    for k, (a, b) in enumerate(zip(mixed, merged, strict=True)):
        assert np.abs(a - b).max() <= 2, f"set {MIXED[k]}: W x + s B (A x) vs (W + s B A) x"
        if k:
            assert np.abs(a - mixed[0]).max() > 10  # and the adapters did change the picture


def test_per_sample_merges_the_common_set_and_hooks_the_rest(engine, per_sample_engine):
    # Three samples with style_a, one with none, one with style_b: style_a is merged; the plain one gets
    # - style_a, the style_b one + style_b - style_a, by hooks on its rows alone.
    sets = [MIXED[1]] * 3 + [MIXED[0], MIXED[2]]
    reqs = [GenerationRequest(**{**REQ, "seed": 60 + k}, loras=loras) for k, loras in enumerate(sets)]
    got = [res.images[0].astype(int) for res in per_sample_engine.generate(reqs)]
    assert per_sample_engine.lora.active == MIXED[1]  # the common set stays merged for the next step
    for k, r in enumerate(reqs):
        assert np.abs(got[k] - engine.generate([r])[0].images[0].astype(int)).max() <= 2, sets[k]
    unet = per_sample_engine.model.unet
    assert not any(m._forward_hooks for m in unet.modules())  # hooks live for one UNet call only
    per_sample_engine.lora.activate(())
    pristine = {k: v.clone() for k, v in unet.state_dict().items()}
    per_sample_engine.generate(reqs[:1])
    per_sample_engine.lora.activate(())
    assert all(torch.equal(pristine[k], v) for k, v in unet.state_dict().items())  # restored exactly


def test_per_sample_needs_exact_mode(tiny_model):
    with pytest.raises(InvalidRequest) as e:
        Engine(tiny_model, mode="fast", lora_mode="per_sample")
    assert e.value.param == "lora_mode"
    with pytest.raises(InvalidRequest):
        Engine(tiny_model, lora_mode="sometimes")
