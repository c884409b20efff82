"""Evolution measures (evoray.measures): hand-computed values, MinHash against exact Jaccard,
per-round measures from an evolve stage's tables, per-step measures, the plot and the report."""

from __future__ import annotations

import itertools
import json

import pytest

from evoray.measures import (SetMeasures, distinct_n, evolve_round_measures, jaccard, mean_pairwise_jaccard, measure,
                             minhash, shingles, trajectory_measures, write_evolve_measures, _perms)
from evoray.schema import RESULT_SCHEMA, new_row, result_row
from evoray.sinks import TableSink


def test_distinct_by_hand():
    texts = ["the cat sat", "the cat ran"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran of 6
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # the cat (twice), cat sat, cat ran
    assert distinct_n(["one"], 2) is None


def test_lengths_and_grew():
    m = measure(["a b c d", "a b", "x"], previous=["a b", "a b c", None])
    assert m["rows"] == 3 and m["mean_words"] == pytest.approx(7 / 3) and m["mean_chars"] == pytest.approx(11 / 3)
    assert m["grew"] == pytest.approx(1 / 2)  # 2 rows have a predecessor; one grew
    assert measure(["a"])["grew"] is None


def test_shingles():
    assert shingles("A b c d") == {"a b c", "b c d"}
    assert shingles("hi there") == {"hi there"}
    assert shingles("") == set()


def test_identical_and_disjoint_sets():
    assert measure(["same words here ok"] * 5)["self_similarity"] == 1.0
    texts = [f"w{i}a w{i}b w{i}c w{i}d" for i in range(20)]
    assert measure(texts)["self_similarity"] == pytest.approx(0.0, abs=0.02)


def test_minhash_mean_matches_exact_jaccard():
    base = "write a short poem about the sea and the wind at night".split()
    texts = [" ".join(base[: 6 + i % 6] + [f"extra{i % 3}"]) for i in range(40)]
    sets = [shingles(t) for t in texts]
    exact = sum(jaccard(a, b) for a, b in itertools.combinations(sets, 2)) / (40 * 39 / 2)
    perms = _perms(256, 0)
    est = mean_pairwise_jaccard([minhash(s, perms) for s in sets])
    assert est == pytest.approx(exact, abs=0.05)


def test_pair_counting_is_the_mean_of_pairwise_matches():
    sigs = [(1, 2), (1, 3), (1, 2)]
    # pairs (0,1): 1 of 2 positions match; (0,2): 2 of 2; (1,2): 1 of 2 -> mean (0.5 + 1 + 0.5) / 3
    assert mean_pairwise_jaccard(sigs) == pytest.approx(2 / 3)
    assert mean_pairwise_jaccard(sigs[:1]) is None


def test_samples_are_bounded_and_seeded():
    m = SetMeasures(sample_rows=50, minhash_rows=20, perm=16)
    for i in range(1000):
        m.add(f"instruction number {i} about topic {i % 7}")
    d = m.to_dict()
    assert d["rows"] == 1000 and d["sample_rows"] == 50 and d["minhash_rows"] == 20
    m2 = SetMeasures(sample_rows=50, minhash_rows=20, perm=16)
    for i in range(1000):
        m2.add(f"instruction number {i} about topic {i % 7}")
    assert m2.to_dict() == d


def _evolved(seed_row, traj):
    r = new_row(traj[-1], source="t", meta={"trajectory": traj}, parent_id=seed_row["id"], round=len(traj),
                method_id="m")
    return result_row(r, status="evolved")


def test_evolve_rounds_from_tables(tmp_path):
    seeds = [new_row("add two numbers", source="t"), new_row("name a color please", source="t")]
    evolved = [_evolved(seeds[0], ["add two large numbers", "add two large numbers and explain"]),
               _evolved(seeds[1], ["name a color", "name a warm color now"])]
    rounds = evolve_round_measures([seeds], [evolved[:1], evolved[1:]])
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["mean_words"] == pytest.approx(3.5) and rounds[0]["grew"] is None
    assert rounds[1]["grew"] == pytest.approx(0.5)  # 3 -> 4 grew; 4 -> 3 shrank
    assert rounds[2]["grew"] == pytest.approx(1.0)
    assert rounds[2]["mean_words"] == pytest.approx(5.5)
    # the same through the files an evolve stage writes
    sink = TableSink(tmp_path, "in", "parquet", RESULT_SCHEMA)
    sink.write([result_row(s) for s in seeds])
    sink.close()
    sink = TableSink(tmp_path, "evolved", "jsonl", RESULT_SCHEMA)
    sink.write(evolved)
    sink.close()
    p = write_evolve_measures(tmp_path / "in.parquet", tmp_path / "evolved.jsonl", tmp_path)
    assert json.loads(p.read_text())["rounds"] == json.loads(json.dumps(rounds))


def test_trajectory_measures():
    trajs = [{"seed_id": "a", "steps": [{"round": 1, "instruction": "a b", "evolved": "a b c"},
                                       {"round": 2, "instruction": "a b c", "evolved": None}]},
             {"seed_id": "b", "steps": [{"round": 1, "instruction": "x y z", "evolved": "x"}]}]
    m = trajectory_measures(trajs)
    assert m["rows"] == 2 and m["grew"] == 0.5 and m["mean_words"] == 2


def test_plot_and_report(tmp_path):
    from evoray.plots import measures_plot
    from evoray.report import write_report

    pts = [{"round": 0, "mean_words": 3, "distinct_1": 0.6, "distinct_2": 0.8, "self_similarity": 0.1, "grew": None},
           {"round": 1, "mean_words": 5, "distinct_1": 0.5, "distinct_2": 0.7, "self_similarity": 0.2, "grew": 0.9}]
    png = measures_plot(pts, tmp_path / "m.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    d = tmp_path / "run" / "evolve"
    d.mkdir(parents=True)
    (d / "measures.json").write_text(json.dumps({"rounds": pts}))
    seed = new_row("q", source="t")
    sink = TableSink(d, "evolved", "parquet", RESULT_SCHEMA)
    sink.write([_evolved(seed, ["q more"])])
    sink.close()
    html = write_report(tmp_path / "run").read_text()
    assert "Measures per round" in html and "self-similarity" in html
