"""Training the bundled ``shapes`` model from a seed: VAE, then text encoder + UNet, then each LoRA adapter.

    diffuserve train shapes                      # all stages, resuming from runs/shapes if present
    diffuserve train shapes --stage base --minutes 30

Each stage checkpoints to ``<run>/<stage>/`` (weights as safetensors, optimizer state with
``torch.load(weights_only=True)``) every few minutes and at its end, so an interrupted run resumes where
it stopped. ``export`` writes the diffusers pipeline directory plus ``loras/{outline,stripes}.safetensors``.

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
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from models.schedules import NoiseSchedule
from models.shapes import architecture as arch
from models.shapes.data import caption, random_scene, render

log = logging.getLogger(__name__)
# Stripes before outline: the outline stage trains part of its steps with the stripes adapter on (train_lora).
STAGES = ("vae", "decoder", "base", "stripes", "outline")
LORA_DATA_SEEDS = {"outline": 5, "stripes": 6}  # seed offsets of each adapter's data (as before the reorder)
# Outlines on stripes are the hardest images to decode (a 3 px line across an 8 px texture), so they get a
# third of the decoder stage's batches.
DECODER_STYLES = ("plain", "outline", "outline", "stripes", "outline+stripes", "outline+stripes")
CODE_FILE = "outline_code.json"  # beside an exported VAE: the code it was taught, for a later decoder stage


@dataclass
class TrainConfig:
    run_dir: Path = Path("runs/shapes")
    out_dir: Path = Path(__file__).resolve().parents[1] / "zoo" / "shapes"
    seed: int = 0
    vae_steps: int = 1500
    vae_batch: int = 16
    decoder_steps: int = 3500
    decoder_lr: float = 5e-4
    # Length of the outline code (latent_code.py) in latent standard deviations; 0 encodes outlines as drawn.
    outline_code: float = 2.0
    decoder_object_weight: float = 3.0  # extra loss weight near the object (object_weight)
    base_steps: int = 12000  # the shipped base had 11,307 steps in its chain of runs
    base_batch: int = 64
    base_images: int = 30000
    lora_steps: int = 3000
    lora_batch: int = 32
    lr: float = 1e-3
    lora_lr: float = 1e-3
    # Loss weight min(SNR + 1, cap) / (SNR + 1), per stage; inf weighs every timestep 1. (Tried for the outline
    # adapter, whose 3 px lines are drawn at the nearly clean steps that cap 5 weighs down: it was worse.)
    snr_cap: float = 5.0
    lora_snr_cap: float = 5.0
    # Fraction of the outline stage's steps on outlined striped images with the stripes adapter merged in,
    # so that the two adapters compose (each trained alone, outline + stripes showed both in 66%).
    lora_pairs: float = 0.5
    ema: float = 0.999
    caption_dropout: float = 0.1
    checkpoint_minutes: float = 3.0
    init_from: Path | None = None  # an exported pipeline to start the base stage from (no checkpoint)
    threads: int = 0  # 0: torch's default


# -- data ---------------------------------------------------------------------------------------
def sample_scenes(rng: random.Random, n: int, styles: tuple[str, ...]) -> list[Any]:
    return [random_scene(rng, rng.choice(styles)) for _ in range(n)]


def render_tensor(scenes: list[Any]) -> torch.Tensor:
    """The scenes rendered as an NCHW batch in [-1, 1] (what the VAE takes)."""
    return torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1


def render_batch(rng: random.Random, n: int, styles: tuple[str, ...]) -> tuple[torch.Tensor, list[Any]]:
    scenes = sample_scenes(rng, n, styles)
    return render_tensor(scenes), scenes


# -- checkpoints --------------------------------------------------------------------------------
class Checkpoint:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def exists(self) -> bool:
        return (self.dir / "state.json").is_file()

    def save(self, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer, step: int, extra: dict) -> None:
        tmp = self.dir.with_name(self.dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, m in modules.items():
            save_file({k: v.contiguous() for k, v in m.state_dict().items()}, tmp / f"{name}.safetensors")
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}))
        shutil.rmtree(self.dir, ignore_errors=True)
        tmp.rename(self.dir)  # atomic: a crash mid-save leaves the previous checkpoint intact

    def load(self, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer | None) -> dict:
        for name, m in modules.items():
            m.load_state_dict(load_file(self.dir / f"{name}.safetensors"))
        if opt is not None:
            opt.load_state_dict(torch.load(self.dir / "optimizer.pt", weights_only=True))
        return json.loads((self.dir / "state.json").read_text())


def set_lr(opt: torch.optim.Optimizer, base: float, step: int, warmup: int, total: int) -> None:
    """Linear warm-up, then cosine decay to 0 at ``total``."""
    for g in opt.param_groups:
        g["lr"] = base * min(1.0, (step + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * step / total)))


def descend(opt: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)


def loop(name: str, total: int, step_fn, ckpt: Checkpoint, save_fn, start: int, minutes: float | None,
         every_minutes: float) -> int:
    """Run step_fn(step) from ``start`` to ``total`` with a progress bar, checkpointing on a timer."""
    from tqdm import tqdm

    t_end = time.monotonic() + minutes * 60 if minutes else math.inf
    last = time.monotonic()
    step = start
    with tqdm(total=total, initial=start, desc=name, unit="step", mininterval=5) as bar:
        while step < total and time.monotonic() < t_end:
            loss = step_fn(step)
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss:.4f}")
            if time.monotonic() - last > every_minutes * 60:
                save_fn(step)
                last = time.monotonic()
    save_fn(step)
    return step


# -- stage 1: VAE ---------------------------------------------------------------------------------
def train_vae(cfg: TrainConfig, minutes: float | None = None) -> None:
    ckpt = Checkpoint(cfg.run_dir / "vae")
    torch.manual_seed(cfg.seed)
    vae = arch.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    start = ckpt.load({"vae": vae}, opt)["step"] if ckpt.exists() else 0
    if start == 0:
        # Start with a near-deterministic posterior (std ~ e^-5): with logvar ~ 0 the decoder first sees
        # latents drowned in unit noise and learns washed-out averages; measured here, 2x slower to converge.
        with torch.no_grad():
            vae.quant_conv.bias[vae.config.latent_channels :] = -10.0
    rng = random.Random(cfg.seed * 1000 + start)
    vae.train()

    def step_fn(step: int) -> float:
        x, _ = render_batch(rng, cfg.vae_batch, ("plain", "plain", "outline", "stripes"))
        set_lr(opt, cfg.lr, step, 200, cfg.vae_steps)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        return descend(opt, F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean())

    loop("vae", cfg.vae_steps, step_fn, ckpt, lambda s: ckpt.save({"vae": vae}, opt, s, {}), start, minutes,
         cfg.checkpoint_minutes)


def load_vae(cfg: TrainConfig) -> Any:
    """The trained VAE: the decoder stage's when it has run (the VAE stage's otherwise)."""
    vae = arch.build_vae()
    tuned = Checkpoint(cfg.run_dir / "decoder")
    (tuned if tuned.exists() else Checkpoint(cfg.run_dir / "vae")).load({"vae": vae}, None)
    return vae.eval().requires_grad_(False)


def export_vae(cfg: TrainConfig, out: Path) -> None:
    """Write the trained VAE into a pipeline directory, with the latent scale the base stage measured (or,
    continuing an exported pipeline with ``--init-from``, the scale that pipeline's UNet was trained with)."""
    vae = load_vae(cfg)
    scale_file = cfg.run_dir / "latent_scale.json"
    if not scale_file.is_file() and cfg.init_from:
        scale_file = cfg.init_from / "vae" / "config.json"
    vae.register_to_config(scaling_factor=json.loads(scale_file.read_text())["scaling_factor"])
    vae.save_pretrained(out / "vae", safe_serialization=True)
    tuned = Checkpoint(cfg.run_dir / "decoder")
    code = json.loads((tuned.dir / "state.json").read_text()).get("outline_code") if tuned.exists() else None
    (out / "vae" / CODE_FILE).unlink(missing_ok=True)
    if code:
        (out / "vae" / CODE_FILE).write_text(json.dumps({"outline_code": code}))


# -- stage 1b: decoder fine-tuning and the outline code ---------------------------------------------
def source_vae(cfg: TrainConfig) -> Any:
    """The VAE the decoder stage starts from: the VAE stage's, or without one the exported VAE of
    ``--init-from`` (to continue a pipeline's VAE without training one from scratch)."""
    from diffusers import AutoencoderKL

    first = Checkpoint(cfg.run_dir / "vae")
    if not first.exists() and cfg.init_from and (cfg.init_from / "vae").is_dir():
        return AutoencoderKL.from_pretrained(cfg.init_from / "vae").eval().requires_grad_(False)
    vae = arch.build_vae()
    first.load({"vae": vae}, None)
    return vae.eval().requires_grad_(False)


def train_decoder(cfg: TrainConfig, minutes: float | None = None) -> None:
    """Fine-tune the decoder (as SD's ft-MSE VAE did) and teach the VAE the outline code (``latent_code``).

    The joint VAE stage leaves soft edges and faint blotches on flat backgrounds; the evaluator reads those
    as shape, size and position errors (measured: a round trip through the joint VAE alone scored shape
    59%, position 62%, size 82%). The decoder learns to decode outlined objects from the filled object's
    latent plus the outline code, at 0.4-1.4 times the code's length (a UNet's code comes out weaker or
    stronger), and the encoder learns to produce exactly that code while keeping every other image's latent
    where the starting VAE put it, so the base UNet's latent space does not move. A starting VAE with fewer
    resnets per block than ``VAE_CONFIG`` is grown (``grow_vae``); pixels near the object weigh more
    (``object_weight``).
    """
    from models.shapes.latent_code import fit_outline_code

    ckpt = Checkpoint(cfg.run_dir / "decoder")
    source = source_vae(cfg)
    vae = arch.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.decoder_lr, weight_decay=0.0)
    if ckpt.exists():
        state = ckpt.load({"vae": vae}, opt)
    else:
        grow_vae(vae, source)
        state = {"step": 0}
    if cfg.outline_code and "outline_code" not in state:
        state["outline_code"] = inherited_code(cfg) or fit_outline_code(
            lambda x: source.encode(x).latent_dist.mean, cfg.outline_code, cfg.seed)
    code = torch.tensor(state["outline_code"]) if state.get("outline_code") else None
    rng = random.Random(cfg.seed * 1013 + state["step"])
    gen = torch.Generator().manual_seed(cfg.seed * 1013 + state["step"])
    vae.train()

    def step_fn(step: int) -> float:
        x, scenes = render_batch(rng, cfg.vae_batch, DECODER_STYLES)
        set_lr(opt, cfg.decoder_lr, step, 100, cfg.decoder_steps)
        with torch.no_grad():
            ref, offset = decoder_targets(source, x, scenes, code)
            amp = 0.4 + torch.rand(len(scenes), 1, 1, 1, generator=gen)
            z = ref.mean + amp * offset + ref.std * torch.randn(ref.mean.shape, generator=gen)
            weight = object_weight(scenes, cfg.decoder_object_weight)
        rec = vae.decode(z).sample
        # L1 keeps flat areas flat; the gradient term keeps 3 px outlines between close colours (yellow on
        # orange) from blurring below the evaluator's colour threshold (measured: 11% of round trips lost them).
        err = rec - x
        loss = (weight * (err.abs() + err**2)).mean() + edge_loss(rec, x)
        post = vae.encode(x).latent_dist
        anchor = F.mse_loss(post.mean, ref.mean + offset) + 0.01 * F.mse_loss(post.logvar, ref.logvar)
        return descend(opt, loss + anchor)

    loop("decoder", cfg.decoder_steps, step_fn, ckpt,
         lambda s: ckpt.save({"vae": vae}, opt, s, {"outline_code": state.get("outline_code")}), state["step"],
         minutes, cfg.checkpoint_minutes)


def grow_vae(vae: Any, source: Any) -> None:
    """Load ``source``'s weights into ``vae``, which may have more resnets per block (a deeper
    ``VAE_CONFIG``). A resnet block is x + conv2(...), so each new one starts with conv2 at zero: the identity,
    and the grown VAE computes exactly what the source did until training uses the new capacity."""
    missing, unexpected = vae.load_state_dict(source.state_dict(), strict=False)
    new = {k.rsplit(".", 2)[0] for k in missing}
    if unexpected or any(".resnets." not in k for k in new):
        raise ValueError(f"cannot grow this VAE: missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
    with torch.no_grad():
        for block in new:
            conv2 = vae.get_submodule(block).conv2
            conv2.weight.zero_()
            conv2.bias.zero_()


def inherited_code(cfg: TrainConfig) -> list[float] | None:
    """The outline code of the ``--init-from`` pipeline's VAE, if it was taught one: a continued decoder stage
    keeps it (a code fitted again would differ a little, and that pipeline's outline adapter draws the old one)."""
    f = cfg.init_from / "vae" / CODE_FILE if cfg.init_from else None
    return json.loads(f.read_text())["outline_code"] if f and f.is_file() else None


def object_weight(scenes: list[Any], extra: float) -> torch.Tensor:
    """N x 1 x H x W pixel weights averaging 1: ``1 + extra`` within 3 px of the object, 1 elsewhere. The flat
    background is most of each image and easy; a small object's outline is a few dozen pixels."""
    from models.shapes.latent_code import object_masks

    near = F.max_pool2d(object_masks(scenes), 7, stride=1, padding=3)
    w = 1 + extra * near
    return w / w.mean(dim=(1, 2, 3), keepdim=True)


@torch.no_grad()
def decoder_targets(source: Any, x: torch.Tensor, scenes: list[Any], code: torch.Tensor | None) -> tuple[Any, Any]:
    """What the decoder stage trains toward: the starting VAE's posterior of each image (``x``, the scenes
    rendered) and an offset to add to its mean. With the outline code, an outlined scene's posterior is its
    filled twin's and the offset is the code over the object (zero for other scenes); without it, each
    image's own posterior and no offset."""
    from models.shapes.latent_code import outline_offset, without_outline

    if code is None:
        return source.encode(x).latent_dist, torch.zeros(())
    return source.encode(render_tensor([without_outline(s) for s in scenes])).latent_dist, outline_offset(scenes, code)


def edge_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical finite differences of two images (a gradient-difference loss)."""
    dx = F.l1_loss(rec[..., :, 1:] - rec[..., :, :-1], x[..., :, 1:] - x[..., :, :-1])
    dy = F.l1_loss(rec[..., 1:, :] - rec[..., :-1, :], x[..., 1:, :] - x[..., :-1, :])
    return dx + dy


# -- stage 2: text encoder + UNet --------------------------------------------------------------------
@torch.no_grad()
def encode_dataset(vae: Any, n: int, seed: int, style: str) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
    """Pre-render and pre-encode n scenes: the VAE posterior's mean and std, and the scenes."""
    rng = random.Random(seed)
    means, stds, scenes = [], [], []
    for b in range(0, n, 256):
        x, sc = render_batch(rng, min(256, n - b), (style,))
        dist = vae.encode(x).latent_dist
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
                 snr_cap: float) -> None:
        self.tok, self.te, self.unet, self.cfg, self.snr_cap = tokenizer, text_encoder, unet, cfg, snr_cap
        sched = NoiseSchedule.from_config(arch.SCHEDULER_CONFIG)
        self.abar = torch.from_numpy(sched.alphas_cumprod).float()
        self.v_prediction = sched.prediction_type == "v_prediction"
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def loss(self, z0: torch.Tensor, captions: list[str]) -> torch.Tensor:
        ids = self.tok(captions, padding="max_length", max_length=arch.MAX_TOKENS, truncation=True,
                       return_tensors="pt").input_ids
        emb = self.te(ids)[0]
        b = z0.shape[0]
        t = torch.randint(0, len(self.abar), (b,), generator=self.gen)
        eps = torch.randn(z0.shape, generator=self.gen)
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
        return (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * w).mean()

    def captions(self, scenes: list[Any]) -> list[str]:
        return ["" if self.rng.random() < self.cfg.caption_dropout else caption(s, self.rng) for s in scenes]


def train_base(cfg: TrainConfig, minutes: float | None = None) -> None:
    ckpt = Checkpoint(cfg.run_dir / "base")
    tok_dir = cfg.run_dir / "tokenizer"
    tokenizer = arch.build_tokenizer(tok_dir)
    vae = load_vae(cfg)
    torch.manual_seed(cfg.seed)
    unet, te = arch.build_unet(), arch.build_text_encoder(tok_dir)
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
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
        mean, std, scenes = encode_dataset(vae, cfg.base_images, cfg.seed + 1, "plain")
        save_file({"mean": mean.contiguous(), "std": std.contiguous()}, cache)
    scale = latent_scale(mean)
    (cfg.run_dir / "latent_scale.json").write_text(json.dumps({"scaling_factor": scale}))
    job = Denoising(tokenizer, te, unet, cfg, cfg.seed * 7919 + state["step"], cfg.snr_cap)
    torch.manual_seed(cfg.seed + state["step"])
    unet.train()
    te.train()

    def step_fn(step: int) -> float:
        set_lr(opt, cfg.lr, step, 500, cfg.base_steps)
        idx = torch.randint(0, len(scenes), (cfg.base_batch,), generator=job.gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=job.gen)) * scale
        loss = job.loss(z0, job.captions([scenes[i] for i in idx.tolist()]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_unet, unet, cfg.ema if step > 500 else 0.0)
        ema_update(ema_te, te, cfg.ema if step > 500 else 0.0)
        return float(loss)

    loop("base", cfg.base_steps, step_fn, ckpt, lambda s: ckpt.save(modules, opt, s, {}), state["step"], minutes,
         cfg.checkpoint_minutes)


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


def train_lora(cfg: TrainConfig, style: str, minutes: float | None = None) -> Path:
    """Fine-tune a rank-8 LoRA (PEFT, saved in diffusers' format) on one style, base model frozen."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from models.loading import load_pipeline

    model = load_pipeline(cfg.out_dir, device="cpu")
    unet, te, vae = model.unet, model.text_encoder, model.vae
    unet.add_adapter(LoraConfig(r=arch.LORA_RANK, lora_alpha=arch.LORA_RANK, init_lora_weights="gaussian",
                                target_modules=list(arch.LORA_TARGETS)))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lora_lr)
    ckpt = Checkpoint(cfg.run_dir / f"lora_{style}")
    lora_module = _ParamBag(unet)
    state = ckpt.load({"lora": lora_module}, opt) if ckpt.exists() else {"step": 0}
    data_seed = cfg.seed + LORA_DATA_SEEDS[style]
    data = {style: encode_dataset(vae, cfg.lora_batch * 200, data_seed, style)}
    partner = cfg.out_dir / "loras" / "stripes.safetensors"
    merged = None
    if style == "outline" and cfg.lora_pairs > 0 and partner.is_file():
        data["pair"] = encode_dataset(vae, cfg.lora_batch * 200, data_seed + 100, "outline+stripes")
        merged = MergedAdapter(unet, partner)
    if style == "outline":
        log.info("outline stage: %s", f"{cfg.lora_pairs:.0%} of steps with {partner} on" if merged else "no pair steps")
    scale = vae.config.scaling_factor
    job = Denoising(model.tokenizer, te, unet, cfg, cfg.seed * 31 + state["step"], cfg.lora_snr_cap)
    unet.train()

    def step_fn(step: int) -> float:
        set_lr(opt, cfg.lora_lr, step, 50, cfg.lora_steps)
        pair = merged is not None and int((step + 1) * cfg.lora_pairs) > int(step * cfg.lora_pairs)
        mean, std, scenes = data["pair" if pair else style]
        idx = torch.randint(0, len(scenes), (cfg.lora_batch,), generator=job.gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=job.gen)) * scale
        with merged.on() if pair else contextlib.nullcontext():
            return descend(opt, job.loss(z0, job.captions([scenes[i] for i in idx.tolist()])))

    loop(f"lora {style}", cfg.lora_steps, step_fn, ckpt, lambda s: ckpt.save({"lora": lora_module}, opt, s, {}),
         state["step"], minutes, cfg.checkpoint_minutes)
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
            self.weights.append((w, w.detach().clone(), w.detach() + layer.delta(w.shape)))

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
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "config.json").write_text(json.dumps({k: str(v) for k, v in asdict(cfg).items()}, indent=2))
    t0 = time.monotonic()
    for stage in stages:
        left = None if minutes is None else minutes - (time.monotonic() - t0) / 60
        if left is not None and left <= 0:  # not even a later stage's data encoding: run again to resume
            log.info("--minutes spent: stopping before stage %s", stage)
            break
        if stage == "vae":
            train_vae(cfg, left)
        elif stage == "decoder":
            train_decoder(cfg, left)
            if cfg.init_from and not Checkpoint(cfg.run_dir / "base").exists():
                # Continuing an exported pipeline: put the new VAE in it, for the adapter stages to train on.
                if not (cfg.out_dir / "model_index.json").is_file():
                    shutil.copytree(cfg.init_from, cfg.out_dir, dirs_exist_ok=True)
                export_vae(cfg, cfg.out_dir)
        elif stage == "base":
            train_base(cfg, left)
            export_pipeline(cfg)
        else:
            train_lora(cfg, stage, left)
    log.info("stages %s done in %.1f min", stages, (time.monotonic() - t0) / 60)
