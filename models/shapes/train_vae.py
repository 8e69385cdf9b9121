"""Stage 1 of the shapes training: the VAE (trained jointly), then its decoder fine-tuned with the outline code,
then the decoder alone polished on outlines and close colours."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.shapes import architecture as arch
from models.shapes.train_common import (
    Checkpoint,
    Randomness,
    TrainConfig,
    adamw,
    deadline,
    descend,
    loop,
    render_batch,
    render_tensor,
    set_lr,
)

# Outlines on stripes are the hardest images to decode (a 3 px line across an 8 px texture), so they get a
# third of the decoder stage's batches.
DECODER_STYLES = ("plain", "outline", "outline", "stripes", "outline+stripes", "outline+stripes")
CODE_FILE = "latent_code.json"  # beside an exported VAE: the codes it was taught, for a later decoder stage
OLD_CODE_FILE = "outline_code.json"  # the same, from before the stripes code
CODES = ("outline_code", "stripes_flat", "stripes_checker")


# -- stage 1: VAE ---------------------------------------------------------------------------------
def train_vae(cfg: TrainConfig, minutes: float | None = None) -> bool:
    """Train the VAE; True once all ``vae_steps`` are done (False: stopped at ``minutes``, resumable)."""
    until = deadline(minutes)
    ckpt = Checkpoint(cfg.run_dir / "vae")
    torch.manual_seed(cfg.seed)
    vae = arch.build_vae().to(cfg.device)
    opt = adamw(list(vae.parameters()), cfg.lr, 0.0, cfg.device)
    state = ckpt.load({"vae": vae}, opt) if ckpt.exists() else {"step": 0}
    start = state["step"]
    if start == 0:
        # Start with a near-deterministic posterior (std ~ e^-5): with logvar ~ 0 the decoder first sees
        # latents drowned in unit noise and learns washed-out averages; measured here, 2x slower to converge.
        with torch.no_grad():
            vae.quant_conv.bias[vae.config.latent_channels :] = -10.0
    # Posterior noise from torch's global generator (seeded above), as the stage always drew it.
    rand = Randomness.resumed(cfg.seed * 1000 + start, state.get("rng"), torch.default_generator)
    vae.train()

    def step_fn(step: int) -> torch.Tensor:
        x, scenes = render_batch(rand.py, cfg.vae_batch, ("plain", "plain", "outline", "stripes"))
        x = x.to(cfg.device)
        set_lr(opt, cfg.lr, step, 200, cfg.vae_steps)
        post = vae.encode(x).latent_dist
        noise = torch.randn(post.mean.shape).to(cfg.device)  # post.sample() would draw it on the device
        err = vae.decode(post.mean + post.std * noise).sample - x
        weight = object_weight(scenes, cfg.vae_object_weight).to(cfg.device)
        return descend(opt, (weight * (err**2 + 0.5 * err.abs())).mean() + 1e-6 * post.kl().mean())

    return loop("vae", cfg.vae_steps, step_fn, lambda s: ckpt.save({"vae": vae}, opt, s, {"rng": rand.state()}),
                start, until, cfg.checkpoint_minutes)


def load_vae(cfg: TrainConfig, refined: bool = True) -> Any:
    """The trained VAE: the refine stage's once it has run all its steps (unless ``refined`` is False), else
    the polish stage's once it has, else the decoder stage's when it has run, else the VAE stage's. (The polish
    and refine stages keep the decoder stage's encoder, so the latents are the same.)"""
    finals = ([("refine", cfg.refine_steps)] if refined else []) + [("polish", cfg.polish_steps)]
    name = next((name for name, steps in finals if finished(cfg.run_dir / name, steps)), None)
    if name is None:
        name = "decoder" if Checkpoint(cfg.run_dir / "decoder").exists() else "vae"
    vae = arch.build_vae()
    Checkpoint(cfg.run_dir / name).load({"vae": vae}, None)
    return vae.eval().requires_grad_(False)


def finished(stage_dir: Path, steps: int) -> bool:
    """Whether the stage checkpointed in ``stage_dir`` has run all its ``steps``."""
    ckpt = Checkpoint(stage_dir)
    return ckpt.exists() and ckpt.state()["step"] >= steps


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
    codes = taught_codes(tuned.state() if tuned.exists() else {})
    for name in (CODE_FILE, OLD_CODE_FILE):
        (out / "vae" / name).unlink(missing_ok=True)
    if codes:
        (out / "vae" / CODE_FILE).write_text(json.dumps(codes))


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


def train_decoder(cfg: TrainConfig, minutes: float | None = None) -> bool:
    """Fine-tune the decoder (as SD's ft-MSE VAE did) and teach the VAE the outline and stripes codes
    (``latent_code``).

    The joint VAE stage leaves soft edges and faint blotches on flat backgrounds; the evaluator reads those
    as shape, size and position errors (measured: a round trip through the joint VAE alone scored shape
    59%, position 62%, size 82%). The decoder learns to decode outlined objects from the filled object's
    latent plus the outline code, and striped images from the plain twin's latent plus the stripes code, at
    0.4-1.4 times the codes' length (a UNet's code comes out weaker or stronger), and the encoder learns to
    produce exactly those codes while keeping plain images' latents where the starting VAE put them, so the
    base UNet's latent space does not move. A starting VAE with fewer
    resnets per block than ``VAE_CONFIG`` is grown (``grow_vae``); pixels near the object weigh more
    (``object_weight``). True once all ``decoder_steps`` are done.
    """
    from models.shapes.latent_code import fit_codes

    until = deadline(minutes)
    ckpt = Checkpoint(cfg.run_dir / "decoder")
    source = source_vae(cfg).to(cfg.device)
    vae = arch.build_vae().to(cfg.device)
    opt = adamw(list(vae.parameters()), cfg.decoder_lr, 0.0, cfg.device)
    if ckpt.exists():
        state = ckpt.load({"vae": vae}, opt)
    else:
        grow_vae(vae, source)
        state = {"step": 0}
    lengths = (cfg.outline_code, cfg.stripes_code, cfg.stripes_checker)
    if state["step"] == 0 and any(lengths):  # a checkpoint keeps the codes it was trained toward
        state.update(inherited_codes(cfg) or fit_codes(
            lambda x: source.encode(x.to(cfg.device)).latent_dist.mean.cpu(), *lengths, cfg.seed))
    codes = taught_codes(state) or None
    rand = Randomness.resumed(cfg.seed * 1013 + state["step"], state.get("rng"))
    vae.train()

    def step_fn(step: int) -> torch.Tensor:
        x, scenes = decoder_batch(rand, cfg)
        set_lr(opt, cfg.decoder_lr, step, 100, cfg.decoder_steps)
        with torch.no_grad():
            ref, offset = decoder_targets(source, x, scenes, codes)
            amp = code_lengths(len(scenes), rand)
            noise = torch.randn(ref.mean.shape, generator=rand.torch)
            z = ref.mean + amp.to(cfg.device) * offset + ref.std * noise.to(cfg.device)
            weight = object_weight(scenes, cfg.decoder_object_weight).to(cfg.device)
        rec = vae.decode(z).sample
        # L1 keeps flat areas flat; the gradient term keeps 3 px outlines between close colours (yellow on
        # orange) from blurring below the evaluator's colour threshold (measured: 11% of round trips lost them).
        err = rec - x
        loss = (weight * (err.abs() + err**2)).mean() + edge_loss(rec, x)
        post = vae.encode(x).latent_dist
        anchor = F.mse_loss(post.mean, ref.mean + offset) + 0.01 * F.mse_loss(post.logvar, ref.logvar)
        return descend(opt, loss + anchor)

    def save(step: int) -> None:
        ckpt.save({"vae": vae}, opt, step, {**{k: state.get(k) for k in CODES}, "rng": rand.state()})

    return loop("decoder", cfg.decoder_steps, step_fn, save, state["step"], until, cfg.checkpoint_minutes)


# -- stage 1c: the decoder polished on outlines and close colours, encoder frozen ---------------------------
def train_polish(cfg: TrainConfig, minutes: float | None = None) -> bool:
    """Fine-tune the decoder stage's decoder once more, with its encoder frozen, the loss weighted where its
    drawing was weakest (``polish_weight``): an outlined object's 3 px ring, and images whose two colours are
    close. The decoder stage drew such rings visibly but too pale: 3 px of orange on yellow (73 RGB levels
    apart) must come within 13 levels of orange to stand 60 levels off the background, where the evaluator
    looks, and a round trip kept the outline of 66.5% of 200 close-pair renders (0 of 14 orange/yellow
    outlines among 300 generated images; 96% for pairs over 200 levels apart).

    The encoder, and so every latent the base and adapter stages train on, stays as the decoder stage left
    it: the stage can run on a finished run without training those again. It decodes the encoder's latents
    with the codes at 0.4-1.4 times their length, as the decoder stage does. True once all ``polish_steps`` are
    done; a pipeline this run has already exported then gets the polished VAE."""
    until = deadline(minutes)
    tuned = Checkpoint(cfg.run_dir / "decoder")
    if not tuned.exists():
        from models.errors import InvalidRequest

        raise InvalidRequest(f"the polish stage starts from the decoder stage's checkpoint, and {tuned.dir} has "
                             "none. Hint: run the decoder stage first (--stage decoder).", param="stage")
    vae = arch.build_vae()
    codes = taught_codes(tuned.load({"vae": vae}, None))
    opt, state, rand, save = decoder_stage(cfg, "polish", vae.to(cfg.device), cfg.polish_lr, 1019)

    def step_fn(step: int) -> torch.Tensor:
        set_lr(opt, cfg.polish_lr, step, 50, cfg.polish_steps)
        x, z, weight = polish_batch(vae, rand, cfg, codes)
        rec = vae.decode(z).sample
        return descend(opt, decoder_loss(rec, x, weight))

    if not loop("polish", cfg.polish_steps, step_fn, save, state["step"], until, cfg.checkpoint_minutes):
        return False
    if (cfg.run_dir / "latent_scale.json").is_file() and (cfg.out_dir / "model_index.json").is_file():
        export_vae(cfg, cfg.out_dir)  # this run's pipeline, exported before the stage (a resumed run)
    return True


def decoder_stage(cfg: TrainConfig, name: str, vae: Any, lr: float,
                  stream: int) -> tuple[Any, dict[str, Any], Randomness, Any]:
    """What a decoder-only stage (polish, refine) starts from: its optimizer over ``decoder_params``, its state
    (``vae`` and the optimizer resumed from ``<run>/<name>/`` if checkpointed there), its random streams (seeded
    ``seed * stream + step``) and the function that checkpoints it at a step. Leaves ``vae`` in train mode."""
    ckpt = Checkpoint(cfg.run_dir / name)
    opt = adamw(decoder_params(vae), lr, 0.0, cfg.device)
    state = ckpt.load({"vae": vae}, opt) if ckpt.exists() else {"step": 0}
    rand = Randomness.resumed(cfg.seed * stream + state["step"], state.get("rng"))
    vae.train()

    def save(step: int) -> None:
        ckpt.save({"vae": vae}, opt, step, {"rng": rand.state()})

    return opt, state, rand, save


def decoder_params(vae: Any) -> list[torch.nn.Parameter]:
    """Freeze the VAE but its decoder (and post-quant conv), and return those: the polish and refine stages
    train them alone, so the latents every other stage trains on stay where they are."""
    vae.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


@torch.no_grad()
def polish_batch(vae: Any, rand: Randomness, cfg: TrainConfig,
                 codes: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A polish-stage batch (``decoder_batch``): the rendered images, the latents to decode (the encoder's,
    codes drawn at 0.4-1.4 times their length, as the decoder stage does) and the loss weights."""
    from models.shapes.latent_code import latent_offset

    x, scenes = decoder_batch(rand, cfg)
    z = vae.encode(x).latent_dist.mean
    if codes:
        amp = code_lengths(len(scenes), rand)
        z = z + (amp.to(cfg.device) - 1) * latent_offset(scenes, codes).to(cfg.device)
    weight = polish_weight(scenes, cfg.decoder_object_weight, cfg.polish_ring_weight, cfg.polish_pair_cap)
    return x, z, weight.to(cfg.device)


def decoder_loss(rec: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The polish and refine stages' loss: weighted L1 + MSE, plus ``edge_loss``."""
    err = rec - x
    return (weight * (err.abs() + err**2)).mean() + edge_loss(rec, x)


def polish_weight(scenes: list[Any], near: float, ring: float, pair_cap: float) -> torch.Tensor:
    """N x 1 x H x W loss weights, averaging 1 over the batch: ``object_weight`` (``1 + near`` within 3 px of
    the object), times ``1 + ring`` on an outlined object's ring (its outer ``OUTLINE_PX`` pixels), each image
    averaging 1; then each image times (150 / the distance of its two colours in RGB)^2, within [1, pair_cap]:
    orange on yellow (73 levels) weighs 4x at cap 4, red on orange (104) 2.1x, most pairs 1."""
    from models.shapes.data import OUTLINE_PX, pair_distance
    from models.shapes.latent_code import has_style, object_masks

    w = object_weight(scenes, near)
    if ring:
        m = object_masks(scenes)
        edge = (m + F.max_pool2d(-m, 2 * OUTLINE_PX + 1, stride=1, padding=OUTLINE_PX)).clamp(0, 1)  # m - eroded m
        w = w * (1 + ring * edge * has_style(scenes, "outline"))
        w = w / w.mean(dim=(1, 2, 3), keepdim=True)
    dist = torch.tensor([pair_distance(s.color, s.background) for s in scenes])
    w = w * torch.clamp((150.0 / dist) ** 2, 1.0, max(1.0, pair_cap)).view(-1, 1, 1, 1)
    return w / w.mean()


def decoder_batch(rand: Randomness, cfg: TrainConfig) -> tuple[torch.Tensor, list[Any]]:
    """A batch of the decoder and polish stages (``DECODER_STYLES``), rendered and on the stage's device."""
    x, scenes = render_batch(rand.py, cfg.vae_batch, DECODER_STYLES)
    return x.to(cfg.device), scenes


def code_lengths(n: int, rand: Randomness) -> torch.Tensor:
    """N x 1 x 1 x 1: how long each image's codes are drawn, 0.4-1.4 times their length (a UNet's come out weaker
    or stronger)."""
    return 0.4 + torch.rand(n, 1, 1, 1, generator=rand.torch)


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


def taught_codes(state: dict[str, Any]) -> dict[str, list[float]]:
    """The codes a decoder stage's state holds (those it was taught; none from a stage without them)."""
    return {k: state[k] for k in CODES if state.get(k)}


def inherited_codes(cfg: TrainConfig) -> dict[str, list[float]] | None:
    """The codes of the ``--init-from`` pipeline's VAE, if it was taught any: a continued decoder stage keeps
    them (codes fitted again would differ a little, and that pipeline's adapters draw the old ones)."""
    for name in (CODE_FILE, OLD_CODE_FILE):
        f = cfg.init_from / "vae" / name if cfg.init_from else None
        if f and f.is_file():
            return json.loads(f.read_text())
    return None


def object_weight(scenes: list[Any], extra: float, factor: int = 1, reach: int = 3) -> torch.Tensor:
    """N x 1 x H x W weights averaging 1: ``1 + extra`` within ``reach`` pixels of the object, 1 elsewhere. The
    flat background is most of each image and easy; a small object's outline is a few dozen pixels. With
    ``factor`` 4 the pixels are latent pixels (16 x 16; any 4 x 4 patch the object touches counts as object)."""
    from models.shapes.latent_code import object_masks

    masks = object_masks(scenes)
    if factor > 1:
        masks = F.max_pool2d(masks, factor)
    near = F.max_pool2d(masks, 2 * reach + 1, stride=1, padding=reach)
    w = 1 + extra * near
    return w / w.mean(dim=(1, 2, 3), keepdim=True)


@torch.no_grad()
def decoder_targets(source: Any, x: torch.Tensor, scenes: list[Any], codes: dict[str, Any] | None) -> tuple[Any, Any]:
    """What the decoder stage trains toward: the starting VAE's posterior of each image (``x``, the scenes
    rendered) and an offset to add to its mean. With the outline code, an outlined scene's posterior is its
    filled twin's and the offset is the code over the object; with the stripes code, a striped scene's is its
    plain twin's and the offset is that code over the background (``latent_code.latent_offset``; zero for plain
    scenes). Without codes, each image's own posterior and no offset."""
    from models.shapes.latent_code import latent_offset, twin

    if not codes:
        return source.encode(x).latent_dist, torch.zeros((), device=x.device)
    twins = render_tensor([twin(s, codes) for s in scenes]).to(x.device)
    return source.encode(twins).latent_dist, latent_offset(scenes, codes).to(x.device)


def edge_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical finite differences of two images (a gradient-difference loss)."""
    dx = F.l1_loss(rec[..., :, 1:] - rec[..., :, :-1], x[..., :, 1:] - x[..., :, :-1])
    dy = F.l1_loss(rec[..., 1:, :] - rec[..., :-1, :], x[..., 1:, :] - x[..., :-1, :])
    return dx + dy

