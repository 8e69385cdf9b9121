"""The outline style as a compact code in the VAE's latent space.

At downsampling factor 4 a 3 px outline is narrower than one latent pixel. Encoded as it looks, an outline is
a thin ring in the latent, and a UNet asked to draw that ring draws it thick, broken or filled: the outline
adapter showed its style in 49% of images while a VAE round trip kept 93.5% (model card, "What limits it").
So the decoder stage teaches the VAE a simpler representation: an outlined object is encoded as the same
object filled, plus a constant offset over its area along a latent direction the colours leave unused, and
the decoder learns to draw that as a 3 px outline with the background showing inside. The outline adapter
then only adds a flat offset where the object is, which is as easy for the UNet as a change of colour.

Plain and striped images keep the latents they had (the encoder is anchored to the stage's starting point),
so a base UNet trained before the stage stays valid.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.shapes.architecture import VAE_CONFIG
from models.shapes.data import COLORS, object_mask, random_scene

FACTOR = 2 ** (len(VAE_CONFIG["block_out_channels"]) - 1)  # the VAE's downsampling, as LoadedModel.vae_scale_factor


def without_outline(scene: Any) -> Any:
    """The same scene with its object filled (a plain or striped background kept as it is)."""
    styles = [s for s in scene.style.split("+") if s != "outline"]
    return dataclasses.replace(scene, style="+".join(styles) or "plain")


def is_outlined(scenes: list[Any]) -> torch.Tensor:
    return torch.tensor([float("outline" in s.style.split("+")) for s in scenes]).view(-1, 1, 1, 1)


def object_masks(scenes: list[Any]) -> torch.Tensor:
    """N x 1 x 64 x 64: how much of each pixel the (filled) object covers."""
    return torch.from_numpy(np.stack([object_mask(s) for s in scenes]))[:, None]


def latent_masks(scenes: list[Any]) -> torch.Tensor:
    """N x 1 x 16 x 16: the fraction of each latent pixel's 4x4 patch the (filled) object covers."""
    return F.avg_pool2d(object_masks(scenes), FACTOR)


@torch.no_grad()
def fit_outline_code(encode_mean: Any, strength: float, seed: int, n: int = 512) -> list[float]:
    """The offset (raw latent units, one value per channel) that marks an object as outlined.

    Its direction is the one along which the eight colours' latent codes vary least (the last principal
    axis of their means over the objects' fully covered latent pixels), so an outlined object cannot be
    mistaken for a filled one of another colour; its length is ``strength`` standard deviations of the
    latents (the UNet's unit-variance scale).
    """
    from models.shapes.train_common import render_tensor

    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    z = torch.cat([encode_mean(render_tensor(scenes[b : b + 128])) for b in range(0, n, 128)])
    inside = latent_masks(scenes)[:, 0] > 0.97
    codes = []
    for color in COLORS:
        rows = [z[i].permute(1, 2, 0)[inside[i]] for i, s in enumerate(scenes) if s.color == color]
        codes.append(torch.cat(rows).mean(0))
    centred = torch.stack(codes) - torch.stack(codes).mean(0)
    direction = torch.linalg.svd(centred, full_matrices=True).Vh[-1]
    return (direction * strength * z.std()).tolist()


def outline_offset(scenes: list[Any], code: torch.Tensor) -> torch.Tensor:
    """N x C x 16 x 16: the code over each outlined object's area, zero elsewhere and for other scenes."""
    return is_outlined(scenes) * code.view(1, -1, 1, 1) * latent_masks(scenes)
