"""The API's outermost layer as plain ASGI: refuse oversized bodies, count and time every request.

Starlette's ``@app.middleware("http")`` (BaseHTTPMiddleware) runs every request through an extra task group and
memory streams; measured with ``bench/api_cost.py`` it was a large share of the CPU a refused (429) request
costs, and under overload the API's CPU is what answers quickly or not.
"""

from __future__ import annotations

import json
import time
from typing import Any

from server import metrics

Scope = dict[str, Any]


class LimitsAndMetrics:
    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        method = scope["method"]
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await self._too_large(send)
            self._observe(scope, method, 413, t0)
            return

        async def send_timed(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":  # time to headers (an SSE stream goes on for long)
                self._observe(scope, method, message["status"], t0)
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        except Exception:
            self._observe(scope, method, 500, t0)
            raise

    @staticmethod
    def _observe(scope: Scope, method: str, status: int, t0: float) -> None:
        path = getattr(scope.get("route"), "path", "unmatched")
        metrics.REQUESTS.labels(method, path, str(status)).inc()
        metrics.REQUEST_SECONDS.labels(method, path).observe(time.perf_counter() - t0)

    async def _too_large(self, send: Any) -> None:
        body = json.dumps({"error": {"type": "request_too_large", "param": None,
                                     "message": f"request body exceeds {self.max_body_bytes} bytes."}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
