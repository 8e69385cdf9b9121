"""``diffuserve api``: the HTTP front end alone, against a given Redis (Compose, Kubernetes)."""

from __future__ import annotations

import argparse
import os


def add_api_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=os.environ.get("DIFFUSERVE_REDIS_URL"))
    p.add_argument("--host", default=os.environ.get("DIFFUSERVE_HOST"))
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--default-model", default=None)
    p.add_argument("--api-keys", default=None, help="comma-separated; also DIFFUSERVE_API_KEYS")


def run_api(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.settings import Settings

    settings = Settings.from_env(redis_url=args.redis_url, host=args.host, port=args.port,
                                 default_model=args.default_model, api_keys=args.api_keys)
    print(f"diffuserve api at http://{settings.host}:{settings.port} (Redis {settings.redis_url})", flush=True)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")
    return 0
