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


def draining_server(app, settings, **config):  # -> uvicorn.Server
    """A uvicorn server that, on SIGTERM/SIGINT, first turns ``/readyz`` to 503 for ``shutdown_drain_s``
    (load balancers stop sending new requests) and only then shuts down, finishing in-flight requests."""
    import threading

    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if settings.shutdown_drain_s > 0 and not app.state.draining:
                app.state.draining = True
                threading.Timer(settings.shutdown_drain_s, super().handle_exit, (sig, frame)).start()
            else:
                super().handle_exit(sig, frame)

    return DrainingServer(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", **config))


def run_api(args: argparse.Namespace) -> int:
    from server.app import create_app
    from server.settings import Settings

    settings = Settings.from_env(redis_url=args.redis_url, host=args.host, port=args.port,
                                 default_model=args.default_model, api_keys=args.api_keys)
    print(f"diffuserve api at http://{settings.host}:{settings.port} (Redis {settings.redis_url})", flush=True)
    draining_server(create_app(settings), settings).run()
    return 0
