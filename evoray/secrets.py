"""Keeping API keys out of logs, outputs, caches, exceptions and Ray runtime environments.

Keys are read from the environment only in the process that calls the provider (as
``pydantic.SecretStr``). :func:`redact` removes anything that looks like a key, plus the exact
values of the key variables this process knows about, from text that might be shown or written.
:class:`RedactingFilter` applies it to every log record.
"""

from __future__ import annotations

import logging
import os
import re

_VALUE = r"[^\s,;'\"]{6,}"
KEY_PATTERNS = [
    # sk-..., sk-ant-..., sk-proj-...: only at the start of a word ("task-oriented" is not a key)
    re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_\-]{8,}"),
    # key: VALUE, "api_key": "VALUE", Authorization: Bearer VALUE (the value, not the word Bearer)
    re.compile(r"(?i)\b(api[_-]?key|authorization|x-api-key)([\"']?\s*[:=]\s*[\"']?(?:bearer\s+)?)" + _VALUE),
    re.compile(r"(?i)\b(bearer)(\s+)" + _VALUE),
]
KEY_ENV_HINTS = ("KEY", "TOKEN", "SECRET")


def _known_secrets() -> list[str]:
    vals = []
    for k, v in os.environ.items():
        if v and len(v) >= 8 and any(h in k.upper() for h in KEY_ENV_HINTS):
            vals.append(v)
    return sorted(vals, key=len, reverse=True)


def redact(text: str) -> str:
    if not text:
        return text
    for v in _known_secrets():
        if v in text:
            text = text.replace(v, "***")
    for pat in KEY_PATTERNS:
        text = pat.sub(lambda m: (m.group(1) + m.group(2) + "***") if m.lastindex and m.lastindex >= 2 else "***", text)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:
            return True
        red = redact(msg)
        if red != msg:
            record.msg, record.args = red, None
        return True


def install_log_redaction() -> None:
    root = logging.getLogger()
    if not any(isinstance(f, RedactingFilter) for f in root.filters):
        root.addFilter(RedactingFilter())
    for h in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in h.filters):
            h.addFilter(RedactingFilter())
