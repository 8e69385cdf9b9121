"""The outline code: object masks, the latent offset that marks an outlined object, and the direction it uses."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.shapes.data import COLORS, object_mask, random_scene, render
from models.shapes.latent_code import fit_outline_code, latent_masks, outline_offset, without_outline
from models.shapes.train_common import render_tensor


def test_object_mask_is_the_filled_object_whatever_the_style():
    rng = random.Random(3)
    for _ in range(50):
        sc = random_scene(rng, rng.choice(["plain", "outline", "stripes", "outline+stripes"]))
        mask = object_mask(sc)
        assert mask.shape == (64, 64) and mask.min() >= 0 and mask.max() <= 1
        assert np.array_equal(mask, object_mask(dataclasses.replace(sc, style="plain")))
        # Where the plain render shows the object colour exactly, the mask is full; far from it, empty.
        img = render(dataclasses.replace(sc, style="plain")).astype(int)
        exact = np.all(img == COLORS[sc.color], axis=-1)
        assert exact.any() and (mask[exact] == 1).all()
        assert (mask[np.all(img == COLORS[sc.background], axis=-1)] == 0).all()
    square = random_scene(random.Random(4), shape="square", size="large")
    assert object_mask(square).sum() == pytest.approx(square.size_px**2, rel=0.02)


def test_without_outline_keeps_the_background_style():
    sc = random_scene(random.Random(5), "outline+stripes")
    assert without_outline(sc).style == "stripes"
    assert without_outline(dataclasses.replace(sc, style="outline")).style == "plain"
    assert without_outline(dataclasses.replace(sc, style="stripes")).style == "stripes"


def test_outline_offset_is_the_code_over_outlined_objects_only():
    rng = random.Random(6)
    scenes = [random_scene(rng, s, size="large") for s in ("outline", "plain", "outline+stripes", "stripes")]
    code = torch.tensor([0.5, -1.0, 2.0, 0.25])
    off = outline_offset(scenes, code)
    assert off.shape == (4, 4, 16, 16)
    assert off[1].abs().max() == 0 and off[3].abs().max() == 0
    masks = latent_masks(scenes)
    for i in (0, 2):
        inside, outside = masks[i, 0] == 1, masks[i, 0] == 0
        assert inside.any() and outside.any()
        assert torch.allclose(off[i][:, inside], code.view(4, 1).expand(4, int(inside.sum())))
        assert off[i][:, outside].abs().max() == 0


def test_fit_outline_code_picks_the_direction_colours_leave_unused():
    """An encoder whose latents are the RGB of each 4x4 patch plus a channel that never varies: the code must
    lie along that fourth channel, and be ``strength`` latent standard deviations long."""

    def encode_mean(x: torch.Tensor) -> torch.Tensor:
        rgb = F.avg_pool2d(x, 4)
        return torch.cat([rgb, torch.full_like(rgb[:, :1], 0.3)], dim=1)

    code = torch.tensor(fit_outline_code(encode_mean, strength=2.0, seed=0, n=128))
    rng = random.Random(0)
    z = encode_mean(render_tensor([random_scene(rng) for _ in range(128)]))
    assert code[:3].abs().max() < 1e-4 * code.abs().max()
    assert code.norm().item() == pytest.approx(2.0 * z.std().item(), rel=1e-4)
