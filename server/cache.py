"""Small values the API reads from Redis on every request (a model's defaults, its workers' speed), cached."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Refreshed(Generic[T]):
    """Values by key, re-read at most every ``ttl`` seconds; the readers of a stale key share one read.

    Without the sharing, every request that arrives while a value is stale starts a read of its own: under
    a few hundred requests a second, one slow read (say a few milliseconds on a busy Redis) becomes dozens
    of identical reads in flight, each making the next one slower. ``keep`` says which values may take a
    new slot once ``max_keys`` are cached (e.g. only real models, not a flood of made-up names)."""

    def __init__(self, ttl: float, fetch: Callable[[Any, str], Awaitable[T]], max_keys: int = 64,
                 keep: Callable[[T], bool] = lambda value: True) -> None:
        self.ttl, self.fetch, self.max_keys, self.keep = ttl, fetch, max_keys, keep
        self.values: dict[str, tuple[float, T]] = {}
        self.inflight: dict[str, asyncio.Future[T]] = {}
        self.reads = 0  # how many reads reached Redis (tests, diagnostics)

    async def get(self, r: Any, key: str) -> T:
        hit = self.values.get(key)
        if hit is not None and time.monotonic() - hit[0] <= self.ttl:
            return hit[1]
        read = self.inflight.get(key)
        if read is None:
            read = self.inflight[key] = asyncio.ensure_future(self._read(r, key))
        # shielded: a reader that goes away (client disconnect) does not cancel the read the others await
        return await asyncio.shield(read)

    async def _read(self, r: Any, key: str) -> T:
        self.reads += 1
        try:
            value = await self.fetch(r, key)
            if key in self.values or self.keep(value) or len(self.values) < self.max_keys:
                self.values[key] = (time.monotonic(), value)
            return value
        finally:
            self.inflight.pop(key, None)
