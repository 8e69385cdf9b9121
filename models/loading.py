"""Loading a diffusers-format Stable Diffusion pipeline directory from a local path.

Only ``.safetensors`` weights are read, never pickles, and nothing is fetched from a network: the
directory must be complete. Device ``auto`` picks CUDA when present; the dtype is fp16 on CUDA (bf16
selectable) and fp32 on CPU.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.errors import InvalidModel
from models.schedules import NoiseSchedule

log = logging.getLogger(__name__)

# Belt and braces: even a component that tried to reach a hub would fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DEFAULTS_FILE = "diffuserve.json"  # optional: our per-model defaults (steps, guidance, sampler, size)


@dataclass
class ModelDefaults:
    steps: int = 30
    guidance: float = 7.5
    sampler: str = "euler"
    width: int | None = None
    height: int | None = None


@dataclass
class LoadedModel:
    """The components of one pipeline, on one device, plus what the engine needs to know about them."""

    name: str
    path: Path
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    schedule: NoiseSchedule
    device: torch.device
    dtype: torch.dtype
    attention: str
    defaults: ModelDefaults = field(default_factory=ModelDefaults)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def native_size(self) -> tuple[int, int]:
        """(width, height) the model was trained at."""
        if self.defaults.width and self.defaults.height:
            return self.defaults.width, self.defaults.height
        s = self.unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else s
        return w * self.vae_scale_factor, h * self.vae_scale_factor

    def describe(self) -> dict[str, Any]:
        w, h = self.native_size
        return {
            "name": self.name,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "attention": self.attention,
            "native_size": f"{w}x{h}",
            "prediction_type": self.schedule.prediction_type,
        }


def write_pipeline_metadata(path: Path, scheduler_config: dict[str, Any], defaults: dict | None = None) -> None:
    """model_index.json and the scheduler config of an SD pipeline directory (stock-diffusers loadable),
    plus our optional per-model defaults. The component weights are saved by their own save_pretrained."""
    (path / "scheduler").mkdir(parents=True, exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_config.get("_class_name", "DDIMScheduler")],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    if defaults:
        (path / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidModel(f"device {device!r} requested but CUDA is not available. Hint: use --device cpu.")
    return dev


def resolve_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise InvalidModel(f"dtype {dtype!r} unknown. Hint: one of auto, fp16, bf16, fp32.", param="dtype")
    if device.type == "cpu" and table[dtype] == torch.float16:
        raise InvalidModel("fp16 is not supported on CPU. Hint: use fp32 (default) or bf16.", param="dtype")
    return table[dtype]


def check_pipeline_dir(path: Path) -> None:
    """Fail with a message naming the path and exactly what is missing, before any loading."""
    if not path.is_dir():
        raise InvalidModel(f"model directory {str(path)!r} does not exist or is not a directory.", param="model")
    if not (path / "model_index.json").is_file():
        raise InvalidModel(
            f"{str(path)!r} has no model_index.json: not a diffusers pipeline directory. "
            "Hint: save one with StableDiffusionPipeline.save_pretrained(path).",
            param="model",
        )
    try:
        json.loads((path / "model_index.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidModel(f"{str(path / 'model_index.json')!r} is not valid JSON: {e}", param="model") from e
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise InvalidModel(f"{str(path)!r} is missing component folder(s): {', '.join(missing)}.", param="model")
    for comp in ("unet", "vae", "text_encoder"):
        d = path / comp
        if not (d / "config.json").is_file():
            raise InvalidModel(f"{str(d)!r} has no config.json.", param="model")
        if not list(d.glob("*.safetensors")):
            other = [p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".ckpt", ".pth")]
            hint = f" (found {', '.join(other)}: pickle formats are never loaded; convert to safetensors)" if other else ""
            raise InvalidModel(f"{str(d)!r} has no .safetensors weights{hint}.", param="model")
    tok = path / "tokenizer"
    if not ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()) and not (tok / "tokenizer.json").is_file():
        raise InvalidModel(f"{str(tok)!r} needs vocab.json and merges.txt (or tokenizer.json).", param="model")
    if not (path / "scheduler" / "scheduler_config.json").is_file():
        raise InvalidModel(f"{str(path / 'scheduler')!r} has no scheduler_config.json.", param="model")


def read_defaults(path: Path) -> ModelDefaults:
    f = path / DEFAULTS_FILE
    if not f.is_file():
        return ModelDefaults()
    data = json.loads(f.read_text())
    known = {k: v for k, v in data.items() if k in ModelDefaults.__dataclass_fields__}
    return ModelDefaults(**known)


def pick_attention(unet: Any, vae: Any, device: torch.device) -> str:
    """xformers' memory-efficient attention on CUDA when installed, else PyTorch SDPA (diffusers' default)."""
    if device.type == "cuda":
        try:
            import xformers  # noqa: F401

            unet.enable_xformers_memory_efficient_attention()
            vae.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as e:  # not installed, or no kernel for this GPU: SDPA is the fallback
            log.info("xformers unavailable (%s); using PyTorch SDPA", e)
    return "sdpa" if hasattr(torch.nn.functional, "scaled_dot_product_attention") else "eager"


def load_pipeline(
    path: str | Path, *, device: str = "auto", dtype: str = "auto", name: str | None = None
) -> LoadedModel:
    path = Path(path).expanduser().resolve()
    check_pipeline_dir(path)  # before importing diffusers (seconds), so a wrong path fails at once
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dev, dtype)
    common = {"local_files_only": True, "use_safetensors": True}
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dt, **common)
        vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dt, **common)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dt, **common)
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise InvalidModel(f"could not load the pipeline at {str(path)!r}: {e}", param="model") from e
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    schedule = NoiseSchedule.from_config(scheduler_config)
    for m in (unet, vae, text_encoder):
        m.to(dev).eval().requires_grad_(False)
    if getattr(vae.config, "force_upcast", False) and dt == torch.float16:
        vae.to(torch.float32)  # VAEs that overflow in fp16 (diffusers marks them) decode in fp32
    attention = pick_attention(unet, vae, dev)
    model = LoadedModel(
        name=name or path.name,
        path=path,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        schedule=schedule,
        device=dev,
        dtype=dt,
        attention=attention,
        defaults=read_defaults(path),
    )
    log.info("loaded %s", model.describe())
    return model
