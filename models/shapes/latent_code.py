"""The outline and stripes styles as compact codes in the VAE's latent space.

At downsampling factor 4 a 3 px outline is narrower than one latent pixel. Encoded as it looks, an outline is
a thin ring in the latent, and a UNet asked to draw that ring draws it thick, broken or filled: the outline
adapter showed its style in 49% of images while a VAE round trip kept 93.5% (model card, "What limits it").
So the decoder stage teaches the VAE a simpler representation: an outlined object is encoded as the same
object filled, plus a constant offset over its area along a latent direction the colours leave unused, and
the decoder learns to draw that as a 3 px outline with the background showing inside. The outline adapter
then only adds a flat offset where the object is, which is as easy for the UNet as a change of colour.

Stripes had the opposite problem. A 4x4 latent patch holds both stripe colours whatever its place (period 8 px,
diagonal), so the joint VAE encoded a striped background as a flat offset plus a faint checkerboard (the two
ways a patch can be cut, 0.045 sd in seed 0's VAE), and its decoder took the stripes' contrast from that
checkerboard. A UNet cannot tell the checkerboard's phase from noise until the last steps, so generated latents
carried a quarter of it and the stripes adapter drew faint stripes (57-72% at scale 1; 98% at scale 1.5). With
the stripes code a striped image is encoded as its plain twin plus, over the background, a flat offset and a
strong checkerboard along the colours' second least used direction: the flat part says "striped" from the first
steps, and the checkerboard's phase (which of the two stripe positions) is visible at mid noise.

Plain images keep the latents they had (the encoder is anchored to the stage's starting point), so a base UNet
trained before the stage stays valid.
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


def without_styles(scene: Any, drop: set[str]) -> Any:
    """The same scene without the styles in ``drop`` (plain when none is left)."""
    styles = [s for s in scene.style.split("+") if s not in drop]
    return dataclasses.replace(scene, style="+".join(styles) or "plain")


def without_outline(scene: Any) -> Any:
    """The same scene with its object filled (a plain or striped background kept as it is)."""
    return without_styles(scene, {"outline"})


def object_masks(scenes: list[Any]) -> torch.Tensor:
    """N x 1 x 64 x 64: how much of each pixel the (filled) object covers."""
    return torch.from_numpy(np.stack([object_mask(s) for s in scenes]))[:, None]


def latent_masks(scenes: list[Any]) -> torch.Tensor:
    """N x 1 x 16 x 16: the fraction of each latent pixel's 4x4 patch the (filled) object covers."""
    return F.avg_pool2d(object_masks(scenes), FACTOR)


def has_style(scenes: list[Any], style: str) -> torch.Tensor:
    return torch.tensor([float(style in s.style.split("+")) for s in scenes]).view(-1, 1, 1, 1)


def checkerboard(side: int = 64 // FACTOR) -> torch.Tensor:
    """side x side: +1 on the latent pixels ((i + j) even) whose 4x4 patch of a striped background is a little
    lighter (53% the background colour, 47% on the others, which are -1)."""
    i, j = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return 1.0 - 2.0 * ((i + j) % 2).float()


@torch.no_grad()
def fit_codes(encode_mean: Any, outline: float, stripes_flat: float, stripes_checker: float, seed: int,
              n: int = 512) -> dict[str, list[float]]:
    """The codes (raw latent units, one value per channel) that mark an object as outlined and a background as
    striped: ``{"outline_code": ..., "stripes_flat": ..., "stripes_checker": ...}``, leaving out any whose
    length is 0.

    The outline code lies along the direction in which the eight colours' latent codes vary least (the last
    principal axis of their means over the objects' fully covered latent pixels), so an outlined object cannot
    be mistaken for a filled one of another colour; the stripes code along the next one (it sits on the
    background, the outline code on the object, and an outlined object on stripes carries both). Each length
    is in standard deviations of the latents (the UNet's unit-variance scale).
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
    axes = torch.linalg.svd(centred, full_matrices=True).Vh * z.std()
    lengths = {"outline_code": (outline, -1), "stripes_flat": (stripes_flat, -2), "stripes_checker": (stripes_checker, -2)}
    return {name: (axes[axis] * length).tolist() for name, (length, axis) in lengths.items() if length}


def fit_outline_code(encode_mean: Any, strength: float, seed: int, n: int = 512) -> list[float]:
    """The outline code alone (``fit_codes``)."""
    return fit_codes(encode_mean, strength, 0.0, 0.0, seed, n)["outline_code"]


def outline_offset(scenes: list[Any], code: torch.Tensor) -> torch.Tensor:
    """N x C x 16 x 16: the code over each outlined object's area, zero elsewhere and for other scenes."""
    return has_style(scenes, "outline") * code.view(1, -1, 1, 1) * latent_masks(scenes)


def stripes_offset(scenes: list[Any], flat: torch.Tensor, checker: torch.Tensor) -> torch.Tensor:
    """N x C x 16 x 16: over each striped scene's background (the part of each latent pixel the object leaves
    uncovered), the flat code plus the checker code times ``checkerboard``; zero for other scenes."""
    pattern = flat.view(1, -1, 1, 1) + checker.view(1, -1, 1, 1) * checkerboard()
    return has_style(scenes, "stripes") * pattern * (1 - latent_masks(scenes))


def latent_offset(scenes: list[Any], codes: dict[str, Any]) -> torch.Tensor:
    """The outline offset plus, when ``codes`` holds a stripes code, the stripes offset."""
    t = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in codes.items() if v is not None}
    none = torch.zeros(())  # a missing part adds nothing (broadcast over the channels)
    off = outline_offset(scenes, t["outline_code"]) if "outline_code" in t else none
    if "stripes_flat" in t or "stripes_checker" in t:
        off = off + stripes_offset(scenes, t.get("stripes_flat", none), t.get("stripes_checker", none))
    return off


def twin(scene: Any, codes: dict[str, Any]) -> Any:
    """The scene whose latent a coded scene is aimed at: filled (with an outline code), and on a plain
    background (with a stripes code)."""
    drop = {"outline"} if codes.get("outline_code") is not None else set()
    if codes.get("stripes_flat") is not None or codes.get("stripes_checker") is not None:
        drop.add("stripes")
    return without_styles(scene, drop)
