"""``python -m models.shapes train|eval shapes ...``: the ``diffuserve`` shapes commands without the server's
dependencies (FastAPI, Redis), for a box that has torch and little else (``models/shapes/device_train.sh``)."""

from __future__ import annotations

import argparse
import logging
import sys

from models.shapes.cli import add_parsers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.shapes", description="Train or evaluate the shapes model.")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
