"""Requests-per-minute per tenant: a sliding one-minute window, in this process (each replica counts its own)."""

from __future__ import annotations

import math
import time
from collections import deque


class RateLimiter:
    def __init__(self, window_s: float = 60.0) -> None:
        self.window = window_s
        self._hits: dict[str, deque[float]] = {}

    def retry_after(self, tenant_id: str, limit: int | None, now: float | None = None) -> int | None:
        """Record a request; None if allowed, else seconds until the oldest request leaves the window."""
        if limit is None:
            return None
        now = time.monotonic() if now is None else now
        hits = self._hits.setdefault(tenant_id, deque())
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        if len(hits) >= limit:
            return max(1, math.ceil(hits[0] + self.window - now))
        hits.append(now)
        return None
