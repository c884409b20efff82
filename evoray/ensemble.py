"""A rater ensemble: every row rated by every provider of the ``rater`` role (``rate.ensemble: all``).

:class:`EnsembleRater` asks each provider through its own client (each with its own rate limits,
cache entries and ledger lines) and writes one result row: ``score`` is the ensemble's score under
``rate.ensemble_rule``, so the selection (threshold, ``top_k``, target size) is unchanged:

* ``mean``: the mean of the raters' scores;
* ``min``: the lowest score (kept only when every rater is at the threshold);
* ``majority``: the ``(n // 2 + 1)``-th highest score, the highest score that more than half of the
  raters reach; ``score >= threshold`` is then exactly "more than half of the raters scored at least
  the threshold".

The per-rater scores travel in the row's ``raw`` column as JSON (``{"ensemble": [{provider, model,
score, explanation}, ...]}``); ``provider`` / ``model`` list the raters. A row is failed when any
rater failed on it (reason ``rater NAME: ...``): the rule is over all the raters, never a subset.

Agreement (:class:`EnsembleStats`, for scores.json): per-rater histograms (the scores.json buckets),
Fleiss' kappa on integer buckets (a score rounded half up to 0..5), the mean pairwise Spearman
correlation of the scores (average ranks for ties), and the rows the raters disagree on most (the
largest spread, highest minus lowest). Plain Python, no numpy: the kappa is accumulated row by row,
and the scores are kept as ``array('d')`` (8 bytes per rater and row) for the rank correlations.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import math
from array import array
from typing import Any, Iterable, Sequence

from .schema import result_row
from .selection import bucket_counts

RULES = ("mean", "min", "majority")
CATEGORIES = 6  # integer buckets 0..5


def combine(scores: Sequence[float], rule: str) -> float:
    """The ensemble score of one row's rater scores (see the module docstring)."""
    if not scores:
        raise ValueError("no scores to combine")
    if rule == "mean":
        return sum(scores) / len(scores)
    if rule == "min":
        return min(scores)
    if rule == "majority":
        return sorted(scores, reverse=True)[len(scores) // 2]
    raise ValueError(f"unknown ensemble rule '{rule}' (known: {', '.join(RULES)})")


class EnsembleRater:
    """Rates each row with every rater (``{provider name: Rater}``) at once; one result row."""

    def __init__(self, raters: dict[str, Any], rule: str = "mean"):
        if not raters:
            raise ValueError("an ensemble needs at least one rater")
        combine([1.0], rule)  # an unknown rule fails here, not on the first row
        self.raters = raters
        self.rule = rule

    async def rate(self, row: dict[str, Any]) -> dict[str, Any]:
        names = list(self.raters)
        # every rater's call is awaited to its end even when one stops the job (StopJob), then that is raised
        outs = await asyncio.gather(*(self.raters[n].rate(row) for n in names), return_exceptions=True)
        for o in outs:
            if isinstance(o, BaseException):
                raise o
        attempts = sum(int(o.get("attempts") or 0) for o in outs)
        providers = ",".join(str(o.get("provider") or n) for n, o in zip(names, outs))
        models = ",".join(str(o.get("model") or "?") for o in outs)
        for n, o in zip(names, outs):
            if o.get("status") != "scored":
                return result_row(row, status="failed", reason=f"rater {n}: {o.get('reason')}", attempts=attempts,
                                  raw=o.get("raw"), provider=providers, model=models, score=None, explanation=None)
        per = [{"provider": n, "model": o.get("model"), "score": o["score"], "explanation": o.get("explanation")}
               for n, o in zip(names, outs)]
        score = combine([p["score"] for p in per], self.rule)
        expl = "\n".join(f"[{p['provider']} {p['score']:g}] {p['explanation'] or ''}".rstrip() for p in per)
        return result_row(row, status="scored", score=score, explanation=expl, provider=providers, model=models,
                          reason=None, attempts=attempts, raw=json.dumps({"ensemble": per}, ensure_ascii=False))

    async def rate_batch(self, rows: Sequence[dict[str, Any]], concurrency: int = 16) -> list[dict[str, Any]]:
        from .rating import run_bounded

        return await run_bounded(self.rate, rows, concurrency)


def per_rater_scores(raw: str | None) -> dict[str, float] | None:
    """``{provider: score}`` from an ensemble row's ``raw`` column, or None for another row."""
    if not raw:
        return None
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("ensemble"), list):
        return None
    return {str(p["provider"]): float(p["score"]) for p in obj["ensemble"]}


# ---- agreement --------------------------------------------------------------------------------------

def integer_bucket(score: float) -> int:
    """A score's integer bucket for Fleiss' kappa: rounded half up, clipped to 0..5."""
    return max(0, min(CATEGORIES - 1, int(math.floor(score + 0.5))))


def fleiss_kappa(counts: Iterable[Sequence[int]]) -> float | None:
    """Fleiss' kappa from per-row category counts (every row rated by the same number of raters).

    None when it is undefined: no rows, fewer than two raters, or every rating in one category."""
    acc = _Fleiss()
    for row in counts:
        acc.add(row)
    return acc.value()


class _Fleiss:
    def __init__(self) -> None:
        self.rows = 0
        self.raters: int | None = None
        self.sum_p = 0.0
        self.totals: list[int] = []

    def add(self, row: Sequence[int]) -> None:
        n = sum(row)
        if self.raters is None:
            self.raters = n
            self.totals = [0] * len(row)
        elif n != self.raters:
            raise ValueError(f"every row needs the same number of ratings ({self.raters}), got {n}")
        if n < 2:
            return
        self.rows += 1
        self.sum_p += (sum(c * c for c in row) - n) / (n * (n - 1))
        for j, c in enumerate(row):
            self.totals[j] += c

    def value(self) -> float | None:
        if not self.rows or not self.raters or self.raters < 2:
            return None
        total = self.rows * self.raters
        p_bar = self.sum_p / self.rows
        p_e = sum((t / total) ** 2 for t in self.totals)
        if p_e >= 1.0:
            return None
        return (p_bar - p_e) / (1 - p_e)


def ranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(xs)), key=xs.__getitem__)
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        avg = (i + j) / 2 + 1
        for k in range(i, j + 1):
            out[order[k]] = avg
        i = j + 1
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    n = len(x)
    if n != len(y):
        raise ValueError("x and y differ in length")
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); None when a side is constant."""
    return pearson(ranks(x), ranks(y))


class EnsembleStats:
    """Agreement of the raters over the scored rows, fed batch by batch (see the module docstring)."""

    def __init__(self, raters: Sequence[str], rule: str, top: int = 10):
        self.raters = list(raters)
        self.rule = rule
        self.top = top
        self.scores = {r: array("d") for r in self.raters}
        self._fleiss = _Fleiss()
        self._worst: list[tuple[float, str, dict]] = []  # a min-heap of (spread, id, row) of size `top`

    def add(self, id_: str, instruction: str | None, per: dict[str, float]) -> None:
        if set(per) != set(self.raters):
            return
        vals = [per[r] for r in self.raters]
        for r, v in zip(self.raters, vals):
            self.scores[r].append(v)
        cats = [0] * CATEGORIES
        for v in vals:
            cats[integer_bucket(v)] += 1
        self._fleiss.add(cats)
        spread = max(vals) - min(vals)
        item = (spread, _neg_id(id_), {"id": id_, "instruction": (instruction or "")[:300], "spread": spread,
                                       "scores": dict(zip(self.raters, vals))})
        if len(self._worst) < self.top:
            heapq.heappush(self._worst, item)
        elif item[:2] > self._worst[0][:2]:
            heapq.heapreplace(self._worst, item)

    def add_table(self, table) -> None:
        """The scored rows of a pyarrow table (columns id, instruction, raw)."""
        for id_, ins, raw in zip(table.column("id").to_pylist(), table.column("instruction").to_pylist(),
                                 table.column("raw").to_pylist()):
            per = per_rater_scores(raw)
            if per is not None:
                self.add(id_, ins, per)

    def to_dict(self) -> dict[str, Any]:
        pairs = {}
        for i, a in enumerate(self.raters):
            for b in self.raters[i + 1:]:
                pairs[f"{a}|{b}"] = spearman(self.scores[a], self.scores[b])
        defined = [v for v in pairs.values() if v is not None]
        worst = sorted(self._worst, key=lambda t: (-t[0], t[2]["id"]))
        return {
            "rule": self.rule,
            "raters": self.raters,
            "rows": len(self.scores[self.raters[0]]) if self.raters else 0,
            "histograms": {r: bucket_counts(self.scores[r]) for r in self.raters},
            "mean_scores": {r: (sum(s) / len(s) if len(s) else None) for r, s in self.scores.items()},
            "fleiss_kappa": self._fleiss.value(),
            "spearman_mean": sum(defined) / len(defined) if defined else None,
            "spearman_pairs": pairs,
            "disagreements": [t[2] for t in worst],
        }


def _neg_id(id_: str) -> tuple:
    # equal spreads: the smaller id ranks as the bigger disagreement (a stable, order-free choice)
    return tuple(-ord(c) for c in id_) + (1,)


__all__ = ["CATEGORIES", "RULES", "EnsembleRater", "EnsembleStats", "combine", "fleiss_kappa", "integer_bucket",
           "pearson", "per_rater_scores", "ranks", "spearman"]
