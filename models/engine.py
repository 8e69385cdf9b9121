"""The engine: text-to-image (and img2img) as a step API over independent samples.

Generation reads as numbered stages:
  1. check inputs      (``Engine.resolve``: defaults from the model, limits, sampler, adapters)
  2. encode prompt     (cached per text and text-encoder adapter state)
  3. prepare latents   (per-sample seeded noise, exactly as diffusers draws it)
  4. denoise           (``Engine.step``: one UNet call for a group, one sampler update per sample)
  5. decode            (``Engine.decode``: batched VAE decode to uint8 RGB)
  6. encode PNG        (``models.images``)

Each ``Sample`` carries its own latent, step index, plan, sampler state, guidance, embeddings, adapter set
and RNG, so a sample's image never depends on its batch neighbours, and a worker can add a sample to a
running batch at any step (continuous batching). Samples stepped together must share a ``GroupKey``
(resolution and adapter set); ``Engine.groups`` partitions a set of samples accordingly. With
``lora_mode="per_sample"`` the adapter set leaves the key: the batch's most common set is merged and the
other rows' differences are added by forward hooks (``LoraApplier.per_row``), so samples with different
adapters share UNet calls.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from models.errors import InvalidRequest
from models.images import to_uint8
from models.loading import LoadedModel
from models.lora import AdapterCache, AdapterSet, LoraApplier, LoraRegistry, normalize_set
from models.samplers import Plan, Sampler, SamplerState, canonical_sampler, get_sampler
from models.text import PromptEncoder

MAX_SEED = 2**63 - 1
ENGINE_MODES = ("exact", "fast")
LORA_MODES = ("merge", "per_sample")


def default_engine_mode(device: torch.device, long_running: bool = False) -> str:
    """``fast`` where it pays without hurting quality: a long-running worker everywhere (it serves eager while
    its graphs compile in the background, see models/warm.py), a one-shot run on CUDA; ``exact`` for a
    one-shot run on a CPU, where compiling the graphs takes minutes to save seconds (see bench/)."""
    return "fast" if long_running or device.type == "cuda" else "exact"


@dataclass(frozen=True)
class GenerationRequest:
    """What one request asks of the engine. ``None`` fields take the model's defaults in ``resolve``."""

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    sampler: str | None = None
    width: int | None = None
    height: int | None = None
    n: int = 1
    loras: AdapterSet = ()
    init_image: Any = None  # PIL image or HxWx3 uint8 array (img2img)
    strength: float = 1.0


GroupKey = tuple[int, int, AdapterSet]  # (height, width, adapter set)


@dataclass(eq=False)
class Sample:
    """One image's trajectory. ``tag`` is the caller's (e.g. job id); the engine never reads it."""

    tag: Any
    index: int
    seed: int
    group: GroupKey
    sampler: Sampler
    plan: Plan
    state: SamplerState
    step_index: int
    start_index: int
    x: torch.Tensor  # (1, C, h, w) float32 latent in the sampler's parameterisation
    cond: torch.Tensor
    uncond: torch.Tensor | None
    guidance: float
    generator: torch.Generator
    warnings: list[str] = field(default_factory=list)
    loras: AdapterSet = ()

    @property
    def done(self) -> bool:
        return self.step_index >= self.plan.num_steps

    @property
    def steps_done(self) -> int:
        return self.step_index - self.start_index

    @property
    def steps_total(self) -> int:
        return self.plan.num_steps - self.start_index


@dataclass
class GenerationResult:
    images: list[np.ndarray]  # HxWx3 uint8
    seeds: list[int]
    warnings: list[str]
    seconds: float


def img2img_start(num_steps: int, strength: float) -> int:
    """Index of the first step that img2img runs (diffusers' ``get_timesteps``)."""
    if not 0.0 < strength <= 1.0:
        raise InvalidRequest(f"strength must be in (0, 1], got {strength}. Hint: 0.5-0.8 keeps the layout.",
                             param="strength")
    run = min(int(num_steps * strength), num_steps)
    if run < 1:
        raise InvalidRequest(
            f"strength {strength} x steps {num_steps} leaves no step to run. Hint: raise strength or steps.",
            param="strength",
        )
    return num_steps - run


class Engine:
    def __init__(
        self,
        model: LoadedModel,
        *,
        mode: str = "exact",
        lora_dir: str | None = None,
        prompt_cache_size: int = 256,
        lora_cache_count: int = 8,
        lora_cache_bytes: int = 512 * 2**20,
        lora_mode: str = "merge",
    ) -> None:
        if mode not in ENGINE_MODES:
            raise InvalidRequest(f"engine mode {mode!r} unknown. Hint: one of {ENGINE_MODES}.", param="engine_mode")
        if lora_mode not in LORA_MODES:
            raise InvalidRequest(f"LoRA mode {lora_mode!r} unknown. Hint: one of {LORA_MODES}.", param="lora_mode")
        if lora_mode == "per_sample" and mode == "fast":
            raise InvalidRequest("LoRA mode 'per_sample' needs engine mode 'exact': its hooks change with every "
                                 "batch's adapter mix, which a compiled UNet would recompile for.", param="lora_mode")
        self.lora_mode = lora_mode
        self.model = model
        self.mode = mode
        self.device = model.device
        self.registry = LoraRegistry(lora_dir)
        names = LoraApplier.module_names(model.unet, model.text_encoder)
        self.adapters = AdapterCache(self.registry, names, lora_cache_count, lora_cache_bytes)
        self.lora = LoraApplier(model.unet, model.text_encoder, self.adapters)
        self.prompts = PromptEncoder(model.tokenizer, model.text_encoder, model.device, prompt_cache_size)
        self._unet = model.unet
        self._decode = model.vae.decode
        self.autocast: torch.dtype | None = None
        if mode == "fast":
            from models.fast import accelerate

            self._unet, self._decode, self.autocast = accelerate(model)

    # -- 1. check inputs ------------------------------------------------------------------------
    def resolve(self, req: GenerationRequest) -> GenerationRequest:
        d = self.model.defaults
        w0, h0 = self.model.native_size
        sampler = canonical_sampler(req.sampler or d.sampler)
        steps = int(req.steps if req.steps is not None else d.steps)
        if steps < 1:
            raise InvalidRequest(f"steps must be >= 1, got {steps}. Hint: 20-50 is typical.", param="steps")
        guidance = float(req.guidance if req.guidance is not None else d.guidance)
        if not np.isfinite(guidance):
            raise InvalidRequest(f"guidance must be a finite number, got {guidance}.", param="guidance_scale")
        width = int(req.width if req.width is not None else w0)
        height = int(req.height if req.height is not None else h0)
        for field_name, v in (("width", width), ("height", height)):
            if v < 8 or v % 8:
                raise InvalidRequest(f"{field_name} must be a positive multiple of 8, got {v}.", param="size")
        if req.n < 1:
            raise InvalidRequest(f"n must be >= 1, got {req.n}.", param="n")
        seed = req.seed if req.seed is not None else random.randrange(2**32)
        if not 0 <= seed <= MAX_SEED - req.n:
            raise InvalidRequest(f"seed must be in [0, 2^63 - 1 - n], got {seed}.", param="seed")
        loras = normalize_set(req.loras)
        self.lora.load(loras)  # unknown or invalid adapters fail here, before any work is queued
        if req.init_image is not None:
            img2img_start(steps, req.strength)
        return replace(req, sampler=sampler, steps=steps, guidance=guidance, width=width, height=height,
                       seed=seed, loras=loras)

    # -- 2. encode prompt -----------------------------------------------------------------------
    def _embeddings(self, req: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        te_key = self.lora.text_encoder_key(req.loras)
        if self.lora_mode == "merge":
            self.lora.activate(req.loras)
        else:  # only the text encoder's part is merged, for as long as prompts are encoded
            self.lora.activate(te_key, parts=("text_encoder",))
        cond = self.prompts.encode(req.prompt, te_key)
        warnings = [cond.warning] if cond.warning else []
        uncond = None
        if req.guidance > 1.0:  # classifier-free guidance needs the unconditional (negative) half
            neg = self.prompts.encode(req.negative_prompt or "", te_key)
            uncond = neg.embeds
            if neg.warning:
                warnings.append("negative " + neg.warning)
        return cond.embeds, uncond, warnings

    # -- 3. prepare latents ---------------------------------------------------------------------
    def prepare(self, req: GenerationRequest, tag: Any = None) -> list[Sample]:
        """Resolve a request into ``n`` samples at their first step. Image i uses seed + i."""
        req = self.resolve(req)
        cond, uncond, warnings = self._embeddings(req)
        f = self.model.vae_scale_factor
        shape = (1, self.model.latent_channels, req.height // f, req.width // f)
        init = self._encode_image(req) if req.init_image is not None and req.strength < 1.0 else None
        samples = []
        for i in range(req.n):
            sampler = get_sampler(req.sampler)
            plan = sampler.plan(self.model.schedule, req.steps)
            gen = torch.Generator("cpu").manual_seed(req.seed + i)
            if init is None:
                noise = torch.randn(shape, generator=gen, dtype=torch.float32)
                start, x = 0, noise * sampler.init_noise_sigma(plan)
            else:
                # Same draw order as diffusers' img2img: the VAE posterior sample, then the noise.
                mean, std = init
                z0 = (mean + std * torch.randn(mean.shape, generator=gen)) * self.model.vae.config.scaling_factor
                noise = torch.randn(z0.shape, generator=gen, dtype=torch.float32)
                start = img2img_start(req.steps, req.strength)
                x = sampler.add_noise(plan, start, z0, noise)
            samples.append(
                Sample(
                    tag=tag, index=i, seed=req.seed + i, loras=req.loras,
                    group=(req.height, req.width, req.loras if self.lora_mode == "merge" else ()),
                    sampler=sampler, plan=plan, state=SamplerState(), step_index=start, start_index=start,
                    x=x.to(self.device), cond=cond, uncond=uncond, guidance=req.guidance, generator=gen,
                    warnings=list(warnings),
                )
            )
        return samples

    @torch.inference_mode()
    def _encode_image(self, req: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior N(mean, std^2) of the init image, on the CPU (each sample draws its own z)."""
        from models.images import to_model_input

        vae = self.model.vae
        x = to_model_input(req.init_image, req.width, req.height).to(self.device, vae.dtype)
        dist = vae.encode(x).latent_dist
        return dist.mean.float().cpu(), dist.std.float().cpu()

    # -- 4. denoise -----------------------------------------------------------------------------
    @staticmethod
    def groups(samples: Iterable[Sample]) -> dict[GroupKey, list[Sample]]:
        out: dict[GroupKey, list[Sample]] = {}
        for s in samples:
            if not s.done:
                out.setdefault(s.group, []).append(s)
        return out

    @torch.inference_mode()
    def step(self, samples: Sequence[Sample]) -> None:
        """Advance every sample one step with a single UNet call (2B rows where guidance is on)."""
        if not samples:
            return
        key = samples[0].group
        if any(s.group != key or s.done for s in samples):
            raise ValueError("step() takes unfinished samples of one group (same size and adapter set)")
        g_idx = [j for j, s in enumerate(samples) if s.uncond is not None]  # rows that also run unconditioned
        guided = [samples[j] for j in g_idx]
        # Selects the guided rows: a plain slice (a view, no copy) in the usual case where every row is guided.
        sel: slice | list[int] = slice(None) if len(g_idx) == len(samples) else g_idx
        rows = guided + list(samples)
        # Each sample's input scale as one column: one multiply for the batch, the same product per row.
        scale = torch.tensor([s.sampler.input_scale(s.plan, s.step_index) for s in samples], dtype=torch.float32)
        xs = torch.cat([s.x for s in samples])  # the latents, stacked once for the UNet and the sampler
        x = xs * scale.to(self.device).view(-1, 1, 1, 1)
        x_in = torch.cat([x[sel], x]) if guided else x
        t = torch.tensor([float(s.plan.timesteps[s.step_index]) for s in rows], dtype=torch.float32)
        emb = torch.cat([s.uncond for s in guided] + [s.cond for s in samples])
        if self.lora_mode == "merge":
            self.lora.activate(key[2])
            out = self._unet_call(x_in, t.to(self.device), emb)
        else:
            with self.lora.per_row([s.loras for s in rows]):
                out = self._unet_call(x_in, t.to(self.device), emb)
        uncond_out, pred = out[: len(guided)], out[len(guided) :]
        if guided:  # u + g (c - u), each row with its own scale, in one operation
            g = torch.tensor([s.guidance for s in guided], dtype=out.dtype, device=out.device).view(-1, 1, 1, 1)
            # In place: ``out`` is this call's own tensor, and the write touches only its conditional rows.
            pred[sel] = uncond_out + g * (pred[sel] - uncond_out)
        self._sampler_updates(samples, xs, pred)

    def _sampler_updates(self, samples: Sequence[Sample], xs: torch.Tensor, pred: torch.Tensor) -> None:
        """One sampler update per sample, batched where samples are at the same point of the same plan (a
        request's images): the update is elementwise with coefficients from (plan, step), so one call on the
        stacked rows gives each row exactly what its own call would, at a fraction of the per-call overhead
        (16 separate updates cost ~2 ms a step on a 2-core CPU). Noise stays per sample, from
        each sample's own generator, in the same order."""
        together: dict[tuple[int, int, int, bool], list[int]] = {}
        for j, s in enumerate(samples):
            key = (id(s.sampler), id(s.plan), s.step_index, s.state.prev_x0 is None)
            together.setdefault(key, []).append(j)
        for idx in together.values():
            members = [samples[j] for j in idx]
            s0 = members[0]
            if len(members) == 1:
                s0.x = s0.sampler.step(s0.plan, s0.step_index, s0.x, pred[idx[0] : idx[0] + 1], s0.state,
                                       functools.partial(self._noise, s0))
                s0.step_index += 1
                continue
            state = SamplerState(None if s0.state.prev_x0 is None else torch.cat([s.state.prev_x0 for s in members]))
            everyone = len(idx) == len(samples)  # the usual case: one request's images, no copy to make
            x = s0.sampler.step(s0.plan, s0.step_index, xs if everyone else xs[idx], pred if everyone else pred[idx],
                                state, lambda m=members: torch.cat([self._noise(s) for s in m]))
            for k, s in enumerate(members):
                s.x = x[k : k + 1]
                s.state.prev_x0 = None if state.prev_x0 is None else state.prev_x0[k : k + 1]
                s.step_index += 1

    def _unet_call(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        dtype = self.model.dtype
        if self.autocast is not None:
            with torch.autocast(self.device.type, dtype=self.autocast):
                return self._unet(x, t, encoder_hidden_states=emb, return_dict=False)[0].float()
        return self._unet(x.to(dtype), t, encoder_hidden_states=emb.to(dtype), return_dict=False)[0].float()

    def _decode_call(self, z: torch.Tensor) -> torch.Tensor:
        if self.autocast is not None:
            with torch.autocast(self.device.type, dtype=self.autocast):
                return self._decode(z, return_dict=False)[0].float()
        return self._decode(z.to(self.model.vae.dtype), return_dict=False)[0].float()

    def _noise(self, s: Sample) -> torch.Tensor:
        # Drawn on the CPU from the sample's own generator: reproducible across devices and batches.
        return torch.randn(s.x.shape, generator=s.generator, dtype=torch.float32).to(self.device)

    def warm_plan(self, max_batch: int = 16) -> list[tuple[str, int]]:
        """Fast mode: the graphs (``("unet" | "decode", batch size)``) that a step of up to 2 x ``max_batch``
        rows (guidance doubles them) and a decode of up to ``max_batch`` at the native size can use, in the
        order that pays first. Empty in exact mode, which has nothing to compile."""
        if self.mode != "fast":
            return []
        from models.fast import warm_buckets, warm_order

        unet = warm_buckets(2 * max_batch, self._unet.buckets)  # as accelerate() chose them for this device
        decode = warm_buckets(max_batch, self._decode.buckets)
        self._unet.planned, self._decode.planned = set(unet), set(decode)
        return [("unet", b) for b in warm_order(unet, 2)] + [("decode", b) for b in warm_order(decode, 1)]

    @torch.inference_mode()
    def warm(self, part: str, rows: int) -> None:
        """Build (or load from inductor's cache) one graph of the plan and run it once; from then on calls
        that need only built graphs run compiled (``models.fast.Bucketed.ready``)."""
        w, h = self.model.native_size
        f, c = self.model.vae_scale_factor, self.model.latent_channels
        x = torch.zeros(rows, c, h // f, w // f, device=self.device)
        module = self._unet if part == "unet" else self._decode
        module.ready.add(rows)
        try:
            if part == "unet":
                width = self.model.text_encoder.config.hidden_size
                emb = torch.zeros(rows, self.prompts.max_length, width, device=self.device)
                self._unet_call(x, torch.full((rows,), 500.0, device=self.device), emb)
            else:
                self._decode_call(x)
        except BaseException:
            module.ready.discard(rows)
            raise

    def warmup(self, max_batch: int = 16) -> float:
        """Build every graph of ``warm_plan`` now, so that no call waits for a compile or runs eager.
        Returns the seconds it took (0 in exact mode)."""
        t0 = time.perf_counter()
        for part, rows in self.warm_plan(max_batch):
            self.warm(part, rows)
        return time.perf_counter() - t0 if self.mode == "fast" else 0.0

    # -- 5. decode ------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, samples: Sequence[Sample]) -> list[np.ndarray]:
        """Batched VAE decode of finished samples (any mix of sizes) to HxWx3 uint8 arrays."""
        vae = self.model.vae
        out: dict[int, np.ndarray] = {}
        by_size: dict[tuple[int, ...], list[int]] = {}
        for k, s in enumerate(samples):
            by_size.setdefault(tuple(s.x.shape), []).append(k)
        for idx in by_size.values():
            img = self._decode_call(torch.cat([samples[k].x for k in idx]) / vae.config.scaling_factor)
            for k, a in zip(idx, to_uint8(img), strict=True):
                out[k] = a
        return [out[k] for k in range(len(samples))]

    # -- all stages, for the CLI, tests and benchmarks --------------------------------------------
    def denoise(
        self,
        requests: Sequence[GenerationRequest],
        *,
        max_batch: int = 16,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[list[Sample]]:
        """Stages 1-4 for every request: each request's finished samples (their latents ``x``, undecoded)."""
        per_request = [self.prepare(r, tag=k) for k, r in enumerate(requests)]
        samples = [s for group in per_request for s in group]
        total = sum(s.steps_total for s in samples)
        done = 0
        while groups := self.groups(samples):
            for members in groups.values():
                for b in range(0, len(members), max_batch):
                    chunk = members[b : b + max_batch]
                    self.step(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
        return per_request

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        max_batch: int = 16,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[GenerationResult]:
        """Run requests to completion, batching every group's samples up to ``max_batch`` per UNet call."""
        t0 = time.perf_counter()
        per_request = self.denoise(requests, max_batch=max_batch, progress=progress)
        images = self.decode([s for group in per_request for s in group])
        results, k = [], 0
        for group in per_request:
            imgs = images[k : k + len(group)]
            k += len(group)
            warnings = sorted({w for s in group for w in s.warnings})
            results.append(GenerationResult(imgs, [s.seed for s in group], warnings, time.perf_counter() - t0))
        return results
