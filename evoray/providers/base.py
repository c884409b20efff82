"""The one provider seam.

A provider turns a :class:`Request` into a :class:`Completion` with one async method,
``complete``. It states what it can do as class attributes (``kind``, ``supports_json_schema``,
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
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from ..config import ProviderConfig


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str


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

    def prompt_chars(self) -> int:
        return sum(len(m["content"]) for m in self.messages)

    def estimate_input_tokens(self) -> int:
        """Rough input tokens before the call: ~4 characters a token plus per-message framing."""
        return self.prompt_chars() // 4 + 4 * len(self.messages) + 4

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


class Provider:
    """Base class of every provider. Subclasses implement :meth:`complete`."""

    kind: ClassVar[str] = "base"
    supports_json_schema: ClassVar[bool] = False
    needs_key: ClassVar[bool] = True

    def __init__(self, config: ProviderConfig):
        self.config = config
        self.name = config.name
        self.model = config.model

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
