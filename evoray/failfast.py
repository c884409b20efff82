"""Fail fast: stop a job whose provider fails the same way on every request.

A wrong ``base_url``, key, model name or request setting fails every request identically; retrying
each row with backoff only turns that into minutes of waiting and a table of failed rows. The retry
layer (:mod:`evoray.client`) feeds every attempt's outcome to one :class:`FailFast` per provider,
which trips when

* ``fail_fast_after`` attempts in a row (N, default 3) failed with one deterministic signature
  before the provider's first success (the provider is unusable from the start); or
* its **last** ``fail_fast_window`` attempts (W, default 20) all failed with one deterministic
  signature, later in the job (a server restarted with another config, a key revoked).

Deterministic means the same request gets the same failure: a refused connection, an unknown host,
a failed TLS handshake, a 4xx other than 408/409/429, or a validation message returned with a 5xx
(llama-cpp-python's server answers an unsupported ``response_format`` with HTTP 500). Overload
(429, plain 5xx), timeouts and reset connections are transient: they are retried and never trip the
rule. Neither do failures that belong to one row (a prompt longer than the context window, a
content filter), since other rows may well succeed.

The signature is the failure's kind, status and the server's message with digits blanked, so "the
same error" survives request ids and token counts in the message.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

DETERMINISTIC_KINDS = frozenset({"client", "validation", "refused", "dns", "tls"})

#: failures that belong to one row's content, not to the provider's configuration
_ROW_SPECIFIC = re.compile(
    r"context.length|context.window|context.size|maximum context|too long|too many tokens|"
    r"exceeds? (?:the )?(?:available )?(?:context|maximum)|"
    r"content.(?:policy|filter|management)|flagged|safety system",
    re.I,
)


def row_specific(detail: str) -> bool:
    """The message is about one row's content (its length, a content filter), not the configuration."""
    return bool(_ROW_SPECIFIC.search(detail or ""))


def signature(error: Any) -> str | None:
    """The failure's signature when it is deterministic and not row-specific; None otherwise."""
    kind = getattr(error, "kind", None)
    status = getattr(error, "status", None)
    if kind not in DETERMINISTIC_KINDS:
        return None
    if kind == "client" and (status is None or status in (408, 409, 429)):
        return None
    detail = str(getattr(error, "detail", "") or "")
    if row_specific(detail):
        return None
    norm = re.sub(r"\d+", "#", detail)
    norm = re.sub(r"\s+", " ", norm).strip()[:200]
    return f"{kind}|{status}|{norm}"


def hint(error: Any, config: Any) -> str:
    """The config key that most likely fixes this failure, in words."""
    name = getattr(config, "name", "?")
    kind = getattr(error, "kind", "")
    status = getattr(error, "status", None)
    detail = str(getattr(error, "detail", "") or "").lower()
    p = f"providers[{name}]"
    if kind in ("refused", "dns"):
        return f"{p}.base_url (is the server running there?)"
    if kind == "tls":
        return f"{p}.base_url (http:// for a server without TLS, https:// with a valid certificate)"
    if status in (401, 403):
        env = getattr(config, "key_env", None) or "the key variable"
        return f"the API key: set {env} (or point {p}.api_key_env at the right variable)"
    if re.search(r"response_format|json_schema|json_object|output_config|schema|grammar", detail):
        return f"{p}.structured_output (auto, json_object or none)"
    if re.search(r"max_completion_tokens|max_tokens", detail):
        return f"{p}.max_tokens_field"
    if re.search(r"\bseed\b", detail):
        return f"{p}.send_seed"
    if status == 404 and "model" not in detail:
        return f"{p}.base_url (OpenAI-compatible servers usually serve under /v1)"
    if "model" in detail or status == 404:
        return f"{p}.model (the name the server knows the model by)"
    return f"{p} (kind, base_url, model) and the stage's settings"


class FailFast:
    """The fail-fast rule for one provider: :meth:`record` each attempt, trips at most once."""

    def __init__(self, after: int = 3, window: int = 20):
        self.after = after
        self.window = window
        self.successes = 0
        self.first: list[str | None] = []  # signatures of the attempts before the first success
        self.recent: deque[str | None] = deque(maxlen=max(1, window))
        self.tripped: str | None = None

    def record(self, error: Any | None) -> str | None:
        """Feed one attempt (None = success). Returns ``"first"`` or ``"window"`` when the rule
        trips on this attempt, else None."""
        if self.tripped:
            return None
        if error is None:
            self.successes += 1
            self.recent.append(None)
            return None
        sig = signature(error)
        self.recent.append(sig)
        if self.successes == 0 and self.after > 0:
            self.first.append(sig)
            tail = self.first[-self.after:]
            if len(tail) == self.after and tail[0] is not None and len(set(tail)) == 1:
                self.tripped = "first"
                return self.tripped
        if self.successes > 0 and self.window > 0 and len(self.recent) == self.window:
            if self.recent[0] is not None and len(set(self.recent)) == 1:
                self.tripped = "window"
                return self.tripped
        return None

    def count(self, how: str) -> int:
        return self.after if how == "first" else self.window


def halt_message(error: Any, config: Any, how: str, attempts: int) -> str:
    """The message a halted stage ends with: provider, what the server said, the likely fix."""
    name = getattr(config, "name", "?")
    model = getattr(config, "model", "?")
    kind = getattr(error, "kind", "error")
    status = getattr(error, "status", None)
    where = f"HTTP {status}" if status is not None else kind
    which = "first" if how == "first" else "last"
    return (f"provider '{name}' (model {model}) stopped the stage: its {which} {attempts} request(s) all failed the "
            f"same way ({where}): {getattr(error, 'detail', error)}. Likely fix: {hint(error, config)}. "
            f"Finished rows are kept; fix the config and run the same command again to resume.")


__all__ = ["DETERMINISTIC_KINDS", "FailFast", "halt_message", "hint", "row_specific", "signature"]
