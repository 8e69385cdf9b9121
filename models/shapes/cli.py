"""``diffuserve train shapes`` and ``diffuserve eval shapes``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

STAGES = ("vae", "decoder", "polish", "base", "stripes", "outline", "refine")  # models.shapes.train.STAGES, without importing torch here


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the bundled 'shapes' model from a seed (resumable)")
    p.add_argument("what", choices=["shapes"])
    p.add_argument("--stage", action="append", choices=[*STAGES, "export"],
                   help="stage(s) to run (default: all, in order)")
    p.add_argument("--run-dir", default="runs/shapes")
    p.add_argument("--out", help="pipeline directory to write (default: models/zoo/shapes)")
    p.add_argument("--minutes", type=float, help="stop (after checkpointing) when this much time has passed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int)
    p.add_argument("--decoder-steps", type=int)
    p.add_argument("--decoder-lr", type=float)
    p.add_argument("--outline-code", type=float,
                   help="length of the outline code in latent standard deviations (0: encode outlines as drawn)")
    p.add_argument("--stripes-code", type=float, help="the same for the stripes code's flat part (default 1)")
    p.add_argument("--stripes-checker", type=float,
                   help="the same for its checkerboard (default 1.25; both 0: encode stripes as drawn)")
    p.add_argument("--polish-steps", type=int, help="polish stage: decoder steps, encoder frozen (default 1000)")
    p.add_argument("--polish-ring-weight", type=float,
                   help="polish stage: extra loss weight on an outlined object's ring (default 3; 0: none)")
    p.add_argument("--polish-pair-cap", type=float,
                   help="polish stage: images weigh (150 / colour distance)^2 up to this (default 4; 1: all alike)")
    p.add_argument("--refine-steps", type=int,
                   help="refine stage: decoder steps on the model's generated latents, encoder frozen (default 600)")
    p.add_argument("--refine-images", type=int, help="refine stage: scenes generated for it (default 1536)")
    p.add_argument("--refine-min-iou", type=float,
                   help="refine stage: use a generated scene only if its fit covers the drawn object this well "
                        "(default 0.8; 0: all)")
    p.add_argument("--base-steps", type=int)
    p.add_argument("--base-images", type=int)
    p.add_argument("--base-object-weight", type=float,
                   help="base stage: extra loss weight on latent pixels at and next to the object (0: none)")
    p.add_argument("--base-object-weight-t", type=int,
                   help="base stage: apply that weight only at timesteps below this (default 400; 1000: all)")
    p.add_argument("--base-object-weight-everywhere", type=int,
                   help="... except in the base stage's first this many steps: there at every timestep (default 6000)")
    p.add_argument("--base-small-weight", type=float,
                   help="draw base-stage images of small objects this many times as often as large ones (default 1)")
    p.add_argument("--base-detail-share", type=float,
                   help="share of base-stage timesteps drawn from [0, 400), where small shapes are decided (default 0)")
    p.add_argument("--lora-steps", type=int)
    p.add_argument("--lora-images", type=int, help="images each adapter trains on")
    p.add_argument("--lora-snr-cap", type=float,
                   help="outline adapter stage: loss weight min(SNR + 1, cap) / (SNR + 1); inf weighs every step 1")
    p.add_argument("--stripes-snr-cap", type=float, help="the same for the stripes adapter (default inf)")
    p.add_argument("--stripes-detail-share", type=float,
                   help="share of the stripes adapter's timesteps drawn from [0, 400) (default 0)")
    p.add_argument("--attribute-drop", type=float,
                   help="chance that a training caption leaves out each attribute (default 0.2)")
    p.add_argument("--lora-pairs", type=float,
                   help="fraction of the outline stage's steps on outline+stripes with the stripes adapter on")
    p.add_argument("--batch", type=int, help="batch size for every stage")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--compile", nargs="?", const="inductor", default="", metavar="BACKEND",
                   help="compile the UNet and text encoder of the base and adapter stages (for a GPU; backend: "
                        "inductor)")
    p.add_argument("--render-workers", type=int, default=0,
                   help="processes that render the training images (a GPU box's spare cores; 0: none)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when there is one)")
    p.add_argument("--init-from", help="start the decoder and base stages from this exported pipeline when they have "
                   "no checkpoint (after the decoder stage its VAE is written into --out, for the adapters)")
    p.set_defaults(func=run_train)

    c = sub.add_parser("carry", help="pack a training run directory into files that can be committed (a run "
                       "longer than a machine keeps runs/), or unpack one to resume it")
    c.add_argument("action", choices=["pack", "unpack"])
    c.add_argument("source", help="pack: the run directory; unpack: the packed directory")
    c.add_argument("dest", help="pack: the directory to write (replaced); unpack: the run directory to rebuild")
    c.add_argument("--force", action="store_true", help="unpack over a non-empty run directory")
    c.set_defaults(func=run_carry)

    e = sub.add_parser("eval", help="measure prompt adherence and the adapters' effect")
    e.add_argument("what", choices=["shapes"])
    e.add_argument("--model", help="pipeline directory (default: models/zoo/shapes)")
    e.add_argument("-n", type=int, default=200)
    e.add_argument("--seed", type=int, default=10_000,
                   help="the prompt set's seed (default 10000: the held-out prompts the bars are read on); another "
                        "seed with a larger -n says how far those 200 read from prompts at large")
    e.add_argument("--steps", type=int, help="denoising steps for every image, pictures too (default: the model's)")
    e.add_argument("--no-adapters", action="store_true")
    e.add_argument("--vae-only", action="store_true",
                   help="only read back renders after a VAE round trip (the ceiling for generated images)")
    e.add_argument("--pictures", metavar="DIR",
                   help="also write the model card's grid.png and adapters.png into DIR")
    e.add_argument("--engine-mode", default="exact", choices=["exact", "fast"],
                   help="measure the engine in this mode (fast: compiled; its warm-up is not in the image time)")
    e.add_argument("--json", help="also write the report here")
    e.set_defaults(func=run_eval)


def config_from(args: argparse.Namespace):  # -> TrainConfig
    from models.errors import InvalidRequest
    from models.loading import resolve_device
    from models.shapes.train import TrainConfig

    cfg = TrainConfig(run_dir=Path(args.run_dir), seed=args.seed, threads=args.threads,
                      render_workers=args.render_workers, compile=args.compile, device=str(resolve_device(args.device)))
    if args.out:
        cfg.out_dir = Path(args.out)
    for name in ("vae_steps", "decoder_steps", "decoder_lr", "outline_code", "stripes_code", "stripes_checker",
                 "polish_steps", "polish_ring_weight", "polish_pair_cap", "refine_steps", "refine_images",
                 "refine_min_iou", "base_steps", "base_images",
                 "base_object_weight", "base_object_weight_t", "base_object_weight_everywhere", "base_small_weight",
                 "base_detail_share", "lora_steps", "lora_images", "lora_snr_cap", "lora_pairs",
                 "attribute_drop", "stripes_snr_cap", "stripes_detail_share"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if not cfg.base_small_weight > 0:  # odds of 0 would leave small objects out, and multinomial fails on all-zero
        raise InvalidRequest(f"--base-small-weight must be > 0, got {cfg.base_small_weight}", param="base_small_weight")
    for name in ("base_detail_share", "stripes_detail_share", "attribute_drop", "refine_min_iou"):
        if not 0 <= getattr(cfg, name) <= 1:
            flag = "--" + name.replace("_", "-")
            raise InvalidRequest(f"{flag} must be within [0, 1], got {getattr(cfg, name)}", param=name)
    if args.init_from:
        cfg.init_from = Path(args.init_from)
    if args.batch:
        cfg.vae_batch = cfg.base_batch = cfg.lora_batch = args.batch
    return cfg


def run_train(args: argparse.Namespace) -> int:
    from models.errors import DiffuserveError
    from models.shapes.train import export_pipeline, run

    try:
        cfg = config_from(args)
    except DiffuserveError as e:  # a bad flag: its message, not a traceback (as `diffuserve generate`)
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    # `diffuserve` logs at WARNING unless -v; a training run's stage times and stops are its report.
    log = logging.getLogger("models.shapes")
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    stages = tuple(args.stage or STAGES)
    if stages == ("export",):
        print(f"exported {export_pipeline(cfg)}")
        return 0
    from models.shapes.train_common import Stopped

    try:
        run(cfg, tuple(s for s in stages if s != "export"), args.minutes)
    except Stopped as e:  # nothing exported: the stage is partly trained
        log.warning("%s; run the same command again to resume", e)
        return 128 + e.signum
    except DiffuserveError as e:  # e.g. a stage run before the one it starts from
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    if "export" in stages:
        export_pipeline(cfg)
    return 0


def run_carry(args: argparse.Namespace) -> int:
    from models.shapes.carry import CarryError, pack, unpack

    try:
        if args.action == "pack":
            manifest = pack(Path(args.source), Path(args.dest))
        else:
            manifest = unpack(Path(args.source), Path(args.dest), force=args.force)
    except CarryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(m["bytes"] for m in manifest["files"].values())
    print(f"{args.action}ed {len(manifest['files'])} files ({size / 2**20:.1f} MiB) from {args.source} into "
          f"{args.dest}; checkpointed steps: {json.dumps(manifest['steps'])}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from models.cli import DEFAULT_MODEL, default_lora_dir
    from models.engine import Engine
    from models.loading import load_pipeline
    from models.shapes.evaluate import evaluate, format_report, vae_round_trip

    model_dir = Path(args.model) if args.model else DEFAULT_MODEL
    lora_dir = default_lora_dir(model_dir)
    model = load_pipeline(model_dir)
    if args.vae_only:
        report = {"n": args.n, "seed": args.seed, "vae_round_trip": vae_round_trip(model.vae, args.n, args.seed)}
    else:
        engine = Engine(model, mode=args.engine_mode, lora_dir=str(lora_dir) if lora_dir else None)
        engine.warmup(16)  # fast mode: every graph the evaluator's batches use (exact: nothing to do)
        if args.pictures:
            from models.shapes.card import make_pictures

            for path in make_pictures(engine, Path(args.pictures), steps=args.steps):
                print(f"wrote {path}")
        report = evaluate(engine, n=args.n, seed=args.seed, steps=args.steps, adapters=not args.no_adapters)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
