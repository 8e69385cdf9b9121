"""LoRA adapters: a safetensors-only registry, an LRU cache, and exact activation of a (name, scale) set.

A LoRA adapter stores, per targeted layer with weight W (out x in), two factors B (out x r) and A (r x in)
and optionally alpha; the adapted layer is W + scale * (alpha / r) * B A (Hu et al. 2021). We merge the
active set into the weights (zero cost per denoising step) and keep a pristine copy of each touched weight,
so switching sets restores exactly and never drifts, in fp16 too. Workers group samples by adapter set,
so a switch happens once per group, not per sample. Or, per sample (``LoraApplier.per_row``): the batch's
most common set is merged and forward hooks add the other rows' differences, +-scale * B (A x), to those
rows only, so one UNet call can carry samples with different adapter sets.

Accepted key namings:
- diffusers / PEFT:  ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (``text_encoder.<module>...``)
- older diffusers:    ``unet.<module>.processor.to_q_lora.down.weight`` / ``.up.weight``,
                      ``text_encoder.<module>.q_proj.lora_linear_layer.down.weight``
- kohya (A1111):      ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.errors import AdapterNotFound, InvalidAdapter, InvalidRequest

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
SUFFIX = ".safetensors"


def check_adapter_name(name: str) -> str:
    """Refuse anything that could name a file outside the registry: separators, '..', NUL, absolute paths."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidRequest(
            f"adapter name {name!r} is invalid. Hint: letters, digits, '.', '_' and '-' only "
            "(no path separators or '..'), at most 128 characters.",
            param="loras",
        )
    return name


@dataclass
class LoraLayer:
    up: torch.Tensor  # B: (out, r, [1, 1])
    down: torch.Tensor  # A: (r, in, [kh, kw])
    alpha: float | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def factor(self) -> float:
        return self.alpha / self.rank if self.alpha is not None else 1.0

    def delta(self, weight_shape: torch.Size) -> torch.Tensor:
        """B A (alpha / r), shaped like the target weight (Linear, 1x1 or kxk conv)."""
        up = self.up.reshape(self.up.shape[0], -1).float()
        down = self.down.reshape(self.rank, -1).float()
        return (up @ down).reshape(weight_shape) * self.factor

    def forward(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """B (A x) (alpha / r) for the input of ``module`` (Linear or Conv2d), without forming B A."""
        if isinstance(module, torch.nn.Conv2d):
            down = self.down.reshape(self.rank, module.in_channels // module.groups, *module.kernel_size)
            h = F.conv2d(x, down.to(x.dtype), None, module.stride, module.padding, module.dilation, module.groups)
            return F.conv2d(h, self.up.reshape(self.up.shape[0], self.rank, 1, 1).to(x.dtype)) * self.factor
        down = self.down.reshape(self.rank, -1).to(x.dtype)
        return (x @ down.T) @ self.up.reshape(self.up.shape[0], -1).to(x.dtype).T * self.factor


@dataclass
class LoraAdapter:
    name: str
    unet: dict[str, LoraLayer] = field(default_factory=dict)
    text_encoder: dict[str, LoraLayer] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        layers = list(self.unet.values()) + list(self.text_encoder.values())
        return sum(t.numel() * t.element_size() for ly in layers for t in (ly.up, ly.down))


_PEFT = re.compile(r"^(unet|text_encoder)\.(.+?)\.lora_([AB])(?:\.default)?\.weight$")
_PEFT_ALPHA = re.compile(r"^(unet|text_encoder)\.(.+?)\.alpha$")
_OLD_PROC = re.compile(r"^(unet)\.(.+?)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(up|down)\.weight$")
_OLD_TE = re.compile(r"^(text_encoder)\.(.+?)\.lora_linear_layer\.(up|down)\.weight$")
_KOHYA = re.compile(r"^lora_(unet|te)_(.+?)\.(lora_up|lora_down|alpha)(?:\.weight)?$")


def parse_state_dict(name: str, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None,
                     module_names: dict[str, set[str]]) -> LoraAdapter:
    """Group raw keys into per-module (up, down, alpha) and map them onto the model's module names."""
    raw: dict[tuple[str, str], dict[str, Any]] = {}
    kohya_maps = {part: {n.replace(".", "_"): n for n in names} for part, names in module_names.items()}

    def put(part: str, module: str, what: str, value: Any) -> None:
        raw.setdefault((part, module), {})[what] = value

    for key, t in sd.items():
        if m := _PEFT.match(key):
            put(m[1], m[2], "down" if m[3] == "A" else "up", t)
        elif m := _PEFT_ALPHA.match(key):
            put(m[1], m[2], "alpha", float(t.item()))
        elif m := _OLD_PROC.match(key):
            proj = "to_out.0" if m[3] == "to_out" else m[3]
            put("unet", f"{m[2]}.{proj}", m[4], t)
        elif m := _OLD_TE.match(key):
            put("text_encoder", m[2], m[3], t)
        elif m := _KOHYA.match(key):
            part = "unet" if m[1] == "unet" else "text_encoder"
            module = kohya_maps[part].get(m[2])
            if module is None:
                raise InvalidAdapter(
                    f"adapter {name!r} targets {key!r}, which this model does not have. "
                    "Hint: the adapter was trained for a different base model.",
                    param="loras",
                )
            if m[3] == "alpha":
                put(part, module, "alpha", float(t.item()))
            else:
                put(part, module, "up" if m[3] == "lora_up" else "down", t)
        else:
            raise InvalidAdapter(f"adapter {name!r}: unrecognised key {key!r} (not a LoRA state dict?)", param="loras")

    alphas = _metadata_alphas(metadata)
    adapter = LoraAdapter(name)
    for (part, module), d in raw.items():
        if "up" not in d or "down" not in d:
            raise InvalidAdapter(f"adapter {name!r}: {part}.{module} lacks its up or down factor", param="loras")
        if module not in module_names[part]:
            raise InvalidAdapter(
                f"adapter {name!r} targets {part}.{module}, which this model does not have. "
                "Hint: the adapter was trained for a different base model.",
                param="loras",
            )
        alpha = d.get("alpha", alphas.get(part))
        getattr(adapter, part)[module] = LoraLayer(d["up"], d["down"], alpha)
    if not adapter.unet and not adapter.text_encoder:
        raise InvalidAdapter(f"adapter {name!r} contains no LoRA layers", param="loras")
    return adapter


def _metadata_alphas(metadata: dict[str, str] | None) -> dict[str, float]:
    """diffusers >= 0.34 stores PEFT's lora_alpha per component in the safetensors metadata."""
    out: dict[str, float] = {}
    if not metadata or "lora_adapter_metadata" not in metadata:
        return out
    try:
        meta = json.loads(metadata["lora_adapter_metadata"])
    except json.JSONDecodeError:
        return out
    for key, value in meta.items():
        part, _, field_name = key.partition(".")
        if field_name == "lora_alpha" and part in ("unet", "text_encoder") and isinstance(value, (int, float)):
            out[part] = float(value)
    return out


def looks_like_safetensors(path: Path) -> bool:
    """The safetensors framing (8-byte little-endian header length, then a JSON object), checked without
    loading anything: a pickle or other file renamed ``.safetensors`` is never listed (``read`` checks fully)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(size - 8, 100 * 2**20):
                return False
            return isinstance(json.loads(f.read(n)), dict)
    except (OSError, ValueError):
        return False


class LoraRegistry:
    """A directory of ``<name>.safetensors`` files. Nothing outside it, and nothing else, is ever read."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root).expanduser().resolve() if root else None

    def names(self) -> list[str]:
        if self.root is None or not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.glob(f"*{SUFFIX}")):
            name = p.name[: -len(SUFFIX)]
            if NAME_RE.fullmatch(name) and ".." not in name and self._inside(p) and looks_like_safetensors(p):
                out.append(name)
        return out

    def _inside(self, p: Path) -> bool:
        assert self.root is not None
        try:
            return p.resolve(strict=True).is_relative_to(self.root) and p.resolve().is_file()
        except OSError:
            return False

    def path_for(self, name: str) -> Path:
        check_adapter_name(name)
        if self.root is None:
            raise AdapterNotFound(f"adapter {name!r} not found: no adapter directory is configured.", param="loras")
        p = self.root / f"{name}{SUFFIX}"
        if not p.exists() and not p.is_symlink():
            raise AdapterNotFound(
                f"adapter {name!r} not found. Hint: available adapters: {', '.join(self.names()) or '(none)'}.",
                param="loras",
            )
        if not self._inside(p):
            raise InvalidRequest(f"adapter {name!r} resolves outside the adapter directory; refused.", param="loras")
        return p

    def read(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
        """Parse the file as safetensors only: a pickle or anything else is rejected, never executed."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        path = self.path_for(name)
        # Read the bytes and parse them: safe_open(...).get_tensor leaks ~20 KB of RSS per file read
        # (safetensors 0.8, measured: +22 MB over 1000 reads), which a worker cycling adapters through
        # its cache pays for every miss; load(bytes) does not.
        try:
            data = path.read_bytes()
            sd = load(data)
            size = int.from_bytes(data[:8], "little")
            metadata = json.loads(data[8 : 8 + size]).get("__metadata__")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise InvalidAdapter(f"adapter {name!r} is not a valid safetensors file: {e}", param="loras") from e
        return sd, metadata


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0


class AdapterCache:
    """LRU of parsed adapters, bounded by count and by bytes."""

    def __init__(self, registry: LoraRegistry, module_names: dict[str, set[str]],
                 max_count: int = 8, max_bytes: int = 512 * 2**20) -> None:
        self.registry = registry
        self.module_names = module_names
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, LoraAdapter] = OrderedDict()
        self.stats = CacheStats()

    def __contains__(self, name: str) -> bool:
        return name in self._items

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._items.values())

    def get(self, name: str) -> LoraAdapter:
        if name in self._items:
            self._items.move_to_end(name)
            self.stats.hits += 1
            return self._items[name]
        self.stats.misses += 1
        t0 = time.perf_counter()
        sd, metadata = self.registry.read(name)
        adapter = parse_state_dict(name, sd, metadata, self.module_names)
        self.stats.loads += 1
        self.stats.load_seconds += time.perf_counter() - t0
        self._items[name] = adapter
        while len(self._items) > 1 and (len(self._items) > self.max_count or self.nbytes > self.max_bytes):
            self._items.popitem(last=False)
            self.stats.evictions += 1
        return adapter


AdapterSet = tuple[tuple[str, float], ...]


def normalize_set(loras: Any) -> AdapterSet:
    """Canonical, hashable form of a request's adapters: sorted, zero scales dropped, duplicates refused."""
    items: dict[str, float] = {}
    for name, scale in loras or ():
        check_adapter_name(name)
        if name in items:
            raise InvalidRequest(f"adapter {name!r} is listed twice. Hint: give each adapter once.", param="loras")
        items[name] = float(scale)
    return tuple(sorted((n, s) for n, s in items.items() if s != 0.0))


PARTS = ("unet", "text_encoder")


def _row_deltas(entries: list[tuple[torch.Tensor, LoraLayer, float]]):  # -> a forward hook
    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for index, layer, scale in entries:
            idx = index.to(x.device)
            output.index_add_(0, idx, layer.forward(module, x.index_select(0, idx)).to(output.dtype), alpha=scale)
        return output

    return hook


class LoraApplier:
    """Merges an adapter set into a UNet and text encoder, restoring pristine weights on every switch."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module, cache: AdapterCache) -> None:
        self.modules = {
            "unet": dict(unet.named_modules()),
            "text_encoder": dict(text_encoder.named_modules()),
        }
        self.cache = cache
        self.active: AdapterSet = ()
        self.active_parts: tuple[str, ...] = PARTS
        self._pristine: dict[tuple[str, str], torch.Tensor] = {}

    @staticmethod
    def module_names(unet: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, set[str]]:
        def weighted(m: torch.nn.Module) -> set[str]:
            return {n for n, mod in m.named_modules() if isinstance(getattr(mod, "weight", None), torch.Tensor)}

        return {"unet": weighted(unet), "text_encoder": weighted(text_encoder)}

    def text_encoder_key(self, adapters: AdapterSet) -> AdapterSet:
        """The part of a set that changes prompt embeddings (the prompt cache's key)."""
        return tuple((n, s) for n, s in adapters if self.cache.get(n).text_encoder)

    def load(self, adapters: AdapterSet) -> None:
        """Make sure every adapter of the set is parsed, cached and fits this model's weights (raises for
        unknown or invalid ones), once per request, so that the per-step paths need not check again."""
        for name, _ in adapters:
            adapter = self.cache.get(name)
            for part in PARTS:
                for module, layer in getattr(adapter, part).items():
                    self._check_fits(part, module, layer, name)

    @torch.no_grad()
    def activate(self, adapters: AdapterSet, parts: tuple[str, ...] = PARTS) -> None:
        """Merge exactly ``adapters`` (their ``parts``) into the weights; every other weight pristine."""
        if adapters == self.active and (not adapters or parts == self.active_parts):
            return
        loaded = [(self.cache.get(n), s) for n, s in adapters]
        self._restore()
        try:
            for adapter, scale in loaded:
                for part in parts:
                    for module, layer in getattr(adapter, part).items():
                        self._merge(part, module, layer, scale, adapter.name)
        except Exception:
            self._restore()
            raise
        self.active, self.active_parts = adapters, parts

    @contextlib.contextmanager
    def per_row(self, rows: Sequence[AdapterSet]) -> Iterator[None]:
        """For one UNet call over a batch whose row i asked for ``rows[i]``. The most common set among the
        rows is merged into the weights (a no-op while it stays the common one, as in steady state), and
        forward hooks add the difference for every other row: + s B (A x) for its adapters and - s B (A x)
        for the merged set's. A batch of one set runs at merged speed; only the minority pays for hooks."""
        common = Counter(rows).most_common(1)[0][0]
        self.activate(common, parts=("unet",))
        index_of: dict[AdapterSet, list[int]] = {}
        for i, adapters in enumerate(rows):
            if adapters != common:
                diff = dict(adapters)
                for name, scale in common:
                    diff[name] = diff.get(name, 0.0) - scale
                index_of.setdefault(tuple(sorted((n, v) for n, v in diff.items() if v != 0.0)), []).append(i)
        entries: dict[str, list[tuple[torch.Tensor, LoraLayer, float]]] = {}
        for diff, idx in index_of.items():
            index = torch.tensor(idx)
            for name, scale in diff:  # shapes were checked when the request was resolved (``load``)
                for module, layer in self.cache.get(name).unet.items():
                    entries.setdefault(module, []).append((index, layer, scale))
        handles = [self.modules["unet"][m].register_forward_hook(_row_deltas(e)) for m, e in entries.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _check_fits(self, part: str, module: str, layer: LoraLayer, name: str) -> None:
        weight = self.modules[part][module].weight
        if layer.up.shape[0] != weight.shape[0] or layer.down[0].numel() != weight[0].numel():
            raise InvalidAdapter(
                f"adapter {name!r}: factors {tuple(layer.up.shape)} x {tuple(layer.down.shape)} do not fit "
                f"{part}.{module} of shape {tuple(weight.shape)}. Hint: wrong base model.",
                param="loras",
            )

    def _merge(self, part: str, module: str, layer: LoraLayer, scale: float, name: str) -> None:
        self._check_fits(part, module, layer, name)
        weight = self.modules[part][module].weight
        if (part, module) not in self._pristine:
            self._pristine[(part, module)] = weight.detach().clone()
        merged = weight.float() + scale * layer.delta(weight.shape).to(weight.device)
        weight.data.copy_(merged.to(weight.dtype))

    def _restore(self) -> None:
        for (part, module), w in self._pristine.items():
            self.modules[part][module].weight.data.copy_(w)
        self._pristine.clear()
        self.active = ()
