"""The outline and stripes codes: object masks, the latent offsets that mark an outlined object and a striped
background, and the directions they use."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.shapes.data import COLORS, object_mask, random_scene, render, stripe_shade
from models.shapes.latent_code import (
    checkerboard,
    fit_codes,
    fit_outline_code,
    latent_masks,
    latent_offset,
    outline_offset,
    stripes_offset,
    twin,
    without_outline,
)
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


def test_fit_codes_puts_stripes_on_the_next_unused_direction():
    """The same encoder: the outline code along the constant channel, the stripes code within RGB (orthogonal
    to it), its flat part and checkerboard along one direction at their own lengths; a length of 0 leaves a
    code out."""

    def encode_mean(x: torch.Tensor) -> torch.Tensor:
        rgb = F.avg_pool2d(x, 4)
        return torch.cat([rgb, torch.full_like(rgb[:, :1], 0.3)], dim=1)

    codes = {k: torch.tensor(v) for k, v in fit_codes(encode_mean, 2.0, 1.0, 1.5, seed=0, n=128).items()}
    assert sorted(codes) == ["outline_code", "stripes_checker", "stripes_flat"]
    assert torch.allclose(codes["outline_code"], torch.tensor(fit_outline_code(encode_mean, 2.0, seed=0, n=128)))
    flat, checker = codes["stripes_flat"], codes["stripes_checker"]
    assert abs(flat[3]) < 1e-4 * flat.norm() and torch.allclose(checker, 1.5 * flat, atol=1e-6)
    rng = random.Random(0)
    z = encode_mean(render_tensor([random_scene(rng) for _ in range(128)]))
    assert flat.norm().item() == pytest.approx(z.std().item(), rel=1e-4)
    assert sorted(fit_codes(encode_mean, 2.0, 0.0, 0.0, seed=0, n=128)) == ["outline_code"]


def test_checkerboard_marks_the_lighter_patches_of_a_striped_background():
    """A 4x4 patch of a striped background holds both bands whatever its place; the two ways it is cut leave
    53% or 47% of it the background colour (the light band), and the checkerboard is +1 on the lighter ones."""
    sc = dataclasses.replace(random_scene(random.Random(8), "stripes", background="blue"), size_px=0)
    light, dark = COLORS["blue"][2], stripe_shade(COLORS["blue"], "blue")[2]
    share = F.avg_pool2d(torch.from_numpy((render(sc)[..., 2] - dark) / (light - dark)).float()[None, None], 4)[0, 0]
    board = checkerboard()
    assert board.shape == (16, 16) and set(board.unique().tolist()) == {-1.0, 1.0}
    far = latent_masks([sc])[0, 0] == 0  # patches the object does not touch
    assert far.sum() > 200
    assert torch.allclose(share[far & (board == 1)], torch.tensor(0.534), atol=0.01)
    assert torch.allclose(share[far & (board == -1)], torch.tensor(0.470), atol=0.01)


def test_stripes_offset_is_the_code_over_striped_backgrounds_only():
    rng = random.Random(9)
    scenes = [random_scene(rng, s, size="large") for s in ("stripes", "plain", "outline+stripes", "outline")]
    flat, checker = torch.tensor([0.0, 1.0, 0.0, 0.5]), torch.tensor([0.0, 0.0, 2.0, 0.0])
    off = stripes_offset(scenes, flat, checker)
    assert off.shape == (4, 4, 16, 16) and off[1].abs().max() == 0 and off[3].abs().max() == 0
    board, masks = checkerboard(), latent_masks(scenes)
    for i in (0, 2):
        bg, inside = masks[i, 0] == 0, masks[i, 0] == 1
        assert inside.any() and off[i][:, inside].abs().max() == 0
        want = flat.view(4, 1) + checker.view(4, 1) * board[bg].view(1, -1)
        assert torch.allclose(off[i][:, bg], want)
    codes = {"outline_code": [1.0, 0.0, 0.0, 0.0], "stripes_flat": flat.tolist(), "stripes_checker": checker.tolist()}
    both = latent_offset(scenes, codes)
    assert torch.allclose(both, off + outline_offset(scenes, torch.tensor(codes["outline_code"])))
    assert torch.equal(latent_offset(scenes, {"outline_code": codes["outline_code"]}),
                       outline_offset(scenes, torch.tensor(codes["outline_code"])))


def test_twin_drops_the_styles_that_have_codes():
    sc = random_scene(random.Random(10), "outline+stripes")
    assert twin(sc, {"outline_code": [1.0], "stripes_flat": [1.0]}).style == "plain"
    assert twin(sc, {"outline_code": [1.0]}).style == "stripes"
    assert twin(sc, {"stripes_checker": [1.0]}).style == "outline"
    assert twin(sc, {}).style == "outline+stripes"
