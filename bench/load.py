"""Load generator: the server under closed-loop and Poisson load, against stock diffusers baselines.

    python bench/load.py --model models/zoo/shapes            # starts `diffuserve serve` itself
    python bench/load.py --engine-mode fast --skip-poisson    # the fast engine mode against stock
    python bench/load.py --url http://127.0.0.1:8000 --skip-baselines

In one run it measures:
  - closed loop: C concurrent clients, each sending its next request when the last one returns; the
    saturated throughput counts the window in which every client has a request in the server;
  - Poisson arrivals at --rate requests/s (default: 70% of the measured saturated throughput),
    with steps mixed uniformly in [--min-steps, --max-steps], once with continuous batching and once
    with request-level batching (two servers, same model);
  - baselines in this process: stock StableDiffusionPipeline one image at a time, and at batch = max batch,
    before and after the servers; and the idle server's single request paired with a stock image, in turns.
It prints throughput, p50/p95/p99 latency and the ratios the issue asks for.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

PROMPTS = ["a large red circle at the top left on a blue background", "a small green square at the center",
           "a yellow triangle on a black background", "a large white disc at the bottom right"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def one(client: httpx.AsyncClient, url: str, steps: int, seed: int) -> float:
    t0 = time.perf_counter()
    r = await client.post(f"{url}/v1/images/generations", json={"prompt": random.choice(PROMPTS), "steps": steps,
                                                                  "seed": seed, "response_format": "url"})
    r.raise_for_status()
    return time.perf_counter() - t0


async def closed_loop(url: str, clients: int, requests: int, steps: int) -> tuple[float, list[float], float]:
    """(steady img/s, latencies, overall img/s). Steady: completions per second between the first completion
    and the last request's submission, the window in which all ``clients`` have a request in the server (the
    ramp-up of the first batch and the drain at the end, when fewer clients are left, are outside it)."""
    lat: list[float] = []
    done: list[float] = []
    issued: list[float] = []
    counter = iter(range(requests))

    async def client_loop(c: httpx.AsyncClient) -> None:
        for i in counter:
            issued.append(time.perf_counter())
            lat.append(await one(c, url, steps, i))
            done.append(time.perf_counter())

    async with httpx.AsyncClient(timeout=600) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(c) for _ in range(clients)))
        overall = requests / (time.perf_counter() - t0)
    start, end = min(done), max(issued)
    inside = sum(1 for t in done if start < t <= end)
    steady = inside / (end - start) if end > start and inside else overall
    return steady, lat, overall


async def poisson(url: str, rate: float, requests: int, min_steps: int, max_steps: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=600) as c:
        tasks = []
        for i in range(requests):
            tasks.append(asyncio.create_task(one(c, url, rng.randint(min_steps, max_steps), i)))
            await asyncio.sleep(rng.expovariate(rate))
        return list(await asyncio.gather(*tasks))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, batching: str, max_batch: int, engine_mode: str = "exact") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "serve", "--model", model, "--port", str(self.port),
             "--batching", batching, "--max-batch", str(max_batch), "--engine-mode", engine_mode,
             "--data-dir", tempfile.mkdtemp()],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        t0 = time.monotonic()
        self.ready_s = self.wait(lambda: httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200) - t0
        # Fast mode serves at once, eager, and compiles in the background: measure once every graph is in.
        self.fast_s = self.wait(self.all_compiled) - t0

    def all_compiled(self) -> bool:
        workers = httpx.get(f"{self.url}/v1/workers", timeout=2).json()["data"]
        return bool(workers) and all(w["graphs_pending"] == 0 for w in workers)

    @staticmethod
    def wait(ready: Callable[[], Any], limit_s: float = 3600) -> float:
        t_end = time.monotonic() + limit_s
        while time.monotonic() < t_end:
            try:
                if ready():
                    return time.monotonic()
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def close(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)
        self.proc.wait(timeout=60)


class Stock:
    """Stock diffusers StableDiffusionPipeline on the same model, sampler and steps, in this process."""

    def __init__(self, model: str, steps: int) -> None:
        import torch
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        self.torch, self.steps = torch, steps
        self.pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
        self.pipe.scheduler = DPMSolverMultistepScheduler.from_config(self.pipe.scheduler.config,
                                                                      algorithm_type="dpmsolver++")
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe(PROMPTS[0], num_inference_steps=2, output_type="np")

    def single(self, i: int) -> float:
        t0 = time.perf_counter()
        self.pipe(PROMPTS[i % 4], num_inference_steps=self.steps, generator=self.torch.Generator().manual_seed(i),
                  output_type="np")
        return time.perf_counter() - t0

    def baselines(self, batch: int, n: int) -> tuple[float, float, float]:
        """(one-at-a-time img/s, batched img/s: best of two after a warm-up call, single-image seconds)."""
        times = [self.single(i) for i in range(n)]
        batched = []
        for rep in range(3):
            t0 = time.perf_counter()
            self.pipe([PROMPTS[i % 4] for i in range(batch)], num_inference_steps=self.steps if rep else 2,
                      output_type="np", generator=[self.torch.Generator().manual_seed(i) for i in range(batch)])
            batched.append(batch / (time.perf_counter() - t0))
        return 1 / statistics.mean(times), max(batched[1:]), statistics.median(times)


async def paired_idle(url: str, stock: Stock, steps: int, n: int) -> tuple[list[float], list[float]]:
    """One request on the idle server, then one stock image here, n times: each pair sees the same box speed."""
    server, local = [], []
    async with httpx.AsyncClient(timeout=600) as c:
        for i in range(n):
            server.append(await one(c, url, steps, i))
            local.append(stock.single(i))  # the server is idle meanwhile
    return server, local


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "models" / "zoo" / "shapes"))
    ap.add_argument("--url", help="an already running server (skips starting one; no batching comparison)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=160, help="closed-loop requests")
    ap.add_argument("--poisson-requests", type=int, default=150)
    ap.add_argument("--engine-mode", default="exact", choices=["exact", "fast"])
    ap.add_argument("--skip-poisson", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--rate", type=float, help="Poisson arrivals per second (default: 70%% of capacity)")
    ap.add_argument("--min-steps", type=int, default=10)
    ap.add_argument("--max-steps", type=int, default=50)
    ap.add_argument("--skip-baselines", action="store_true")
    args = ap.parse_args()

    results: dict[str, float] = {}
    # This box's speed drifts by 10-30% over minutes (a shared host): the stock baselines run before and
    # after the servers, and the ratios use their mean (both passes are printed).
    ref = None if args.skip_baselines else Stock(args.model, args.steps)
    stock = [ref.baselines(args.max_batch, 5)] if ref else []
    server = None if args.url else Server(args.model, "continuous", args.max_batch, args.engine_mode)
    url = args.url or server.url
    if server:
        results["server start to ready s"] = server.ready_s
        results["server start to all graphs compiled s"] = server.fast_s
    try:
        asyncio.run(warmup(url, args.max_batch))
        if ref:
            single, local = asyncio.run(paired_idle(url, ref, args.steps, 9))
            results["idle pairs: server / stock single, median"] = statistics.median(
                a / b for a, b in zip(single, local, strict=True))
        else:
            single = asyncio.run(closed_loop(url, 1, 5, args.steps))[1]
        results["idle p50 s"] = statistics.median(single)
        thr, lat, results["closed-loop overall img/s"] = asyncio.run(
            closed_loop(url, args.clients, args.requests, args.steps))
        results["saturated img/s"] = thr
        results["saturated p50 s"], results["saturated p99 s"] = pct(lat, 0.5), pct(lat, 0.99)
        rate = args.rate or 0.7 * thr * args.steps / ((args.min_steps + args.max_steps) / 2)
        results["poisson rate/s"] = rate
        if not args.skip_poisson:
            lat = asyncio.run(poisson(url, rate, args.poisson_requests, args.min_steps, args.max_steps, 0))
            results["continuous p50 s"], results["continuous p95 s"] = pct(lat, 0.5), pct(lat, 0.95)
            results["continuous p99 s"] = pct(lat, 0.99)
    finally:
        if server:
            server.close()
    if not args.url and not args.skip_poisson:
        server = Server(args.model, "request", args.max_batch, args.engine_mode)
        try:
            asyncio.run(warmup(server.url, args.max_batch))
            lat = asyncio.run(poisson(server.url, results["poisson rate/s"], args.poisson_requests, args.min_steps,
                                      args.max_steps, 0))
            results["request-level p50 s"], results["request-level p95 s"] = pct(lat, 0.5), pct(lat, 0.95)
            results["request-level p99 s"] = pct(lat, 0.99)
        finally:
            server.close()
    if stock:
        stock.append(ref.baselines(args.max_batch, 5))
        for i, name in enumerate(("stock 1-at-a-time img/s", "stock batched img/s", "stock single s")):
            results[f"{name} (before, after)"] = stock[0][i], stock[1][i]  # type: ignore[assignment]
            results[name] = (stock[0][i] + stock[1][i]) / 2
    for k, v in results.items():
        print(f"{k:>28}: " + (", ".join(f"{x:.3f}" for x in v) if isinstance(v, tuple) else f"{v:.3f}"))
    if "stock batched img/s" in results:
        print(f"engine mode: {args.engine_mode}; saturated / stock batched: {results['saturated img/s'] / results['stock batched img/s']:.2f}x")
        print(f"saturated / stock one-at-a-time: {results['saturated img/s'] / results['stock 1-at-a-time img/s']:.2f}x")
        print(f"idle p50 / stock single:       {results['idle p50 s'] / results['stock single s']:.2f}x "
              f"(paired, same moments: {results['idle pairs: server / stock single, median']:.2f}x)")
    if "request-level p95 s" in results:
        print(f"continuous p95 / request-level p95: {results['continuous p95 s'] / results['request-level p95 s']:.2f}x")


async def warmup(url: str, max_batch: int) -> None:
    """One request alone, then a full batch: the fast mode compiles here, not inside a measurement."""
    async with httpx.AsyncClient(timeout=900) as c:
        await one(c, url, 2, 0)
        await asyncio.gather(*(one(c, url, 4, i) for i in range(max_batch)))


if __name__ == "__main__":
    main()
