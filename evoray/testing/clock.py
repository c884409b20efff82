"""Fake time for limiter and backoff tests: an event loop whose clock jumps to the next timer.

``run_virtual(coro)`` runs a coroutine on a loop where ``loop.time()`` is virtual: whenever no
callback is ready, time advances straight to the earliest scheduled timer, so a minute of rate
limiting runs in milliseconds and the timings are exact and repeatable.
"""

from __future__ import annotations

import asyncio


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self):
        super().__init__()
        self._virtual_now = 0.0

    def time(self) -> float:
        return self._virtual_now

    def _run_once(self):  # noqa: D401 - private asyncio hook
        if not self._ready and self._scheduled:
            # jump to the next timer, plus a nanosecond: real clocks always move on a little, and
            # code that re-arms a timer for "now" after float rounding would otherwise spin forever
            self._virtual_now = max(self._virtual_now, self._scheduled[0]._when) + 1e-9
        super()._run_once()


def run_virtual(coro):
    loop = VirtualClockLoop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        # like asyncio.run: cancel what is still pending (parked lease calls, watches) and let it finish
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        asyncio.set_event_loop(None)
        loop.close()


class TokenBucketModel:
    """A provider-side token bucket (what a real API enforces) to check grant times against."""

    def __init__(self, per_minute: float, burst_seconds: float = 1.0):
        self.rate = per_minute / 60.0
        self.capacity = self.rate * burst_seconds
        self.level = self.capacity
        self.t = 0.0
        self.rejected = 0

    def offer(self, t: float, amount: float = 1.0) -> bool:
        self.level = min(self.capacity, self.level + (t - self.t) * self.rate)
        self.t = t
        if self.level + 1e-9 >= amount:
            self.level -= amount
            return True
        self.rejected += 1
        return False


class StrictWindowModel:
    """A strict provider: at most ``max(1, floor(rpm/60 * window))`` arrivals in ANY window of
    ``window_s`` seconds, rejected arrivals counted too (what the fake server's ``window`` mode does)."""

    def __init__(self, per_minute: float, window_s: float = 1.0, count_rejected: bool = True):
        import math
        from collections import deque

        self.window = max(window_s, 60.0 / per_minute)
        self.allowed = max(1, math.floor(per_minute / 60.0 * self.window + 1e-9))
        self.count_rejected = count_rejected
        self.arrivals: deque[float] = deque()
        self.admitted = 0
        self.rejected = 0

    def offer(self, t: float) -> bool:
        while self.arrivals and self.arrivals[0] <= t - self.window:
            self.arrivals.popleft()
        ok = len(self.arrivals) < self.allowed
        if ok or self.count_rejected:
            self.arrivals.append(t)
        if ok:
            self.admitted += 1
        else:
            self.rejected += 1
        return ok


def max_in_window(times: list[float], window_s: float) -> int:
    """The most of ``times`` inside any half-open window ``(t - window_s, t]``."""
    ts = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(ts):
        while ts[j] <= t - window_s:
            j += 1
        best = max(best, i - j + 1)
    return best
