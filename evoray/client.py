"""The client every stage calls: cache, permits, the one retry layer, failover and the ledger.

``LLMClient.complete(request)`` for a role:

1. looks the request up in the response cache under each of the role's providers (the answers'
   source, kind, model, and how the provider would send the schema now: see :mod:`evoray.cache`);
   a hit returns at once and is counted in the ledger as a cache hit;
2. asks the gate for a permit (the gate picks the provider by weight and free headroom, honours
   429 pauses and cool-downs, and enforces rpm / tpm / max_concurrency for the whole job);
3. calls the provider with a per-request timeout; SDK retries are off, so this is the only retry
   layer. Retryable failures (429, 408, 409, 5xx, timeouts, connection errors, malformed bodies)
   back off exponentially with full jitter, or for the time ``Retry-After`` / ``retry-after-ms``
   advises; other failures raise at once;
4. stores the answer in the cache and the usage in the ledger; ledger deltas are shipped to the
   gate (the job's ledger) in batches, which is also where the budget cap is seen.

Two things make a failed attempt more than a reason to retry:

* **Capabilities.** When the failure shows that the server does not support something the request
  carried (``response_format`` json_schema, ``max_tokens``, ``seed``) and the provider is on
  ``auto`` for it, the provider switches to its next choice for the rest of the job and the request
  is sent again at once (:meth:`Provider.adapt`; no backoff, no attempt used). The switch is
  reported to the gate, so the job warns once and other actors switch at their next ledger flush
  instead of each paying a failed request.
* **Fail fast** (:mod:`evoray.failfast`). Every attempt's outcome feeds the provider's rule; when
  it trips, the provider is halted in this client and at the gate (other actors see it at their
  next flush), and once every provider of the role is halted each request raises
  :class:`~evoray.errors.ProviderHalted`, which stops the stage (exit 1) with the server's error,
  the provider and the config key that likely fixes it.

The final error names the provider, the model, the attempts and the last cause, never a key.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any, Awaitable, Callable, Protocol

from .cache import ResponseCache, cache_key
from .config import ProviderConfig
from .errors import BudgetExceeded, ProviderError, ProviderHalted, RetriesExhausted
from .failfast import FailFast, halt_message
from .gate import Grant, LocalGate, backoff_delay  # noqa: F401 - LocalGate: the in-process gate
from .ledger import Ledger
from .providers.base import Completion, Provider, Request

log = logging.getLogger("evoray")


class Gate(Protocol):
    async def acquire(self, candidates: list[str], est_tokens: int = 0) -> Grant: ...
    async def release(self, grant: Grant | None, provider: str, ok: bool, used_tokens: int | None = None,
                      status: int | None = None, retry_after: float | None = None, health_failure: bool = False,
                      limits: dict | None = None) -> None: ...
    async def record(self, delta: dict) -> dict: ...
    # optional: async halt(provider, message) -> bool and learn(provider, choices) -> bool share
    # what one actor found with the others (both answer True when it is news for the job)


def needs_permits(cfgs: list[ProviderConfig]) -> bool:
    return any(c.rpm or c.tpm or c.max_concurrency for c in cfgs)


class LLMClient:
    def __init__(
        self,
        providers: list[Provider],
        gate: Gate,
        cache: ResponseCache | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        flush_every_s: float = 0.5,
    ):
        if not providers:
            raise ValueError("a client needs at least one provider")
        self.providers = {p.name: p for p in providers}
        self.order = [p.name for p in providers]
        self.gate = gate
        self.cache = cache
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.ledger = Ledger({p.name: p.config.price for p in providers})
        cfgs = [p.config for p in providers]
        # one unlimited provider needs no gate round-trip; several need it for spreading and failover
        self.use_permits = needs_permits(cfgs) or len(providers) > 1
        self.max_attempts = max(c.max_attempts for c in cfgs)
        self.flush_every_s = flush_every_s
        self._last_flush = time.monotonic()
        self.stop = False  # set when the job's budget is reached
        self.events: list[dict[str, Any]] = []  # per-call trace kept only when trace=True
        self.trace = False
        self._prepared = False
        self.health = {p.name: FailFast(p.config.fail_fast_after, p.config.fail_fast_window) for p in providers}
        self.halted: dict[str, str] = {}  # provider -> the message it was halted with

    # ---- ledger shipping ----------------------------------------------------------------------
    async def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_flush < self.flush_every_s:
            return
        self._last_flush = now
        delta = self.ledger.take_delta()
        status = await self.gate.record(delta)
        if status.get("stop"):
            self.stop = True
        # what other actors found: providers halted, capabilities switched
        for name, message in (status.get("halted") or {}).items():
            if name in self.providers and name not in self.halted:
                self.halted[name] = message
        for name, choices in (status.get("learned") or {}).items():
            if name in self.providers and self.providers[name].learn(choices):
                log.debug("provider '%s': capabilities from another actor: %s", name, choices)

    # ---- capabilities and fail-fast -------------------------------------------------------------
    def _key(self, p: Provider, request: Request) -> str:
        return cache_key(p.kind, p.model, request, source=p.cache_source(), variant=p.cache_variant(request))

    def _live(self) -> list[str]:
        return [n for n in self.order if n not in self.halted]

    def _check_halted(self) -> None:
        if self.halted and not self._live():
            name = next(iter(self.halted))
            raise ProviderHalted(self.halted[name], provider=name)

    async def _adapted(self, name: str, message: str) -> None:
        """A provider switched a capability: tell the gate; warn when this is news for the job."""
        first = True
        learn = getattr(self.gate, "learn", None)
        if learn is not None:
            try:
                first = bool(await learn(name, dict(self.providers[name].choices)))
            except Exception:  # noqa: BLE001 - sharing is an optimisation; the switch holds here anyway
                first = True
        (log.warning if first else log.debug)("%s", message)

    async def _halt(self, name: str, err: ProviderError, how: str) -> None:
        prov = self.providers[name]
        msg = halt_message(err, prov.config, how, self.health[name].count(how))
        self.halted[name] = msg
        first = True
        note = getattr(self.gate, "halt", None)
        if note is not None:
            try:
                first = bool(await note(name, msg))
            except Exception:  # noqa: BLE001
                first = True
        if first:
            log.error("%s", msg)
        if self._live():
            log.warning("provider '%s' is out for the rest of the job; its requests go to %s", name,
                        ", ".join(self._live()))

    # ---- the call -------------------------------------------------------------------------------
    def _cache_lookup(self, request: Request) -> Completion | None:
        if self.cache is None:
            return None
        for name in self._live():
            p = self.providers[name]
            hit = self.cache.get(self._key(p, request))
            if hit is not None:
                self.ledger.cache_hit(name, p.model)
                return hit
        return None

    async def complete(self, request: Request) -> Completion:
        hit = self._cache_lookup(request)
        if hit is not None:
            await self.flush()
            return hit
        if self.stop:
            raise BudgetExceeded("the job's budget was reached")
        if not self._prepared:
            # SDK imports and clients are built before the first permit, not while holding one
            for p in self.providers.values():
                p.prepare()
            self._prepared = True
        est = request.estimate_tokens()
        last: BaseException | None = None
        attempt = 0
        adaptations = 0
        while attempt < self.max_attempts:
            if attempt:
                await self.flush()  # picks up halts and capability switches other actors found
            self._check_halted()
            attempt += 1
            grant: Grant | None = None
            live = self._live()
            if self.use_permits:
                grant = await self.gate.acquire(live, est)
                name = grant.provider
            else:
                name = live[0]
            prov = self.providers[name]
            sent = prov.wire_state(request)
            t0 = time.monotonic()
            try:
                comp = await asyncio.wait_for(prov.complete(request), timeout=prov.config.timeout_s)
            except asyncio.TimeoutError:
                err = ProviderError(f"no answer within {prov.config.timeout_s:g}s", provider=name, model=prov.model,
                                    retryable=True, kind="timeout")
            except ProviderError as e:
                err = e
            except asyncio.CancelledError:
                # the request may well have reached the provider: count it, so the ledger agrees
                # with the provider's count when a row is cancelled (budget stop, shutdown)
                self.ledger.failure(name, prov.model, None, retry=attempt > 1)
                if grant is not None:
                    await self.gate.release(grant, name, ok=False)
                raise
            else:
                comp.latency_s = time.monotonic() - t0
                comp.attempts = attempt
                comp.provider, comp.model = name, prov.model
                if grant is not None:
                    await self.gate.release(grant, name, ok=True, used_tokens=comp.input_tokens + comp.output_tokens,
                                            limits=comp.limits)
                unhonoured = bool(prov.unhonoured(request))
                self.ledger.success(name, prov.model, comp.input_tokens, comp.output_tokens, retry=attempt > 1,
                                    unhonoured=unhonoured)
                self.health[name].record(None)
                if self.cache is not None:
                    self.cache.put(self._key(prov, request), comp)
                await self.flush()
                return comp
            # a failed attempt
            last = err
            self.ledger.failure(name, prov.model, err.status, retry=attempt > 1)
            switched = prov.adapt(err, sent, request) if adaptations < 4 else None
            if switched is not None:
                # the server does not support what this request carried; the provider now sends it
                # another way (or already did since this request left): send again at once
                adaptations += 1
                attempt -= 1
                if self.use_permits:
                    await self.gate.release(grant, name, ok=False)
                if switched:
                    await self._adapted(name, switched)
                hit = self._cache_lookup(request)  # a re-run may hold the answer under the new mode
                if hit is not None:
                    await self.flush()
                    return hit
                continue
            health = err.status != 429
            if self.use_permits:
                await self.gate.release(grant, name, ok=False, used_tokens=None, status=err.status,
                                        retry_after=err.retry_after, health_failure=health,
                                        limits=getattr(err, "limits", None))
            how = self.health[name].record(err)
            if how is not None:
                await self._halt(name, err, how)
                await self.flush(force=True)
                self._check_halted()
            if not err.retryable:
                await self.flush(force=True)
                raise err
            if attempt >= self.max_attempts:
                break
            cfg = prov.config
            delay = err.retry_after if err.retry_after is not None else backoff_delay(
                attempt, cfg.backoff_base_s, cfg.backoff_max_s, self.rng)
            await self.sleep(delay)
        await self.flush(force=True)
        self._check_halted()
        raise RetriesExhausted(attempt, last)

    async def aclose(self) -> None:
        await self.flush(force=True)
        close = getattr(self.gate, "close", None)
        if close is not None:
            close()  # the gate's background permit calls (restarted by the next request, if any)
        for p in self.providers.values():
            await p.aclose()
