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

Both return ids in input order (not rank order), so tables keep the order of the data.
"""

from __future__ import annotations

import math
import random
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


def select(
    scored: Sequence[tuple[str, float]],
    threshold: float = 4.5,
    top_k: int | None = None,
) -> tuple[list[str], list[str]]:
    """(kept_ids, rejected_ids) from ``(id, score)`` pairs of scored rows; both in input order.

    ``top_k=None``: keep ``score >= threshold``. ``top_k=k``: keep exactly the best ``min(k, n)``
    rows regardless of ``threshold`` (the budget mode), ranking by score descending and breaking
    ties by ascending id, so the choice does not depend on input order.
    """
    if top_k is None:
        kept = [i for i, s in scored if s >= threshold]
        rejected = [i for i, s in scored if not s >= threshold]
        return kept, rejected
    if top_k < 0:
        raise ValueError("top_k must be at least 0")
    n = len(scored)
    if top_k >= n:
        return [i for i, _ in scored], []
    if top_k == 0:
        return [], [i for i, _ in scored]
    # the k-th best score is the cut; rows above it are in, rows on it are taken by ascending id
    cut = sorted((s for _, s in scored), reverse=True)[top_k - 1]
    above = sum(1 for _, s in scored if s > cut)
    on_cut = sorted((scored[j][0], j) for j in range(n) if scored[j][1] == cut)
    take = {j for _, j in on_cut[: top_k - above]}
    kept: list[str] = []
    rejected: list[str] = []
    for j, (i, s) in enumerate(scored):
        (kept if s > cut or j in take else rejected).append(i)
    return kept, rejected


def random_baseline(ids: Iterable[str], k: int, seed: int = 0) -> list[str]:
    """A seeded random subset of ``min(k, len(ids))`` ids (the paper's random-subset baseline).

    The ids are sorted before sampling, so the subset depends on the set of ids and the seed only,
    not on the order rows came back from the workers. Returned in sorted id order.
    """
    pool = sorted(ids)
    if k < 0:
        raise ValueError("k must be at least 0")
    chosen = random.Random(seed).sample(pool, min(k, len(pool)))
    return sorted(chosen)


__all__ = ["BUCKETS", "bucket_counts", "bucket_of", "random_baseline", "select"]
