"""`RATE_LIMIT_PER_MIN`: requests per minute per API key, answered 429 with `Retry-After`.

Counted in fixed windows of a minute: in Redis when `REDIS_URL` is set (`INCR` and `EXPIRE` of
`streaming:rate:<key id>:<minute>`, one round trip), so that the limit holds across every host;
in the process otherwise (each worker then allows the limit on its own). Only requests that
carry a key are counted: an open service has no keys to count by. When Redis cannot be reached
the request is let through (and the failure logged once a minute): a limit is not worth an
outage.
"""

from __future__ import annotations

import threading
import time

from flask import Blueprint, Flask, g

from .auth import public
from .config import Settings
from .errors import ApiError
from .store import FailureLog

WINDOW_S = 60


class MemoryCounter:
    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, window: int) -> int:
        with self._lock:
            if len(self.counts) > 10_000:  # forget the windows that are over
                self.counts = {k: n for k, n in self.counts.items() if k[1] >= window}
            count = self.counts[key, window] = self.counts.get((key, window), 0) + 1
        return count


class RedisCounter:
    def __init__(self, settings: Settings) -> None:
        from .live.redis_streams import connect

        self.client = connect(settings)
        self.failures = FailureLog("Redis")

    def hit(self, key: str, window: int) -> int:
        name = f"streaming:rate:{key}:{window}"
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.incr(name)
            pipe.expire(name, WINDOW_S * 2)
            return pipe.execute()[0]
        except Exception as exc:
            self.failures.failed("counting requests", exc)
            return 0


def init_app(app: Flask | Blueprint, settings: Settings) -> None:
    limit = settings.rate_limit_per_min
    if limit <= 0:
        return
    counter = RedisCounter(settings) if settings.redis_url else MemoryCounter()

    @app.before_request
    def rate_limit() -> None:
        if not g.get("key_id") or public():
            return
        now = time.time()
        window = int(now // WINDOW_S)
        if counter.hit(g.key_id, window) > limit:
            retry_after = max(1, int((window + 1) * WINDOW_S - now + 0.999))
            raise ApiError(429, "rate_limited", f"this API key is over its {limit} requests a minute",
                           {"Retry-After": str(retry_after)})
