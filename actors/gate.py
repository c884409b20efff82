"""The job's gate as a named Ray actor: one per job, asked by every pool actor on every node.

:class:`GateActor` is a thin async-actor wrapper around :class:`evoray.gate.Gatekeeper` (the
design and its guarantees are documented there). :class:`RayGate` is the adapter the
:class:`evoray.client.LLMClient` inside each pool actor talks to.
"""

from __future__ import annotations

import ray

from evoray.config import ProviderConfig
from evoray.gate import Gatekeeper, Grant


@ray.remote(num_cpus=0, max_restarts=0)
class GateActor:
    def __init__(self, providers: list[dict], budget_usd: float | None):
        self.keeper = Gatekeeper([ProviderConfig.model_validate(p) for p in providers], budget_usd=budget_usd)

    async def acquire(self, candidates: list[str], est_tokens: int = 0) -> Grant:
        return await self.keeper.acquire(candidates, est_tokens)

    async def release(self, grant, provider, ok, used_tokens=None, status=None, retry_after=None, health_failure=False):
        await self.keeper.release(grant, provider, ok, used_tokens, status, retry_after, health_failure)

    async def record(self, delta: dict) -> dict:
        return self.keeper.record(delta)

    async def halt(self, provider: str, message: str) -> bool:
        return self.keeper.halt(provider, message)

    async def learn(self, provider: str, choices: dict) -> bool:
        return self.keeper.learn(provider, choices)

    async def ledger(self) -> dict:
        return self.keeper.ledger_dict()

    async def status(self) -> dict:
        return {"providers": self.keeper.status(), "stopped": self.keeper.stopped_reason,
                "dollars": self.keeper.ledger.dollars}

    async def set_budget(self, budget_usd: float | None) -> None:
        self.keeper.budget_usd = budget_usd


class RayGate:
    """What an LLMClient inside an actor uses to reach the job's GateActor."""

    def __init__(self, handle):
        self.handle = handle

    async def acquire(self, candidates, est_tokens=0):
        return await self.handle.acquire.remote(candidates, est_tokens)

    async def release(self, grant, provider, ok, used_tokens=None, status=None, retry_after=None, health_failure=False):
        # fire and forget: the slot and the tpm correction need no answer
        self.handle.release.remote(grant, provider, ok, used_tokens, status, retry_after, health_failure)

    async def record(self, delta):
        return await self.handle.record.remote(delta)

    async def halt(self, provider, message):
        return await self.handle.halt.remote(provider, message)

    async def learn(self, provider, choices):
        return await self.handle.learn.remote(provider, choices)
