"""The client every stage calls: cache, permits, the one retry layer, failover and the ledger.

``LLMClient.complete(request)`` for a role:

1. looks the request up in the response cache under each of the role's providers (kind + model);
   a hit returns at once and is counted in the ledger as a cache hit;
2. asks the gate for a permit (the gate picks the provider by weight and free headroom, honours
   429 pauses and cool-downs, and enforces rpm / tpm / max_concurrency for the whole job);
3. calls the provider with a per-request timeout; SDK retries are off, so this is the only retry
   layer. Retryable failures (429, 408, 409, 5xx, timeouts, connection errors, malformed bodies)
   back off exponentially with full jitter, or for the time ``Retry-After`` / ``retry-after-ms``
   advises; other failures raise at once;
4. stores the answer in the cache and the usage in the ledger; ledger deltas are shipped to the
   gate (the job's ledger) in batches, which is also where the budget cap is seen.

The final error names the provider, the model, the attempts and the last cause, never a key.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, Awaitable, Callable, Protocol

from .cache import ResponseCache, cache_key
from .config import ProviderConfig
from .errors import BudgetExceeded, ProviderError, RetriesExhausted
from .gate import Grant, LocalGate, backoff_delay  # noqa: F401 - LocalGate: the in-process gate
from .ledger import Ledger
from .providers.base import Completion, Provider, Request


class Gate(Protocol):
    async def acquire(self, candidates: list[str], est_tokens: int = 0) -> Grant: ...
    async def release(self, grant: Grant | None, provider: str, ok: bool, used_tokens: int | None = None,
                      status: int | None = None, retry_after: float | None = None, health_failure: bool = False,
                      limits: dict | None = None) -> None: ...
    async def record(self, delta: dict) -> dict: ...


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

    # ---- the call -------------------------------------------------------------------------------
    def _cache_lookup(self, request: Request) -> Completion | None:
        if self.cache is None:
            return None
        for name in self.order:
            p = self.providers[name]
            hit = self.cache.get(cache_key(p.kind, p.model, request))
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
        est = request.estimate_input_tokens() + request.max_tokens
        last: BaseException | None = None
        attempt = 0
        while attempt < self.max_attempts:
            attempt += 1
            grant: Grant | None = None
            if self.use_permits:
                grant = await self.gate.acquire(self.order, est)
                name = grant.provider
            else:
                name = self.order[0]
            prov = self.providers[name]
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
                self.ledger.success(name, prov.model, comp.input_tokens, comp.output_tokens, retry=attempt > 1)
                if self.cache is not None:
                    self.cache.put(cache_key(prov.kind, prov.model, request), comp)
                await self.flush()
                return comp
            # a failed attempt
            last = err
            self.ledger.failure(name, prov.model, err.status, retry=attempt > 1)
            health = err.status != 429
            if self.use_permits:
                await self.gate.release(grant, name, ok=False, used_tokens=None, status=err.status,
                                        retry_after=err.retry_after, health_failure=health,
                                        limits=getattr(err, "limits", None))
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
        raise RetriesExhausted(attempt, last)

    async def aclose(self) -> None:
        await self.flush(force=True)
        close = getattr(self.gate, "close", None)
        if close is not None:
            close()  # the gate's background permit calls (restarted by the next request, if any)
        for p in self.providers.values():
            await p.aclose()
