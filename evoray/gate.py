"""One place that grants permits for every provider of a job.

Design decision (STYLE habit 6): the rate budget of a provider entry is held by **one**
:class:`Gatekeeper` per job. In a Ray job it lives in a named async actor (``actors.gate``), so
every rater, evolver, candidate and judge actor on every node asks the same object; without Ray
(unit tests) the same class is used in-process. Nothing else holds a share of the limit, so the
limits cannot be multiplied by the number of actors.

Per provider it enforces:

* ``rpm`` with an :class:`aiolimiter.AsyncLimiter` whose bucket holds ``burst`` permits and drains
  at ``rpm/60`` per second. Providers enforce per-minute limits over short windows (a 600 rpm key
  allows about 10 requests in any one second), so ``burst`` is a quarter of a second's worth: the
  minute's budget is let out evenly, never in a burst, and the whole limit is still used.
* ``tpm`` with a token bucket of the same shape that is charged an estimate before the call
  (prompt size + max_tokens) and corrected after it from the real usage (refund or debt).
* ``max_concurrency`` with a counter of permits out; permits carry a lease so a permit whose
  holder died (a killed actor) is reclaimed after ``lease_s``.
* a 429 pauses the provider for every actor for the advised time (``pause``).
* a provider that fails ``failures_before_cooldown`` times in a row is taken out for
  ``cooldown_s`` and its share goes to the others (failover).

Spreading: among the providers a request may use, the gate picks one that can grant now, and
among those the one with the fewest grants per unit of ``weight``; when none can grant now it
picks by the same rule and waits for that one.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from dataclasses import dataclass
from typing import Any

from aiolimiter import AsyncLimiter

from .config import ProviderConfig
from .errors import BudgetExceeded, ConfigError
from .ledger import Ledger


def _now() -> float:
    return asyncio.get_running_loop().time()


class TokenBucket:
    """Leaky bucket in tokens with corrections: ``level`` may go negative (debt)."""

    def __init__(self, per_minute: float, burst_seconds: float = 1.0):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_seconds)
        self.level = self.capacity
        self._t: float | None = None
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = _now()
        if self._t is not None:
            self.level = min(self.capacity, self.level + (now - self._t) * self.rate)
        self._t = now

    def has_capacity(self, amount: float) -> bool:
        self._refill()
        return self.level >= min(amount, self.capacity)

    async def acquire(self, amount: float) -> None:
        amount = min(amount, self.capacity)  # a request larger than the bucket waits for a full one
        async with self._lock:  # FIFO: the head of the queue waits, the rest queue behind
            while True:
                self._refill()
                if self.level >= amount:
                    self.level -= amount
                    return
                await asyncio.sleep((amount - self.level) / self.rate)

    def correct(self, delta: float) -> None:
        """Give back (delta > 0) or charge more (delta < 0) after the real usage is known."""
        self._refill()
        self.level = min(self.capacity, self.level + delta)


@dataclass
class Grant:
    provider: str
    permit: int
    est_tokens: int


class _ProviderState:
    def __init__(self, cfg: ProviderConfig, burst_seconds: float):
        self.cfg = cfg
        self.name = cfg.name
        self.weight = cfg.weight
        self.rpm: AsyncLimiter | None = None
        if cfg.rpm:
            per_s = cfg.rpm / 60.0
            burst = max(1.0, per_s * burst_seconds)
            self.rpm = AsyncLimiter(burst, burst / per_s)
        self.tpm = TokenBucket(cfg.tpm, burst_seconds) if cfg.tpm else None
        self.max_conc = cfg.max_concurrency
        self.inflight: dict[int, float] = {}
        self.granted = 0
        self.paused_until = 0.0
        self.cooldown_until = 0.0
        self.consecutive_failures = 0
        self.cooldowns = 0

    def available_at(self, now: float) -> float:
        return max(self.paused_until, self.cooldown_until)

    def has_slot(self) -> bool:
        return self.max_conc is None or len(self.inflight) < self.max_conc

    def ready_now(self, est: int) -> bool:
        return (self.rpm is None or self.rpm.has_capacity()) and (self.tpm is None or self.tpm.has_capacity(est))


class Gatekeeper:
    """Grants permits, takes 429 pauses and failure reports, and holds the job's ledger."""

    def __init__(
        self,
        providers: list[ProviderConfig],
        budget_usd: float | None = None,
        burst_seconds: float = 0.25,
        lease_s: float | None = None,
    ):
        self.states = {p.name: _ProviderState(p, burst_seconds) for p in providers}
        self.budget_usd = budget_usd
        self.ledger = Ledger({p.name: p.price for p in providers})
        self._ids = itertools.count(1)
        self._changed: asyncio.Event | None = None
        self.lease_s = lease_s
        self.stopped_reason: str | None = None
        # what one actor found, shared with the others through record(): providers halted by the
        # fail-fast rule, and capability choices (structured_output ...) a provider switched to
        self.halted: dict[str, str] = {}
        self.learned: dict[str, dict[str, str]] = {}

    # ---- helpers --------------------------------------------------------------------------------
    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        ev = self._event()
        ev.set()
        self._changed = asyncio.Event()

    def _reap(self, st: _ProviderState, now: float) -> None:
        lease = self.lease_s or (st.cfg.timeout_s * 2 + 30)
        dead = [pid for pid, t in st.inflight.items() if now - t > lease]
        for pid in dead:
            del st.inflight[pid]

    def limited(self, names: list[str]) -> bool:
        """Whether any of these providers has a limit that needs permits."""
        return any(
            (s := self.states[n]).rpm is not None or s.tpm is not None or s.max_conc is not None for n in names
        )

    def _check_budget(self) -> None:
        if self.budget_usd is not None and self.ledger.dollars >= self.budget_usd:
            self.stopped_reason = f"budget of ${self.budget_usd:.4f} reached (spent ${self.ledger.dollars:.4f})"
            raise BudgetExceeded(self.stopped_reason)

    # ---- the API actors use ------------------------------------------------------------------
    async def acquire(self, candidates: list[str], est_tokens: int = 0) -> Grant:
        for n in candidates:
            if n not in self.states:
                raise ConfigError(f"unknown provider '{n}'")
        while True:
            self._check_budget()
            now = _now()
            states = [self.states[n] for n in candidates]
            for s in states:
                self._reap(s, now)
            open_ = [s for s in states if s.available_at(now) <= now]
            if not open_:
                # every provider is paused or cooling down: wait for the first to come back
                wake = min(s.available_at(now) for s in states)
                await self._wait(wake - now)
                continue
            slotted = [s for s in open_ if s.has_slot()]
            if not slotted:
                await self._wait(1.0)
                continue
            ready = [s for s in slotted if s.ready_now(est_tokens)]
            pool = ready or slotted
            st = min(pool, key=lambda s: (s.granted / s.weight, s.name))
            pid = next(self._ids)
            st.inflight[pid] = now  # hold the slot while we wait for the buckets
            st.granted += 1
            try:
                if st.rpm is not None:
                    await st.rpm.acquire()
                if st.tpm is not None:
                    await st.tpm.acquire(est_tokens)
                # a 429 may have paused this provider while we waited
                while (wait := st.paused_until - _now()) > 0:
                    await asyncio.sleep(wait)
            except BaseException:
                st.inflight.pop(pid, None)
                raise
            st.inflight[pid] = _now()
            return Grant(st.name, pid, est_tokens)

    async def _wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._event().wait(), timeout=max(0.001, timeout))
        except asyncio.TimeoutError:
            pass

    async def release(
        self,
        grant: Grant | None,
        provider: str,
        ok: bool,
        used_tokens: int | None = None,
        status: int | None = None,
        retry_after: float | None = None,
        health_failure: bool = False,
    ) -> None:
        st = self.states.get(provider)
        if st is None:
            return
        if grant is not None:
            st.inflight.pop(grant.permit, None)
            if st.tpm is not None and used_tokens is not None:
                st.tpm.correct(grant.est_tokens - used_tokens)
        now = _now()
        if status == 429:
            # pause every actor of this provider for the advised time (default: one second)
            st.paused_until = max(st.paused_until, now + (retry_after if retry_after is not None else 1.0))
        if ok:
            st.consecutive_failures = 0
        elif health_failure:
            st.consecutive_failures += 1
            if st.consecutive_failures >= st.cfg.failures_before_cooldown:
                st.cooldowns += 1
                st.cooldown_until = now + st.cfg.cooldown_s
                st.consecutive_failures = 0
        self._notify()

    def record(self, delta: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Merge a ledger delta; return the spend so far and whether the job must stop."""
        if delta:
            self.ledger.merge(delta)
        stop = self.budget_usd is not None and self.ledger.dollars >= self.budget_usd
        if stop and not self.stopped_reason:
            self.stopped_reason = f"budget of ${self.budget_usd:.4f} reached (spent ${self.ledger.dollars:.4f})"
        out: dict[str, Any] = {"dollars": self.ledger.dollars, "stop": stop}
        if self.halted:
            out["halted"] = dict(self.halted)
        if self.learned:
            out["learned"] = {k: dict(v) for k, v in self.learned.items()}
        return out

    def halt(self, provider: str, message: str) -> bool:
        """An actor's fail-fast rule halted ``provider``; True when it is the first to say so."""
        if provider in self.halted:
            return False
        self.halted[provider] = message
        return True

    def learn(self, provider: str, choices: dict[str, str]) -> bool:
        """An actor's provider switched capabilities; True when these choices are news for the job."""
        if self.learned.get(provider) == choices:
            return False
        self.learned[provider] = dict(choices)
        return True

    def ledger_dict(self) -> dict[str, Any]:
        return self.ledger.to_dict()

    def status(self) -> dict[str, Any]:
        now = _now() if _has_loop() else 0.0
        return {
            n: {
                "halted": self.halted.get(n),
                "choices": self.learned.get(n),
                "inflight": len(s.inflight),
                "granted": s.granted,
                "paused": s.paused_until > now,
                "cooling": s.cooldown_until > now,
                "cooldowns": s.cooldowns,
            }
            for n, s in self.states.items()
        }


def _has_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def backoff_delay(attempt: int, base: float, cap: float, rng) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**(attempt-1))]."""
    return rng.uniform(0, min(cap, base * math.pow(2, max(0, attempt - 1))))
