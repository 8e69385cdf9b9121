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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
