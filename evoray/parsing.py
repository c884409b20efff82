"""Reading scores out of model replies: the part rating (:mod:`evoray.rating`) and judging
(:mod:`evoray.judge`) share.

Both parse a reply the same way and tell the same two failures apart:

1. a value the provider already parsed (a schema-constrained JSON reply) is read as an object;
2. otherwise a leading ``<think>...</think>`` block is dropped and an empty reply is an error;
3. a reply that *starts* with ``{`` or a fenced block is read as JSON: the whole object when it
   parses, else the head of a reply cut off after its scores (the scores themselves are whole);
   a reply starting with ``{`` that is neither is an error, never read as text;
4. anything else is read as text from its first lines, by the caller's rules (:func:`clean` strips
   markdown decoration from a line).

A :class:`~evoray.errors.ParseError` says which failure it was in ``kind``: ``unparseable`` (no
number where a score belongs) or ``out_of_range`` (a number, but off the scale, see
:func:`on_scale`); :func:`failure_reason` turns the last one into a failed row's reason.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Pattern, TypeVar

from .errors import ParseError
from .providers.base import parse_json_reply

#: a non-negative number as written in a reply: ``4``, ``4.5``
NUM = r"[0-9]+(?:\.[0-9]+)?"
#: a reasoning model's leading ``<think>...</think>`` block
THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.S | re.I)
_LEAD = re.compile(r"^[\s#>*_`]*(?:-\s+)?[\s*_`]*")
_TRAIL = re.compile(r"[\s*_`]+$")

T = TypeVar("T")


def clean(line: str) -> str:
    """A line without markdown decoration around it (``**``, ``#``, a list dash, backticks)."""
    return _TRAIL.sub("", _LEAD.sub("", line))


def number(value: Any) -> float | None:
    """``value`` as a finite float when it is a real number (or a number written as text); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        v = value.strip()
        if not re.fullmatch("-?" + NUM, v):
            return None
        value = float(v)
    if not isinstance(value, (int, float)):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def in_range(value: Any, lo: float, hi: float) -> float | None:
    """``value`` as a float when it is a real number within ``lo..hi``; None otherwise."""
    f = number(value)
    if f is None or f < lo or f > hi:
        return None
    return f


def on_scale(value: Any, lo: float, hi: float, what: str, raw: str) -> float:
    """The score in ``value``, or ParseError: ``out_of_range`` for a number off the ``lo..hi``
    scale, ``unparseable`` for something that is not a number."""
    f = number(value)
    if f is None:
        raise ParseError(f"{what} {value!r} is not a number", raw=raw)
    if not lo <= f <= hi:
        raise ParseError(f"{what} {f:g} is not on the {lo:g}-{hi:g} scale", raw=raw, kind="out_of_range")
    return f


def parse_reply(
    text: str | None,
    parsed_json: Any,
    *,
    from_object: Callable[[Any, str], T],
    json_head: Pattern[str],
    from_head: Callable[[re.Match[str], str], T],
    not_json: str,
    from_text: Callable[[str, str], T],
) -> T:
    """Read a reply in the order of the module docstring.

    ``from_object(obj, raw)`` reads a JSON value, ``json_head`` matches the start of a JSON reply cut
    off after its scores and ``from_head(match, raw)`` reads it, ``not_json`` is the message for a
    reply that starts with ``{`` but is not that, and ``from_text(body, raw)`` reads a text reply
    (``body``: the reply without its think block, stripped, not empty). ``raw`` is the reply as given.
    """
    raw = text or ""
    if parsed_json is not None:
        return from_object(parsed_json, raw)
    body = THINK.sub("", raw).strip()
    if not body:
        raise ParseError("empty reply", raw=raw)
    if body.startswith("{") or body.startswith("```"):
        obj = parse_json_reply(body)
        if obj is not None:
            return from_object(obj, raw)
        head = json_head.match(body)
        if head:  # cut off after the scores: the scores themselves are whole
            return from_head(head, raw)
        if body.startswith("{"):
            raise ParseError(not_json, raw=raw)
    return from_text(body, raw)


def failure_reason(error: ParseError | None, noun: str = "score") -> str:
    """A failed row's reason after the last unusable reply: ``unparseable reply``, or
    ``<noun> out of range: ...`` naming the number and the scale."""
    if error is not None and error.kind == "out_of_range":
        return f"{noun} out of range: {error.message}"
    return "unparseable reply"


__all__ = ["NUM", "THINK", "clean", "failure_reason", "in_range", "number", "on_scale", "parse_reply"]
