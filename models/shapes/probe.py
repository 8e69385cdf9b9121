"""Does the model know where to put things? Its clean-image estimate from (nearly) pure noise.

At high noise a v-prediction model's estimate x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v is its guess of
E[x0 | prompt]: for "a large red square at the top left on a blue background" that should be a red blob in
the top-left cell. This probe decodes that estimate for a few position words at a few timesteps, from one
shared noise draw, and reports where the object colour's mass lies. If the centroids do not move with the
position word, the model ignores it where the layout is decided (the ``shapes`` model's failure so far).

    python -m models.shapes.probe models/zoo/shapes [--png probe.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from models.loading import load_pipeline

POSITIONS = ("top left", "top right", "center", "bottom left", "bottom right")
TIMESTEPS = (999, 800, 600)


@torch.inference_mode()
def x0_estimates(model_dir: str | Path, positions=POSITIONS, timesteps=TIMESTEPS, seed: int = 0,
                 color: str = "red", background: str = "blue") -> dict[tuple[int, str], np.ndarray]:
    """{(t, position): HxWx3 float image in [0, 1]} of the decoded clean-image estimate."""
    m = load_pipeline(model_dir)
    sched = m.schedule
    abar = torch.from_numpy(sched.alphas_cumprod).float()
    cfg = m.unet.config
    x = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=torch.Generator().manual_seed(seed))
    out = {}
    for p in positions:
        ids = m.tokenizer([f"a large {color} square at the {p} on a {background} background"], padding="max_length",
                          max_length=m.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        emb = m.text_encoder(ids.to(m.device))[0]
        for t in timesteps:
            a = abar[t]
            pred = m.unet(x.to(m.device, m.unet.dtype), torch.tensor([t], device=m.device), encoder_hidden_states=emb).sample
            pred = pred.float().cpu()
            if sched.prediction_type == "v_prediction":
                x0 = a.sqrt() * x - (1 - a).sqrt() * pred
            else:
                x0 = (x - (1 - a).sqrt() * pred) / a.sqrt()
            img = m.vae.decode((x0 / m.vae.config.scaling_factor).to(m.device, m.vae.dtype)).sample[0].float().cpu()
            out[(t, p)] = (img.permute(1, 2, 0).numpy() / 2 + 0.5).clip(0, 1)
    return out


def centroid(img: np.ndarray, background: tuple[int, int, int]) -> tuple[float, float]:
    """(x, y) of the image's mass away from the background colour: each pixel weighted by how much farther
    from the background it is than the median pixel (an estimate from pure noise is a faint blob)."""
    d = np.linalg.norm(img * 255.0 - np.array(background), axis=-1)
    w = np.clip(d - np.median(d), 0, None)
    if w.sum() <= 0:
        return float("nan"), float("nan")
    ys, xs = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    return float((w * xs).sum() / w.sum()), float((w * ys).sum() / w.sum())


def main(argv: list[str] | None = None) -> int:
    from models.shapes.data import COLORS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--png", type=Path, help="also save the estimates as a grid (rows: timesteps)")
    args = ap.parse_args(argv)
    est = x0_estimates(args.model)
    for t in TIMESTEPS:
        cells = []
        for p in POSITIONS:
            cx, cy = centroid(est[(t, p)], COLORS["blue"])
            cells.append(f"{p}: ({cx:4.1f}, {cy:4.1f})")
        print(f"t={t:4d}  " + "  ".join(cells))
    if args.png:
        from PIL import Image

        rows = [np.concatenate([est[(t, p)] for p in POSITIONS], 1) for t in TIMESTEPS]
        grid = (np.concatenate(rows, 0) * 255).astype(np.uint8)
        Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
