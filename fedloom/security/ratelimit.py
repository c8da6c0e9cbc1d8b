"""Per-node token buckets: each node may make ``rate`` calls a second, in bursts of up to ``burst``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from fedloom.security.signing import AuthError

MAX_BUCKETS = 100_000


class RateLimiter:
    """``take(key)`` spends one token of ``key``'s bucket or raises AuthError(RESOURCE_EXHAUSTED)."""

    def __init__(self, *, rate: float, burst: float, clock: Callable[[], float] = time.monotonic,
                 max_buckets: int = MAX_BUCKETS):
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be positive and burst at least 1, got rate={rate}, burst={burst}")
        self.rate, self.burst = float(rate), float(burst)
        self.clock = clock
        self.max_buckets = max_buckets
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: str) -> None:
        with self._lock:
            now = self.clock()
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
                raise AuthError("RESOURCE_EXHAUSTED",
                                f"rate limit: node {key[:128]!r} exceeds {self.rate:g} calls/s "
                                f"(burst {self.burst:g}); retry in {wait:.2f}s")
            if key not in self._buckets and len(self._buckets) >= self.max_buckets:
                self._forget_full(now)
            self._buckets[key] = (tokens - 1.0, now)

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled (they hold no information); bounds memory under many keys."""
        full = [k for k, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= self.max_buckets:
            raise AuthError("RESOURCE_EXHAUSTED", "too many distinct callers; try again later")
