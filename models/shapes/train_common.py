"""What every shapes training stage shares: the config, rendered batches, checkpoints, the LR schedule and
the step loop with its progress bar (``train.py`` runs the stages; ``train_vae.py`` holds the VAE's)."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import multiprocessing
import random
import shutil
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.shapes.data import random_scene, render


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
    # Lengths of the stripes code's flat part and checkerboard (latent_code.py), the same way; 0 and 0: as drawn.
    stripes_code: float = 1.0
    stripes_checker: float = 1.25
    # The polish stage (train_vae.train_polish): the decoder alone, encoder frozen, with outline rings and close
    # colour pairs weighted. The decoder stage drew 3 px outlines between close colours (orange on yellow,
    # red on orange, purple on blue) too pale for the evaluator: a round trip kept 66.5% of 200 such renders.
    polish_steps: int = 1000
    polish_lr: float = 3e-4
    polish_ring_weight: float = 3.0  # extra loss weight on an outlined object's 3 px ring (0: none)
    polish_pair_cap: float = 4.0  # images weigh (150 / colour distance)^2, at most this (1: all alike)
    decoder_object_weight: float = 3.0  # extra loss weight near the object (object_weight)
    # The same in the VAE stage: without it a 2-resnet VAE from seed 0 encoded object colour so faintly that
    # green, blue and purple shared one latent (round trip: colour 48% after 3000 steps; 99% with it at 1500).
    vae_object_weight: float = 3.0
    # The same in the base stage, on latent pixels (the object's 4 x 4 patches and their neighbours): a small
    # object is 5-6% of the latent, and without it the seed-0 run drew small squares as circles (shape 86%).
    base_object_weight: float = 3.0
    # ... applied only at timesteps below this (1000: all), where a small object's shape is decided. Weighted at
    # every timestep it cost prompts without a position: seed 0's base drew "a red circle" right 65% of the time
    # (often on red). 1500-step fine-tunes of that base: unweighted, 88% but small shapes 80%; weighted below
    # 400, 89% and shape 97% (small 94%) (NOTES.md, session 28).
    base_object_weight_t: int = 400
    # ... except in the base stage's first this many steps, where it applies at every timestep: the layout
    # (position) is learned at high noise early on. Seed 0 weighted only below 400 from step 0 still drew
    # position at chance (10%) at step 4672; weighted everywhere it drew 98.5% at step 4535 (NOTES.md).
    base_object_weight_everywhere: int = 6000
    base_steps: int = 12000  # the shipped base had 11,307 steps in its chain of runs
    # Images of small objects are drawn this many times as often as large ones in the base stage (1: uniformly).
    base_small_weight: float = 1.0
    # Share of the base stage's timesteps drawn from [0, base_detail_t) rather than [0, 1000): a small object's
    # shape (square or circle) is decided there (img2img from the other shape flips half of them at t ~ 200).
    base_detail_share: float = 0.0
    base_detail_t: int = 400
    base_batch: int = 64
    base_images: int = 30000
    lora_steps: int = 3000
    lora_batch: int = 32
    lora_images: int = 6400  # per adapter (and again for the outline stage's pair steps)
    lr: float = 1e-3
    lora_lr: float = 1e-3
    # Loss weight min(SNR + 1, cap) / (SNR + 1), per stage; inf weighs every timestep 1. (Tried for the outline
    # adapter, whose 3 px lines are drawn at the nearly clean steps that cap 5 weighs down: it was worse.)
    snr_cap: float = 5.0
    lora_snr_cap: float = 5.0
    # The stripes adapter's own loss weight cap, and share of its timesteps drawn from [0, base_detail_t). Before
    # the stripes code the seed-0 VAE drew the stripes' contrast from a faint latent checkerboard that generated
    # latents lacked: cap 5 gave 57% at scale 1, every timestep weighed 1 gave 72%, and so became the default.
    # With the stripes code (a strong checkerboard) the seed-0 adapter trained this way shows stripes in 100%.
    stripes_snr_cap: float = math.inf
    stripes_detail_share: float = 0.0
    # Fraction of the outline stage's steps on outlined striped images with the stripes adapter merged in,
    # so that the two adapters compose (each trained alone, outline + stripes showed both in 66%).
    lora_pairs: float = 0.5
    # The refine stage (train_refine.py): the decoder alone once more, half of each batch the latents the finished
    # base and outline adapter generate, taught to draw their outlines. Drawn from the base's own latents, 3 px
    # rings between middle-distance colours came out broken (green on purple 5 of 21) though a round trip of
    # renders kept all of them.
    refine_steps: int = 600
    refine_lr: float = 1.5e-4
    refine_images: int = 1536  # scenes generated once, each with and without the outline adapter
    refine_min_iou: float = 0.8  # a generated object used only if its fitted scene covers it this well
    ema: float = 0.999
    caption_dropout: float = 0.1
    # Chance that a training caption leaves out each attribute (data.caption), so partial prompts work.
    attribute_drop: float = 0.2
    checkpoint_minutes: float = 3.0
    init_from: Path | None = None  # an exported pipeline to start the base stage from (no checkpoint)
    threads: int = 0  # 0: torch's default
    # Where every stage trains ("cuda" on a GPU). Random numbers are drawn on the CPU either way, so a seed picks
    # the same data, timesteps and noise on any device; checkpoints are written from CPU copies.
    device: str = "cpu"
    # Processes that render the training images (0: the training process does). Rendering is ~1.4 ms an
    # image on one core: on a GPU it would be most of the VAE stages' time, and of encoding the datasets.
    render_workers: int = 0
    # Compile the UNet and text encoder of the base and adapter stages (torch.compile, static shapes): fewer,
    # fused kernels. For a GPU, where this small model's eager step is bound by thousands of kernel launches;
    # on a CPU the convolutions dominate and compiling gained nothing (0.73 vs 0.72 s a base step, measured).
    # The torch.compile backend ("inductor"; the tests trace with "aot_eager"); "" runs eager.
    compile: str = ""


# -- data ---------------------------------------------------------------------------------------
def sample_scenes(rng: random.Random, n: int, styles: tuple[str, ...]) -> list[Any]:
    return [random_scene(rng, rng.choice(styles)) for _ in range(n)]


_render_pool: tuple[ProcessPoolExecutor, int] | None = None  # (pool, its processes) within render_workers


@contextlib.contextmanager
def render_workers(n: int):
    """Within the block, ``render_tensor`` renders in ``n`` processes (none if ``n`` is 0). A scene's image
    depends on the scene alone, so the batches are exactly those rendered in this process."""
    global _render_pool
    if n <= 0:
        yield
        return
    # forkserver: the workers do not inherit a CUDA context or torch's thread pools
    # The workers ignore Ctrl-C (sent to the whole process group): the step loop stops on it and still needs them.
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("forkserver"),
                             initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        _render_pool = pool, n
        try:
            yield
        finally:
            _render_pool = None


def render_tensor(scenes: list[Any]) -> torch.Tensor:
    """The scenes rendered as an NCHW batch in [-1, 1] (what the VAE takes)."""
    if _render_pool is None:
        images = [render(s) for s in scenes]
    else:
        pool, n = _render_pool
        images = list(pool.map(render, scenes, chunksize=max(1, len(scenes) // (4 * n))))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def render_batch(rng: random.Random, n: int, styles: tuple[str, ...]) -> tuple[torch.Tensor, list[Any]]:
    scenes = sample_scenes(rng, n, styles)
    return render_tensor(scenes), scenes


# -- checkpoints --------------------------------------------------------------------------------
class Randomness:
    """A stage's random streams: Python's (scenes, captions) and a torch generator (timesteps, noise; by default
    its own, or e.g. ``torch.default_generator``). Saved in every checkpoint, so a resumed stage draws exactly
    what an uninterrupted one would have, wherever the timer happened to stop it."""

    def __init__(self, seed: int, generator: torch.Generator | None = None) -> None:
        self.py = random.Random(seed)
        self.torch = generator if generator is not None else torch.Generator().manual_seed(seed)

    def state(self) -> dict[str, Any]:
        version, internal, gauss = self.py.getstate()
        return {"py": [version, list(internal), gauss],
                "torch": base64.b64encode(self.torch.get_state().numpy().tobytes()).decode()}

    @classmethod
    def resumed(cls, seed: int, saved: dict[str, Any] | None, generator: torch.Generator | None = None) -> Randomness:
        """Streams seeded with ``seed``, continued from ``saved`` (a checkpoint's ``state()``; None: the seed's)."""
        rand = cls(seed, generator)
        rand.restore(saved)
        return rand

    def restore(self, state: dict[str, Any] | None) -> None:
        """Continue the streams saved by ``state()`` (None, from a checkpoint without them: keep the seed's)."""
        if state:
            version, internal, gauss = state["py"]
            self.py.setstate((version, tuple(internal), gauss))
            self.torch.set_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))


def save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    """The optimizer's state as safetensors (tensor ``{param index}.{name}``) with its param groups as JSON
    metadata: checkpoints hold no pickles either."""
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items() for k, v in st.items()}
    save_file(tensors, path, metadata={"param_groups": json.dumps(sd["param_groups"])})


def load_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    """Load ``save_optimizer``'s file; the optimizer moves the state onto its parameters' device."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(path).items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


class Checkpoint:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def exists(self) -> bool:
        return (self.dir / "state.json").is_file()

    def state(self) -> dict:
        """The saved step and extras (what ``load`` returns), without loading any weights."""
        return json.loads((self.dir / "state.json").read_text())

    def save(self, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer, step: int, extra: dict) -> None:
        tmp = self.dir.with_name(self.dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, m in modules.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()},
                      tmp / f"{name}.safetensors")
        save_optimizer(opt, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}))
        shutil.rmtree(self.dir, ignore_errors=True)
        tmp.rename(self.dir)  # atomic: a crash mid-save leaves the previous checkpoint intact

    def load(self, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer | None) -> dict:
        for name, m in modules.items():
            m.load_state_dict(load_file(self.dir / f"{name}.safetensors"))
        if opt is not None:  # saved on a GPU, resumed on a CPU or back
            load_optimizer(opt, self.dir / "optimizer.safetensors")
        return self.state()


def set_lr(opt: torch.optim.Optimizer, base: float, step: int, warmup: int, total: int) -> None:
    """Linear warm-up, then cosine decay to 0 at ``total``."""
    for g in opt.param_groups:
        g["lr"] = base * min(1.0, (step + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * step / total)))


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float, device: str) -> torch.optim.AdamW:
    """AdamW with its update as a few kernels over all parameters (fused on a GPU, foreach on a CPU) rather
    than a dozen small ops per parameter: on a GPU those launches, not the arithmetic, would bound a step."""
    if torch.device(device).type == "cuda":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def descend(opt: torch.optim.Optimizer, loss: torch.Tensor, clip: list[torch.nn.Parameter] | None = None) -> torch.Tensor:
    """One optimizer step on ``loss`` (gradient norm clipped to 1 over ``clip`` if given); returns the loss,
    detached and where it was computed: reading it (``float``) waits for a GPU, so ``loop`` does that rarely."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    return loss.detach()


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, as one foreach op over all parameters."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def deadline(minutes: float | None) -> float:
    """When ``minutes`` from now run out, on the monotonic clock (inf: no limit). A stage takes it on entry, so
    that its data encoding counts against --minutes too (it used to start the clock only after it)."""
    return math.inf if minutes is None else time.monotonic() + minutes * 60


class Stopped(Exception):
    """A stage stopped by SIGINT or SIGTERM (Ctrl-C, ``docker stop``, a pod's eviction) after checkpointing."""

    def __init__(self, stage: str, step: int, signum: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} during stage {stage}: checkpointed at step {step}")
        self.stage, self.step, self.signum = stage, step, signum


@contextlib.contextmanager
def stop_signals():
    """While inside, SIGINT and SIGTERM set the yielded list (to the signal) instead of killing the process,
    so that the step loop can finish its step and checkpoint; the previous handlers come back on exit."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield received
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def loop(name: str, total: int, step_fn, save_fn, start: int, until: float, every_minutes: float) -> bool:
    """Run step_fn(step) from ``start`` to ``total`` with a progress bar, checkpointing on a timer and at the
    end; True if it reached ``total`` (False: stopped at the ``until`` deadline, and a stage then exports
    nothing). SIGINT or SIGTERM stops it after the step in progress and a checkpoint, raising ``Stopped``."""
    from tqdm import tqdm

    last = time.monotonic()
    step = start
    saved = start or None  # a resumed stage's checkpoint already holds ``start``; a fresh one holds nothing yet
    with tqdm(total=total, initial=start, desc=name, unit="step", mininterval=5) as bar, stop_signals() as stop:
        while step < total and time.monotonic() < until and not stop:
            loss = step_fn(step)
            step += 1
            bar.update(1)
            if step % 20 == 0:  # the only read of the loss: on a GPU each read waits for the queued steps
                bar.set_postfix(loss=f"{float(loss):.4f}")
            if time.monotonic() - last > every_minutes * 60:
                save_fn(step)
                saved, last = step, time.monotonic()
        if step != saved:  # not again for a stage resumed when already finished, or just saved on the timer
            save_fn(step)  # still inside stop_signals: a second Ctrl-C cannot cut the checkpoint short
    if stop:
        raise Stopped(name, step, stop[0])
    return step >= total

