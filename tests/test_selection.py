"""AlpaGasus selection: the paper's histogram, top-k budget, random baseline, buckets, and the plots."""

from __future__ import annotations

import random

import pytest

from evoray.plots import failure_rate_plot, score_histogram, wtl_bar_chart
from evoray.selection import BUCKETS, bucket_counts, bucket_of, random_baseline, select

# ChatGPT's scores on Alpaca in the AlpaGasus paper (below 3: one row; we use 2.5 for it)
PAPER = {2.5: 1, 3.0: 1550, 3.5: 10811, 4.0: 30240, 4.5: 9218, 5.0: 11}


def paper_scores(seed: int = 0) -> list[tuple[str, float]]:
    scores = [s for s, n in PAPER.items() for _ in range(n)]
    random.Random(seed).shuffle(scores)
    return [(f"row{i:06d}", s) for i, s in enumerate(scores)]


def test_paper_histogram_threshold_keeps_9229():
    scored = paper_scores()
    kept, rejected = select(scored, threshold=4.5)
    assert len(kept) == 9229
    assert len(kept) + len(rejected) == len(scored) == 51831
    assert not set(kept) & set(rejected)
    by_id = dict(scored)
    assert all(by_id[i] >= 4.5 for i in kept) and all(by_id[i] < 4.5 for i in rejected)
    # input order is kept
    pos = {i: n for n, (i, _) in enumerate(scored)}
    assert [pos[i] for i in kept] == sorted(pos[i] for i in kept)


def test_paper_bucket_counts():
    scored = paper_scores()
    counts = bucket_counts([s for _, s in scored], failed_count=171)
    assert counts == {"<3": 1, "3": 1550, "3.5": 10811, "4": 30240, "4.5": 9218, "5": 11, "unparsed": 171}
    assert list(counts) == list(BUCKETS)


@pytest.mark.parametrize(
    "score, bucket",
    [(0, "<3"), (2.99, "<3"), (3, "3"), (3.2, "3"), (3.5, "3.5"), (3.7, "3.5"), (4, "4"), (4.49, "4"),
     (4.5, "4.5"), (4.99, "4.5"), (5, "5"), (None, "unparsed"), (float("nan"), "unparsed")],
)
def test_bucket_rule(score, bucket):
    assert bucket_of(score) == bucket
    counts = bucket_counts([score])
    assert counts[bucket] == 1 and sum(counts.values()) == 1


def test_top_k_exact_and_ties_by_id():
    scored = [("e", 4.5), ("b", 5.0), ("d", 4.5), ("a", 4.5), ("c", 3.0), ("f", 4.0)]
    kept, rejected = select(scored, top_k=3)
    assert sorted(kept) == ["a", "b", "d"]  # 5.0, then the 4.5 ties by id: a, d (not e)
    assert kept == ["b", "d", "a"]  # returned in input order
    assert sorted(rejected) == ["c", "e", "f"]
    # the same choice whatever the input order
    for seed in range(5):
        shuffled = scored[:]
        random.Random(seed).shuffle(shuffled)
        assert sorted(select(shuffled, top_k=3)[0]) == ["a", "b", "d"]


def test_top_k_ignores_threshold_and_caps_at_n():
    scored = [("a", 2.0), ("b", 3.0), ("c", 1.0)]
    kept, rejected = select(scored, threshold=4.5, top_k=2)
    assert sorted(kept) == ["a", "b"] and rejected == ["c"]
    kept, rejected = select(scored, top_k=10)
    assert sorted(kept) == ["a", "b", "c"] and rejected == []
    assert select(scored, top_k=0) == ([], ["a", "b", "c"])


def test_top_k_on_paper_histogram_gives_exactly_k():
    scored = paper_scores()
    for k in (1, 11, 12, 5000, 9229, 9230, 40000):
        kept, rejected = select(scored, top_k=k)
        assert len(kept) == k and len(kept) + len(rejected) == len(scored)
    kept, _ = select(scored, top_k=9229)
    assert sorted(kept) == sorted(select(scored, threshold=4.5)[0])


def test_random_baseline_seeded_same_size():
    ids = [f"row{i}" for i in range(1000)]
    a = random_baseline(ids, 100, seed=1)
    assert len(a) == len(set(a)) == 100 and set(a) <= set(ids)
    assert a == random_baseline(list(reversed(ids)), 100, seed=1)  # order of the input does not matter
    assert a != random_baseline(ids, 100, seed=2)
    assert len(random_baseline(ids, 5000, seed=1)) == 1000
    kept, _ = select(paper_scores(), threshold=4.5)
    base = random_baseline([i for i, _ in paper_scores()], len(kept), seed=0)
    assert len(base) == len(kept) == 9229


# ---- plots ------------------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n"


def test_score_histogram_png(tmp_path):
    counts = bucket_counts([s for _, s in paper_scores()], failed_count=171)
    p = score_histogram(counts, tmp_path / "sub" / "scores.png")
    assert p.exists() and p.stat().st_size > 1000 and p.read_bytes()[:8] == PNG


def test_wtl_bar_chart_png(tmp_path):
    summary = {
        "test_sets": {
            "vicuna": {"win": 40, "tie": 20, "lose": 20, "failed": 0, "n": 80, "winning_score": 1.25},
            "koala": {"win": 60, "tie": 60, "lose": 55, "failed": 5, "n": 175, "winning_score": 1.03},
        },
        "overall": {"win": 100, "tie": 80, "lose": 75, "failed": 5, "n": 255, "winning_score": 1.1},
    }
    p = wtl_bar_chart(summary, tmp_path / "wtl.png")
    assert p.exists() and p.stat().st_size > 1000 and p.read_bytes()[:8] == PNG


def test_failure_rate_plot_png(tmp_path):
    steps = [
        {"step": 0, "failure_rate": 0.4},
        {"step": 1, "candidates": [{"failure_rate": 0.35}, {"failure_rate": 0.5}, 0.3]},
        {"step": 2, "candidates": [0.28, 0.33], "best_failure_rate": 0.28},
    ]
    p = failure_rate_plot(steps, tmp_path / "failure_rate.png")
    assert p.exists() and p.stat().st_size > 1000 and p.read_bytes()[:8] == PNG
    empty = failure_rate_plot([], tmp_path / "empty.png")
    assert empty.stat().st_size > 0


def test_optimize_failure_rate_plot_from_history(tmp_path):
    from evoray.plots import optimize_failure_rate_plot

    hist = {"baseline_failure_rate": 0.4,
            "steps": [{"step": 1, "candidates": [{"failure_rate": 0.3}, {"failure_rate": 0.5}],
                       "chosen_failure_rate": 0.3, "best_failure_rate": 0.3},
                      {"step": 2, "candidates": [{"failure_rate": 0.35}], "chosen_failure_rate": 0.35,
                       "best_failure_rate": 0.3}]}
    p = optimize_failure_rate_plot(hist, tmp_path / "failure_rate.png")
    assert p.exists() and p.stat().st_size > 1000 and p.read_bytes()[:8] == PNG
    assert optimize_failure_rate_plot({}, tmp_path / "none.png").stat().st_size > 0


@pytest.mark.parametrize("top_k", [None, 0, 1, 37, 250, 999, 5000])
def test_streamed_rule_over_arrow_batches_matches_select(top_k):
    """The rate stage applies the rule batch by batch to Arrow columns: same rows as select()."""
    import pyarrow as pa

    from evoray.selection import finish, plan

    rng = random.Random(top_k or 0)
    scored = [(f"id-{rng.randrange(10**6):07d}-{j}", rng.choice([2.0, 3.5, 4.0, 4.5, 4.5, 5.0])) for j in range(1000)]
    kept, _ = select(scored, threshold=4.5, top_k=top_k)
    rule, take = plan([s for _, s in scored], threshold=4.5, top_k=top_k)
    ties = []
    for b in range(0, 1000, 128):  # the ties are gathered batch by batch too
        ties += [i for i, s in scored[b:b + 128] if s == rule.cut]
    rule = finish(rule, take, ties)
    streamed = []
    for b in range(0, 1000, 128):
        part = scored[b:b + 128]
        m = rule.mask(pa.array([s for _, s in part], pa.float64()), pa.array([i for i, _ in part]))
        streamed += [i for (i, _), k in zip(part, m.to_pylist()) if k]
    assert streamed == kept
    assert len(kept) == (min(top_k, 1000) if top_k is not None else sum(s >= 4.5 for _, s in scored))


def test_rule_mask_sends_null_scores_to_rejected():
    import pyarrow as pa

    from evoray.selection import Rule

    m = Rule(threshold=4.5).mask(pa.array([5.0, None, float("nan"), 4.5]), pa.array(["a", "b", "c", "d"]))
    assert m.to_pylist() == [True, False, False, True]


# ---- a target size: the threshold chosen so the kept set has that size --------------------------------

from evoray.selection import auto_select, chosen_threshold, plan, target_k  # noqa: E402


def test_target_k_rows_and_fraction():
    assert target_k(10, target_rows=3) == 3
    assert target_k(10, target_rows=30) == 10
    assert target_k(10, target_fraction=0.25) == 3  # 2.5 rounds half up
    assert target_k(10, target_fraction=0.24) == 2
    assert target_k(0, target_fraction=0.5) == 0
    with pytest.raises(ValueError):
        target_k(10)
    with pytest.raises(ValueError):
        target_k(10, target_rows=1, target_fraction=0.1)


def test_auto_threshold_breaks_ties_by_id_like_top_k():
    scored = [("e", 5.0), ("d", 4.5), ("c", 4.5), ("a", 4.5), ("b", 4.0), ("f", 3.0)]
    kept, rejected, thr = auto_select(scored, target_rows=3)
    assert thr == 4.5 and kept == ["e", "c", "a"] and rejected == ["d", "b", "f"]  # input order, ties by ascending id
    assert kept == select(scored, top_k=3)[0]
    kept, _, thr = auto_select(scored, target_fraction=0.5)
    assert thr == 4.5 and len(kept) == 3
    kept, _, thr = auto_select(scored, target_rows=5)
    assert thr == 4.0 and len(kept) == 5
    kept, _, thr = auto_select(scored, target_rows=6)
    assert thr == 3.0 and len(kept) == 6
    kept, _, thr = auto_select(scored, target_rows=0)
    assert thr is None and kept == []


def test_auto_threshold_on_paper_histogram():
    scored = paper_scores()
    kept, _, thr = auto_select(scored, target_rows=9229)
    assert thr == 4.5 and sorted(kept) == sorted(select(scored, threshold=4.5)[0])
    kept, _, thr = auto_select(scored, target_fraction=0.1)
    assert len(kept) == round(0.1 * len(scored)) and thr == 4.5  # the 4.5 bucket holds the cut


def test_chosen_threshold_of_rules():
    rule, _ = plan([1.0, 2.0], top_k=5)
    assert chosen_threshold(rule, [1.0, 2.0]) == 1.0
    rule, _ = plan([], top_k=0)
    assert chosen_threshold(rule, []) is None
    rule, _ = plan([1.0], threshold=4.0)
    assert chosen_threshold(rule, [1.0]) == 4.0
