"""The evaluator reads ground-truth renders back correctly (so its figures about the model mean something)."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from models.shapes.data import random_scene, render
from models.shapes.evaluate import ATTRIBUTES, analyze, fill_holes, held_out_scenes, read_shape


@pytest.mark.parametrize("close_pairs", [False, True])
@pytest.mark.parametrize("style", ["plain", "outline", "stripes", "outline+stripes"])
def test_analyzer_on_ground_truth(style, close_pairs):
    rng = random.Random(123)
    n = 300
    wrong = dict.fromkeys(ATTRIBUTES, 0)
    outline = stripes = 0
    for _ in range(n):
        sc = random_scene(rng, style)
        r = analyze(render(sc), close_pairs=close_pairs)
        for a in ATTRIBUTES:
            wrong[a] += getattr(r, a) != getattr(sc, a)
        outline += r.outline
        stripes += r.stripes
    assert all(w <= 0.01 * n for w in wrong.values()), wrong
    for name, shown in (("outline", outline), ("stripes", stripes)):
        if name in style.split("+"):
            assert shown / n >= 0.98, (name, shown)
        else:
            assert shown / n <= 0.01, (name, shown)


@pytest.mark.parametrize("style", ["plain", "outline", "stripes"])
def test_shape_reading_survives_smoothing(style):
    """A decoder rounds small objects' corners; a square blurred by 1.5 px is still a square to a person and
    must be to the analyser (the bounding-box fill rule it replaced read 13% of blurred plain renders wrong),
    while no circle may be read as anything else."""
    from PIL import Image, ImageFilter

    rng = random.Random(7)
    n = 300
    confusion: Counter[tuple[str, str | None]] = Counter()
    for _ in range(n):
        sc = random_scene(rng, style)
        img = np.asarray(Image.fromarray(render(sc)).filter(ImageFilter.GaussianBlur(1.5)))
        confusion[(sc.shape, analyze(img).shape)] += 1
    right = sum(v for (truth, got), v in confusion.items() if truth == got)
    assert right / n >= (0.98 if style == "plain" else 0.9), confusion
    circles_wrong = sum(v for (truth, got), v in confusion.items() if truth == "circle" and got != "circle")
    assert circles_wrong <= 0.03 * n, confusion


@pytest.mark.parametrize("background", ["plain", "stripes"])
def test_a_faint_ring_on_a_close_colour_reads_as_an_outline(background):
    """Orange on yellow (73 RGB levels apart) at 70% of full contrast: 51 levels off the background, plainly
    visible. The bar's 60-level mask reads no outline; the close-pair reading (nearer orange than yellow) reads
    the ring. The same faintness filled reads as a filled object (the 60-level mask sees little of it)."""
    from dataclasses import replace

    from models.shapes.data import COLORS
    from models.shapes.latent_code import without_outline

    rng = random.Random(5)
    for shape in ("circle", "square", "triangle"):
        sc = random_scene(rng, "outline" if background == "plain" else "outline+stripes", shape=shape,
                          color="orange", background="yellow", size="large", position="center")
        ring = render(sc).astype(float)
        back = render(replace(sc, color="yellow")).astype(float)  # the same scene with the object invisible
        faint = np.rint(back + 0.7 * (ring - back)).astype(np.uint8)
        assert analyze(ring).outline and analyze(ring, close_pairs=True).outline
        close = analyze(faint, close_pairs=True)
        assert close.outline and close.color == "orange" and close.shape == shape
        assert not analyze(faint).outline
        filled = render(without_outline(sc)).astype(float)
        faint_filled = np.rint(back + 0.7 * (filled - back)).astype(np.uint8)
        close = analyze(faint_filled, close_pairs=True)
        assert not close.outline and close.shape == shape and not analyze(faint_filled).outline
    # Noise up to 29 levels off a flat background (under half the distance to any other colour) stays background.
    flat = np.full((64, 64, 3), COLORS["yellow"], float)
    noisy = np.clip(flat + np.random.default_rng(0).uniform(-17, 17, flat.shape), 0, 255).astype(np.uint8)
    assert analyze(noisy, close_pairs=True).color is None


def test_read_shape_on_ideal_masks():
    yy, xx = np.mgrid[0:16, 0:16] + 0.5
    disc = (xx - 8) ** 2 + (yy - 8) ** 2 <= 64
    box = np.ones((16, 16), bool)
    tri = np.abs(xx - 8) <= yy / 2
    rounded = box & ~(((np.minimum(xx, 16 - xx) < 3) & (np.minimum(yy, 16 - yy) < 3))
                      & ((np.minimum(xx, 16 - xx) - 3) ** 2 + (np.minimum(yy, 16 - yy) - 3) ** 2 > 9))
    assert [read_shape(m) for m in (disc, box, tri, rounded)] == ["circle", "square", "triangle", "square"]
    assert read_shape(np.ones((1, 12), bool)) in {"circle", "square"}  # degenerate sliver: no crash


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


def test_readings_by_colour_distance_weigh_each_bin_by_its_share_of_the_pairs():
    """Orange on yellow (73 levels) is the only pair under 90, red/orange and blue/purple the 90-120 bin: 2, 4,
    14 and 36 of the 56 ordered pairs. A set that holds close pairs more often than prompts at large reads
    lower; the weighted rate does not depend on how many of each a set holds."""
    from dataclasses import replace

    from models.shapes.evaluate import by_distance, pair_distance

    assert round(pair_distance("orange", "yellow")) == round(pair_distance("yellow", "orange")) == 73
    base = random_scene(random.Random(1))
    pairs = [("orange", "yellow"), ("yellow", "orange"), ("red", "orange"), ("purple", "blue"), ("green", "black"),
             ("green", "purple"), ("white", "black"), ("blue", "white")]
    scenes = [replace(base, color=c, background=b) for c, b in pairs]
    hits = [False, False, True, False, True, True, True, False]
    got = by_distance(scenes, hits)
    assert got["bins"] == {"0-90": [0, 2], "90-120": [1, 2], "120-200": [2, 2], "200+": [1, 2]}
    assert got["weighted"] == pytest.approx((2 * 0 + 4 * 0.5 + 14 * 1 + 36 * 0.5) / 56)
    # Twice as many orange/yellow scenes, read the same way: the plain rate falls, the weighted one stays.
    doubled = by_distance(scenes + scenes[:2], hits + hits[:2])
    assert doubled["bins"]["0-90"] == [0, 4] and doubled["weighted"] == pytest.approx(got["weighted"])
    assert by_distance(scenes[2:], hits[2:])["weighted"] is None  # no orange/yellow scene: no estimate
