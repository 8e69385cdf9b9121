"""The engine's ``fast`` mode: compiled UNet and VAE decoder, reduced precision where the hardware has it.

- CPU: torch.compile (inductor) of the UNet forward and the VAE decoder; bf16 autocast only on CPUs with
  native bf16 matrix instructions (AVX512-BF16 or AMX), where it pays; channels_last memory format.
- CUDA: the model is already fp16/bf16 with SDPA or xformers attention; channels_last and torch.compile.

On CPU shapes are compiled static, not dynamic: inductor's static-shape CPU kernels are much faster (bundled
model, UNet at 32 rows: eager 204 ms, static 147 ms; dynamic compile gave the engine only 1.08x stock at
batch 16). Batch sizes vary from step to step under continuous batching, so every call at the model's
native size is padded or split into a few fixed batch sizes (``BUCKETS``), compiled once each (the engine's
``warm_plan``); other sizes run the eager modules rather than stall a server for a compile. On CUDA the batch
dimension stays dynamic (``buckets_for``).

A call runs compiled only once every graph it needs has been built and run (``Bucketed.ready``); until then
it runs the eager module, in the same precision. So an engine serves at once and speeds up graph by graph
as they come in: ``Engine.warmup`` builds them all before returning, ``models.warm.BackgroundWarmup`` has a
separate process compile them while a worker serves, then loads them from inductor's on-disk cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32)


@cache
def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def chunks(rows: int, buckets: Sequence[int] = BUCKETS) -> list[tuple[int, int]]:
    """Split ``rows`` into (real rows, bucket) pieces: each piece runs padded up to its bucket size.

    Pads when that wastes at most a quarter of the bucket, else splits off the largest bucket that fits;
    rows beyond the largest bucket go in pieces of that size."""
    out: list[tuple[int, int]] = []
    while rows > 0:
        top = buckets[-1]
        if rows >= top:
            out.append((top, top))
            rows -= top
            continue
        up = min(b for b in buckets if b >= rows)
        down = max((b for b in buckets if b <= rows), default=0)
        if not down or up - rows <= up // 4:
            out.append((rows, up))
            rows = 0
        else:
            out.append((down, down))
            rows -= down
    return out


def run_bucketed(fn: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor],
                 buckets: Sequence[int] = BUCKETS) -> torch.Tensor:
    """``fn(*tensors)`` over the batch dimension, in bucket-sized pieces (padded with copies of the last row,
    which every row-independent model ignores); the padding rows' outputs are dropped."""
    if not buckets:  # dynamic shapes: any batch size in one call
        return fn(*tensors)
    outs, i = [], 0
    for size, bucket in chunks(tensors[0].shape[0], buckets):
        part = [t[i : i + size] for t in tensors]
        if bucket > size:
            part = [torch.cat([p, p[-1:].expand(bucket - size, *p.shape[1:])]) for p in part]
        outs.append(fn(*part)[:size])
        i += size
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class Bucketed:
    """A module call compiled for static shapes at one spatial size, on bucketed batch sizes."""

    def __init__(self, compiled: Callable[..., Any], eager: Callable[..., Any], spatial: tuple[int, int],
                 buckets: Sequence[int] = BUCKETS) -> None:
        self.compiled, self.eager, self.spatial, self.buckets = compiled, eager, spatial, tuple(buckets)
        self.ready: set[int] = set()  # batch sizes whose graph is built and has run once
        self.planned: set[int] = set()  # the sizes a warm-up will build (with dynamic shapes: all of them)

    def compiled_for(self, rows: int) -> bool:
        """Whether a call of ``rows`` rows runs compiled without compiling anything (else it runs eager)."""
        if not self.buckets:  # dynamic shapes: a warmed size, or any size once the planned ones are in
            return rows in self.ready or bool(self.planned) and self.planned <= self.ready
        return all(b in self.ready for _, b in chunks(rows, self.buckets))

    def native(self, x: torch.Tensor) -> bool:
        return tuple(x.shape[-2:]) == self.spatial


class FastUNet(Bucketed):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 return_dict: bool = False) -> tuple[torch.Tensor]:
        if not self.native(x) or not self.compiled_for(x.shape[0]):
            return (self.eager(x, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0],)
        return (run_bucketed(lambda a, b, c: self.compiled(a, b, encoder_hidden_states=c, return_dict=False)[0],
                             [x, t.expand(x.shape[0]).contiguous(), encoder_hidden_states], self.buckets),)


class FastDecode(Bucketed):
    def __call__(self, z: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        if not self.native(z) or not self.compiled_for(z.shape[0]):
            return (self.eager(z, return_dict=False)[0],)
        return (run_bucketed(lambda a: self.compiled(a, return_dict=False)[0], [z], self.buckets),)


def accelerate(model: Any) -> tuple[Callable[..., Any], Callable[..., Any], torch.dtype | None]:
    """Return (unet_forward, vae_decode, autocast_dtype) for the fast mode on the model's device."""
    autocast = None
    if model.device.type == "cpu" and model.dtype == torch.float32 and cpu_has_native_bf16():
        autocast = torch.bfloat16
    model.unet.to(memory_format=torch.channels_last)
    model.vae.to(memory_format=torch.channels_last)
    w, h = model.native_size
    f = model.vae_scale_factor
    buckets = buckets_for(model.device)
    # One graph per bucket (adapter merges are in place: the same graphs serve every adapter set).
    cfg = torch._dynamo.config
    limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(cfg, limit, max(getattr(cfg, limit), 4 * len(BUCKETS)))
    try:
        unet = torch.compile(model.unet, dynamic=not buckets)
        decode = torch.compile(model.vae.decode, dynamic=not buckets)
    except Exception as e:  # no compiler toolchain: keep the eager modules, still channels_last
        log.warning("torch.compile unavailable (%s); fast mode runs eager", e)
        unet, decode = model.unet, model.vae.decode
    log.info("fast mode on %s: compile (%s) at %dx%d, channels_last, autocast=%s", model.device,
             f"static, batch buckets {buckets}" if buckets else "dynamic batch", w, h, autocast)
    spatial = (h // f, w // f)
    return (FastUNet(unet, model.unet, spatial, buckets), FastDecode(decode, model.vae.decode, spatial, buckets),
            autocast)


def buckets_for(device: torch.device) -> tuple[int, ...]:
    """Static buckets on CPU, where they were measured to pay; on CUDA (not measured here: no GPU) the batch
    stays dynamic, as Triton's kernels handle it well and a full-size UNet's compile per bucket is long."""
    return BUCKETS if device.type == "cpu" else ()


def warm_buckets(max_rows: int, buckets: Sequence[int] = BUCKETS) -> list[int]:
    """The batch sizes to compile for a batch of up to ``max_rows`` rows: every bucket it can use; with
    dynamic shapes, 1 (which dynamo specialises), 2 and the largest."""
    if not buckets:
        return sorted({1, min(2, max_rows), max_rows})
    return sorted({b for rows in range(1, max_rows + 1) for _, b in chunks(rows, buckets)})


def warm_order(sizes: Sequence[int], first: int) -> list[int]:
    """Build order: the size a lone request uses (``first``), then from the largest down, since a full
    batch is where the compiled graph saves the most time per call."""
    rest = sorted((b for b in sizes if b != first), reverse=True)
    return ([first] if first in sizes else []) + rest
