"""OpenAI Chat Completions through ``openai.AsyncOpenAI``.

With ``base_url`` the same class serves any OpenAI-compatible server (vLLM, llama.cpp's server,
hosted ones): that is configuration, not a new class. SDK retries are off (``max_retries=0``):
:mod:`evoray.client` is the one retry layer. The client is built lazily inside the process (and
event loop) that uses it, never shipped across Ray (:class:`~evoray.providers.sdk.SDKProvider`).

The request goes through the SDK's generic ``post`` (the path its README gives for endpoints it does
not wrap), not ``chat.completions.create``: same client, auth, transport, timeouts and status-error
mapping, but without ``create``'s per-call walk of the body against its TypedDict annotations and
without building pydantic response models. Measured in one process against the fake server, that
walk and the model building were about half of the client's CPU per request: 1.08 ms per rated
row through ``create``, 0.55 ms this way (bench/B5, BENCHMARKS.md). Our bodies are plain JSON
(strings, numbers, a JSON-schema dict), which the walk leaves unchanged, and we read the four
fields we need from the JSON reply ourselves, so a reply with fields the SDK does not know is
still read. Auth is the bearer key only, the security option ``create`` passes (the SDK's
default for ``post`` would also allow ``OPENAI_ADMIN_KEY``; an admin key has no business on a chat
endpoint, let alone a third-party ``base_url``).
"""

from __future__ import annotations

import json
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

    def chat_body(self, request: Request) -> dict[str, Any]:
        """The Chat Completions request body for ``request`` (also each line's body in batch mode)."""
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
        return kwargs

    async def complete(self, request: Request) -> Completion:
        raw = await self._call(self._sdk().post, path="/chat/completions", body=self.chat_body(request), cast_to=bytes,
                               options=_CHAT_OPTIONS)
        return self._completion(raw, request.json_schema is not None)

    def _completion(self, raw: bytes, wants_json: bool) -> Completion:
        """The Completion in a Chat Completions reply body; a body that is not one is ``malformed``."""
        try:
            body = json.loads(raw)
            choices = body.get("choices")
            if not choices:
                raise ProviderError("response has no choices", provider=self.name, model=self.model, retryable=True,
                                    kind="malformed")
            first = choices[0]
            text = (first.get("message") or {}).get("content") or ""
            usage = body.get("usage") or {}
            input_tokens = int(usage.get("prompt_tokens") or 0)
            output_tokens = int(usage.get("completion_tokens") or 0)
            if not isinstance(text, str):
                raise TypeError("message content is not text")
        except ProviderError:
            raise
        except (ValueError, TypeError, AttributeError) as e:  # not JSON, or not the shape of a chat completion
            raise self._error(f"malformed response body ({type(e).__name__})", "malformed") from None
        return Completion(
            text=text,
            parsed=parse_json_reply(text) if wants_json else None,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            provider=self.name,
            model=body.get("model") or self.model,
            finish_reason=first.get("finish_reason"),
        )


#: the request options ``chat.completions.create`` passes: authenticate with the bearer key only
_CHAT_OPTIONS: dict[str, Any] = {"security": {"bearer_auth": True}}
