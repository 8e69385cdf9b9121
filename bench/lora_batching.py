"""Per-sample LoRA adapters against grouped batches: the same requests, mixed adapter sets, in one process.

    python bench/lora_batching.py                      # the bundled shapes model and its two adapters
    python bench/lora_batching.py --steps 20 --repeats 3

Sixteen requests, four of each adapter set (none, outline, stripes, outline + stripes), 20 steps:
  - grouped, set by set: ``lora_mode="merge"``, each set's four requests one batch after the other (what a
    worker does when it steps one adapter set at a time): four UNet calls of 4 samples per step;
  - per-sample: ``lora_mode="per_sample"``, all sixteen in one batch: one UNet call of 16 per step, the
    most common set merged and the other rows' differences added by hooks;
and sixteen requests that all use outline + stripes, merged vs per-sample (no hooks needed: should tie).
Runs are interleaved (a noisy neighbour hits both alike); each figure is the best of --repeats after a
warm-up. Prints images/s and the ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.engine import Engine, GenerationRequest  # noqa: E402
from models.loading import load_pipeline  # noqa: E402

PROMPTS = ["a large red circle at the top left on a blue background", "a small green square at the center",
           "a yellow triangle on a black background", "a large white disc at the bottom right"]


def requests(sets: list[tuple], steps: int) -> list[GenerationRequest]:
    return [GenerationRequest(PROMPTS[k % len(PROMPTS)], steps=steps, seed=k, loras=s) for k, s in enumerate(sets)]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    from models.cli import DEFAULT_MODEL

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--lora-dir", type=Path)
    ap.add_argument("--adapters", default="outline,stripes")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lora_dir = str(args.lora_dir or args.model / "loras")
    a, b = args.adapters.split(",")
    merged = Engine(load_pipeline(args.model), lora_dir=lora_dir, lora_mode="merge")
    per_sample = Engine(load_pipeline(args.model), lora_dir=lora_dir, lora_mode="per_sample")
    sets = [(), ((a, 1.0),), ((b, 1.0),), tuple(sorted(((a, 1.0), (b, 1.0))))]
    mixed = requests([s for s in sets for _ in range(4)], args.steps)
    same = requests([sets[3]] * 16, args.steps)
    runs = {
        "mixed: grouped, set by set": lambda: [merged.generate(mixed[k : k + 4]) for k in range(0, 16, 4)],
        "mixed: per-sample, one batch": lambda: per_sample.generate(mixed, max_batch=16),
        "one set: merged, one batch": lambda: merged.generate(same, max_batch=16),
        "one set: per-sample, one batch": lambda: per_sample.generate(same, max_batch=16),
    }
    for fn in runs.values():  # warm-up: adapter cache, allocator, prompt cache
        fn()
    best = {name: min(timed(fn) for _ in range(1)) for name, fn in runs.items()}
    for _ in range(args.repeats - 1):
        for name, fn in runs.items():
            best[name] = min(best[name], timed(fn))
    print(f"model {args.model} | {args.steps} steps | 16 requests | torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name, sec in best.items():
        print(f"  {name:32s} {16 / sec:6.2f} img/s  ({sec:.2f} s)")
    g, p = best["mixed: grouped, set by set"], best["mixed: per-sample, one batch"]
    m, h = best["one set: merged, one batch"], best["one set: per-sample, one batch"]
    print(f"per-sample vs grouped on mixed sets: {g / p:.2f}x throughput; on one set: per-sample at "
          f"{m / h:.2f}x the merged throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
