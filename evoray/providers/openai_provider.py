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
still read. The reply comes back as the SDK's raw HTTP response (``cast_to`` its response class) so
its rate-limit headers reach the key's gate. Auth is the bearer key only, the security option ``create`` passes (the SDK's
default for ``post`` would also allow ``OPENAI_ADMIN_KEY``; an admin key has no business on a chat
endpoint, let alone a third-party ``base_url``).

Servers that speak this API differ in three request fields, each a capability with a fallback
(see :class:`~evoray.providers.base.Provider`): how a JSON schema is sent (``response_format``
json_schema, json_object with a ``schema`` beside it as llama.cpp and llama-cpp-python read it, or
not at all), ``max_tokens`` or ``max_completion_tokens``, and whether ``seed`` is sent.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import ProviderError
from .base import Completion, Request, parse_json_reply, rate_limit_info
from .sdk import SDKProvider


def _strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": False}}


def response_format(mode: str | None, schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``response_format`` for a structured-output mode: json_schema (OpenAI's form, which vLLM,
    llama.cpp's llama-server and Ollama read too), json_object with the schema beside it (the form
    llama-cpp-python's server and llama.cpp turn into a grammar; other servers ask for any JSON
    object), or None (``none``: the prompt alone asks for JSON)."""
    if schema is None or mode in (None, "none"):
        return None
    if mode == "json_object":
        return {"type": "json_object", "schema": schema}
    return _strict_schema(schema)


class OpenAIProvider(SDKProvider):
    kind = "openai"
    supports_json_schema = True
    default_key_env = "OPENAI_API_KEY"
    counts_with_tiktoken = True
    capabilities = {
        "structured_output": ("json_schema", "json_object", "none"),
        "max_tokens_field": ("max_tokens", "max_completion_tokens"),
        "send_seed": ("send", "omit"),
    }

    @classmethod
    def default_base_url(cls) -> str:
        import os

        # the SDK reads OPENAI_BASE_URL when no base_url is given (Ray workers inherit it too)
        return os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"

    def _sdk_module(self):
        import openai

        return openai

    def _client_class(self):
        return self._sdk_module().AsyncOpenAI

    def prepare(self) -> None:
        self._sdk().chat.completions  # builds the client and its resource objects

    async def complete(self, request: Request) -> Completion:
        resp = await self._call(self._sdk().post, path="/chat/completions", body=self.chat_body(request),
                                cast_to=_http_response_class(self._sdk_module()), options=_CHAT_OPTIONS)
        comp = self._completion(resp.content, request.json_schema is not None)
        comp.limits = rate_limit_info(resp.headers)
        return comp

    def chat_body(self, request: Request) -> dict[str, Any]:
        """The Chat Completions request body for ``request`` under the capability choices in effect
        now (also each line's body in batch mode)."""
        c = self.choices
        kwargs: dict[str, Any] = dict(
            model=self.model,
            messages=request.messages,
            temperature=request.temperature,
            top_p=request.top_p,
        )
        kwargs[c.get("max_tokens_field", "max_tokens")] = request.max_tokens
        if request.seed is not None and c.get("send_seed") != "omit":
            kwargs["seed"] = request.seed
        rf = response_format(self.structured_mode(request), request.json_schema)
        if rf is not None:
            kwargs["response_format"] = rf
        return kwargs

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


def _http_response_class(sdk):
    """The HTTP response class the SDK's ``post(..., cast_to=...)`` returns as is (body and headers):
    ``httpx2.Response`` in openai 3.x (its README's example for undocumented endpoints), ``httpx.Response``
    before. The headers carry the rate-limit state the key's gate learns from."""
    base = getattr(sdk, "_base_client", None)
    mod = getattr(base, "httpx2", None) or getattr(base, "httpx", None)
    if mod is None:
        import httpx as mod
    return mod.Response
