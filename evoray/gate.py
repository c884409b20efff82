"""Permits for every provider a job uses: who limits what, and where it lives.

Design decision (STYLE habit 6): a rate budget is held by **one** object per API key, shared by
every actor of every job on the cluster; nothing else holds a share of it, so limits are never
multiplied by the number of actors or jobs. Three pieces:

* **Per key** (:class:`evoray.limiter.KeyGate`): ``rpm`` and ``tpm`` on a strict sliding window,
  429 pauses, the adaptive rate and rate-limit headers. In a Ray job it lives in a named, detached
  actor per key (``actors.gate.KeyGateActor``) that later jobs on the same cluster find by name;
  keys are told apart by provider kind, base URL and a hash of the key (never the key).
* **Per job** (:class:`Gatekeeper`): the ledger and the budget, failover cool-downs, and
  ``max_concurrency`` (a count of requests in flight for the job, with leases so a permit whose
  holder died is reclaimed after ``lease_s``). In a Ray job it lives in the job's gate actor.
* **Per process** (:class:`ClientGate`, what :class:`evoray.client.LLMClient` calls): picks the
  provider, holds the process's leased rate permits (:class:`evoray.limiter.PermitPool`), and
  learns cool-downs and the budget stop from the job's gate with every ledger flush.

Spreading: among the providers a request may use (not cooling down), the one with a permit ready
now and the fewest requests per unit of ``weight``; when none is ready, the one whose next permit
is expected soonest. Failover: a provider that fails ``failures_before_cooldown`` times in a row
(counted in each process) is taken out for ``cooldown_s`` for the whole job; its share goes to the
others.

Without Ray (unit tests, single-process tools) the same classes run in one process:
``LocalGate(Gatekeeper(providers))`` gives a client gate whose key gates live in the Gatekeeper.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

from .config import ProviderConfig
from .errors import BudgetExceeded, ConfigError
from .ledger import Ledger
from .limiter import ChangeSignal, KeyGate, LimitSpec, LocalKeyLink, PermitPool, key_identity, new_client_id
from .providers import runs_locally


def _now() -> float:
    return asyncio.get_running_loop().time()


def limited(cfg: ProviderConfig) -> bool:
    """Whether a provider's rate (rpm/tpm) goes through its key's gate."""
    return bool(cfg.rpm or cfg.tpm)


def provider_identity(cfg: ProviderConfig, job_id: str = "", environ: dict | None = None) -> str:
    """The identity of the key a provider entry uses: kind + base URL + sha256 of the key.

    A local model is its own limit within one job. When the key is not available in this process
    the entry is its own key (never merged with another by guesswork)."""
    if runs_locally(cfg):
        return key_identity(cfg.kind, f"{job_id}/{cfg.name}", None, cfg.name)
    env = cfg.key_env
    value = (environ if environ is not None else os.environ).get(env) if env else None
    return key_identity(cfg.kind, cfg.base_url, value or None, fallback=f"{job_id}/{cfg.name}")


@dataclass
class Grant:
    provider: str
    permit: int | None = None  # rate permit id (None: the provider has no rpm/tpm)
    est_tokens: int = 0
    slot: int | None = None  # max_concurrency slot id


class Gatekeeper(ChangeSignal):
    """The job's side: ledger, budget, failover cool-downs and ``max_concurrency`` slots.

    In-process it also owns the key gates of its providers (:meth:`key_link`); in a Ray job the
    key gates are separate, shared actors.
    """

    def __init__(self, providers: list[ProviderConfig], budget_usd: float | None = None,
                 lease_s: float | None = None, job_id: str = "local"):
        self.configs = {p.name: p for p in providers}
        self.job_id = job_id
        self.budget_usd = budget_usd
        self.ledger = Ledger({p.name: p.price for p in providers})
        self.lease_s = lease_s
        self.stopped_reason: str | None = None
        self.cooldown_until: dict[str, float] = {}
        self.cooldowns: Counter = Counter()
        self.slots: dict[str, dict[int, float]] = {p.name: {} for p in providers}
        self._ids = itertools.count(1)
        self._changed: asyncio.Event | None = None
        self._keys: dict[str, KeyGate] = {}
        # what one actor found, shared with the others through record(): providers halted by the
        # fail-fast rule, and capability choices (structured_output ...) a provider switched to
        self.halted: dict[str, str] = {}
        self.learned: dict[str, dict[str, str]] = {}

    # ---- budget and ledger ------------------------------------------------------------------------
    def stop_reason(self) -> str | None:
        if self.stopped_reason is None and self.budget_usd is not None and self.ledger.dollars >= self.budget_usd:
            self.stopped_reason = f"budget of ${self.budget_usd:.4f} reached (spent ${self.ledger.dollars:.4f})"
        return self.stopped_reason

    def record(self, delta: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Merge a ledger delta; return the spend so far, whether the job must stop, and the
        providers cooling down (seconds left)."""
        if delta:
            self.ledger.merge(delta)
        reason = self.stop_reason()
        out: dict[str, Any] = {"dollars": self.ledger.dollars, "stop": reason is not None, "reason": reason,
                               "cooling": self.cooling()}
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

    # ---- failover ---------------------------------------------------------------------------------
    def cooling(self) -> dict[str, float]:
        now = _now() if _has_loop() else None
        if now is None:
            return {}
        return {n: until - now for n, until in self.cooldown_until.items() if until > now}

    def cool_down(self, provider: str) -> float:
        """Take a provider out for its ``cooldown_s`` (unless it already is); seconds left."""
        cfg = self.configs.get(provider)
        if cfg is None:
            return 0.0
        now = _now()
        until = self.cooldown_until.get(provider, 0.0)
        if until <= now:
            until = self.cooldown_until[provider] = now + cfg.cooldown_s
            self.cooldowns[provider] += 1
            self._notify()
        return until - now

    # ---- max_concurrency --------------------------------------------------------------------------

    def _reap(self, provider: str, now: float) -> None:
        cfg = self.configs[provider]
        lease = self.lease_s or (cfg.timeout_s * 2 + 30)
        held = self.slots[provider]
        for sid in [s for s, t in held.items() if now - t > lease]:
            del held[sid]

    async def take_slot(self, provider: str) -> int:
        """A slot of the provider's ``max_concurrency``; waits for one to free up."""
        cfg = self.configs.get(provider)
        if cfg is None:
            raise ConfigError(f"unknown provider '{provider}'")
        while True:
            now = _now()
            self._reap(provider, now)
            held = self.slots[provider]
            if cfg.max_concurrency is None or len(held) < cfg.max_concurrency:
                sid = next(self._ids)
                held[sid] = now
                return sid
            oldest = min(held.values())
            lease = self.lease_s or (cfg.timeout_s * 2 + 30)
            try:
                await asyncio.wait_for(self._event().wait(), timeout=max(0.001, oldest + lease - now))
            except asyncio.TimeoutError:
                pass

    def drop_slot(self, provider: str, slot: int) -> None:
        if self.slots.get(provider, {}).pop(slot, None) is not None:
            self._notify()

    # ---- key gates in this process ------------------------------------------------------------------
    def key_link(self, provider: str) -> LocalKeyLink:
        """The in-process gate of a provider's key (entries on one key share it)."""
        ident = provider_identity(self.configs[provider], self.job_id)
        gate = self._keys.get(ident)
        if gate is None:
            gate = self._keys[ident] = KeyGate(ident)
        return LocalKeyLink(gate)

    def key_status(self) -> dict[str, Any]:
        return {i: g.status() for i, g in self._keys.items() if g.limiter is not None}

    def status(self) -> dict[str, Any]:
        cool = self.cooling()
        return {n: {"inflight": len(self.slots[n]), "cooling": n in cool, "cooldowns": self.cooldowns[n],
                    "halted": self.halted.get(n), "choices": self.learned.get(n)}
                for n in self.configs}


def _has_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


class JobLink(Protocol):
    """How a :class:`ClientGate` reaches its job's :class:`Gatekeeper` (in-process or a Ray actor)."""

    async def record(self, delta: dict) -> dict: ...
    async def cool_down(self, provider: str) -> float: ...
    async def take_slot(self, provider: str) -> int: ...
    def drop_slot(self, provider: str, slot: int) -> None: ...
    def known_stop(self) -> str | None: ...
    async def halt(self, provider: str, message: str) -> bool: ...
    async def learn(self, provider: str, choices: dict) -> bool: ...


class LocalJobLink:
    def __init__(self, keeper: Gatekeeper):
        self.keeper = keeper

    async def record(self, delta):
        return self.keeper.record(delta)

    async def cool_down(self, provider):
        return self.keeper.cool_down(provider)

    async def take_slot(self, provider):
        return await self.keeper.take_slot(provider)

    def drop_slot(self, provider, slot):
        self.keeper.drop_slot(provider, slot)

    def known_stop(self):
        return self.keeper.stop_reason()

    async def halt(self, provider, message):
        return self.keeper.halt(provider, message)

    async def learn(self, provider, choices):
        return self.keeper.learn(provider, choices)


class ClientGate:
    """The gate one process's clients use (see the module docstring).

    ``keys`` maps each rate-limited provider to the link of its key's gate; ``owner`` names this
    job (and entry) at the key gates; ``batching=False`` asks the key gate once per request (the
    old design, kept for the B4 comparison).
    """

    def __init__(self, configs: list[ProviderConfig], job: JobLink, keys: dict[str, Any], *, job_id: str = "local",
                 batching: bool = True):
        self.configs = {c.name: c for c in configs}
        self.job = job
        self.keys = keys
        self.job_id = job_id
        self.batching = batching
        self.client_id = new_client_id()
        self.pools: dict[str, PermitPool] = {}
        self.granted: Counter = Counter()
        self.failures: Counter = Counter()
        self.cooling_until: dict[str, float] = {}
        self._stop: str | None = None

    def pool(self, provider: str) -> PermitPool | None:
        """This process's permit pool for a provider (None: the provider has no rpm/tpm)."""
        p = self.pools.get(provider)
        if p is None:
            cfg = self.configs[provider]
            if not limited(cfg) or provider not in self.keys:
                return None
            p = self.pools[provider] = PermitPool(self.keys[provider], f"{self.job_id}/{provider}", LimitSpec.of(cfg),
                                                  client_id=self.client_id, batching=self.batching)
        return p

    def _stopped(self) -> str | None:
        return self._stop or self.job.known_stop()

    # ---- the Gate protocol of LLMClient ------------------------------------------------------------
    async def acquire(self, candidates: list[str], est_tokens: int = 0) -> Grant:
        for n in candidates:
            if n not in self.configs:
                raise ConfigError(f"unknown provider '{n}'")
        while True:
            reason = self._stopped()
            if reason:
                raise BudgetExceeded(reason)
            now = _now()
            open_ = [n for n in candidates if self.cooling_until.get(n, 0.0) <= now]
            if not open_:
                wake = min(self.cooling_until[n] for n in candidates)
                await asyncio.sleep(max(0.001, wake - now))
                continue
            name = self._pick(open_)
            cfg = self.configs[name]
            slot = await self.job.take_slot(name) if cfg.max_concurrency else None
            try:
                pool = self.pool(name)
                permit = await pool.take(est_tokens) if pool is not None else None
            except BaseException:
                if slot is not None:
                    self.job.drop_slot(name, slot)
                raise
            self.granted[name] += 1
            return Grant(name, permit, est_tokens, slot)

    def _pick(self, names: list[str]) -> str:
        if len(names) == 1:
            return names[0]
        waits = {}
        for n in names:
            pool = self.pool(n)
            waits[n] = pool.expected_wait() if pool is not None else 0.0
        ready = [n for n in names if waits[n] <= 0.005]
        if ready:
            return min(ready, key=lambda n: (self.granted[n] / self.configs[n].weight, n))
        return min(names, key=lambda n: (waits[n], self.granted[n] / self.configs[n].weight, n))

    async def release(self, grant: Grant | None, provider: str, ok: bool, used_tokens: int | None = None,
                      status: int | None = None, retry_after: float | None = None, health_failure: bool = False,
                      limits: dict | None = None) -> None:
        if provider not in self.configs:
            return
        if grant is not None and grant.slot is not None:
            self.job.drop_slot(provider, grant.slot)
        pool = self.pool(provider)
        if pool is not None:
            pool.report(grant.permit if grant is not None else None, used_tokens, status, retry_after, limits, ok=ok)
        if ok:
            self.failures[provider] = 0
        elif health_failure:
            self.failures[provider] += 1
            if self.failures[provider] >= self.configs[provider].failures_before_cooldown:
                self.failures[provider] = 0
                left = await self.job.cool_down(provider)
                self.cooling_until[provider] = _now() + left

    async def halt(self, provider: str, message: str) -> bool:
        """Tell the job a provider was halted by the fail-fast rule (True: news for the job)."""
        return bool(await self.job.halt(provider, message))

    async def learn(self, provider: str, choices: dict) -> bool:
        """Tell the job a provider switched capabilities (True: news for the job)."""
        return bool(await self.job.learn(provider, choices))

    async def record(self, delta: dict) -> dict:
        for pool in self.pools.values():
            pool.flush()
        st = await self.job.record(delta)
        now = _now()
        for n, left in (st.get("cooling") or {}).items():
            self.cooling_until[n] = max(self.cooling_until.get(n, 0.0), now + left)
        if st.get("stop"):
            self._stop = st.get("reason") or "the job's budget was reached"
        return st

    def stats(self) -> dict[str, Any]:
        return {n: p.stats() for n, p in self.pools.items()}

    def close(self) -> None:
        """Send what the pools still have to report and stop their background calls."""
        for p in self.pools.values():
            p.flush()
            p.close()


class LocalGate(ClientGate):
    """A client gate wired to a :class:`Gatekeeper` in this process (tests, single-process tools)."""

    def __init__(self, keeper: Gatekeeper, batching: bool = True):
        keys = {n: keeper.key_link(n) for n, c in keeper.configs.items() if limited(c)}
        super().__init__(list(keeper.configs.values()), LocalJobLink(keeper), keys, job_id=keeper.job_id,
                         batching=batching)
        self.keeper = keeper


def backoff_delay(attempt: int, base: float, cap: float, rng) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**(attempt-1))]."""
    return rng.uniform(0, min(cap, base * math.pow(2, max(0, attempt - 1))))
