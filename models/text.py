"""Prompt encoding with a bounded LRU cache of embeddings.

A prompt longer than the tokenizer's window (77 tokens for CLIP) is truncated, as stock diffusers does,
and the caller gets a warning naming the dropped text (returned with the result) instead of a silent cut.
The cache key includes the text encoder's adapter state, since a text-encoder LoRA changes the embedding.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Encoded:
    embeds: torch.Tensor  # (1, L, D) on the model's device and dtype
    warning: str | None = None


class PromptEncoder:
    def __init__(self, tokenizer: Any, text_encoder: Any, device: torch.device, capacity: int = 256) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.capacity = capacity
        self._cache: OrderedDict[tuple[str, Any], Encoded] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def clear(self) -> None:
        self._cache.clear()

    def encode(self, text: str, adapter_key: Any = ()) -> Encoded:
        key = (text, adapter_key)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return hit
        self.misses += 1
        enc = self._encode(text)
        self._cache[key] = enc
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return enc

    @torch.inference_mode()
    def _encode(self, text: str) -> Encoded:
        tok = self.tokenizer
        batch = tok(text, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt")
        ids = batch.input_ids
        warning = None
        full = tok(text, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > ids.shape[-1]:
            dropped = tok.batch_decode(full[:, self.max_length - 1 : -1])[0]
            warning = (
                f"prompt truncated to the text encoder's {self.max_length - 2} tokens; "
                f"this part was ignored: {dropped!r}"
            )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = batch.attention_mask.to(self.device)
        embeds = self.text_encoder(ids.to(self.device), attention_mask=mask)[0]
        return Encoded(embeds=embeds, warning=warning)
