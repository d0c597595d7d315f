"""Per-user sliding-window rate limit, shared by every adapter."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable, Hashable

__all__ = ["RateLimiter"]

WINDOW_SECONDS = 60.0


class RateLimiter:
    """Allows each user at most ``per_minute`` messages in any 60-second window; 0 means no limit."""

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._recent: defaultdict[Hashable, deque[float]] = defaultdict(deque)

    def allow(self, user: Hashable) -> bool:
        """Record one message from ``user`` and say whether it is within the limit."""
        if self.per_minute <= 0:
            return True
        now = self._clock()
        recent = self._recent[user]
        while recent and now - recent[0] >= WINDOW_SECONDS:
            recent.popleft()
        if len(recent) >= self.per_minute:
            return False
        recent.append(now)
        return True

    def retry_after(self, user: Hashable) -> float:
        """Seconds until ``user`` may send again (0 when allowed now)."""
        recent = self._recent.get(user)
        if not recent or len(recent) < self.per_minute:
            return 0.0
        return max(0.0, WINDOW_SECONDS - (self._clock() - recent[0]))
