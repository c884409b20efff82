"""AlpaGasus selection: threshold or top-k budget, the random baseline, and the score buckets.

Plain lists and sorting only, so a million scores take about a second.

Buckets (scores.json): ``<3``, ``3``, ``3.5``, ``4``, ``4.5``, ``5`` and ``unparsed`` (failed
rows). A score of 3 or more goes to the half point at or below it (``floor(2 * s) / 2``): 3.7 goes
to ``3.5``, 4.49 to ``4``, 4.99 to ``4.5``; only 5 itself is ``5``. So a bucket at or above the
threshold holds exactly the rows kept by it when the threshold is a half point.

Selection modes:

* threshold (``top_k=None``): rows with ``score >= threshold`` are kept, the others rejected.
* budget (``top_k=k``): the best ``k`` rows overall are kept **regardless of the threshold** -
  scores ranked high to low, ties broken by ascending ``id`` - and all others are rejected. With
  fewer than ``k`` scored rows all are kept.

* target (``rate.target_rows`` / ``rate.target_fraction``): the threshold is chosen on the score
  scale so the kept set has the target size: it is the score of the ``k``-th best row, and the
  rows scoring exactly that are taken by ascending ``id`` as in the budget mode, so the size is
  exact even when many rows share the score. :func:`target_k` turns the target into ``k``;
  :func:`chosen_threshold` reports the threshold the rule amounts to.

Both return ids in input order (not rank order), so tables keep the order of the data.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

BUCKETS: tuple[str, ...] = ("<3", "3", "3.5", "4", "4.5", "5", "unparsed")
_SCORED_BUCKETS = BUCKETS[:-1]
# index by int(2 * score) for 3 <= score <= 5: 6 -> "3", 7 -> "3.5", 8 -> "4", 9 -> "4.5", 10 -> "5"
_HALF = {6: "3", 7: "3.5", 8: "4", 9: "4.5", 10: "5"}


def bucket_of(score: float) -> str:
    """The scores.json bucket of one score (see the module docstring for the rule)."""
    if score is None or (isinstance(score, float) and math.isnan(score)):
        return "unparsed"
    if score < 3:
        return "<3"
    return _HALF[min(10, int(math.floor(score * 2)))]


def bucket_counts(scores: Iterable[float], failed_count: int = 0) -> dict[str, int]:
    """Counts per bucket, every bucket present and in :data:`BUCKETS` order.

    ``failed_count`` rows (status failed) go to ``unparsed``; a None or NaN score counts there too.
    """
    counts = [0] * 11  # index int(2 * score) clipped to 0..10; below 6 is "<3"
    unparsed = int(failed_count)
    for s in scores:
        if s is None or s != s:
            unparsed += 1
            continue
        i = int(s * 2) if s > 0 else 0
        counts[10 if i > 10 else i] += 1
    out = {"<3": sum(counts[:6])}
    for i in range(6, 11):
        out[_HALF[i]] = counts[i]
    out["unparsed"] = unparsed
    return out


@dataclass(frozen=True)
class Rule:
    """Which scored rows are kept, as a test on (score, id) alone, so it can be applied to a stream.

    Threshold mode: ``score >= threshold``. Budget mode: ``score > cut``, or ``score == cut`` and
    ``id <= id_cut`` (the ties on the cut taken by ascending id). ``keep_all`` / ``keep_none`` are
    the budget's edge cases (k at least n, k = 0).
    """

    threshold: float | None = None
    cut: float | None = None
    id_cut: str | None = None
    keep_all: bool = False
    keep_none: bool = False

    def keeps(self, score: float | None, id_: str) -> bool:
        if self.keep_all or self.keep_none:
            return self.keep_all
        if score is None or score != score:
            return False
        if self.threshold is not None:
            return score >= self.threshold
        return score > self.cut or (score == self.cut and self.id_cut is not None and id_ <= self.id_cut)

    def mask(self, scores, ids):
        """The same test over Arrow arrays (a null or NaN score is not kept)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        n = len(scores)
        if self.keep_all or self.keep_none:
            return pa.array([self.keep_all] * n, pa.bool_())
        if self.threshold is not None:
            m = pc.greater_equal(scores, self.threshold)
        else:
            m = pc.greater(scores, self.cut)
            if self.id_cut is not None:
                m = pc.or_(m, pc.and_(pc.equal(scores, self.cut), pc.less_equal(ids, self.id_cut)))
        return pc.fill_null(m, False)


def plan(scores: Sequence[float], threshold: float = 4.5, top_k: int | None = None) -> tuple[Rule, int]:
    """First pass of a selection, from the scores alone: ``(rule, ties_to_take)``.

    In budget mode with ties on the cut, the rule still lacks ``id_cut``: collect the ids whose
    score equals ``rule.cut`` and finish with :func:`finish` (``ties_to_take`` of them are kept).
    """
    if top_k is None:
        return Rule(threshold=threshold), 0
    if top_k < 0:
        raise ValueError("top_k must be at least 0")
    n = len(scores)
    if top_k >= n:
        return Rule(keep_all=True), 0
    if top_k == 0:
        return Rule(keep_none=True), 0
    import numpy as np

    arr = np.asarray(scores, dtype=np.float64)
    cut = float(np.partition(arr, n - top_k)[n - top_k])  # the k-th best score
    above = int(np.count_nonzero(arr > cut))
    return Rule(cut=cut), top_k - above


def finish(rule: Rule, ties_to_take: int, ids_on_cut: Sequence[str]) -> Rule:
    """The budget rule with ``id_cut``: the ``ties_to_take``-th smallest id among the ties."""
    if rule.cut is None or ties_to_take <= 0:
        return rule
    return dataclasses.replace(rule, id_cut=sorted(ids_on_cut)[ties_to_take - 1])


def select(
    scored: Sequence[tuple[str, float]],
    threshold: float = 4.5,
    top_k: int | None = None,
) -> tuple[list[str], list[str]]:
    """(kept_ids, rejected_ids) from ``(id, score)`` pairs of scored rows; both in input order.

    ``top_k=None``: keep ``score >= threshold``. ``top_k=k``: keep exactly the best ``min(k, n)``
    rows regardless of ``threshold`` (the budget mode), ranking by score descending and breaking
    ties by ascending id, so the choice does not depend on input order. The same :class:`Rule`
    drives the streaming selection of the rate stage.
    """
    rule, take = plan([s for _, s in scored], threshold=threshold, top_k=top_k)
    rule = finish(rule, take, [i for i, s in scored if s == rule.cut])
    kept: list[str] = []
    rejected: list[str] = []
    for i, s in scored:
        (kept if rule.keeps(s, i) else rejected).append(i)
    return kept, rejected


def target_k(n_scored: int, target_rows: int | None = None, target_fraction: float | None = None) -> int:
    """The number of rows to keep for a target: ``target_rows`` itself, or ``target_fraction`` of the
    scored rows rounded to the nearest row (half up); never more than the scored rows."""
    if (target_rows is None) == (target_fraction is None):
        raise ValueError("give exactly one of target_rows and target_fraction")
    if target_rows is not None:
        if target_rows < 0:
            raise ValueError("target_rows must be at least 0")
        return min(int(target_rows), n_scored)
    if not 0 <= target_fraction <= 1:
        raise ValueError("target_fraction must be between 0 and 1")
    return min(int(math.floor(target_fraction * n_scored + 0.5)), n_scored)


def chosen_threshold(rule: Rule, scores: Sequence[float]) -> float | None:
    """The score-scale threshold a budget rule amounts to: its cut, or the lowest score when every
    row is kept; None when nothing is kept (or nothing was scored)."""
    if rule.threshold is not None:
        return rule.threshold
    if rule.cut is not None:
        return float(rule.cut)
    if rule.keep_all and len(scores):
        return float(min(scores))
    return None


def auto_select(scored: Sequence[tuple[str, float]], target_rows: int | None = None,
                target_fraction: float | None = None) -> tuple[list[str], list[str], float | None]:
    """:func:`select` for a target size: ``(kept_ids, rejected_ids, chosen threshold)``."""
    k = target_k(len(scored), target_rows, target_fraction)
    kept, rejected = select(scored, top_k=k)
    rule, _ = plan([s for _, s in scored], top_k=k)
    return kept, rejected, chosen_threshold(rule, [s for _, s in scored])


def random_positions(n: int, k: int, seed: int = 0) -> list[int]:
    """Positions (in sorted-id order) of the random baseline: the same draw as :func:`random_baseline`."""
    if k < 0:
        raise ValueError("k must be at least 0")
    return sorted(random.Random(seed).sample(range(n), min(k, n)))


def random_baseline(ids: Iterable[str], k: int, seed: int = 0) -> list[str]:
    """A seeded random subset of ``min(k, len(ids))`` ids (the paper's random-subset baseline).

    The ids are sorted before sampling, so the subset depends on the set of ids and the seed only,
    not on the order rows came back from the workers. Returned in sorted id order.
    """
    pool = sorted(ids)
    return [pool[j] for j in random_positions(len(pool), k, seed)]


__all__ = ["BUCKETS", "Rule", "auto_select", "bucket_counts", "bucket_of", "chosen_threshold", "finish", "plan",
           "random_baseline", "random_positions", "select", "target_k"]
