"""Anthropic Messages through ``anthropic.AsyncAnthropic``.

System messages become the top-level ``system`` field; consecutive messages of the same role are
merged (the API wants user/assistant turns alternating). ``seed`` is not part of the Messages API
and is ignored. Sampling is always sent, because the Messages API accepts ``temperature`` and
``top_p``: as keyword arguments when the installed SDK's ``messages.create`` names them, else in
``extra_body`` (anthropic 2.x removed the sampling parameters from ``messages.create``; without this
a Claude role would run at the API's default sampling, silently). ``top_p`` is sent only when it is
below 1 (1 is the API's default), and some Claude models accept only one of temperature and top_p:
the ``sampling`` capability (``temperature_top_p -> temperature``) drops top_p for the rest of the
job when the API rejects the pair, with one warning that names top_p as an unhonoured setting, and
the cache key records that the reply was sampled without it. JSON schemas go through
``output_config.format`` (structured outputs); numeric bounds are dropped from the schema since
structured outputs do not accept them, and the reply is validated by our own parser anyway.
SDK retries are off: :mod:`evoray.client` is the one retry layer.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from ..errors import ProviderError
from .base import Completion, Request, parse_json_reply, rate_limit_info
from .sdk import SDKProvider


def _plain_schema(schema: dict[str, Any]) -> dict[str, Any]:
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength"):
                node.pop(k, None)
            if node.get("type") == "object":
                node.setdefault("additionalProperties", False)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    return s


_CREATE_PARAMS: frozenset[str] | None = None
#: a 400 that complains about the temperature/top_p pair (or top_p alone)
_NAMES_SAMPLING = re.compile(r"\btop_p\b", re.I)


def _create_params(messages_resource) -> frozenset[str]:
    """The keyword arguments the installed SDK's ``messages.create`` accepts (read once)."""
    global _CREATE_PARAMS
    if _CREATE_PARAMS is None:
        import inspect

        try:
            _CREATE_PARAMS = frozenset(inspect.signature(messages_resource.create).parameters)
        except (TypeError, ValueError):
            _CREATE_PARAMS = frozenset({"temperature"})
    return _CREATE_PARAMS


def to_anthropic_messages(messages: list[dict[str, str]]) -> tuple[str | None, list[dict[str, str]]]:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
    out: list[dict[str, str]] = []
    for m in messages:
        if m["role"] == "system":
            continue
        role = "assistant" if m["role"] == "assistant" else "user"
        if out and out[-1]["role"] == role:
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append({"role": role, "content": m["content"]})
    if not out or out[0]["role"] != "user":
        out.insert(0, {"role": "user", "content": "(continue)"})
    return system, out


class AnthropicProvider(SDKProvider):
    kind = "anthropic"
    supports_json_schema = True
    default_key_env = "ANTHROPIC_API_KEY"
    structured_output_modes = ("json_schema", "none")
    extra_retryable = frozenset({529})  # "overloaded"
    capabilities = {"structured_output": ("json_schema", "none"), "sampling": ("temperature_top_p", "temperature")}

    @classmethod
    def default_base_url(cls) -> str:
        import os

        return os.environ.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com"

    def _sdk_module(self):
        import anthropic

        return anthropic

    def _client_class(self):
        return self._sdk_module().AsyncAnthropic

    def prepare(self) -> None:
        self._sdk().messages  # builds the client and its resource objects

    def message_params(self, request: Request) -> dict[str, Any]:
        """The ``messages.create`` arguments for ``request`` (also each request's params in batch mode)."""
        system, messages = to_anthropic_messages(request.messages)
        kwargs: dict[str, Any] = dict(model=self.model, messages=messages, max_tokens=request.max_tokens)
        params = _create_params(self._sdk().messages)
        extra: dict[str, Any] = {}
        for name, value in self.sampling_params(request).items():
            (kwargs if name in params else extra)[name] = value
        if extra:
            kwargs["extra_body"] = extra
        if system:
            kwargs["system"] = system
        if self.structured_mode(request) not in (None, "none"):
            kwargs["output_config"] = {"format": {"type": "json_schema", "schema": _plain_schema(request.json_schema)}}
        return kwargs

    def sampling_params(self, request: Request) -> dict[str, float]:
        """The sampling fields this request is sent with: temperature always, top_p when below 1 and
        the ``sampling`` choice still sends it."""
        out: dict[str, float] = {"temperature": request.temperature}
        if request.top_p is not None and request.top_p < 1 and self.choices.get("sampling") != "temperature":
            out["top_p"] = request.top_p
        return out

    def unhonoured(self, request: Request) -> list[str]:
        """Sampling settings of ``request`` that this provider cannot send (``top_p`` after the API
        rejected the temperature/top_p pair)."""
        if request.top_p is not None and request.top_p < 1 and self.choices.get("sampling") == "temperature":
            return [f"top_p={request.top_p}"]
        return []

    def cache_variant(self, request: Request) -> str | None:
        base = super().cache_variant(request)
        if self.unhonoured(request):
            return ",".join(x for x in (base, "sampling=temperature") if x)
        return base

    def _fallback_for(self, error: Any, request: Request) -> str | None:
        from .base import _capability_complaint

        if "top_p" in self.sampling_params(request) and _capability_complaint(error) \
                and _NAMES_SAMPLING.search(str(getattr(error, "detail", "") or "")):
            return "sampling"
        return super()._fallback_for(error, request)

    def adapt(self, error: Any, sent: tuple, request: Request) -> str | None:
        message = super().adapt(error, sent, request)
        if message and self.choices.get("sampling") == "temperature" and "sampling" in message:
            message += (f"; unhonoured setting: top_p={request.top_p} (model {self.model} accepts only one of "
                        "temperature and top_p; temperature is sent)")
        return message

    async def complete(self, request: Request) -> Completion:
        resp, headers = await self._call(self._create_raw, **self.message_params(request))
        return self.completion_from_message(resp, request, headers)

    def completion_from_message(self, resp: Any, request: Request, headers: Any = None) -> Completion:
        """The Completion in a ``Message`` (a reply, or a succeeded line of a message batch, which
        has no headers)."""
        blocks = getattr(resp, "content", None) or []
        text = "".join(getattr(b, "text", "") or "" for b in blocks if getattr(b, "type", "") == "text")
        if not blocks:
            raise ProviderError("response has no content", provider=self.name, model=self.model, retryable=True, kind="malformed")
        usage = getattr(resp, "usage", None)
        return Completion(
            text=text,
            parsed=parse_json_reply(text) if request.json_schema is not None else None,
            input_tokens=int(getattr(usage, "input_tokens", 0) or 0),
            output_tokens=int(getattr(usage, "output_tokens", 0) or 0),
            provider=self.name,
            model=getattr(resp, "model", None) or self.model,
            finish_reason=getattr(resp, "stop_reason", None),
            limits=rate_limit_info(headers) if headers is not None else None,
        )

    async def _create_raw(self, **kwargs: Any):
        """``messages.create`` through ``with_raw_response``: the parsed message and the reply's
        headers (their rate-limit state goes to the key's gate)."""
        raw = await self._sdk().messages.with_raw_response.create(**kwargs)
        return await raw.parse(), raw.headers
