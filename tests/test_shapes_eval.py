"""The evaluator reads ground-truth renders back correctly (so its figures about the model mean something)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from models.shapes.data import random_scene, render
from models.shapes.evaluate import ATTRIBUTES, analyze, fill_holes, held_out_scenes


@pytest.mark.parametrize("style", ["plain", "outline", "stripes"])
def test_analyzer_on_ground_truth(style):
    rng = random.Random(123)
    n = 300
    wrong = dict.fromkeys(ATTRIBUTES, 0)
    outline = stripes = 0
    for _ in range(n):
        sc = random_scene(rng, style)
        r = analyze(render(sc))
        for a in ATTRIBUTES:
            wrong[a] += getattr(r, a) != getattr(sc, a)
        outline += r.outline
        stripes += r.stripes
    assert all(w <= 0.01 * n for w in wrong.values()), wrong
    assert outline / n >= (0.98 if style == "outline" else 0) and outline / n <= (1 if style == "outline" else 0.01)
    assert stripes / n >= (0.98 if style == "stripes" else 0) and stripes / n <= (1 if style == "stripes" else 0.01)


def test_noise_image_reads_as_nothing_in_particular():
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    r = analyze(img)
    assert not (r.outline and r.stripes and r.shape == "square" and r.size == "small")  # no crash, some reading


def test_fill_holes():
    m = np.zeros((9, 9), bool)
    m[2:7, 2:7] = True
    m[3:6, 3:6] = False  # a ring
    assert fill_holes(m).sum() == 25


def test_held_out_scenes_are_deterministic_and_varied():
    a, b = held_out_scenes(50), held_out_scenes(50)
    assert a == b
    assert len({s.position for s in a}) == 9 and len({s.color for s in a}) == 8
