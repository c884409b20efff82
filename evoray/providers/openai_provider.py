"""OpenAI Chat Completions through ``openai.AsyncOpenAI``.

With ``base_url`` the same class serves any OpenAI-compatible server (vLLM, llama.cpp's server,
hosted ones): that is configuration, not a new class. SDK retries are off (``max_retries=0``):
:mod:`evoray.client` is the one retry layer. The client is built lazily inside the process (and
event loop) that uses it, never shipped across Ray (:class:`~evoray.providers.sdk.SDKProvider`).
"""

from __future__ import annotations

from typing import Any

from ..errors import ProviderError
from .base import Completion, Request, parse_json_reply
from .sdk import SDKProvider


def _strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": False}}


class OpenAIProvider(SDKProvider):
    kind = "openai"
    supports_json_schema = True

    def _sdk_module(self):
        import openai

        return openai

    def _client_class(self):
        return self._sdk_module().AsyncOpenAI

    def prepare(self) -> None:
        self._sdk().chat.completions  # builds the client and its resource objects

    async def complete(self, request: Request) -> Completion:
        kwargs: dict[str, Any] = dict(
            model=self.model,
            messages=request.messages,
            temperature=request.temperature,
            top_p=request.top_p,
            max_tokens=request.max_tokens,
        )
        if request.seed is not None:
            kwargs["seed"] = request.seed
        if request.json_schema is not None:
            kwargs["response_format"] = _strict_schema(request.json_schema)
        resp = await self._call(self._sdk().chat.completions.create, **kwargs)
        choices = getattr(resp, "choices", None)
        if not choices:
            raise ProviderError("response has no choices", provider=self.name, model=self.model, retryable=True, kind="malformed")
        msg = choices[0].message
        text = (getattr(msg, "content", None) or "")
        usage = getattr(resp, "usage", None)
        parsed = parse_json_reply(text) if request.json_schema is not None else None
        return Completion(
            text=text,
            parsed=parsed,
            input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            provider=self.name,
            model=getattr(resp, "model", None) or self.model,
            finish_reason=getattr(choices[0], "finish_reason", None),
        )
