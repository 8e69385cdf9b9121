"""Build small random-weight Stable Diffusion pipelines on disk (tests and benchmarks; no network).

Shapes follow diffusers' own ``get_dummy_components``, scaled down further for the tiny variant.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.loading import write_pipeline_metadata
from models.shapes.tokenizer import write_clip_tokenizer

WORDS = ["a", "an", "the", "of", "on", "at", "in", "with", "and", "photo", "picture", "painting", "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "small", "large", "circle", "square", "triangle", "disc", "box", "top", "bottom", "left", "right", "center", "upper", "lower", "background", "cat", "dog"]

SCALES = {
    # block_out_channels, layers_per_block, cross_attention_dim / text hidden, vae blocks, latent side
    "tiny": dict(unet=(8, 16), layers=1, hidden=16, heads=2, te_layers=2, vae=(8, 16), groups=4, sample=16),
    "small": dict(unet=(32, 64), layers=2, hidden=32, heads=4, te_layers=3, vae=(16, 32), groups=8, sample=16),
}


def default_scheduler_config(**overrides) -> dict:
    cfg = {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }
    cfg.update(overrides)
    return cfg


def build_random_pipeline(
    path: str | Path, *, scale: str = "tiny", seed: int = 0, scheduler: dict | None = None, defaults: dict | None = None
) -> Path:
    """Write a complete diffusers pipeline directory with random weights and our own tokenizer."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    p = SCALES[scale]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=p["sample"],
        in_channels=4,
        out_channels=4,
        block_out_channels=p["unet"],
        layers_per_block=p["layers"],
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=p["hidden"],
        attention_head_dim=p["heads"],
        norm_num_groups=p["groups"],
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(p["vae"]),
        up_block_types=("UpDecoderBlock2D",) * len(p["vae"]),
        block_out_channels=p["vae"],
        latent_channels=4,
        norm_num_groups=p["groups"],
        sample_size=p["sample"] * 2 ** (len(p["vae"]) - 1),
    )
    tok_dir = write_clip_tokenizer(path / "tokenizer", WORDS)
    vocab = json.loads((tok_dir / "vocab.json").read_text())
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=p["hidden"],
            intermediate_size=p["hidden"] * 2,
            num_hidden_layers=p["te_layers"],
            num_attention_heads=p["heads"],
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    unet.save_pretrained(path / "unet", safe_serialization=True)
    vae.save_pretrained(path / "vae", safe_serialization=True)
    te.save_pretrained(path / "text_encoder", safe_serialization=True)
    write_pipeline_metadata(path, scheduler or default_scheduler_config(), defaults)
    return path


UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def lora_targets(module: torch.nn.Module, suffixes: tuple[str, ...]) -> dict[str, torch.nn.Linear]:
    return {
        n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(suffixes)
    }


def random_lora_state_dict(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    *,
    rank: int = 4,
    seed: int = 0,
    naming: str = "peft",
    alpha: float | None = None,
    magnitude: float = 0.3,
) -> dict[str, torch.Tensor]:
    """A random LoRA over the attention projections, in diffusers/PEFT or kohya key naming."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    parts = [("unet", unet, UNET_TARGETS)]
    if text_encoder is not None:
        parts.append(("text_encoder", text_encoder, TE_TARGETS))
    for part, module, suffixes in parts:
        for name, lin in sorted(lora_targets(module, suffixes).items()):
            down = torch.randn(rank, lin.in_features, generator=g) * magnitude
            up = torch.randn(lin.out_features, rank, generator=g) * magnitude
            if naming == "peft":
                sd[f"{part}.{name}.lora_A.weight"] = down
                sd[f"{part}.{name}.lora_B.weight"] = up
                if alpha is not None:
                    sd[f"{part}.{name}.alpha"] = torch.tensor(float(alpha))
            else:
                prefix = "lora_unet_" if part == "unet" else "lora_te_"
                flat = prefix + name.replace(".", "_")
                sd[f"{flat}.lora_down.weight"] = down
                sd[f"{flat}.lora_up.weight"] = up
                sd[f"{flat}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
    return sd
