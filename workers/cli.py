"""The ``diffuserve`` command. Subcommands import their heavy dependencies lazily."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from models.cli import add_generate_parser, add_test_model_parser
    from models.shapes.cli import add_parsers as add_shapes_parsers

    parser = argparse.ArgumentParser(prog="diffuserve", description="Text-to-image latent diffusion, served.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_test_model_parser(sub)
    add_shapes_parsers(sub)

    from server.main import add_api_args, run_api
    from workers.main import add_worker_args, run_worker
    from workers.supervisor import add_serve_args, run_serve

    serve = sub.add_parser("serve", help="all in one: embedded Redis, the API and worker processes")
    add_serve_args(serve)
    serve.set_defaults(func=run_serve)
    api = sub.add_parser("api", help="the HTTP API alone, against a given Redis")
    add_api_args(api)
    api.set_defaults(func=run_api)
    worker = sub.add_parser("worker", help="one worker process, against a given Redis")
    add_worker_args(worker)
    worker.set_defaults(func=run_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
