"""AlpaGasus evaluation: pairwise judging with the answer order swapped, and its summary.

For each prompt the judge sees the two answers twice: order 1 shows model A as Assistant 1 and B
as Assistant 2, order 2 shows B first and A second. Each order gives A an outcome (win / tie /
lose) and the two outcomes combine into the prompt's result:

=========  ==========  =======
first      second      result
=========  ==========  =======
win        win         Win
win        tie         Win     (either order)
tie        tie         Tie
win        lose        Tie     (either order)
lose       tie         Lose    (either order)
lose       lose        Lose
=========  ==========  =======

Winning score = (#Win - #Lose) / N + 1, from 0 (A always loses) to 2 (A always wins), where N is
the size of the test set as in AlpaGasus (every prompt of the set, judged or not): a failed
judgment counts in N as neither a Win nor a Lose, so it pulls the score towards 1 like a Tie. The
summary gives this paper score as ``winning_score`` and, beside it, ``winning_score_judged_only``
with N = the judged prompts (Win + Tie + Lose), which leaves failed judgments out.

A reply whose two scores cannot be read is asked again (``parse_retries`` times), each time
differently: the second ask is the JSON fallback (the verdict as a schema-constrained JSON object)
when the first was a text ask and the provider takes a schema, later asks a repair turn that quotes
the reply and says what was wrong. After that the judgment's result is ``failed`` with its reason
(``unparseable reply``, or ``scores out of range: ...`` when numbers were there but not on 1-10)
and the raw replies - never a guessed result. Failed judgments are counted separately (``failed``);
they are part of the paper score's N and not of the judged-only score's. ``judge.json_output`` asks for the JSON object from the first ask.

What :func:`parse_pair` accepts on the reply's start (and nothing else):

* ``8 7``, ``8, 7``, ``8/10 7/10``, ``8.5 7`` alone on the first non-empty line;
* ``Assistant 1: 8`` and ``Assistant 2: 7`` at the start of lines (or comma-separated on one line)
  within the first three non-empty lines;
* a JSON object with ``score_1`` and ``score_2`` (or ``assistant_1`` / ``assistant_2``, or
  ``scores: [8, 7]``) when the reply starts with ``{`` or a fenced block.

Scores outside 1..10 are not scores.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import PurePath
from typing import Any, Iterable, Sequence

import pyarrow as pa

from .config import JudgeConfig
from .errors import ParseError, StopJob, ProviderError, RetriesExhausted
from .prompts.judge import PAIR_MAX, PAIR_MIN, build_judge_repair_request, build_judge_request, question_text
from .parsing import NUM, clean, in_range, number, parse_reply
from .rating import run_bounded
from .schema import make_id

OUTCOMES = ("win", "tie", "lose")
RESULTS = ("Win", "Tie", "Lose")

_SCALE = r"(?:\s*/\s*10(?:\.0+)?|\s+out\s+of\s+10)?"
_PAIR_LINE = re.compile(rf"^(?:scores?\s*[:：]?\s*)?(?P<a>{NUM}){_SCALE}\s*(?:,|;|\s|\band\b|vs\.?)\s*(?P<b>{NUM}){_SCALE}\s*\.?$", re.I)
_LABEL = re.compile(
    rf"(?:^|[,;]\s*|\s{{2,}})[*_`]*assistant\s*(?P<who>[12])[*_`]*(?:'s)?(?:\s+score)?[*_`]*\s*(?::|：|=|-)?\s*[*_`]*\s*"
    rf"(?P<n>{NUM})[*_`]*(?P<scale>{_SCALE})(?P<after>\s*[0-9./]?)",
    re.I,
)


_PAIR_JSON_HEAD = re.compile(
    rf'^\s*(?:```(?:json)?\s*)?\{{\s*"score_1"\s*:\s*"?(?P<a>-?{NUM})"?\s*,\s*"score_2"\s*:\s*"?(?P<b>-?{NUM})"?\s*[,}}]',
    re.I)


def _pair_score(value: Any) -> float | None:
    return in_range(value, PAIR_MIN, PAIR_MAX)


def _both(a: Any, b: Any, what: str, raw: str) -> tuple[float, float]:
    """Both scores, or ParseError: ``unparseable`` when one is not a number, ``out_of_range`` when
    a number is off the 1-10 scale."""
    n1, n2 = number(a), number(b)
    if n1 is None or n2 is None:
        raise ParseError(f"{what} {a!r}, {b!r} are not both numbers", raw=raw)
    s1, s2 = _pair_score(n1), _pair_score(n2)
    if s1 is None or s2 is None:
        raise ParseError(f"{what} {n1:g}, {n2:g} are not both on the 1-10 scale", raw=raw, kind="out_of_range")
    return s1, s2


def _pair_from_object(obj: Any, raw: str) -> tuple[float, float]:
    if not isinstance(obj, dict):
        raise ParseError("the JSON reply is not an object", raw=raw)
    a = b = None
    if isinstance(obj.get("scores"), list) and len(obj["scores"]) == 2:
        a, b = obj["scores"]
    else:
        for ka, kb in (("score_1", "score_2"), ("assistant_1", "assistant_2"), ("score1", "score2")):
            if ka in obj and kb in obj:
                a, b = obj[ka], obj[kb]
                break
        else:
            raise ParseError("the JSON reply has no score_1 / score_2", raw=raw)
    return _both(a, b, "the JSON scores", raw)


def _pair_from_head(head: re.Match[str], raw: str) -> tuple[float, float]:
    return _both(head.group("a"), head.group("b"), "the JSON scores", raw)


def _pair_from_text(body: str, raw: str) -> tuple[float, float]:
    lines = [clean(ln) for ln in body.splitlines() if ln.strip()]
    m = _PAIR_LINE.match(lines[0])
    if m:
        return _both(m.group("a"), m.group("b"), "the scores on the first line,", raw)
    found: dict[str, list[str]] = {"1": [], "2": []}
    for line in lines[:3]:
        for lm in _LABEL.finditer(line):
            if lm.group("after").strip():  # "Assistant 1: 8/100", "Assistant 1: 8.": not clean
                if lm.group("after").strip() != ".":
                    raise ParseError(f"unclear score in {line!r}", raw=raw)
            found[lm.group("who")].append(lm.group("n"))
        if found["1"] and found["2"]:
            break
    if found["1"] or found["2"]:
        if len(found["1"]) != 1 or len(found["2"]) != 1:
            raise ParseError("the reply does not name exactly one score for each assistant", raw=raw)
        return _both(found["1"][0], found["2"][0], "the scores", raw)
    raise ParseError("no pair of scores on the first line", raw=raw)


def parse_pair(text: str | None, parsed_json: Any = None) -> tuple[float, float]:
    """(score of Assistant 1, score of Assistant 2) from a judge reply, or :class:`ParseError`.

    The reading order and the failure kinds are :func:`evoray.parsing.parse_reply`'s, shared with
    the rater."""
    return parse_reply(text, parsed_json, from_object=_pair_from_object, json_head=_PAIR_JSON_HEAD,
                       from_head=_pair_from_head, not_json="the reply starts like JSON but is not a JSON object",
                       from_text=_pair_from_text)


def outcome(s_a: float, s_b: float) -> str:
    """Model A's outcome in one order: ``win``, ``tie`` or ``lose``."""
    if s_a > s_b:
        return "win"
    if s_a == s_b:
        return "tie"
    return "lose"


def combine(first: str, second: str) -> str:
    """A's result for a prompt from its outcomes in the two orders (see the module table)."""
    pair = (first, second)
    for o in pair:
        if o not in OUTCOMES:
            raise ValueError(f"an outcome is one of {OUTCOMES}, not {o!r}")
    wins, ties = pair.count("win"), pair.count("tie")
    if wins == 2 or (wins == 1 and ties == 1):
        return "Win"
    if ties == 2 or (wins == 1 and pair.count("lose") == 1):
        return "Tie"
    return "Lose"


def winning_score(n_win: int, n_lose: int, n: int) -> float | None:
    """(#Win - #Lose) / N + 1; None when N is 0."""
    if n <= 0:
        return None
    return (n_win - n_lose) / n + 1


# ---- pairing answers ----------------------------------------------------------------------------

def name_test_set(row: dict[str, Any]) -> str:
    """The test set a row belongs to: its ``test_set``, else its ``source`` file's stem without a
    ``_test_set`` / ``_test`` suffix (``vicuna_test_set.jsonl`` -> ``vicuna``), else ``all``."""
    name = row.get("test_set")
    if name:
        return str(name)
    src = row.get("source") or ""
    if not src:
        return "all"
    stem = PurePath(str(src)).name
    for ext in (".jsonl", ".json", ".parquet", ".gz"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    for suffix in ("_test_set", "-test-set", "_test", "-test"):
        if stem.endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem or "all"


def _key(row: dict[str, Any]) -> tuple[str, str]:
    return ((row.get("instruction") or "").strip(), (row.get("input") or "").strip())


def pair_answers(
    rows_a: Iterable[dict[str, Any]], rows_b: Iterable[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Match the two models' answers by (instruction, input), whitespace-trimmed.

    Returns ``(pairs, only_a, only_b)``: pair rows in A's order, and the rows of each side that
    found no partner (reported, not dropped). A prompt that occurs several times on a side is
    paired occurrence by occurrence. A pair row has ``id`` (A's id, else a hash of the prompt),
    ``test_set``, ``instruction``, ``input``, ``answer_a``, ``answer_b``, ``id_a``, ``id_b``.
    """
    pending: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for rb in rows_b:
        pending[_key(rb)].append(rb)
    taken: dict[tuple[str, str], int] = defaultdict(int)
    pairs: list[dict[str, Any]] = []
    only_a: list[dict[str, Any]] = []
    for ra in rows_a:
        k = _key(ra)
        bucket = pending.get(k)
        if not bucket or taken[k] >= len(bucket):
            only_a.append(ra)
            continue
        rb = bucket[taken[k]]
        taken[k] += 1
        pid = ra.get("id") or make_id("judge", k[0], k[1])
        pairs.append({
            "id": pid,
            "test_set": name_test_set(ra) if (ra.get("test_set") or ra.get("source")) else name_test_set(rb),
            "instruction": ra.get("instruction") or "",
            "input": ra.get("input") or "",
            "answer_a": ra.get("output") or "",
            "answer_b": rb.get("output") or "",
            "id_a": ra.get("id"),
            "id_b": rb.get("id"),
        })
    only_b = [rb for k, bucket in pending.items() for rb in bucket[taken[k]:]]
    return pairs, only_a, only_b


# ---- the judge ----------------------------------------------------------------------------------

_SCORE_COLS = ("score_a_order1", "score_b_order1", "score_a_order2", "score_b_order2")
JUDGMENT_FIELDS = (
    "id", "test_set", "instruction", "input", "answer_a", "answer_b",
    "raw_order1", "raw_order2", *_SCORE_COLS,
    "outcome1", "outcome2", "result", "reason", "provider", "model", "attempts",
)
# the judgments table: one row per prompt, both orders' raw replies and scores
JUDGMENT_SCHEMA = pa.schema([
    pa.field(n, pa.float64() if n in _SCORE_COLS else pa.int32() if n == "attempts" else pa.string(),
             nullable=n != "id")
    for n in JUDGMENT_FIELDS
])


class Judge:
    """Judges pair rows with one client; plain class wrapped by the Ray judge actor.

    ``parse_retries``: asks again this many times per order when a reply's scores cannot be read,
    each time differently (see the module docstring). ``json_fallback``: the second ask may be the
    JSON fallback (pass whether the role's providers take a schema); ``config.json_output`` asks for
    JSON from the first ask.
    """

    def __init__(self, client: Any, config: JudgeConfig | None = None, parse_retries: int = 2,
                 json_fallback: bool = False):
        self.client = client
        self.config = config or JudgeConfig()
        self.parse_retries = parse_retries
        self.json_fallback = json_fallback

    def request(self, question: str, first: str, second: str, ask: int, previous: tuple[str, ParseError] | None):
        c = self.config
        if previous is None:
            return build_judge_request(question, first, second, c.max_tokens, sample_index=ask,
                                       json_output=c.json_output)
        if ask == 1 and not c.json_output and self.json_fallback:
            return build_judge_request(question, first, second, c.max_tokens, sample_index=ask, json_output=True)
        reply, problem = previous
        return build_judge_repair_request(question, first, second, c.max_tokens, reply, problem.message,
                                          sample_index=ask, json_output=c.json_output or self.json_fallback)

    async def _one_order(self, question: str, first: str, second: str) -> dict[str, Any]:
        """Scores of (Assistant 1, Assistant 2) for one order, or the reason it failed."""
        out: dict[str, Any] = {"scores": None, "raw": None, "reason": None, "attempts": 0,
                               "provider": None, "model": None}
        previous: tuple[str, ParseError] | None = None
        for ask in range(self.parse_retries + 1):
            req = self.request(question, first, second, ask, previous)
            try:
                comp = await self.client.complete(req)
            except StopJob:  # the budget, or a halted provider: the job stops
                raise
            except RetriesExhausted as e:
                out.update(reason=str(e), attempts=out["attempts"] + e.attempts)
                return out
            except ProviderError as e:
                out.update(reason=str(e), attempts=out["attempts"] + 1, provider=e.provider, model=e.model)
                return out
            out.update(raw=comp.text, provider=comp.provider, model=comp.model,
                       attempts=out["attempts"] + max(1, comp.attempts or 1))
            try:
                out["scores"] = parse_pair(comp.text, comp.parsed)
                return out
            except ParseError as e:
                previous = (comp.text or "", e)
                continue
        last = previous[1] if previous else None
        out["reason"] = (f"scores out of range: {last.message}" if last is not None and last.kind == "out_of_range"
                         else "unparseable reply")
        return out

    def first_requests(self, pair_row: dict[str, Any]) -> list:
        """The first ask of both orders (batch mode sends the two in the same round)."""
        q = question_text(pair_row)
        a, b = pair_row.get("answer_a") or "", pair_row.get("answer_b") or ""
        return [build_judge_request(q, a, b, self.config.max_tokens, sample_index=0),
                build_judge_request(q, b, a, self.config.max_tokens, sample_index=0)]

    async def judge(self, pair_row: dict[str, Any]) -> dict[str, Any]:
        """One judgment row: both orders' raw replies and scores, outcomes and the result."""
        q = question_text(pair_row)
        a, b = pair_row.get("answer_a") or "", pair_row.get("answer_b") or ""
        o1 = await self._one_order(q, a, b)  # A shown first
        o2 = await self._one_order(q, b, a)  # B shown first
        row: dict[str, Any] = {k: None for k in JUDGMENT_FIELDS}
        row.update(
            id=pair_row.get("id") or make_id("judge", *_key(pair_row)), test_set=pair_row.get("test_set") or name_test_set(pair_row),
            instruction=pair_row.get("instruction") or "", input=pair_row.get("input") or "",
            answer_a=a, answer_b=b, raw_order1=o1["raw"], raw_order2=o2["raw"],
            provider=o2["provider"] or o1["provider"], model=o2["model"] or o1["model"],
            attempts=o1["attempts"] + o2["attempts"],
        )
        if o1["scores"] is not None:
            row["score_a_order1"], row["score_b_order1"] = o1["scores"]
            row["outcome1"] = outcome(*o1["scores"])
        if o2["scores"] is not None:
            row["score_b_order2"], row["score_a_order2"] = o2["scores"]
            row["outcome2"] = outcome(o2["scores"][1], o2["scores"][0])
        reasons = [f"order {i}: {o['reason']}" for i, o in ((1, o1), (2, o2)) if o["scores"] is None]
        if reasons:
            row["result"], row["reason"] = "failed", "; ".join(reasons)
        else:
            row["result"] = combine(row["outcome1"], row["outcome2"])
        return row

    async def judge_batch(self, pair_rows: Sequence[dict[str, Any]], concurrency: int = 16) -> list[dict[str, Any]]:
        """Judge ``pair_rows`` with at most ``concurrency`` pairs in flight; order preserved."""
        return await run_bounded(self.judge, pair_rows, concurrency)


# ---- summary --------------------------------------------------------------------------------------

def _empty() -> dict[str, Any]:
    return {"win": 0, "tie": 0, "lose": 0, "failed": 0,
            "by_order": {"order1": {o: 0 for o in (*OUTCOMES, "failed")},
                         "order2": {o: 0 for o in (*OUTCOMES, "failed")}}}


#: what the two scores of a summary are (written beside them in summary.json)
SCORE_LABELS = {
    "winning_score": "paper (AlpaGasus): (Win - Lose) / test-set size + 1; the size counts every prompt, a failed "
                     "judgment as neither Win nor Lose",
    "winning_score_judged_only": "(Win - Lose) / judged prompts + 1; failed judgments left out",
}


def _finish(c: dict[str, Any]) -> dict[str, Any]:
    n = c["win"] + c["tie"] + c["lose"]
    c["n"] = n
    c["total"] = n + c["failed"]
    c["winning_score"] = winning_score(c["win"], c["lose"], c["total"])
    c["winning_score_judged_only"] = winning_score(c["win"], c["lose"], n)
    return c


def summarize(judgments: Iterable[dict[str, Any]], test_sets: Sequence[str] | None = None) -> dict[str, Any]:
    """Win / Tie / Lose / failed counts and the winning score per test set and overall.

    ``n`` = Win + Tie + Lose (judged prompts); ``failed`` is counted apart and ``total`` = n +
    failed (the test-set size). ``winning_score`` is the paper's, over ``total``;
    ``winning_score_judged_only`` is over ``n`` (see the module and :data:`SCORE_LABELS`, which the
    summary carries as ``score_labels``). ``by_order`` counts A's outcome in each order (a failed order counts as failed there),
    which shows position bias. ``test_sets`` fixes the order of the per-set entries (listed sets
    appear even when empty); other sets follow in order of first appearance.
    """
    per: dict[str, dict[str, Any]] = {name: _empty() for name in (test_sets or [])}
    overall = _empty()
    for j in judgments:
        name = j.get("test_set") or "all"
        c = per.setdefault(name, _empty())
        result = j.get("result")
        key = {"Win": "win", "Tie": "tie", "Lose": "lose"}.get(result, "failed")
        for target in (c, overall):
            target[key] += 1
            for order in ("order1", "order2"):
                o = j.get(f"outcome{order[-1]}")
                target["by_order"][order][o if o in OUTCOMES else "failed"] += 1
    return {"test_sets": {k: _finish(v) for k, v in per.items()}, "overall": _finish(overall),
            "score_labels": dict(SCORE_LABELS)}


__all__ = [
    "JUDGMENT_FIELDS", "JUDGMENT_SCHEMA", "Judge", "OUTCOMES", "RESULTS", "SCORE_LABELS", "combine", "outcome", "pair_answers",
    "parse_pair", "summarize", "name_test_set", "winning_score",
]
