"""One limit per API key: the sliding-window scheduler, its adaptive rate, and permit leases.

Providers enforce a per-minute limit over short sliding windows: a strict one admits at most
``rpm/60 * window`` arrivals in ANY window of ``window`` seconds and still counts the requests it
rejects. This module grants request times that satisfy that rule for every process that uses a key.

Three layers, all Ray-free (the Ray actor in :mod:`actors.gate` is a thin wrapper):

* :class:`WindowLimiter` (pure, the caller passes ``now``) decides *when* a request may be sent.
  Requests are spaced evenly, at least ``max(W/N, 1/r) / (1 - margin)`` apart, where ``r`` is the
  rate per second, ``W`` the window and ``N = max(1, floor(r*W))`` the requests a window admits.
  Hence any ``N + 1`` consecutive grants span at least ``W / (1 - margin)``: no window of length
  ``W`` holds more than ``N`` grants even when each request reaches the provider up to about
  ``margin * W`` later than granted (20 ms with the defaults), and throughput is ``1 - margin`` of
  the limit. There is no burst, also not after an idle spell or a pause: the schedule resumes at
  the same spacing. (The margin is applied to the spacing, not to the count: ``floor(r*W*(1-m))``
  would cap 1,200 rpm at 19 of 20 requests a second.) Tokens (``tpm``) are checked against a
  sliding window of ``W / (1 - margin)`` that holds at most ``T = tpm/60 * W`` tokens (a request
  larger than ``T`` is admitted alone in an empty window), first come first served; a grant is
  charged the caller's estimate (prompt + max_tokens) and corrected when the real usage is
  reported.

  The rate adapts (AIMD on one factor ``f`` that scales both limits): every 429 pauses the key for
  its ``Retry-After`` (default one window); a 429 on a permit granted after the last decrease also
  reads the limit off the refusal (one fewer than the grants in the window that ended with the
  refused one), sets ``f`` a quarter below that (5 % when it is the same limit again), recovers to
  it quickly on successes and then probes beyond it slowly (the probe halves each time a 429
  confirms the same limit), up to the configured limit. Rate-limit headers lower the ceiling
  (``x-ratelimit-limit-*`` / ``anthropic-ratelimit-*-limit``: the limit the provider announces,
  never above the configured one); ``remaining`` 0 pauses the key for one request's (or one
  typical request's tokens') share of ``reset``, the time the provider needs to refill that much.

* :class:`KeyGate` (asyncio) serves one key to many clients. It keeps the :class:`WindowLimiter`
  and hands out **leases**: small batches of permits (request times, sent as delays from now)
  sized by the client's share of the rate. A client holds at most ``rate * horizon / clients``
  permits (``horizon`` = 2 s) and asks for more when half are used, so most requests find a permit
  waiting and need no awaited round trip; a client that dies strands at most its batch (lost
  capacity, never extra traffic). A lease call parks in the gate while the client holds enough;
  when a 429 lowers the rate, parked calls return at once with a new ``epoch`` and every client
  drops the permits it holds. Jobs register their configured limits for the key: **the lowest
  wins** (rpm, tpm and window; the largest margin), and a job's registration lapses when it leaves
  or has not asked for 30 s. A gate that was restarted starts conservatively: nothing for one
  horizon (permits of the dead incarnation may still be in use), then half the rate, ramping up.

* :class:`PermitPool` is the client side inside one process (one per key): requests wait in
  FIFO order, one background task keeps a lease call open for the requests not yet covered, and a
  request sleeps until its permit's time. Reports (successes, token use, headers) ride along with
  the next lease call; a 429 is reported at once.

Key identity (:func:`key_identity`) is provider kind + base URL + sha256 of the key, never the key.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import itertools
import math
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

#: how far ahead of now a gate schedules permits; a client holds at most its share of this
LEASE_HORIZON_S = 2.0
#: the largest lease, whatever the share
MAX_LEASE = 64
#: a client that has not asked for this long no longer counts for the share
CLIENT_TTL_S = 2 * LEASE_HORIZON_S
#: a job's registered limits lapse after this long without a lease or report from it
JOB_TTL_S = 30.0
#: a permit may be used this much after its time; later it is dropped (late use would bunch), both
#: when it is handed out and when the request sleeping on it wakes up
LATE_TOLERANCE_S = 0.005
#: permit lateness / wait samples a client sends with one report (the gate keeps the latest 50,000)
SAMPLES_PER_REPORT = 256
#: multiplicative decrease on a 429, the lowest factor, and the restart factor
DECREASE = 0.75
GENTLE_DECREASE = 0.95  # a 429 again near the factor of the last one
MIN_FACTOR = 0.05
RESTART_FACTOR = 0.5


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def key_identity(kind: str, base_url: str | None, key: str | None, fallback: str = "") -> str:
    """``kind|base_url|sha256(key)``; without a key (not known here) ``kind|base_url|entry:fallback``."""
    url = (base_url or "default").rstrip("/")
    who = _sha(key) if key else f"entry:{fallback}"
    return f"{kind}|{url}|{who}"


def gate_actor_name(identity: str) -> str:
    """The Ray actor name of a key's gate: a hash of the identity (which itself holds only a hash)."""
    return "evoray-keygate-" + _sha(identity)[:20]


def identity_label(identity: str) -> str:
    """What a human may see: kind and base URL, never the key's hash."""
    kind, url, _ = identity.split("|", 2)
    return f"{kind} @ {url}"


# ---------------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LimitSpec:
    """What one job configured for a key (``rpm``/``tpm`` None: not limited)."""

    rpm: float | None = None
    tpm: float | None = None
    window_s: float = 1.0
    margin: float = 0.02

    @classmethod
    def of(cls, cfg: Any) -> "LimitSpec":
        return cls(cfg.rpm, cfg.tpm, getattr(cfg, "limit_window_s", 1.0), getattr(cfg, "limit_margin", 0.02))

    def to_tuple(self) -> tuple:
        return (self.rpm, self.tpm, self.window_s, self.margin)

    @classmethod
    def from_tuple(cls, t) -> "LimitSpec":
        return cls(*t)

    @staticmethod
    def strictest(specs: list["LimitSpec"]) -> "LimitSpec":
        """The lowest rpm, tpm and window and the largest margin among ``specs``."""
        rpms = [s.rpm for s in specs if s.rpm]
        tpms = [s.tpm for s in specs if s.tpm]
        return LimitSpec(min(rpms) if rpms else None, min(tpms) if tpms else None,
                         min(s.window_s for s in specs), max(s.margin for s in specs))


def spacing_for(rate_per_s: float, window_s: float, margin: float) -> float:
    """Seconds between grants so that no window of ``window_s`` (stretched by the margin) holds
    more than ``max(1, floor(rate*window))`` of them."""
    n = max(1, math.floor(rate_per_s * window_s + 1e-6))
    return max(window_s / n, 1.0 / rate_per_s) / (1.0 - margin)


def window_allowance(rpm: float, window_s: float) -> int:
    """What a strict provider admits in one window: ``max(1, floor(rpm/60 * window))``."""
    return max(1, math.floor(rpm / 60.0 * window_s + 1e-9))


class _Grant:
    __slots__ = ("t", "est", "tok", "factor")

    def __init__(self, t: float, est: int, tok: list | None, factor: float):
        self.t, self.est, self.tok, self.factor = t, est, tok, factor


class WindowLimiter:
    """Grant times for one key (pure: every method takes ``now``). See the module docstring."""

    def __init__(self, spec: LimitSpec, now: float = 0.0, *, factor: float = 1.0, quiet_until: float = 0.0):
        self.spec = spec
        self.header_rpm: float | None = None  # limits announced by the provider (lower the ceiling)
        self.header_tpm: float | None = None
        self._factor = factor
        self._recompute()
        self.mark: float | None = 1.0 if factor < 1.0 else None  # factor of the last 429 (or 1 after a restart)
        self.probe = 0.02  # factor per second gained above the mark
        self.tat = quiet_until  # theoretical arrival time of the next request (GCRA, no burst)
        self.paused_until = quiet_until
        self.last_grant = -math.inf
        self.last_decrease = -math.inf
        self._decrease_pid = -1  # permits up to this id were granted before the last decrease
        self._last_ok = now
        self.tokens: deque[list] = deque()  # [t, tokens] of recent grants (tpm window)
        self.recent: deque[float] = deque()  # times of recent grants (the window a 429 is read against)
        self.grants: dict[int, _Grant] = {}
        self._ids = itertools.count(random.getrandbits(40))
        self._pruned = now
        # counters
        self.granted = 0
        self.decreases = 0
        self.rate_limited = 0
        self.pauses = 0

    # ---- the current limits ------------------------------------------------------------------
    @property
    def factor(self) -> float:
        return self._factor

    @factor.setter
    def factor(self, value: float) -> None:
        self._factor = value
        self._recompute()

    def _recompute(self) -> None:
        """Cache the current rates and spacing (read on every grant, changed only by feedback)."""
        c = self.ceiling_rpm
        self._rr = None if c is None else c * self._factor
        ct = self.ceiling_tpm
        self._rt = None if ct is None else ct * self._factor
        self._s = 0.0 if self._rr is None else spacing_for(self._rr / 60.0, self.spec.window_s, self.spec.margin)

    @property
    def ceiling_rpm(self) -> float | None:
        vals = [v for v in (self.spec.rpm, self.header_rpm) if v]
        return min(vals) if vals and self.spec.rpm else None

    @property
    def ceiling_tpm(self) -> float | None:
        vals = [v for v in (self.spec.tpm, self.header_tpm) if v]
        return min(vals) if vals and self.spec.tpm else None

    def rate_rpm(self) -> float | None:
        return self._rr

    def rate_tpm(self) -> float | None:
        return self._rt

    def spacing(self) -> float:
        return self._s

    def requests_per_s(self, typical_tokens: float = 1000.0) -> float:
        """Grants per second at the current rate (for lease sizing); tpm-only keys estimate it."""
        r = self.rate_rpm()
        if r is not None:
            return r / 60.0 * (1 - self.spec.margin)
        t = self.rate_tpm()
        if t is not None:
            return max(0.1, t / 60.0 * (1 - self.spec.margin) / max(1.0, typical_tokens))
        return 1000.0

    def set_spec(self, spec: LimitSpec) -> None:
        self.spec = spec
        self._recompute()

    # ---- granting --------------------------------------------------------------------------------
    def peek(self, now: float, est: int = 0) -> float:
        """The earliest time (>= now) a request of ``est`` tokens may be sent."""
        t = max(now, self.tat, self.paused_until, self.last_grant)
        rt = self._rt
        if rt is not None:
            t = max(t, self._token_window_time(t, est, rt))
        return t

    def _token_window(self) -> tuple[float, float]:
        w = self.spec.window_s / (1.0 - self.spec.margin)
        return w, self.ceiling_tpm / 60.0 * self.spec.window_s * self.factor  # type: ignore[operator]

    def _token_window_time(self, t: float, est: int, rt: float) -> float:
        w, cap = self._token_window()
        entries = [e for e in self.tokens if e[0] > t - w]
        total = sum(e[1] for e in entries)
        if est > cap:  # an oversized request goes alone into an empty window
            return max(t, entries[-1][0] + w) if entries else t
        i = 0
        while total + est > cap + 1e-9 and i < len(entries):
            total -= entries[i][1]
            t = max(t, entries[i][0] + w)
            i += 1
        return t

    def commit(self, t: float, est: int = 0) -> int:
        """Record a grant at ``t`` (from :meth:`peek`) and return its permit id."""
        if self._rr is not None:
            self.tat = t + self._s
        tok = None
        if self._rt is not None:
            tok = [t, float(est)]
            self.tokens.append(tok)
            w = self.spec.window_s / (1.0 - self.spec.margin)
            while self.tokens and self.tokens[0][0] <= t - w:
                self.tokens.popleft()
        self.last_grant = t
        self.recent.append(t)
        keep = t - 2 * self.spec.window_s - 2 * LEASE_HORIZON_S
        while self.recent[0] < keep:
            self.recent.popleft()
        pid = next(self._ids)
        self.grants[pid] = _Grant(t, est, tok, self.factor)
        self.granted += 1
        if t - self._pruned > 30.0:
            self._prune(t)
        return pid

    def drop_future(self, now: float) -> None:
        """Forget grants not yet due (their permits were revoked): the schedule continues from the
        last grant already due, not after permits nobody will use."""
        while self.recent and self.recent[-1] > now:
            self.recent.pop()
        while self.tokens and self.tokens[-1][0] > now:
            self.tokens.pop()
        self.last_grant = self.recent[-1] if self.recent else -math.inf
        self.tat = min(self.tat, self.last_grant + self._s) if self.recent else min(self.tat, now)

    def _prune(self, now: float) -> None:
        old = now - 120.0
        for pid in [p for p, g in self.grants.items() if g.t < old]:
            del self.grants[pid]
        self._pruned = now

    # ---- feedback ------------------------------------------------------------------------------
    def correct(self, pid: int, used: int) -> None:
        """The real token use of a permit: refund or charge the difference."""
        g = self.grants.get(pid)
        rt = self.rate_tpm()
        if g is None or rt is None:
            return
        g.est = used
        if g.tok is not None:
            g.tok[1] = float(max(0, used))

    def on_success(self, now: float, n: int = 1) -> None:
        """``n`` requests succeeded: let the factor grow back (additive increase)."""
        # credit the time these successes stand for at the current rate, not idle time
        dt = min(1.0, max(0.0, now - self._last_ok), n * max(self.spacing(), 0.001))
        self._last_ok = now
        if n <= 0 or self.factor >= 1.0 or dt <= 0 or now < self.paused_until:
            return
        if self.mark is not None and self.factor < self.mark:
            # fast recovery up to the rate at which the last 429 said the limit lies
            self.factor = min(self.mark, self.factor + (self.mark - self.factor) * min(1.0, 0.7 * dt) + 1e-4)
        else:
            self.factor = min(1.0, self.factor + self.probe * dt)  # then probe slowly beyond it

    def on_429(self, now: float, pid: int | None, retry_after: float | None) -> bool:
        """A request drew a 429: pause for the advised time; decrease the rate once per event.
        Returns True when the rate was decreased (permits held elsewhere should be dropped).

        The limit is estimated from what the provider just refused: the rejected request was one
        too many in its window, so the window admits one fewer than our grants in the window that
        ended at its grant time. The rate drops below that estimate (x0.75; x0.9 when it is about
        the last estimate again), recovers up to it quickly and probes beyond it slowly (the probe
        halves each time a 429 confirms the same estimate)."""
        self.rate_limited += 1
        g = self.grants.get(pid) if pid is not None else None
        if g is not None:
            fresh = pid > self._decrease_pid  # type: ignore[operator]
            at, when = g.factor, g.t
        else:  # a permit of another incarnation, or long forgotten
            fresh = now - self.last_decrease > self.spec.window_s
            at, when = self.factor, now
        self.pause(now + (retry_after if retry_after is not None else self.spec.window_s))
        if not fresh:
            return False
        est = at
        c = self.ceiling_rpm
        if c is not None:
            w = self.spec.window_s
            times = self.recent
            k = bisect.bisect_right(times, when) - bisect.bisect_right(times, when - w)
            if k >= 2:
                est = min(at, (k - 1) / (c / 60.0 * w))
        est = max(MIN_FACTOR, est)
        if self.mark is not None and abs(est - self.mark) <= 0.05 * self.mark:
            self.probe = max(0.0005, self.probe / 2)  # the same limit again: it is known, probe slowly
            cut = GENTLE_DECREASE
        else:
            self.probe = 0.02
            cut = DECREASE
        self.mark = est
        self.factor = max(MIN_FACTOR, min(self.factor, est) * cut)
        self.last_decrease = now
        self._decrease_pid = next(self._ids)
        self.decreases += 1
        return True

    def pause(self, until: float) -> None:
        if until > self.paused_until:
            self.paused_until = until
            self.pauses += 1

    def observe(self, when: float, info: dict[str, Any]) -> bool:
        """Rate-limit headers seen at ``when`` (see ``providers.base.rate_limit_info``). Returns
        True when the ceiling dropped."""
        dropped = False
        lr, lt = info.get("limit_requests"), info.get("limit_tokens")
        if lr and lr > 0 and (self.header_rpm is None or lr != self.header_rpm):
            before = self.rate_rpm()
            self.header_rpm = float(lr)
            self._recompute()
            after = self.rate_rpm()
            dropped |= before is not None and after is not None and after < before
        if lt and lt > 0 and (self.header_tpm is None or lt != self.header_tpm):
            before = self.rate_tpm()
            self.header_tpm = float(lt)
            self._recompute()
            after = self.rate_tpm()
            dropped |= before is not None and after is not None and after < before
        # nothing left: wait for one request's worth to come back, assuming the provider refills
        # evenly (both APIs' "reset" is when the limit is whole again, not when the next one fits)
        for dim, limited, header, own in (("requests", self.spec.rpm, lr, self.ceiling_rpm),
                                          ("tokens", self.spec.tpm, lt, self.ceiling_tpm)):
            remaining, reset = info.get(f"remaining_{dim}"), info.get(f"reset_{dim}_s")
            if not limited or remaining is None or remaining > 0 or not reset:
                continue
            whole = header or own or 1.0
            need = 1.0 if dim == "requests" else self._typical_tokens()
            self.pause(when + reset * min(1.0, need / whole))
        return dropped

    def _typical_tokens(self) -> float:
        recent = list(itertools.islice(reversed(self.tokens), 32))
        return sum(e[1] for e in recent) / len(recent) if recent else 1000.0

    def status(self) -> dict[str, Any]:
        return {
            "rpm": self.rate_rpm(), "tpm": self.rate_tpm(), "factor": round(self.factor, 4),
            "ceiling_rpm": self.ceiling_rpm, "ceiling_tpm": self.ceiling_tpm,
            "header_rpm": self.header_rpm, "header_tpm": self.header_tpm,
            "window_s": self.spec.window_s, "margin": self.spec.margin,
            "granted": self.granted, "rate_limited": self.rate_limited, "decreases": self.decreases,
            "pauses": self.pauses,
        }


# ---------------------------------------------------------------------------------------------
# The gate of one key (asyncio; in a Ray job it lives in a named detached actor)
# ---------------------------------------------------------------------------------------------


class _Client:
    __slots__ = ("held", "seen", "leases", "permits")

    def __init__(self, now: float):
        self.held: deque[float] = deque()  # times of this client's permits still in the future
        self.seen = now
        self.leases = 0
        self.permits = 0


def _pct(xs, q: float) -> float:
    if not xs:
        return 0.0
    v = sorted(xs)
    return v[min(len(v) - 1, int(len(v) * q))]


class ChangeSignal:
    """Wake every waiter when the state changes: ``await self._event().wait()`` parks until the next
    :meth:`_notify` (one event per change, made on demand)."""

    _changed: asyncio.Event | None = None

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None


class KeyGate(ChangeSignal):
    """Grants leases of permits for one key to many clients (see the module docstring).

    ``clock`` defaults to the running loop's time (a virtual clock in tests). ``restarted``: this
    gate replaces one that died, so it starts conservatively.
    """

    def __init__(self, label: str = "", *, restarted: bool = False, horizon_s: float = LEASE_HORIZON_S,
                 clock: Callable[[], float] | None = None):
        self.label = label
        self.horizon = horizon_s
        self.restarted = restarted
        self._clock = clock
        self.limiter: WindowLimiter | None = None
        self.jobs: dict[str, list] = {}  # owner -> [LimitSpec, last seen]
        self.clients: dict[str, _Client] = {}
        self.epoch = 0
        self._changed: asyncio.Event | None = None
        self.started: float | None = None
        self.last_activity: float | None = None
        self._expired = -math.inf
        self.parked = 0
        self.late: deque[float] = deque(maxlen=50_000)  # sampled permit lateness reported by clients
        self.waits: deque[float] = deque(maxlen=50_000)  # sampled waits for a permit
        self.leases = 0  # lease calls that asked for permits
        self.watches = 0  # calls that only watched for a revocation
        self.reports = 0
        self.permits = 0

    def now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    # ---- registration ---------------------------------------------------------------------------
    def register(self, owner: str, spec: LimitSpec, now: float | None = None) -> None:
        now = self.now() if now is None else now
        if self.started is None:
            self.started = now
        self.last_activity = now
        if now - self._expired > 5.0:
            self._expire(now)
        cur = self.jobs.get(owner)
        if cur is not None and cur[0] == spec:
            cur[1] = now
            return
        self.jobs[owner] = [spec, now]
        self._retune(now)

    def forget(self, owner: str) -> None:
        if self.jobs.pop(owner, None) is not None and self.jobs:
            self._retune(self.now())

    def _expire(self, now: float) -> None:
        """Drop lapsed job registrations (retuning when one goes) and long-gone clients."""
        self._expired = now
        for c in [c for c, st in self.clients.items() if now - st.seen > 60.0]:
            del self.clients[c]
        stale = [o for o, (_, seen) in self.jobs.items() if now - seen > JOB_TTL_S]
        for o in stale:
            del self.jobs[o]
        if stale and self.jobs:
            self._retune(now)

    def _retune(self, now: float) -> None:
        if not self.jobs:
            return
        spec = LimitSpec.strictest([s for s, _ in self.jobs.values()])
        if self.limiter is None:
            if self.restarted:
                quiet = now + self.horizon  # permits of the dead incarnation may still be used
                self.limiter = WindowLimiter(spec, now, factor=RESTART_FACTOR, quiet_until=quiet)
            else:
                self.limiter = WindowLimiter(spec, now)
            return
        old = self.limiter.rate_rpm(), self.limiter.rate_tpm()
        self.limiter.set_spec(spec)
        new = self.limiter.rate_rpm(), self.limiter.rate_tpm()
        if any(a is not None and b is not None and b < a for a, b in zip(old, new)):
            self._revoke()  # a stricter job joined: permits out at the old rate are dropped
        self._notify()


    def _revoke(self) -> None:
        self.epoch += 1
        for c in self.clients.values():
            c.held.clear()
        if self.limiter is not None:
            # every client drops the permits it holds at once (parked calls return now), so the
            # schedule goes on from the last permit already due
            self.limiter.drop_future(self.now())
        self._notify()

    async def _park(self, until: float) -> None:
        ev = self._event()
        self.parked += 1
        try:
            await asyncio.wait_for(ev.wait(), timeout=max(0.0005, until - self.now()))
        except asyncio.TimeoutError:
            pass
        finally:
            self.parked -= 1

    # ---- the client API ----------------------------------------------------------------------------
    def cap(self, now: float, typical_tokens: float = 1000.0) -> int:
        """Permits one client may hold: its share of ``rate * horizon``."""
        active = sum(1 for c in self.clients.values() if now - c.seen <= CLIENT_TTL_S) or 1
        assert self.limiter is not None
        per_s = self.limiter.requests_per_s(typical_tokens)
        return max(1, min(MAX_LEASE, math.ceil(per_s * self.horizon / active)))

    async def lease(self, client_id: str, owner: str, spec: LimitSpec | tuple, want: int,
                    ests: list[int] | None = None, reports: dict | None = None, batching: bool = True,
                    watch: int | None = None) -> dict:
        """Up to ``want`` permits for this client: ``{"permits": [(pid, delay_s)], "epoch", ...}``.

        Parks while the client holds half its share or more (``batching``), or while the next free
        time is more than ``horizon`` ahead (a pause, a tpm wait). ``want=0`` with ``watch=epoch``
        parks until the epoch moves on (permits were revoked) or for one horizon: how a client
        that holds permits but needs no more hears of a revocation at once."""
        spec = spec if isinstance(spec, LimitSpec) else LimitSpec.from_tuple(spec)
        now = self.now()
        self.register(owner, spec, now)
        if reports:
            self.apply_reports(reports, now)
        if want > 0:
            self.leases += 1
        else:
            self.watches += 1
        cl = self.clients.get(client_id)
        if cl is None:
            cl = self.clients[client_id] = _Client(now)
        ests = list(ests or [])
        lim = self.limiter
        assert lim is not None
        if want <= 0 and watch is not None:
            deadline = now + self.horizon
            while watch == self.epoch and self.now() < deadline:
                await self._park(deadline)
        typical = (sum(ests) / len(ests)) if ests else 1000.0
        while want > 0:
            now = self.now()
            cl.seen = now
            while cl.held and cl.held[0] <= now:
                cl.held.popleft()
            cap = self.cap(now, typical)
            if cl.held and (len(cl.held) * 2 > cap if batching else len(cl.held) >= cap):
                await self._park(cl.held[0])
                continue
            first = lim.peek(now, ests[0] if ests else 0)
            if first > now + self.horizon:
                await self._park(first - self.horizon)
                continue
            break
        now = self.now()
        grants: list[tuple[int, float]] = []
        if want > 0:
            n = max(1, min(want, self.cap(now, typical) - len(cl.held)))
            for i in range(n):
                est = ests[i] if i < len(ests) else (ests[-1] if ests else 0)
                t = lim.peek(now, est)
                if grants and t > now + self.horizon:
                    break
                pid = lim.commit(t, est)
                grants.append((pid, t - now))
                cl.held.append(t)
        cl.leases += 1
        cl.permits += len(grants)
        self.permits += len(grants)
        self.last_activity = now
        return {"permits": grants, "epoch": self.epoch, "spacing": lim.spacing(),
                "share": lim.requests_per_s(typical) / max(1, sum(1 for c in self.clients.values()
                                                                  if now - c.seen <= CLIENT_TTL_S))}

    def report(self, client_id: str, owner: str, reports: dict) -> None:
        """Feedback that cannot wait for the next lease (a 429) or that has none coming."""
        now = self.now()
        self.last_activity = now
        if owner in self.jobs:
            self.jobs[owner][1] = now
        self.apply_reports(reports, now)

    def apply_reports(self, r: dict, now: float) -> None:
        lim = self.limiter
        if lim is None:
            return
        self.reports += 1
        before = (lim.factor, lim.paused_until, lim.rate_rpm(), lim.rate_tpm())
        for pid, used in r.get("corrections", ()):
            lim.correct(pid, used)
        for pid, retry_after, age in r.get("rate_limited", ()):
            if lim.on_429(now - age, pid, retry_after):
                self._revoke()
        if r.get("ok"):
            lim.on_success(now, r["ok"])
        if r.get("late"):
            self.late.extend(r["late"])
            self.waits.extend(r.get("waits", ()))
        lims = r.get("limits")
        if lims:
            info, age = lims
            if lim.observe(now - age, info):
                self._revoke()
        if (lim.factor, lim.paused_until, lim.rate_rpm(), lim.rate_tpm()) != before or r.get("corrections"):
            self._notify()  # parked lease calls look again (a rate, a pause or the token window moved)

    def idle_for(self, now: float | None = None) -> float:
        now = self.now() if now is None else now
        if self.last_activity is None:
            self.last_activity = now  # idle since it was first asked
        if self.parked:
            return 0.0
        return now - self.last_activity

    def status(self) -> dict[str, Any]:
        now = self.now()
        active = sum(1 for c in self.clients.values() if now - c.seen <= CLIENT_TTL_S)
        return {
            "label": self.label, "restarted": self.restarted, "epoch": self.epoch,
            "jobs": {o: {"rpm": s.rpm, "tpm": s.tpm, "window_s": s.window_s, "margin": s.margin}
                     for o, (s, _) in self.jobs.items()},
            "clients": active, "leases": self.leases, "watches": self.watches, "permits": self.permits,
            "reports": self.reports,
            "parked": self.parked, "paused_for": max(0.0, self.limiter.paused_until - now) if self.limiter else 0.0,
            "late_p50_ms": _pct(self.late, 0.5) * 1000, "late_p99_ms": _pct(self.late, 0.99) * 1000,
            "wait_p50_ms": _pct(self.waits, 0.5) * 1000, "wait_p99_ms": _pct(self.waits, 0.99) * 1000,
            "samples": len(self.late),
            **(self.limiter.status() if self.limiter else {}),
        }


# ---------------------------------------------------------------------------------------------
# The client side: one pool of leased permits per key in each process
# ---------------------------------------------------------------------------------------------


class KeyLink(Protocol):
    """How a :class:`PermitPool` reaches its key's gate (in-process: the :class:`KeyGate`; in Ray: the actor)."""

    async def lease(self, client_id: str, owner: str, spec: tuple, want: int, ests: list[int], reports: dict | None,
                    batching: bool, watch: int | None = None) -> dict: ...

    def report(self, client_id: str, owner: str, reports: dict) -> Awaitable[None] | None: ...


class LocalKeyLink:
    """A :class:`KeyGate` in this process."""

    def __init__(self, gate: KeyGate):
        self.gate = gate

    async def lease(self, client_id, owner, spec, want, ests, reports, batching, watch=None):
        return await self.gate.lease(client_id, owner, spec, want, ests, reports, batching, watch)

    def report(self, client_id, owner, reports):
        self.gate.report(client_id, owner, reports)
        return None


class _Waiter:
    __slots__ = ("est", "fut")

    def __init__(self, est: int, fut: asyncio.Future):
        self.est, self.fut = est, fut


_client_ids = itertools.count(1)


def new_client_id() -> str:
    return f"{random.getrandbits(48):012x}-{next(_client_ids)}"


class PermitPool:
    """Leased permits for one key inside one process (see the module docstring).

    ``take(est)`` returns a permit id once its time has come; ``report(...)`` gives the outcome.
    With ``batching=False`` every request asks the gate for one permit and awaits the answer (the
    design this replaced; kept to measure the difference).
    """

    def __init__(self, link: KeyLink, owner: str, spec: LimitSpec, *, client_id: str | None = None,
                 batching: bool = True):
        self.link = link
        self.owner = owner
        self.spec = spec.to_tuple()
        self.client_id = client_id or new_client_id()
        self.batching = batching
        self.free: list[tuple[float, int, int]] = []  # (local time, pid, gen), sorted: leased, not yet assigned
        self._gen = 0  # bumped by every revocation; a permit of an older generation is void
        self.waiters: deque[_Waiter] = deque()
        self.epoch = 0
        self.share = 0.0
        self._sleepers: set[asyncio.Future] = set()
        self._held_until = -math.inf  # the latest time of a permit handed out here
        self._pump: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._ok = 0
        self._corrections: list[tuple[int, int]] = []
        self._limits: tuple[dict, float] | None = None
        self._late: list[float] = []  # how late requests started behind their permits (sampled)
        self._waits: list[float] = []  # how long requests waited for a permit (sampled)
        # counters (what B4/B7 report)
        self.lease_calls = 0
        self.watch_calls = 0
        self.permits_received = 0
        self.dropped = 0
        self.late_dropped = 0  # permits this process woke up for too late to use (see take)
        self.taken = 0
        self.waited_s: list[float] = []

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    # ---- taking a permit -------------------------------------------------------------------------
    async def take(self, est: int = 0) -> int:
        t_ask = self._now()
        while True:
            if not self.batching:
                reply = await self._lease(1, [est])
                got = self._accept(reply, assign=False)
                if not got:
                    continue
                t, pid, gen = got[0]
            else:
                p = self._pop_free() if not self.waiters else None
                if p is None:
                    w = _Waiter(est, asyncio.get_running_loop().create_future())
                    self.waiters.append(w)
                    self._kick()
                    try:
                        p = await w.fut
                    except asyncio.CancelledError:
                        if w in self.waiters:
                            self.waiters.remove(w)
                        elif w.fut.done() and not w.fut.cancelled():
                            bisect.insort(self.free, w.fut.result())
                        raise
                t, pid, gen = p
            if gen != self._gen:  # revoked between the lease and now
                self.dropped += 1
                continue
            ok = await self._sleep_until(t, pid, gen)
            if ok and gen == self._gen:
                now = self._now()
                if now - t > LATE_TOLERANCE_S:
                    # the loop woke us late (a busy or starved process): sending now would bunch this
                    # request with the ones granted after it, so the permit is dropped, never used late
                    self.dropped += 1
                    self.late_dropped += 1
                    continue
                self.taken += 1
                self.waited_s.append(now - t_ask)
                if len(self.waited_s) > 4096:
                    del self.waited_s[:2048]
                if len(self._late) < SAMPLES_PER_REPORT:
                    self._late.append(max(0.0, now - t))
                    self._waits.append(now - t_ask)
                return pid

    def _pop_free(self) -> tuple[float, int, int] | None:
        now = self._now()
        while self.free:
            t = self.free[0][0]
            if t < now - LATE_TOLERANCE_S:
                self.free.pop(0)
                self.dropped += 1
                continue
            return self.free.pop(0)
        return None

    async def _sleep_until(self, t: float, pid: int, gen: int) -> bool:
        """Sleep until ``t``; False when the permit was revoked meanwhile."""
        loop = asyncio.get_running_loop()
        if t <= loop.time():
            return True
        fut = loop.create_future()
        handle = loop.call_at(t, lambda: fut.done() or fut.set_result(True))
        self._sleepers.add(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if t > loop.time() and gen == self._gen:
                bisect.insort(self.free, (t, pid, gen))  # still good: someone else may use it
            raise
        finally:
            handle.cancel()
            self._sleepers.discard(fut)

    def _revoke(self) -> None:
        """Drop every permit held here (the gate lowered the rate, or we drew a 429): the ones
        not yet handed out, the ones requests sleep on, and the ones just handed out."""
        self._gen += 1
        self.dropped += len(self.free) + len(self._sleepers)
        self.free.clear()
        for fut in list(self._sleepers):
            if not fut.done():
                fut.set_result(False)

    def _kick(self) -> None:
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())

    async def _run_pump(self) -> None:
        """One lease call at a time for the requests not yet covered."""
        while self.waiters:
            want = len(self.waiters)
            ests = [w.est for w in itertools.islice(self.waiters, MAX_LEASE)]
            try:
                reply = await self._lease(want, ests)
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - the link gave up: fail the waiting requests
                while self.waiters:
                    w = self.waiters.popleft()
                    if not w.fut.done():
                        w.fut.set_exception(e)
                return
            self._accept(reply, assign=True)

    def _watch(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._run_watch())

    async def _run_watch(self) -> None:
        """While permits are held here, keep one call parked at the gate that returns when the gate
        revokes them (a 429 elsewhere lowered the rate), so they are dropped at once."""
        while self._now() < self._held_until or self._holding():
            try:
                reply = await self._lease(0, [], watch=self.epoch)
            except asyncio.CancelledError:
                raise
            except BaseException:  # noqa: BLE001 - the pump reports link failures; a watch just stops
                return
            self._accept(reply, assign=True)

    def _holding(self) -> bool:
        now = self._now()
        while self.free and self.free[0][0] < now - LATE_TOLERANCE_S:
            self.free.pop(0)
            self.dropped += 1
        return bool(self.free)

    async def _lease(self, want: int, ests: list[int], watch: int | None = None) -> dict:
        reports = self._take_reports()
        if want:
            self.lease_calls += 1
        else:
            self.watch_calls += 1
        return await self.link.lease(self.client_id, self.owner, self.spec, want, ests, reports, self.batching, watch)

    def _accept(self, reply: dict, assign: bool) -> list[tuple[float, int, int]]:
        now = self._now()
        if reply.get("epoch", 0) != self.epoch:
            if reply.get("epoch", 0) > self.epoch:
                self._revoke()
            self.epoch = reply.get("epoch", 0)
        self.share = reply.get("share", self.share)
        got = [(now + max(0.0, d), pid, self._gen) for pid, d in reply.get("permits", ())]
        self.permits_received += len(got)
        if got:
            self._held_until = max(self._held_until, got[-1][0])
            self._watch()
        if not assign:
            return got
        for p in got:
            while self.waiters and self.waiters[0].fut.done():
                self.waiters.popleft()
            if self.waiters:
                self.waiters.popleft().fut.set_result(p)
            else:
                bisect.insort(self.free, p)
        return got

    # ---- outcomes ----------------------------------------------------------------------------------
    def report(self, pid: int | None, used_tokens: int | None = None, status: int | None = None,
               retry_after: float | None = None, limits: dict | None = None, ok: bool = False) -> None:
        now = self._now()
        if limits:
            self._limits = (limits, now)
        if status == 429:
            self._revoke()
            r = self._take_reports() or {}
            r["rate_limited"] = [(pid, retry_after, 0.0)]
            res = self.link.report(self.client_id, self.owner, r)
            if asyncio.iscoroutine(res):
                asyncio.get_running_loop().create_task(res)
            return
        if ok:
            self._ok += 1
        if used_tokens is not None and pid is not None and self.spec[1]:
            self._corrections.append((pid, used_tokens))

    def _take_reports(self) -> dict | None:
        if not (self._ok or self._corrections or self._limits or self._late):
            return None
        now = self._now()
        r: dict[str, Any] = {}
        if self._ok:
            r["ok"] = self._ok
        if self._corrections:
            r["corrections"] = self._corrections
        if self._limits:
            info, seen = self._limits
            r["limits"] = (info, max(0.0, now - seen))
        if self._late:
            r["late"], r["waits"] = self._late, self._waits
            self._late, self._waits = [], []
        self._ok, self._corrections, self._limits = 0, [], None
        return r

    def flush(self) -> None:
        """Send pending reports when no lease call is under way to carry them."""
        if self._pump is not None and not self._pump.done() and self.waiters:
            return
        r = self._take_reports()
        if r:
            res = self.link.report(self.client_id, self.owner, r)
            if asyncio.iscoroutine(res):
                asyncio.get_running_loop().create_task(res)

    def close(self) -> None:
        """Stop the background lease and watch calls (a later ``take`` starts them again)."""
        for task in (self._pump, self._watcher):
            if task is not None and not task.done():
                task.cancel()

    def expected_wait(self) -> float:
        """Roughly how long a new request would wait for a permit here."""
        now = self._now()
        if self.free and not self.waiters:
            return max(0.0, self.free[0][0] - now)
        if self.share <= 0:
            return 0.0 if not self.waiters else math.inf
        return (len(self.waiters) + 1) / self.share

    def stats(self) -> dict[str, Any]:
        ws = sorted(self.waited_s)
        return {"lease_calls": self.lease_calls, "watch_calls": self.watch_calls, "permits": self.permits_received,
                "taken": self.taken,
                "dropped": self.dropped, "late_dropped": self.late_dropped,
                "wait_p50_s": ws[len(ws) // 2] if ws else 0.0,
                "wait_p99_s": ws[min(len(ws) - 1, int(len(ws) * 0.99))] if ws else 0.0}


def monotonic() -> float:
    return time.monotonic()
