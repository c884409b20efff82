"""A scripted provider for unit tests: subclasses the real base, answers from a script.

``enqueue(reply)`` adds a reply (text, or an exception to raise); a ``responder`` callable
``(request) -> str`` answers when the queue is empty. ``history`` records every request.
``delay`` simulates latency; ``started``/``finished`` record (time, request) pairs so tests can
check overlap without wall-clock thresholds.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from typing import Callable

from ..config import ProviderConfig
from ..gate import Gatekeeper
from ..providers.base import Completion, Provider, Request, parse_json_reply


class ScriptedProvider(Provider):
    kind = "scripted"
    supports_json_schema = True
    needs_key = False

    def __init__(self, config: ProviderConfig | None = None, responder: Callable[[Request], str] | None = None,
                 delay: float = 0.0, name: str = "scripted", model: str = "scripted-model"):
        super().__init__(config or ProviderConfig(name=name, kind="openai", model=model))
        self.queue: deque = deque()
        self.responder = responder
        self.delay = delay
        self.history: list[Request] = []
        self.events: list[tuple[str, float]] = []

    def enqueue(self, *replies) -> "ScriptedProvider":
        self.queue.extend(replies)
        return self

    async def complete(self, request: Request) -> Completion:
        self.history.append(request)
        self.events.append(("start", time.monotonic()))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.queue:
            reply = self.queue.popleft()
        elif self.responder is not None:
            reply = self.responder(request)
        else:
            raise AssertionError("ScriptedProvider: no reply queued and no responder")
        self.events.append(("end", time.monotonic()))
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, (dict, list)):
            reply = json.dumps(reply)
        parsed = parse_json_reply(reply) if request.json_schema else None
        return Completion(text=reply, parsed=parsed, input_tokens=request.estimate_input_tokens(),
                          output_tokens=max(1, len(reply) // 4), provider=self.name, model=self.model)


def scripted_client(*providers: Provider, cache=None, budget_usd=None):
    """An LLMClient over these providers with an in-process gate (no Ray)."""
    from ..client import LLMClient, LocalGate

    keeper = Gatekeeper([p.config for p in providers], budget_usd=budget_usd)
    return LLMClient(list(providers), LocalGate(keeper), cache=cache, sleep=_no_sleep)


async def _no_sleep(_s: float) -> None:
    await asyncio.sleep(0)
