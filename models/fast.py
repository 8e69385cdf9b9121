"""The engine's ``fast`` mode: compiled UNet and VAE decoder, reduced precision where the hardware has it.

- CPU: torch.compile (inductor) of the UNet forward and the VAE decoder; bf16 autocast only on CPUs with
  native bf16 matrix instructions (AVX512-BF16 or AMX), where it pays; channels_last memory format.
- CUDA: the model is already fp16/bf16 with SDPA or xformers attention; channels_last and torch.compile.

Batch sizes vary from step to step under continuous batching, so the batch dimension is compiled as
dynamic rather than recompiling for every size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


@cache
def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def accelerate(model: Any) -> tuple[Callable[..., Any], Callable[..., Any], torch.dtype | None]:
    """Return (unet_forward, vae_decode, autocast_dtype) for the fast mode on the model's device."""
    autocast = None
    if model.device.type == "cpu" and model.dtype == torch.float32 and cpu_has_native_bf16():
        autocast = torch.bfloat16
    model.unet.to(memory_format=torch.channels_last)
    model.vae.to(memory_format=torch.channels_last)
    try:
        unet = torch.compile(model.unet, dynamic=True)
        decode = torch.compile(model.vae.decode, dynamic=True)
    except Exception as e:  # no compiler toolchain: keep the eager modules, still channels_last
        log.warning("torch.compile unavailable (%s); fast mode runs eager", e)
        unet, decode = model.unet, model.vae.decode
    log.info("fast mode on %s: compile, channels_last, autocast=%s", model.device, autocast)
    return unet, decode, autocast
