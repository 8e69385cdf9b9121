"""The ``shapes`` model's architecture: a genuine Stable Diffusion pipeline, just tiny.

AutoencoderKL with downsampling factor 4 (64x64x3 <-> 16x16x4), a CLIPTextModel on our own BPE vocabulary,
and a UNet2DConditionModel with cross-attention at the 8x8 and 4x4 resolutions. Sized so that one image at
20 steps with classifier-free guidance takes well under 1.5 s on a 2-core CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.shapes.data import SIDE, vocabulary

MAX_TOKENS = 32  # captions are short; position embeddings for 32 tokens

VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    # 2 resnets per encoder block, 3 per decoder block: with one fewer the decoder kept a 3 px outline on
    # stripes in 79% of round trips. A pipeline whose VAE had fewer is grown (train_vae.grow_vae).
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=8,
    mid_block_add_attention=False,  # flat colours need no global attention; 2.5x faster to train
    sample_size=SIDE,
)

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=SIDE // 4,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=128,
    # diffusers' UNet2DConditionModel reads ``attention_head_dim`` as the number of heads (its naming issue
    # 2011; ``num_attention_heads`` is refused): (1, 2, 4) heads at 32/64/128 channels is a head size of 32.
    # The first weights had 32 here, so 32 heads of size 2 and 4, whose softmax over 32 x 64 x 64 scores per
    # image was a third of the compiled UNet's CPU time.
    attention_head_dim=(1, 2, 4),
    norm_num_groups=16,
)

TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS,
)

# DDPM's linear schedule and v-prediction, not SD 1.5's scaled_linear + epsilon: with scaled_linear,
# x_T still carries sqrt(abar_T) = 0.068 of the clean latent, whose mean *is* the background colour, so an
# epsilon model learns to read the background from the noise's mean instead of the caption (measured: the
# background followed the seed, 16% right). Linear betas leave sqrt(abar_T) = 0.0066 and v-prediction makes
# the high-noise loss "predict the clean image from the text" (Lin et al. 2024, "Common diffusion noise
# schedules and sample steps are flawed"; Salimans & Ho 2022).
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}

DEFAULTS = {"steps": 20, "guidance": 4.0, "sampler": "dpmpp_2m", "width": SIDE, "height": SIDE}

LORA_RANK = 8
# Attention projections (required), plus the feed-forward and the resnet convolutions, so that a style
# adapter can change textures (stripes) and not only where things are.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                "conv1", "conv2")


def build_tokenizer(directory: Path) -> Any:
    from transformers import CLIPTokenizer

    from models.shapes.tokenizer import write_clip_tokenizer

    write_clip_tokenizer(directory, vocabulary(), model_max_length=MAX_TOKENS)
    return CLIPTokenizer.from_pretrained(directory)


def build_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_unet() -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_text_encoder(tokenizer_dir: Path) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    eos = vocab["<|endoftext|>"]
    return CLIPTextModel(
        CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos,
                       pad_token_id=eos, **TEXT_CONFIG)
    )


def write_pipeline_files(out: Path) -> None:
    """model_index.json, scheduler config and our defaults (the weights are saved by the trainer)."""
    from models.loading import write_pipeline_metadata

    write_pipeline_metadata(out, SCHEDULER_CONFIG, DEFAULTS)
