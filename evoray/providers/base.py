"""The one provider seam.

A provider turns a :class:`Request` into a :class:`Completion` with one async method,
``complete``. It states what it can do as class attributes (``kind``, ``supports_json_schema``, ``runs_locally``,
``default_key_env``, ...,
``needs_key``). Provider-specific code lives only in the modules of this package; everything else
talks to :class:`Provider`.

Providers do not retry, limit or cache: one retry layer, one limiter and one cache sit above them
in :mod:`evoray.client`. They map every failure to :class:`~evoray.errors.ProviderError` with
``retryable`` set from the explicit list in :func:`classify_status`.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from ..config import ProviderConfig
from ..tokens import estimate_input_tokens, estimate_request_tokens

log = logging.getLogger("evoray")


@dataclass
class Request:
    """What a caller asks for. Only these fields change the answer (and so the cache key)."""

    messages: list[dict[str, str]]
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int | None = None
    json_schema: dict[str, Any] | None = None
    sample_index: int = 0  # keeps m samples at temperature > 0 distinct in the cache

    def system(self) -> str | None:
        parts = [m["content"] for m in self.messages if m["role"] == "system"]
        return "\n\n".join(parts) if parts else None

    def non_system(self) -> list[dict[str, str]]:
        return [m for m in self.messages if m["role"] != "system"]

    def estimate_input_tokens(self) -> int:
        """Rough input tokens before the call (:func:`evoray.tokens.estimate_input_tokens`)."""
        return estimate_input_tokens(self.messages)

    def estimate_tokens(self) -> int:
        """The most tokens this request may use, charged before the call
        (:func:`evoray.tokens.estimate_request_tokens`)."""
        return estimate_request_tokens(self.messages, self.max_tokens)

    def cache_payload(self) -> dict[str, Any]:
        d = asdict(self)
        return d


@dataclass
class Completion:
    text: str
    parsed: Any = None  # JSON value when a schema was asked and the reply parsed
    input_tokens: int = 0
    output_tokens: int = 0
    provider: str = ""
    model: str = ""
    latency_s: float = 0.0
    cached: bool = False
    attempts: int = 1
    finish_reason: str | None = None
    limits: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # rate-limit headers

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("limits", None)  # what the key's gate learns from one reply; never cached
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Completion":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def parse_json_reply(text: str) -> Any:
    """Parse a JSON reply, tolerating a fenced block or text around one object; None if none."""
    t = text.strip()
    if t.startswith("```"):
        t = t.strip("`")
        if t.lower().startswith("json"):
            t = t[4:]
    try:
        return json.loads(t)
    except (json.JSONDecodeError, ValueError):
        pass
    start, end = t.find("{"), t.rfind("}")
    if 0 <= start < end:
        try:
            return json.loads(t[start : end + 1])
        except (json.JSONDecodeError, ValueError):
            return None
    return None


RETRYABLE_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))


def classify_status(status: int | None) -> bool:
    """True when a failure with this HTTP status is worth retrying (None = timeout/connection)."""
    return status is None or status in RETRYABLE_STATUS


def _retry_after_value(value: str, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds (``"2"``, ``"1.5"``) or as an HTTP-date (RFC 9110)."""
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_after_from_headers(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP-date); None
    if absent or unreadable. ``now`` is the wall-clock time the date is measured from."""
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
    except (TypeError, ValueError):
        pass
    s = headers.get("retry-after")
    return _retry_after_value(str(s), now) if s is not None else None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str) -> float | None:
    """OpenAI's reset durations: ``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"``; plain numbers are seconds."""
    text = text.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(a + b for a, b in parts) != text.replace(" ", ""):
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(a) * scale[b] for a, b in parts)


def _until(text: str, now: float | None) -> float | None:
    """Anthropic's resets: an RFC 3339 time; seconds from ``now`` (wall clock)."""
    try:
        when = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return parse_duration(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def rate_limit_info(headers: Any, now: float | None = None) -> dict[str, float] | None:
    """The rate-limit headers of a reply, in one shape for both APIs (None when there are none):
    ``limit_requests``, ``remaining_requests``, ``reset_requests_s`` and the same for ``tokens``.

    OpenAI sends ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (resets as durations,
    ``"6m0s"``); Anthropic sends ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}``
    (resets as RFC 3339 times). Limits are read as per minute."""
    if headers is None:
        return None
    out: dict[str, float] = {}
    get = headers.get
    for dim in ("requests", "tokens"):
        for name, field_, parse in (
            (f"x-ratelimit-limit-{dim}", f"limit_{dim}", _number),
            (f"x-ratelimit-remaining-{dim}", f"remaining_{dim}", _number),
            (f"x-ratelimit-reset-{dim}", f"reset_{dim}_s", parse_duration),
            (f"anthropic-ratelimit-{dim}-limit", f"limit_{dim}", _number),
            (f"anthropic-ratelimit-{dim}-remaining", f"remaining_{dim}", _number),
            (f"anthropic-ratelimit-{dim}-reset", f"reset_{dim}_s", lambda v: _until(v, now)),
        ):
            v = get(name)
            if v is None or field_ in out:
                continue
            parsed = parse(str(v))
            if parsed is not None:
                out[field_] = parsed
    return out or None


#: a server's complaint names the structured-output part of the request
_NAMES_STRUCTURED = re.compile(
    r"response_format|json_schema|json_object|output_config|output_format|structured.output|guided_json|"
    r"\bschema\b|grammar", re.I)
#: a complaint names another request field (then it is not about structured output)
_NAMES_OTHER = re.compile(r"\b(?:model|messages|max_tokens|max_completion_tokens|temperature|top_p|seed|stop)\b",
                          re.I)
_REFUSES = r"(?=.*(?:unsupported|not supported|extra inputs|unknown|unrecognized|not allowed|not permitted|instead))"
_NAMES_MAX_TOKENS = re.compile(r"(?s)" + _REFUSES + r".*\bmax_(?:completion_)?tokens\b", re.I)
_NAMES_SEED = re.compile(r"(?s)" + _REFUSES + r".*\bseed\b", re.I)


def _capability_complaint(error: Any) -> bool:
    """The failure is the server refusing the request's shape: a 400/404/405/415/422 or a 5xx whose
    body is a validation message (``kind`` validation). Not a key, rate-limit or overload error."""
    from ..failfast import row_specific

    status = getattr(error, "status", None)
    kind = getattr(error, "kind", "")
    if row_specific(str(getattr(error, "detail", "") or "")):
        return False  # a prompt longer than the context, a content filter: this row, not the request's shape
    return kind == "validation" or (kind == "client" and status in (400, 404, 405, 415, 422))


def normalise_url(url: str) -> str:
    """A base URL as a cache-key part: lower-case scheme and host, no user info, no trailing slash."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        p = urlsplit(url.strip())
    except ValueError:
        return url.strip().rstrip("/")
    if not p.scheme or not p.hostname:
        return url.strip().rstrip("/")
    host = p.hostname.lower() + (f":{p.port}" if p.port else "")
    return urlunsplit((p.scheme.lower(), host, p.path.rstrip("/"), p.query, ""))


class Provider:
    """Base class of every provider. Subclasses implement :meth:`complete`.

    **Capabilities.** OpenAI-compatible servers differ in a few request fields; a provider names
    them in :attr:`capabilities`, each a fallback chain, first choice first::

        structured_output: json_schema -> json_object -> none   (openai; anthropic: json_schema -> none)
        max_tokens_field:  max_tokens -> max_completion_tokens  (openai)
        send_seed:         send -> omit                          (openai)

    The config pins a choice (``structured_output: json_object``) or says ``auto``: start with the
    first and, when a reply shows that the server does not support it (:meth:`adapt`), move to the
    next one for the rest of the job in this process. :meth:`wire_state` is what a request was sent
    with; :meth:`cache_variant` puts the choices that change the answer into the cache key.
    """

    kind: ClassVar[str] = "base"
    supports_json_schema: ClassVar[bool] = False
    needs_key: ClassVar[bool] = True
    #: the environment variable holding the key when the config sets no ``api_key_env`` (None: no key)
    default_key_env: ClassVar[str | None] = None
    #: the model runs inside the job (replicas as Ray actors that reserve CPUs) rather than behind an
    #: HTTP API: the job starts its replicas, and it is its own rate limit (no key shared with others)
    runs_locally: ClassVar[bool] = False
    #: ``base_url`` may point it at another (compatible) server
    accepts_base_url: ClassVar[bool] = True
    #: ``evoray estimate`` may count its tokens with tiktoken's encoding for the model name
    counts_with_tiktoken: ClassVar[bool] = False
    #: the ``structured_output`` values a config may pin (besides ``auto``)
    structured_output_modes: ClassVar[tuple[str, ...]] = ("json_schema", "json_object", "none")
    #: field -> fallback chain (first = the auto default); subclasses override
    capabilities: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, config: ProviderConfig):
        self.config = config
        self.name = config.name
        self.model = config.model
        self.choices: dict[str, str] = {}
        self.auto: set[str] = set()
        for fieldname, chain in self.capabilities.items():
            pinned = getattr(config, fieldname, "auto") or "auto"
            if pinned == "auto":
                self.auto.add(fieldname)
                self.choices[fieldname] = chain[0]
            else:
                self.choices[fieldname] = pinned

    # ---- capabilities ------------------------------------------------------------------------------
    def structured_mode(self, request: "Request") -> str | None:
        """How this request's JSON schema is conveyed (json_schema / json_object / none); None
        without a schema."""
        if request.json_schema is None:
            return None
        return self.choices.get("structured_output", "json_schema")

    def wire_state(self, request: "Request") -> tuple:
        """The choices a request is sent with (compared before and after a failed attempt)."""
        return tuple(sorted(self.choices.items()))

    def cache_variant(self, request: "Request") -> str | None:
        """The part of the choices that changes the answer: how the schema was conveyed, and
        whether a requested seed was sent. None when nothing differs from a plain request."""
        parts = []
        mode = self.structured_mode(request)
        if mode is not None:
            parts.append(f"so={mode}")
        if request.seed is not None and self.choices.get("send_seed") == "omit":
            parts.append("seed=omit")
        return ",".join(parts) or None

    def cache_source(self) -> str:
        return self.source_of(self.config)

    @classmethod
    def source_of(cls, config: ProviderConfig) -> str:
        """Where answers come from, for the cache key and stage fingerprints: ``cache_namespace``
        when set, else the normalised ``base_url`` (or the SDK's default endpoint)."""
        ns = getattr(config, "cache_namespace", None)
        if ns:
            return f"ns:{ns}"
        return normalise_url(config.base_url or cls.default_base_url())

    @classmethod
    def default_base_url(cls) -> str:
        return cls.kind

    def _fallback_for(self, error: Any, request: "Request") -> str | None:
        """The capability field the error complains about (and that this request used), or None."""
        if not _capability_complaint(error):
            return None
        detail = str(getattr(error, "detail", "") or "")
        fields = self.capabilities
        if "max_tokens_field" in fields and _NAMES_MAX_TOKENS.search(detail):
            return "max_tokens_field"
        if "send_seed" in fields and request.seed is not None and self.choices.get("send_seed") == "send" \
                and _NAMES_SEED.search(detail):
            return "send_seed"
        if "structured_output" in fields and self.structured_mode(request) not in (None, "none"):
            unnamed = not _NAMES_OTHER.search(detail) and (
                getattr(error, "kind", "") == "validation" or getattr(error, "status", None) in (400, 422))
            if _NAMES_STRUCTURED.search(detail) or unnamed:
                return "structured_output"
        return None

    def adapt(self, error: Any, sent: tuple, request: "Request") -> str | None:
        """After a failed attempt: should the request be sent again at once, differently?

        Returns a message when this call switched a capability to its next choice (the caller
        warns once), ``""`` when another request already switched since this one was sent (just
        send again), None when the failure is not about a capability, or no fallback is left (the
        retry layer then treats the error as it is).
        """
        fieldname = self._fallback_for(error, request)
        if fieldname is None:
            return None
        if self.wire_state(request) != sent:
            return ""
        if fieldname not in self.auto:
            return None
        chain = self.capabilities[fieldname]
        current = self.choices[fieldname]
        i = chain.index(current) if current in chain else len(chain) - 1
        if i + 1 >= len(chain):
            return None
        self.choices[fieldname] = chain[i + 1]
        return (f"provider '{self.name}' ({self.config.base_url or self.kind}) does not support "
                f"{fieldname} {current} (server said: {str(getattr(error, 'detail', ''))[:160]!r}); "
                f"using {fieldname} {chain[i + 1]} for the rest of the job (pin it in the config as "
                f"providers[{self.name}].{fieldname}: {chain[i + 1]} to skip the first failed request)")

    def learn(self, choices: dict[str, str]) -> bool:
        """Take choices another process found (shared through the gate); True when any changed."""
        changed = False
        for fieldname, value in choices.items():
            if fieldname in self.auto and value in self.capabilities.get(fieldname, ()) \
                    and self.choices.get(fieldname) != value:
                chain = self.capabilities[fieldname]
                # only move forward along the chain: never back to a choice the server refused
                if chain.index(value) > chain.index(self.choices[fieldname]):
                    self.choices[fieldname] = value
                    changed = True
        return changed

    def unhonoured(self, request: "Request") -> list[str]:
        """Settings of ``request`` this provider cannot send (counted in the ledger as
        ``unhonoured_sampling``); none by default."""
        return []

    async def complete(self, request: Request) -> Completion:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self) -> None:
        """Build what the first call needs (SDK import and client) before a rate-limit permit is
        taken. Idempotent and cheap after the first call. Without it the set-up cost (an SDK import
        takes about a second) is paid after the permit was granted, so permits granted meanwhile
        reach the server in one burst and draw 429s."""
        return None

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:  # never show keys
        return f"<{type(self).__name__} {self.name} model={self.model}>"
