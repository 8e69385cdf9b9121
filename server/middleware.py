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
            return await self._too_large(scope, send, t0)
        if length is None and method in ("POST", "PUT", "PATCH"):
            # A chunked body declares no length: read it here, up to the limit, and hand it on whole.
            body = await self._read_bounded(receive)
            if body is None:
                return await self._too_large(scope, send, t0)
            receive = self._replay(body, receive)

        async def send_timed(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":  # time to headers (an SSE stream goes on for long)
                self._observe(scope, method, message["status"], t0)
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        except Exception:
            self._observe(scope, method, 500, t0)
            raise

    async def _read_bounded(self, receive: Any) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to answer
                return b""
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes, receive: Any) -> Any:
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        return replay

    @staticmethod
    def _observe(scope: Scope, method: str, status: int, t0: float) -> None:
        path = getattr(scope.get("route"), "path", "unmatched")
        metrics.REQUESTS.labels(method, path, str(status)).inc()
        metrics.REQUEST_SECONDS.labels(method, path, str(status)).observe(time.perf_counter() - t0)

    async def _too_large(self, scope: Scope, send: Any, t0: float) -> None:
        body = json.dumps({"error": {"type": "request_too_large", "param": None,
                                     "message": f"request body exceeds {self.max_body_bytes} bytes."}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        self._observe(scope, scope["method"], 413, t0)
