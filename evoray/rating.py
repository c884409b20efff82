"""AlpaGasus rating: parse a rater's score and rate rows with an :class:`~evoray.client.LLMClient`.

The Ray-free core of the rater pool. :class:`Rater` rates one row (``await rater.rate(row)``) or a
batch with bounded concurrency (``await rater.rate_batch(rows, concurrency)``); the Ray actor in
``actors/`` only wraps it. Every input row gives exactly one output row, ``status`` ``scored`` or
``failed`` (with ``reason``, ``attempts`` and the ``raw`` reply); only :class:`~evoray.errors.StopJob`
escapes (the budget is spent, or the provider was halted), because stopping is the job's decision,
not a row's.

What :func:`parse_score` accepts (and nothing else - no guessing; the reading order and the two
failure kinds are :mod:`evoray.parsing`'s, shared with the judge):

1. a JSON object ``{"score": x, "explanation": "..."}``: the provider's parsed value, or the reply
   text itself when it *starts* with ``{`` or a fenced ```` ```json ```` block (a reply cut off
   after the score still counts when ``"score"`` is its first key);
2. the score alone on the first non-empty line: ``4.5``, ``4.5/5``, ``4.5 out of 5``, ``**4.5**``;
3. a labelled score at the start of one of the first two non-empty lines: ``Score: 4.5``,
   ``Rating: 4``, ``Overall score - 4.5/5``, ``Accuracy: 4``.

A number outside 0..5 is not a score (``45``, ``7``, ``4.5/10``): that reply is *out of range*,
which is told apart from an *unparseable* one (no score where one belongs) in the error's ``kind``
and the failed row's reason. Text further down (an explanation that quotes the row's own
``Score: 5``) is never looked at, and ``4.5`` is 4.5.

Asking again after an unusable reply changes what can help instead of resending the identical
request (at temperature 0 a deterministic server would repeat itself): the second ask is the JSON
fallback (the same prompt asking for the JSON object, schema-constrained) when the first was a text
ask and the provider takes a schema; otherwise, and for later asks, a repair turn: the conversation
so far, the model's reply, and a short message saying what was wrong with it and the exact form
wanted.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from .config import RateConfig
from .errors import ParseError, ProviderError, RetriesExhausted, StopJob
from .parsing import NUM, clean, on_scale, parse_reply
from .parsing import failure_reason as _failure_reason
from .prompts.rating import SCORE_MAX, SCORE_MIN, build_rating_request, build_repair_request
from .schema import result_row

_ALONE = re.compile(rf"^(?P<n>{NUM})\s*(?:/\s*5(?:\.0+)?|out\s+of\s+5(?:\.0+)?)?\s*\.?$", re.I)
_LABELLED = re.compile(
    rf"^(?:(?:[a-z]+\s+)?(?:score|rating)|accuracy|helpfulness)\s*(?:\((?:0\s*-\s*5|out\s+of\s+5)\))?"
    rf"\s*(?::|：|=|-|is\b)?\s*[*_`]*\s*(?P<n>{NUM})[*_`]*"
    rf"\s*(?:/\s*5(?:\.0+)?|out\s+of\s+5(?:\.0+)?)?(?P<rest>.*)$",
    re.I,
)
_OTHER_SCALE = re.compile(rf"^(?P<n>{NUM})\s*(?:/|out\s+of)\s*(?P<d>{NUM})\s*\.?$", re.I)
_BAD_REST = re.compile(r"^\s*(?:[0-9/%]|\.[0-9]|out\s+of)", re.I)
_JSON_HEAD = re.compile(rf'^\s*(?:```(?:json)?\s*)?\{{\s*"score"\s*:\s*"?(?P<n>-?{NUM})"?\s*[,}}]', re.I)

T = TypeVar("T")
R = TypeVar("R")


def _score(value: Any, what: str, raw: str) -> float:
    """The score in ``value`` on the 0-5 scale, or ParseError (:func:`evoray.parsing.on_scale`)."""
    return on_scale(value, SCORE_MIN, SCORE_MAX, what, raw)


def _from_object(obj: Any, raw: str) -> tuple[float, str]:
    if not isinstance(obj, dict) or "score" not in obj:
        raise ParseError("the JSON reply has no score field", raw=raw)
    score = _score(obj["score"], "the JSON score", raw)
    expl = obj.get("explanation")
    return score, "" if expl is None else str(expl).strip()


def _from_head(head: re.Match[str], raw: str) -> tuple[float, str]:
    return _score(head.group("n"), "the JSON score", raw), ""


def _from_text(body: str, raw: str) -> tuple[float, str]:
    lines = [ln for ln in body.splitlines() if ln.strip()]
    first = clean(lines[0])
    m = _ALONE.match(first)
    if m:
        score = _score(m.group("n"), "the score on the first line,", raw)
        return score, "\n".join(lines[1:]).strip()
    other = _OTHER_SCALE.match(first)
    if other:
        raise ParseError(f"the first line {first[:40]!r} is a score on a 0-{other.group('d')} scale, not 0-5",
                         raw=raw, kind="out_of_range")
    for i, line in enumerate(lines[:2]):
        m = _LABELLED.match(clean(line))
        if not m:
            continue
        if _BAD_REST.match(m.group("rest")):
            raise ParseError(f"line {i + 1} has a score on another scale: {line.strip()[:80]!r}", raw=raw,
                             kind="out_of_range")
        score = _score(m.group("n"), f"the score on line {i + 1},", raw)
        after = "\n".join(lines[i + 1 :]).strip()
        rest = m.group("rest").strip().lstrip(".,;:-–— ").strip()
        before = "\n".join(lines[:i]).strip()
        expl = "\n".join(p for p in (rest, after) if p) or before
        return score, expl
    raise ParseError("no score on the first line and no 'Score: x' in the first two lines", raw=raw)


def parse_score(text: str | None, parsed_json: Any = None) -> tuple[float, str]:
    """(score, explanation) from a rater's reply, or :class:`ParseError` carrying the raw text."""
    return parse_reply(text, parsed_json, from_object=_from_object, json_head=_JSON_HEAD, from_head=_from_head,
                       not_json="the reply starts like JSON but is not a JSON object with a score",
                       from_text=_from_text)


def failure_reason(error: ParseError | None) -> str:
    """A failed row's reason after the last unusable reply: ``unparseable reply``, or
    ``score out of range: ...`` naming the number and the scale."""
    return _failure_reason(error, "score")


async def run_bounded(fn: Callable[[T], Awaitable[R]], items: Sequence[T], concurrency: int) -> list[R]:
    """``[await fn(x) for x in items]`` with at most ``concurrency`` in flight, results in input order.

    When one call raises, the calls still running are cancelled and the error propagates. A
    :class:`~evoray.errors.StopJob` carries ``finished``: the results that were complete, in input order.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    sem = asyncio.Semaphore(concurrency)
    results: list[Any] = [None] * len(items)
    done = [False] * len(items)

    async def one(i: int, item: T) -> None:
        async with sem:
            results[i] = await fn(item)
            done[i] = True

    tasks = [asyncio.ensure_future(one(i, x)) for i, x in enumerate(items)]
    try:
        await asyncio.gather(*tasks)
    except BaseException as e:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if isinstance(e, StopJob):
            e.finished = [r for r, d in zip(results, done) if d]
        raise
    return results


class Rater:
    """Rates rows with one client. Plain class: the Ray actor wraps it, tests call it directly.

    ``use_schema`` asks for :data:`~evoray.prompts.rating.SCORE_SCHEMA` output; pass
    ``config.json_scores and <the role's providers support JSON schemas>``. ``json_fallback``: when
    asking again after an unusable text reply, ask for the JSON object (schema-constrained) once;
    pass whether the role's providers take a schema.

    ``attempts`` in an output row counts provider calls for that row: the client's retries of each
    ask (a cached answer counts what it cost when it was made), summed over the asks.
    """

    def __init__(self, client: Any, config: RateConfig | None = None, use_schema: bool = False,
                 json_fallback: bool = False):
        self.client = client
        self.config = config or RateConfig()
        self.use_schema = use_schema
        self.json_fallback = json_fallback

    def request(self, row: dict[str, Any], sample_index: int = 0, previous: tuple[str, ParseError] | None = None):
        """The ask number ``sample_index``: the rating request, or after an unusable reply
        (``previous`` = (reply, its ParseError)) the JSON fallback or a repair turn."""
        c = self.config
        if previous is None:
            return build_rating_request(row, c.dimension, self.use_schema, c.max_tokens, sample_index=sample_index)
        if sample_index == 1 and not self.use_schema and self.json_fallback:
            return build_rating_request(row, c.dimension, True, c.max_tokens, sample_index=sample_index)
        reply, problem = previous
        return build_repair_request(row, c.dimension, self.use_schema or self.json_fallback, c.max_tokens, reply,
                                    problem.message, sample_index=sample_index)

    async def rate(self, row: dict[str, Any]) -> dict[str, Any]:
        """One result row: status ``scored`` (score, explanation) or ``failed`` (reason, raw)."""
        attempts = 0
        raw: str | None = None
        provider = model = None
        previous: tuple[str, ParseError] | None = None
        for ask in range(self.config.parse_retries + 1):
            try:
                comp = await self.client.complete(self.request(row, sample_index=ask, previous=previous))
            except StopJob:  # the budget, or a halted provider: the job stops
                raise
            except RetriesExhausted as e:
                return result_row(row, status="failed", reason=str(e), attempts=attempts + e.attempts,
                                  raw=raw, provider=provider, model=model, score=None, explanation=None)
            except ProviderError as e:
                return result_row(row, status="failed", reason=str(e), attempts=attempts + 1, raw=raw,
                                  provider=e.provider, model=e.model, score=None, explanation=None)
            attempts += max(1, comp.attempts or 1)
            raw, provider, model = comp.text, comp.provider, comp.model
            try:
                score, explanation = parse_score(comp.text, comp.parsed)
            except ParseError as e:
                previous = (comp.text or "", e)
                continue
            return result_row(row, status="scored", score=score, explanation=explanation, provider=provider,
                              model=model, reason=None, attempts=attempts, raw=raw)
        return result_row(row, status="failed", reason=failure_reason(previous[1] if previous else None),
                          attempts=attempts, raw=raw, provider=provider, model=model, score=None, explanation=None)

    async def rate_batch(self, rows: Sequence[dict[str, Any]], concurrency: int = 16) -> list[dict[str, Any]]:
        """Rate ``rows`` with at most ``concurrency`` requests in flight; output order = input order."""
        return await run_bounded(self.rate, rows, concurrency)


__all__ = ["Rater", "failure_reason", "parse_score", "run_bounded"]
