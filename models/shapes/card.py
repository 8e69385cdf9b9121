"""Pictures for the model card: prompts x seeds, and each adapter at scales 0, 0.5, 1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PROMPTS = [
    "a large red circle at the top left on a blue background",
    "a small yellow triangle at the center on a purple background",
    "a large white square at the bottom right on a black background",
    "a small green circle at the right on an orange background",
    "a large black triangle at the bottom on a white background",
    "a blue square",
]


def grid(rows: list[list[np.ndarray]], scale: int = 2) -> Image.Image:
    img = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    pil = Image.fromarray(img)
    return pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)


def make_pictures(engine: Any, out_dir: Path, seeds: tuple[int, ...] = (0, 1, 2, 3),
                  steps: int | None = None) -> list[Path]:
    from models.engine import GenerationRequest

    rows = []
    for p in PROMPTS:
        res = engine.generate([GenerationRequest(p, steps=steps, seed=s) for s in seeds])
        rows.append([r.images[0] for r in res])
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "grid.png"]
    grid(rows).save(paths[0])
    names = engine.registry.names()
    if names:
        rows = []
        for name in names:
            for p in PROMPTS[:3]:
                res = engine.generate([GenerationRequest(p, steps=steps, seed=7, loras=((name, s),))
                                       for s in (0.0, 0.5, 1.0)])
                rows.append([r.images[0] for r in res])
        paths.append(out_dir / "adapters.png")
        grid(rows).save(paths[1])
    return paths
