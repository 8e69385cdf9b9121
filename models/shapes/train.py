"""Training the bundled ``shapes`` model from a seed: VAE, then text encoder + UNet, then each LoRA adapter, then
the decoder once more on what the finished model generates (``train_refine``).

    diffuserve train shapes                      # all stages, resuming from runs/shapes if present
    diffuserve train shapes --stage base --minutes 30

Each stage checkpoints to ``<run>/<stage>/`` (weights, EMA and optimizer state as safetensors, and its
random streams) every few minutes and at its end, so an interrupted run resumes where it stopped and draws
the batches and noise an uninterrupted run would have (the VAE stages then end bit-identical to one; the
base stage within float rounding). ``export`` writes the diffusers pipeline directory plus
``loras/{outline,stripes}.safetensors``; a stage exports only once it has run all its steps, so
``--minutes`` never leaves a partly trained stage in the output directory (by default the shipped model).

The denoiser is trained as in Ho et al. (Algorithm 1): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, but
with the v target of Salimans & Ho (v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0), loss ||v - v_theta(x_t, t, c)||^2
weighted by min(SNR_t + 1, 5) / (SNR_t + 1): full weight wherever the noise dominates (where the layout, i.e.
position and shape, is decided), less on the nearly clean steps (the Min-SNR idea, Hang et al. 2023, without
its vanishing weight at low SNR: with min(SNR, 5) / (SNR + 1) every step above t = 500 of this schedule
weighed < 0.08, and the model trained that way did not learn where to put the object: the same seed gave
the same position for all nine position words); captions are dropped 10% of the time so classifier-free guidance works; an EMA
of the weights is what gets exported.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from models.schedules import NoiseSchedule
from models.shapes import architecture as arch
from models.shapes.data import caption
from models.shapes.latent_code import FACTOR
from models.shapes.train_common import (
    Checkpoint,
    Randomness,
    TrainConfig,
    adamw,
    deadline,
    descend,
    ema_update,
    loop,
    render_batch,
    render_workers,
    sample_scenes,
    set_lr,
)
from models.shapes.train_vae import (
    export_vae,
    finished,
    load_vae,
    object_weight,
    train_decoder,
    train_polish,
    train_vae,
)

log = logging.getLogger(__name__)
# Stripes before outline: the outline stage trains part of its steps with the stripes adapter on (train_lora).
# Refine last: it trains the decoder on what the finished base and outline adapter generate.
STAGES = ("vae", "decoder", "polish", "base", "stripes", "outline", "refine")
LORA_DATA_SEEDS = {"outline": 5, "stripes": 6}  # seed offsets of each adapter's data (as before the reorder)


# -- stage 2: text encoder + UNet --------------------------------------------------------------------
@torch.no_grad()
def encode_dataset(vae: Any, n: int, seed: int, style: str) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
    """Pre-render and pre-encode n scenes: the VAE posterior's mean and std (on the VAE's device), and the scenes."""
    rng = random.Random(seed)
    device = next(vae.parameters()).device
    means, stds, scenes = [], [], []
    for b in range(0, n, 256):
        x, sc = render_batch(rng, min(256, n - b), (style,))
        dist = vae.encode(x.to(device)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        scenes += sc
    return torch.cat(means), torch.cat(stds), scenes


def latent_scale(means: torch.Tensor) -> float:
    """SD's convention: scale latents to unit variance (1 / std of the posterior means)."""
    return float(1.0 / means.flatten().std())


class Denoising:
    """The denoising loss (v or epsilon target, capped-SNR weight) shared by the base and the LoRA stages."""

    def __init__(self, tokenizer: Any, text_encoder: Any, unet: Any, cfg: TrainConfig, seed: int,
                 snr_cap: float, rng_state: dict[str, Any] | None = None, detail: tuple[float, int] = (0.0, 0)) -> None:
        self.tok, self.te, self.unet, self.cfg, self.snr_cap = tokenizer, text_encoder, unet, cfg, snr_cap
        self.detail_share, self.detail_t = detail  # that share of timesteps drawn from [0, detail_t)
        sched = NoiseSchedule.from_config(arch.SCHEDULER_CONFIG)
        self.device = torch.device(cfg.device)  # timesteps and noise are drawn on the CPU, then moved
        self.abar = torch.from_numpy(sched.alphas_cumprod).float().to(self.device)
        self.v_prediction = sched.prediction_type == "v_prediction"
        # checkpointed: rand.state(); a resumed stage passes it back as rng_state
        self.rand = Randomness.resumed(seed, rng_state)
        if cfg.compile:  # in place (Module.compile): the state dicts keep their keys
            for module in (unet, text_encoder):
                module.compile(backend=cfg.compile, dynamic=False)

    def loss(self, z0: torch.Tensor, captions: list[str], weight: torch.Tensor | None = None,
             weight_below: int | None = None) -> torch.Tensor:
        """The batch's mean loss; ``weight`` (N x 1 x h x w, each averaging 1) weighs latent pixels within an
        image, at the timesteps below ``weight_below`` (default ``cfg.base_object_weight_t``; the others weigh
        every pixel 1)."""
        ids = self.tok(captions, padding="max_length", max_length=arch.MAX_TOKENS, truncation=True,
                       return_tensors="pt").input_ids
        emb = self.te(ids.to(self.device))[0]
        b = z0.shape[0]
        t = self.timesteps(b).to(self.device)
        eps = torch.randn(z0.shape, generator=self.rand.torch).to(self.device)
        a = self.abar[t].view(b, 1, 1, 1)
        x_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
        pred = self.unet(x_t, t, encoder_hidden_states=emb).sample
        snr = a / (1 - a)
        if self.v_prediction:  # v = sqrt(abar) eps - sqrt(1 - abar) x_0; weight 1 while noise dominates
            target = a.sqrt() * eps - (1 - a).sqrt() * z0
            w = (torch.clamp(snr + 1, max=self.snr_cap) / (snr + 1)).view(b)
        else:
            target = eps
            w = (torch.clamp(snr, max=self.snr_cap) / snr).view(b)
        err = F.mse_loss(pred, target, reduction="none")
        if weight is not None:
            below = self.cfg.base_object_weight_t if weight_below is None else weight_below
            err = err * torch.where((t < below).view(b, 1, 1, 1), weight, 1.0)
        return (err.mean(dim=(1, 2, 3)) * w).mean()

    def timesteps(self, b: int) -> torch.Tensor:
        """Uniform over the schedule, except ``detail_share`` of them uniform over [0, detail_t)."""
        t = torch.randint(0, len(self.abar), (b,), generator=self.rand.torch)
        if self.detail_share > 0:  # only then: the default draws the same stream as before the option existed
            low = torch.randint(0, self.detail_t, (b,), generator=self.rand.torch)
            t = torch.where(torch.rand(b, generator=self.rand.torch) < self.detail_share, low, t)
        return t

    def latents(self, mean: torch.Tensor, std: torch.Tensor, batch: int, scale: float,
                odds: torch.Tensor | None = None) -> tuple[list[int], torch.Tensor]:
        """A random batch of pre-encoded images (drawn in proportion to ``odds`` if given, else uniformly): their
        indices and latents drawn from their posteriors, scaled."""
        if odds is None:
            idx = torch.randint(0, len(mean), (batch,), generator=self.rand.torch)
        else:
            idx = torch.multinomial(odds, batch, replacement=True, generator=self.rand.torch)
        noise = torch.randn((batch, *mean.shape[1:]), generator=self.rand.torch).to(mean.device)
        return idx.tolist(), (mean[idx] + std[idx] * noise) * scale

    def captions(self, scenes: list[Any]) -> list[str]:
        drop, rng = self.cfg.attribute_drop, self.rand.py
        return ["" if rng.random() < self.cfg.caption_dropout else caption(s, rng, drop) for s in scenes]


def train_base(cfg: TrainConfig, minutes: float | None = None) -> bool:
    """Train the text encoder and UNet; True once all ``base_steps`` are done."""
    until = deadline(minutes)
    ckpt = Checkpoint(cfg.run_dir / "base")
    tok_dir = cfg.run_dir / "tokenizer"
    tokenizer = arch.build_tokenizer(tok_dir)
    torch.manual_seed(cfg.seed)
    unet, te = arch.build_unet().to(cfg.device), arch.build_text_encoder(tok_dir).to(cfg.device)
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    params = list(unet.parameters()) + list(te.parameters())
    opt = adamw(params, cfg.lr, 1e-2, cfg.device)
    modules = {"unet": unet, "text_encoder": te, "ema_unet": ema_unet, "ema_text_encoder": ema_te}
    if ckpt.exists():
        state = ckpt.load(modules, opt)
    else:
        state = {"step": 0}
        if cfg.init_from and (cfg.init_from / "unet").is_dir():
            # Continue from an exported pipeline (e.g. the committed weights) when no checkpoint survives.
            init_from_pipeline(cfg.init_from, unet, te)
            ema_unet.load_state_dict(unet.state_dict())
            ema_te.load_state_dict(te.state_dict())
            log.warning("initialised the UNet and text encoder from %s", cfg.init_from)
    cache = cfg.run_dir / "base_latents.safetensors"
    if cache.is_file():
        lat = load_file(cache)
        mean, std = lat["mean"], lat["std"]
        scenes = encode_scenes_only(cfg.base_images, cfg.seed + 1)
    else:
        # The VAE is needed only here: a resumed stage reads its latents from the cache.
        mean, std, scenes = encode_dataset(load_vae(cfg).to(cfg.device), cfg.base_images, cfg.seed + 1, "plain")
        save_file({"mean": mean.cpu().contiguous(), "std": std.cpu().contiguous()}, cache)
    scale = latent_scale(mean)
    (cfg.run_dir / "latent_scale.json").write_text(json.dumps({"scaling_factor": scale}))
    mean, std = mean.to(cfg.device), std.to(cfg.device)
    # Each image's loss weights on its latent pixels, computed once (the scenes are fixed; 1 KB an image, in
    # chunks: the pixel masks take 16 KB an image) and indexed like the latents.
    weights = torch.cat([object_weight(scenes[i:i + 1024], cfg.base_object_weight, factor=FACTOR, reach=1)
                         for i in range(0, len(scenes), 1024)]).to(cfg.device)
    odds = None
    if cfg.base_small_weight != 1:
        odds = torch.tensor([cfg.base_small_weight if s.size == "small" else 1.0 for s in scenes])
    job = Denoising(tokenizer, te, unet, cfg, cfg.seed * 7919 + state["step"], cfg.snr_cap, state.get("rng"),
                    detail=(cfg.base_detail_share, cfg.base_detail_t))
    torch.manual_seed(cfg.seed + state["step"])
    unet.train()
    te.train()

    def step_fn(step: int) -> torch.Tensor:
        set_lr(opt, cfg.lr, step, 500, cfg.base_steps)
        idx, z0 = job.latents(mean, std, cfg.base_batch, scale, odds)
        # The object weight at every timestep for the first steps (layout), then only below the gate (detail).
        below = len(job.abar) if step < cfg.base_object_weight_everywhere else cfg.base_object_weight_t
        loss = descend(opt, job.loss(z0, job.captions([scenes[i] for i in idx]), weights[idx], below), params)
        ema_update(ema_unet, unet, cfg.ema if step > 500 else 0.0)
        ema_update(ema_te, te, cfg.ema if step > 500 else 0.0)
        return loss

    return loop("base", cfg.base_steps, step_fn, lambda s: ckpt.save(modules, opt, s, {"rng": job.rand.state()}),
                state["step"], until, cfg.checkpoint_minutes)


def init_from_pipeline(path: Path, unet: Any, te: Any) -> None:
    unet.load_state_dict(load_file(next((path / "unet").glob("*.safetensors"))))
    te.load_state_dict(load_file(next((path / "text_encoder").glob("*.safetensors"))), strict=False)


def encode_scenes_only(n: int, seed: int) -> list[Any]:
    """The scenes of ``encode_dataset`` without rendering (same RNG stream), for a cached latent set."""
    rng = random.Random(seed)
    scenes: list[Any] = []
    for b in range(0, n, 256):
        scenes += sample_scenes(rng, min(256, n - b), ("plain",))
    return scenes


# -- stage 3: LoRA adapters ---------------------------------------------------------------------------
def export_pipeline(cfg: TrainConfig, out: Path | None = None) -> Path:
    """Write the diffusers pipeline directory from the VAE and the base stage's EMA weights."""
    out = out or cfg.out_dir
    tok_dir = cfg.run_dir / "tokenizer"
    unet, te = arch.build_unet(), arch.build_text_encoder(tok_dir)
    Checkpoint(cfg.run_dir / "base").load({"ema_unet": unet, "ema_text_encoder": te}, None)
    out.mkdir(parents=True, exist_ok=True)
    for name, m in (("unet", unet), ("text_encoder", te)):
        m.save_pretrained(out / name, safe_serialization=True)
    export_vae(cfg, out)
    shutil.copytree(tok_dir, out / "tokenizer", dirs_exist_ok=True)
    arch.write_pipeline_files(out)
    return out


def train_lora(cfg: TrainConfig, style: str, minutes: float | None = None) -> Path | None:
    """Fine-tune a rank-8 LoRA (PEFT, saved in diffusers' format) on one style, base model frozen. Returns the
    adapter file, written once all ``lora_steps`` are done (None: stopped at ``minutes``, resumable)."""
    until = deadline(minutes)
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from models.loading import load_pipeline

    model = load_pipeline(cfg.out_dir, device=cfg.device, dtype="fp32")  # trained in fp32 on a GPU too
    unet, te, vae = model.unet, model.text_encoder, model.vae
    unet.add_adapter(LoraConfig(r=arch.LORA_RANK, lora_alpha=arch.LORA_RANK, init_lora_weights="gaussian",
                                target_modules=list(arch.LORA_TARGETS)))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = adamw(params, cfg.lora_lr, 1e-2, cfg.device)
    ckpt = Checkpoint(cfg.run_dir / f"lora_{style}")
    lora_module = _ParamBag(unet)
    state = ckpt.load({"lora": lora_module}, opt) if ckpt.exists() else {"step": 0}
    data_seed = cfg.seed + LORA_DATA_SEEDS[style]
    data = {style: encode_dataset(vae, cfg.lora_images, data_seed, style)}
    partner = cfg.out_dir / "loras" / "stripes.safetensors"
    merged = None
    if style == "outline" and cfg.lora_pairs > 0 and partner.is_file():
        data["pair"] = encode_dataset(vae, cfg.lora_images, data_seed + 100, "outline+stripes")
        merged = MergedAdapter(unet, partner)
    if style == "outline":
        log.info("outline stage: %s", f"{cfg.lora_pairs:.0%} of steps with {partner} on" if merged else "no pair steps")
    scale = vae.config.scaling_factor
    snr_cap, detail = ((cfg.stripes_snr_cap, (cfg.stripes_detail_share, cfg.base_detail_t)) if style == "stripes"
                       else (cfg.lora_snr_cap, (0.0, 0)))
    job = Denoising(model.tokenizer, te, unet, cfg, cfg.seed * 31 + state["step"], snr_cap, state.get("rng"), detail)
    unet.train()

    def step_fn(step: int) -> torch.Tensor:
        set_lr(opt, cfg.lora_lr, step, 50, cfg.lora_steps)
        pair = merged is not None and int((step + 1) * cfg.lora_pairs) > int(step * cfg.lora_pairs)
        mean, std, scenes = data["pair" if pair else style]
        idx, z0 = job.latents(mean, std, cfg.lora_batch, scale)
        with merged.on() if pair else contextlib.nullcontext():
            return descend(opt, job.loss(z0, job.captions([scenes[i] for i in idx])))

    def save(step: int) -> None:
        ckpt.save({"lora": lora_module}, opt, step, {"rng": job.rand.state()})

    if not loop(f"lora {style}", cfg.lora_steps, step_fn, save, state["step"], until, cfg.checkpoint_minutes):
        return None
    (cfg.out_dir / "loras").mkdir(exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        cfg.out_dir / "loras", unet_lora_layers=get_peft_model_state_dict(unet), weight_name=f"{style}.safetensors"
    )
    return cfg.out_dir / "loras" / f"{style}.safetensors"


class MergedAdapter:
    """A trained LoRA adapter (a diffusers-format file), added into the frozen base weights of a UNet that
    PEFT has wrapped for training another adapter, and taken out again: ``with merged.on(): ...``. Same sum
    as serving both (W + B_1 A_1 + B_2 A_2, models/lora.py)."""

    def __init__(self, unet: torch.nn.Module, path: Path) -> None:
        from models.lora import LoraRegistry, parse_state_dict

        base = {n.removesuffix(".base_layer"): m for n, m in unet.named_modules() if hasattr(m, "weight")}
        sd, metadata = LoraRegistry(path.parent).read(path.stem)
        adapter = parse_state_dict(path.stem, sd, metadata, {"unet": set(base), "text_encoder": set()})
        # The base weights are frozen, so both versions are computed once, not on every pair step.
        self.weights = []
        for name, layer in adapter.unet.items():
            w = base[name].weight
            self.weights.append((w, w.detach().clone(), w.detach() + layer.delta(w.shape).to(w)))

    @contextlib.contextmanager
    def on(self):
        with torch.no_grad():
            for w, _, merged in self.weights:
                w.copy_(merged)
        try:
            yield
        finally:
            with torch.no_grad():
                for w, pristine, _ in self.weights:
                    w.copy_(pristine)


class _ParamBag(torch.nn.Module):
    """Exposes only a model's trainable parameters as a state dict (LoRA checkpoints)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self._model = [model]

    def state_dict(self, *a, **k):  # type: ignore[override]
        return {n: p.detach() for n, p in self._model[0].named_parameters() if p.requires_grad}

    def load_state_dict(self, sd, strict: bool = True):  # type: ignore[override]
        params = dict(self._model[0].named_parameters())
        with torch.no_grad():
            for n, v in sd.items():
                params[n].copy_(v)


def run(cfg: TrainConfig, stages: tuple[str, ...] = STAGES, minutes: float | None = None) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if torch.device(cfg.device).type == "cuda":  # TF32 matmuls and convolutions: fp32 training at tensor-core speed
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "config.json").write_text(json.dumps({k: str(v) for k, v in asdict(cfg).items()}, indent=2))
    with render_workers(cfg.render_workers):
        run_stages(cfg, stages, minutes)


def run_stages(cfg: TrainConfig, stages: tuple[str, ...], minutes: float | None) -> None:
    t0 = time.monotonic()
    for stage in stages:
        left = None if minutes is None else minutes - (time.monotonic() - t0) / 60
        if left is not None and left <= 0:  # not even a later stage's data encoding: run again to resume
            log.info("--minutes spent: stopping before stage %s", stage)
            return
        t_stage = time.monotonic()
        if not run_stage(cfg, stage, left):
            # Exporting now would put a partly trained stage into the output (by default the shipped model).
            log.info("--minutes spent during stage %s: checkpointed, nothing exported; run again to resume", stage)
            return
        log.info("stage %s done in %.1f min (data and export included)", stage, (time.monotonic() - t_stage) / 60)
    log.info("stages %s done in %.1f min", stages, (time.monotonic() - t0) / 60)
    if all(stage_done(cfg, s) for s in STAGES):
        log.info("every stage of the recipe is done: %s holds the finished model", cfg.out_dir)


def stage_done(cfg: TrainConfig, stage: str) -> bool:
    """Whether ``stage`` has run all its steps in ``cfg.run_dir``."""
    steps = {"vae": cfg.vae_steps, "decoder": cfg.decoder_steps, "polish": cfg.polish_steps, "base": cfg.base_steps,
             "stripes": cfg.lora_steps, "outline": cfg.lora_steps, "refine": cfg.refine_steps}[stage]
    return finished(cfg.run_dir / (f"lora_{stage}" if stage in LORA_DATA_SEEDS else stage), steps)


def run_stage(cfg: TrainConfig, stage: str, minutes: float | None) -> bool:
    """One stage, and its export once it has finished; False if it stopped at ``minutes`` first."""
    if stage == "vae":
        return train_vae(cfg, minutes)
    if stage == "decoder":
        if not train_decoder(cfg, minutes):
            return False
        if cfg.init_from and not Checkpoint(cfg.run_dir / "base").exists():
            # Continuing an exported pipeline: put the new VAE in it, for the adapter stages to train on.
            if not (cfg.out_dir / "model_index.json").is_file():
                shutil.copytree(cfg.init_from, cfg.out_dir, dirs_exist_ok=True)
            export_vae(cfg, cfg.out_dir)
        return True
    if stage == "polish":
        return train_polish(cfg, minutes)
    if stage == "refine":
        from models.shapes.train_refine import train_refine

        if not train_refine(cfg, minutes):
            return False
        export_vae(cfg, cfg.out_dir)
        return True
    if stage == "base":
        if not train_base(cfg, minutes):
            return False
        export_pipeline(cfg)
        return True
    return train_lora(cfg, stage, minutes) is not None
