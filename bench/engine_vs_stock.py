"""Engine throughput vs stock diffusers StableDiffusionPipeline, same model, steps, scheduler and CFG.

    python bench/engine_vs_stock.py                       # exact mode, a random 'small' test model
    python bench/engine_vs_stock.py --model models/zoo/shapes --engine-mode exact fast

Both run in this one process on the same inputs, interleaved run by run (so a noisy neighbour hits both
alike), --repeats rounds in rotating orders after a warm-up (torch.compile's warm-up in fast mode is
excluded and printed separately). Prints, for every batch size, images/s of the best run of each, the
ratio engine/stock of those bests, and the paired figures: each round's stock time over the engine time of
the same round, their median, and in how many rounds the engine was faster. On a shared machine one lucky
run moves a best-of ratio; the median of paired ratios is the steadier figure.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class UNetClock:
    """Accumulates wall time inside a UNet's forward: total minus this is the pipeline's own overhead."""

    def __init__(self, unet) -> None:
        self.seconds = 0.0
        inner = unet.forward

        def forward(*a, **k):
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0

        unet.forward = forward


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="pipeline directory (default: a random 'small' test model)")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--engine-mode", nargs="+", default=["exact"], choices=["exact", "fast"])
    args = ap.parse_args()

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from models.engine import Engine, GenerationRequest
    from models.loading import load_pipeline
    from models.testing import build_random_pipeline

    model_dir = Path(args.model) if args.model else build_random_pipeline(Path(tempfile.mkdtemp()) / "small",
                                                                          scale="small")
    batches = [int(b) for b in args.batches.split(",")]
    prompt = "a large red circle at the top left on a blue background"

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    clocks = {"stock": UNetClock(pipe.unet)}

    def stock(b: int) -> None:
        gens = [torch.Generator("cpu").manual_seed(i) for i in range(b)]
        pipe([prompt] * b, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gens,
             output_type="np")

    engines = {}
    for mode in args.engine_mode:
        model = load_pipeline(model_dir)
        if mode == "exact":
            clocks[mode] = UNetClock(model.unet)
        eng = Engine(model, mode=mode)
        t0 = time.perf_counter()
        eng.warmup(max(batches))  # fast mode: build every graph these batch sizes use (else they run eager)
        for b in batches:
            eng.generate([GenerationRequest(prompt, steps=2, guidance=args.guidance, seed=0, sampler="ddim", n=b)])
        print(f"[{mode}] warm-up {time.perf_counter() - t0:.1f}s")
        engines[mode] = eng

    def engine_run(eng: Engine, b: int) -> None:
        req = GenerationRequest(prompt, steps=args.steps, guidance=args.guidance, seed=0, sampler="ddim", n=b)
        eng.generate([req], max_batch=b)

    print(f"model {model_dir.name}: UNet {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.2f}M params, "
          f"{args.steps} DDIM steps, CFG {args.guidance}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU threads ({platform.processor() or platform.machine()})")
    header = f"{'batch':>5} {'stock img/s':>12}" + "".join(
        f" {m + ' img/s':>12} {m + '/stock':>12} {'median paired':>13} {'won':>7}" for m in engines)
    print(header + "   outside-UNet ms/batch: stock" + (", exact" if "exact" in engines else ""))
    for b in batches:
        stock(b)
        times: dict[str, list[float]] = {"stock": [], **{m: [] for m in engines}}
        overhead = {m: float("inf") for m in clocks}
        runs = [("stock", lambda b=b: stock(b))] + [(m, lambda e=e, b=b: engine_run(e, b)) for m, e in engines.items()]
        # Round r runs them in the r-th of all their orders, so over a multiple of len(orders) rounds each
        # runs after each other equally often and any effect of what ran just before lands on every side.
        orders = list(itertools.permutations(runs))
        for r in range(args.repeats):
            for m, fn in orders[r % len(orders)]:
                if m in clocks:
                    clocks[m].seconds = 0.0
                t = timed(fn)
                times[m].append(t)
                if m in clocks:
                    overhead[m] = min(overhead[m], t - clocks[m].seconds)
        s = min(times["stock"])
        row = f"{b:>5} {b / s:>12.2f}"
        for m in engines:
            paired = sorted(st / et for st, et in zip(times["stock"], times[m], strict=True))
            won = sum(p > 1.0 for p in paired)
            row += (f" {b / min(times[m]):>12.2f} {s / min(times[m]):>11.2f}x {statistics.median(paired):>12.2f}x"
                    f" {won:>3}/{len(paired):<3}")
        print(row + "   " + ", ".join(f"{overhead[m] * 1000:.0f}" for m in clocks), flush=True)


if __name__ == "__main__":
    main()
