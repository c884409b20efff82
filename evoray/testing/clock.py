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
