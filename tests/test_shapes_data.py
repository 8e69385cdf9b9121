"""The shapes dataset: rendering matches the documented vocabulary exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest

from models.shapes.data import (
    COLORS,
    POSITIONS,
    SIDE,
    SIZES,
    caption,
    dataset,
    full_caption,
    random_scene,
    render,
    stripe_shade,
    vocabulary,
)


def test_object_and_background_colours_and_geometry():
    rng = random.Random(0)
    for _ in range(200):
        sc = random_scene(rng)
        img = render(sc).astype(int)
        assert img.shape == (SIDE, SIDE, 3)
        assert sc.color != sc.background
        assert tuple(img[0, 0]) == COLORS[sc.background] or sc.position.startswith("top")
        cy = int(sc.cy + (sc.size_px / 4 if sc.shape == "triangle" else 0))
        assert np.abs(img[cy, int(sc.cx)] - COLORS[sc.color]).max() <= 2
        lo, hi = SIZES[sc.size]
        assert lo <= sc.size_px <= hi
        fg = np.all(np.abs(img - COLORS[sc.color]) <= 40, axis=-1)
        ys, xs = np.nonzero(fg)
        assert xs.min() >= 0 and xs.max() < SIDE and ys.min() >= 0 and ys.max() < SIDE
        width = xs.max() - xs.min() + 1
        assert lo - 2 <= width <= hi + 2
        col, row = POSITIONS[sc.position]
        assert int(sc.cx // (SIDE / 3)) == col and int(sc.cy // (SIDE / 3)) == row


def test_outline_interior_shows_background():
    sc = random_scene(random.Random(1), style="outline", shape="square", size="large", position="center")
    img = render(sc).astype(int)
    assert np.abs(img[int(sc.cy), int(sc.cx)] - COLORS[sc.background]).max() <= 2
    edge_x = int(sc.cx - sc.size_px / 2 + 1)
    assert np.abs(img[int(sc.cy), edge_x] - COLORS[sc.color]).max() <= 2


@pytest.mark.parametrize("bg", ["red", "black"])
def test_stripes_alternate_with_period_8(bg):
    sc = random_scene(random.Random(2), style="stripes", background=bg, color="white" if bg != "white" else "red",
                      size="small", position="bottom right")
    img = render(sc).astype(int)
    row = img[2, :32]
    dark = stripe_shade(COLORS[bg], bg)
    is_dark = np.all(np.abs(row - dark) <= 2, axis=-1)
    is_bg = np.all(np.abs(row - COLORS[bg]) <= 2, axis=-1)
    assert is_dark.sum() >= 12 and is_bg.sum() >= 12
    assert np.array_equal(is_dark[:24], is_dark[8:32])  # period 8 px
    if bg == "black":
        assert sum(dark) > sum(COLORS["black"])  # lighter shade for black


def test_captions_use_only_the_vocabulary_and_drop_attributes():
    rng = random.Random(3)
    vocab = set(vocabulary())
    lengths = set()
    for _ in range(500):
        sc = random_scene(rng)
        cap = caption(sc, rng)
        assert set(cap.replace(",", "").split()) <= vocab, cap
        lengths.add(len(cap.split()))
    assert len(lengths) > 5
    sc = random_scene(random.Random(4))
    full = full_caption(sc)
    for word in (sc.size, sc.color, sc.shape, sc.position, sc.background):
        assert word in full


def test_dataset_is_deterministic():
    a, ca, _ = dataset(8, seed=5)
    b, cb, _ = dataset(8, seed=5)
    assert np.array_equal(a, b) and ca == cb
    assert a.shape == (8, SIDE, SIDE, 3) and a.dtype == np.uint8


def test_tokenizer_makes_each_vocabulary_word_one_token(tmp_path):
    from transformers import CLIPTokenizer

    from models.shapes.tokenizer import write_clip_tokenizer

    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tok", vocabulary()))
    for word in vocabulary():
        assert len(tok(word).input_ids) == 3, word  # BOS, the word, EOS
    ids = tok("a zebra").input_ids  # unknown words still tokenize, as characters
    assert len(ids) > 4
