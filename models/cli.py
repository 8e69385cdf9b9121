"""``diffuserve generate``: run the engine in-process and write PNGs (no server, no Redis)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from models.errors import DiffuserveError, InvalidRequest
from models.sampler_names import canonical_sampler

ZOO = Path(__file__).resolve().parent / "zoo"
DEFAULT_MODEL = ZOO / "shapes"


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InvalidRequest(f"size {text!r} is not WIDTHxHEIGHT, e.g. 64x64.", param="size") from None
    return w, h


def parse_lora(text: str) -> tuple[str, float]:
    name, _, scale = text.partition(":")
    try:
        return name, float(scale) if scale else 1.0
    except ValueError:
        raise InvalidRequest(f"--lora {text!r}: scale must be a number, e.g. outline:0.8.", param="loras") from None


def default_lora_dir(model: Path) -> Path | None:
    d = model / "loras"
    return d if d.is_dir() else None


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images in-process with the engine")
    p.add_argument("prompt")
    p.add_argument("--model", default=os.environ.get("DIFFUSERVE_MODEL"), help="diffusers pipeline directory")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--sampler", help="ddpm, ddim, euler, euler_a, dpmpp_2m (or 'Euler a', 'DPM++ 2M')")
    p.add_argument("--guidance", type=float)
    p.add_argument("--lora", action="append", default=[], metavar="NAME:SCALE")
    p.add_argument("--lora-dir", default=os.environ.get("DIFFUSERVE_LORA_DIR"))
    p.add_argument("--size", help="WIDTHxHEIGHT (default: the model's native size)")
    p.add_argument("-n", type=int, default=1, help="number of images")
    p.add_argument("--init-image", help="img2img: path of the starting image")
    p.add_argument("--strength", type=float, default=0.75, help="img2img: how much to change (0, 1]")
    p.add_argument("-o", "--output", default="out.png", help="PNG path; with -n > 1, out-0.png, out-1.png, ...")
    p.add_argument("--device", default=os.environ.get("DIFFUSERVE_DEVICE", "auto"))
    p.add_argument("--dtype", default=os.environ.get("DIFFUSERVE_DTYPE", "auto"))
    p.add_argument("--engine-mode", default=os.environ.get("DIFFUSERVE_ENGINE_MODE", "auto"),
                   choices=["auto", "exact", "fast"])
    p.set_defaults(func=run_generate)


def output_paths(output: str, n: int) -> list[Path]:
    out = Path(output)
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(n)]


def run_generate(args: argparse.Namespace) -> int:
    model_dir = Path(args.model) if args.model else DEFAULT_MODEL
    try:
        # What can be checked without the model is checked first: a typo fails at once, not after torch is
        # imported and the pipeline loaded (seconds to minutes).
        width, height = parse_size(args.size) if args.size else (None, None)
        loras = tuple(parse_lora(x) for x in args.lora)
        if args.sampler:
            canonical_sampler(args.sampler)
        from models.loading import load_pipeline

        model = load_pipeline(model_dir, device=args.device, dtype=args.dtype)  # checks the directory first
        from tqdm import tqdm

        from models.engine import Engine, GenerationRequest, default_engine_mode
        from models.images import to_png

        lora_dir = args.lora_dir or default_lora_dir(model_dir)
        mode = default_engine_mode(model.device) if args.engine_mode == "auto" else args.engine_mode
        engine = Engine(model, mode=mode, lora_dir=str(lora_dir) if lora_dir else None)
        engine.warmup(min(args.n, 16))  # fast mode: the graphs generate()'s batches use (exact: nothing to do)
        init = Path(args.init_image).read_bytes() if args.init_image else None
        req = GenerationRequest(
            prompt=args.prompt, negative_prompt=args.negative, steps=args.steps, guidance=args.guidance,
            seed=args.seed, sampler=args.sampler, width=width, height=height, n=args.n, loras=loras,
            init_image=init, strength=args.strength if init else 1.0,
        )
        with tqdm(total=None, unit="step", desc="denoising") as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            result = engine.generate([req], progress=progress)[0]
    except DiffuserveError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for path, img, seed in zip(output_paths(args.output, args.n), result.images, result.seeds, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(to_png(img))
        print(f"wrote {path} (seed {seed}, {img.shape[1]}x{img.shape[0]})")
    print(f"{len(result.images)} image(s) in {result.seconds:.2f}s on {model.device} ({engine.mode} mode)")
    return 0


def add_test_model_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-test-model", help="write a small random-weight SD pipeline (for tests and demos)")
    p.add_argument("path")
    p.add_argument("--scale", choices=["tiny", "small"], default="small")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_make_test_model)


def run_make_test_model(args: argparse.Namespace) -> int:
    from models.testing import build_random_pipeline

    path = build_random_pipeline(args.path, scale=args.scale, seed=args.seed)
    print(f"wrote a random {args.scale} pipeline to {path}")
    return 0
