"""The rater ensemble (``rate.ensemble: all``): combining rules, the ensemble rater on scripted
providers, Fleiss' kappa and Spearman against hand-computed values, scores.json and the report.
No Ray: the pool is replaced by a runner that writes the scored rows."""

from __future__ import annotations

import asyncio
import json
import math
from types import SimpleNamespace

import pytest

from evoray.stagedefs import rate as rate_stage  # the rate stage's module (its driver and selection)
from evoray.config import JobConfig, RateConfig
from evoray.ensemble import (EnsembleRater, EnsembleStats, combine, fleiss_kappa, integer_bucket, per_rater_scores,
                             ranks, spearman)
from evoray.rating import Rater
from evoray.schema import RESULT_SCHEMA, new_row, result_row
from evoray.sinks import TableSink
from evoray.testing.scripted import ScriptedProvider, scripted_client


def run(coro):
    return asyncio.run(coro)


# ---- combining --------------------------------------------------------------------------------------

def test_combine_rules():
    assert combine([5, 4, 3], "mean") == 4
    assert combine([5, 4, 3], "min") == 3
    assert combine([5, 4, 3], "majority") == 4  # 2 of 3 reach 4; only 1 reaches 5
    assert combine([5, 4.5, 4.5, 3], "majority") == 4.5  # 3 of 4 reach 4.5
    assert combine([5, 4.5, 3, 3], "majority") == 3  # only 2 of 4 reach 4.5: not more than half
    assert combine([5, 3], "majority") == 3  # both must agree when there are two
    with pytest.raises(ValueError, match="known: mean, min, majority"):
        combine([1], "median")


@pytest.mark.parametrize("scores", [[5, 4.5, 3], [4.5, 4.5, 2, 5], [3, 3, 5, 5, 4.5], [4.5, 4.4]])
def test_majority_score_at_threshold_means_more_than_half_reach_it(scores):
    for t in (3, 4.4, 4.5, 5):
        assert (combine(scores, "majority") >= t) == (sum(s >= t for s in scores) > len(scores) / 2)


# ---- the ensemble rater --------------------------------------------------------------------------

def _rater(name, *replies):
    prov = ScriptedProvider(name=name, model=f"{name}-model").enqueue(*replies)
    return Rater(scripted_client(prov), RateConfig(parse_retries=0))


def test_ensemble_rater_asks_every_rater_once_and_combines():
    e = EnsembleRater({"a": _rater("a", "5\ngood"), "b": _rater("b", "4\nok"), "c": _rater("c", "3\nmeh")}, "majority")
    out = run(e.rate(new_row("q", output="a")))
    assert out["status"] == "scored" and out["score"] == 4
    assert out["provider"] == "a,b,c" and out["model"] == "a-model,b-model,c-model"
    assert per_rater_scores(out["raw"]) == {"a": 5.0, "b": 4.0, "c": 3.0}
    assert "[a 5] good" in out["explanation"] and out["attempts"] == 3


def test_ensemble_row_fails_when_a_rater_fails():
    e = EnsembleRater({"a": _rater("a", "5"), "b": _rater("b", "no idea")}, "mean")
    out = run(e.rate(new_row("q", output="a")))
    assert out["status"] == "failed" and out["reason"] == "rater b: unparseable reply" and out["score"] is None


# ---- agreement: hand-computed values ---------------------------------------------------------------

def test_fleiss_kappa_wikipedia_example():
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories; P = 0.378, Pe = 0.213
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-5)


def test_fleiss_kappa_small_by_hand():
    # raters A = 5, 4, 3 and B = 5, 3, 3: rows agree, disagree, agree: P = 2/3; p5 = 2/6, p4 = 1/6,
    # p3 = 3/6: Pe = 14/36; kappa = (2/3 - 7/18) / (1 - 7/18) = 5/11
    st = EnsembleStats(["A", "B"], "mean")
    for i, (a, b) in enumerate([(5, 5), (4, 3), (3, 3)]):
        st.add(f"r{i}", "x", {"A": a, "B": b})
    assert st.to_dict()["fleiss_kappa"] == pytest.approx(5 / 11)
    assert fleiss_kappa([[0, 2], [0, 2]]) is None  # every rating in one category: undefined
    assert fleiss_kappa([]) is None


def test_integer_bucket():
    assert [integer_bucket(s) for s in (0, 0.49, 0.5, 3.7, 4.5, 5)] == [0, 0, 1, 4, 5, 5]


def test_spearman_by_hand():
    assert ranks([10, 20, 20, 5]) == [2, 3.5, 3.5, 1]
    # ranks of y: 1, 2, 3.5, 5, 3.5; sum dx*dy = 8, sum dx^2 = 10, sum dy^2 = 9.5
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3], [3, 5, 9]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [4, 4, 4]) is None


def test_stats_histograms_pairs_and_disagreements():
    st = EnsembleStats(["a", "b", "c"], "mean", top=2)
    data = [("r1", (5, 5, 5)), ("r2", (5, 2, 4)), ("r3", (4.5, 4, 3)), ("r4", (3, 1, 5)), ("r5", (4, 4, 4))]
    for id_, (a, b, c) in data:
        st.add(id_, f"ins {id_}", {"a": a, "b": b, "c": c})
    st.add("partial", "x", {"a": 5})  # not rated by all: left out
    d = st.to_dict()
    assert d["rows"] == 5
    assert d["histograms"]["a"] == {"<3": 0, "3": 1, "3.5": 0, "4": 1, "4.5": 1, "5": 2, "unparsed": 0}
    assert set(d["spearman_pairs"]) == {"a|b", "a|c", "b|c"}
    assert d["spearman_mean"] == pytest.approx(sum(d["spearman_pairs"].values()) / 3)
    assert [x["id"] for x in d["disagreements"]] == ["r4", "r2"]  # spreads 4 and 3
    assert d["disagreements"][0]["scores"] == {"a": 3, "b": 1, "c": 5}
    json.dumps(d)


def test_disagreement_ties_broken_by_id():
    st = EnsembleStats(["a", "b"], "min", top=2)
    for id_ in ("z", "b", "m"):
        st.add(id_, "", {"a": 5, "b": 1})
    assert [x["id"] for x in st.to_dict()["disagreements"]] == ["b", "m"]


# ---- config ---------------------------------------------------------------------------------------

def _cfg(**rate):
    return JobConfig.model_validate({
        "providers": [{"name": "a", "kind": "openai", "model": "m1"}, {"name": "b", "kind": "anthropic", "model": "m2"}],
        "roles": {"rater": ["a", "b"]}, "rate": rate})


def test_config_ensemble_checks():
    assert RateConfig().ensemble == "one" and RateConfig().ensemble_rule == "mean"  # the default is unchanged
    assert _cfg(ensemble="all", ensemble_rule="majority").rate.ensemble_rule == "majority"
    with pytest.raises(ValueError, match="at least two providers in roles.rater"):
        JobConfig.model_validate({"providers": [{"name": "a", "kind": "openai", "model": "m"}],
                                  "rate": {"ensemble": "all"}})
    with pytest.raises(ValueError, match="online only"):
        _cfg(ensemble="all", mode="batch")
    with pytest.raises(ValueError):
        _cfg(ensemble_rule="median")


def test_build_clients_adds_one_client_per_rater(fake_key):
    from evoray.client import LocalGate
    from evoray.gate import Gatekeeper
    from evoray.runtime import build_clients

    cfg = _cfg(ensemble="all")
    gate = LocalGate(Gatekeeper(cfg.providers))
    clients = build_clients(cfg, ["rater"], gate, cache=False)
    assert set(clients) == {"rater", "rater:a", "rater:b"}
    assert list(clients["rater:b"].providers) == ["b"]
    assert set(build_clients(_cfg(), ["rater"], gate, cache=False)) == {"rater"}


def test_rate_worker_is_the_ensemble_with_ensemble_all():
    from evoray.workers import lookup

    cfg = _cfg(ensemble="all", ensemble_rule="min", parse_retries=0)
    clients = {"rater": None, "rater:a": scripted_client(ScriptedProvider(name="a").enqueue({"score": 5, "explanation": "e"})),
               "rater:b": scripted_client(ScriptedProvider(name="b").enqueue({"score": 4, "explanation": "e"}))}
    _, factory = lookup("rate")
    out = run(factory(cfg, clients, {})(new_row("q", output="x")))
    assert out["score"] == 4 and per_rater_scores(out["raw"]) == {"a": 5.0, "b": 4.0}


# ---- the stage's selection pass and scores.json, and the report --------------------------------------

def _fake_runner(rows):
    def runner(ctx, stage, worker, input_path, outdir, tables, n_actors, formats=None, **kw):
        sink = TableSink(outdir, "_scored", "parquet", RESULT_SCHEMA)
        sink.write(rows)
        sink.close()
        return {"input": len(rows), "scored": len(rows), "failed": 0, "_scored": len(rows)}
    return lambda ctx, stage: runner


def _ensemble_rows():
    out = []
    for i, per in enumerate([(5, 5), (5, 3), (4.5, 4.5), (2, 5)]):
        raw = json.dumps({"ensemble": [{"provider": "a", "score": per[0]}, {"provider": "b", "score": per[1]}]})
        out.append(result_row(new_row(f"q{i}", source="t"), status="scored", score=min(per), raw=raw))
    return out


def test_stage_feeds_the_stats_and_report_shows_disagreements(tmp_path, monkeypatch):
    from evoray.report import _ensemble_html

    monkeypatch.setattr(rate_stage, "stage_runner", _fake_runner(_ensemble_rows()))
    cfg = _cfg(ensemble="all", ensemble_rule="min", target_rows=2)
    cfg.ray.rater_actors = 1
    st = EnsembleStats(["a", "b"], "min")
    counts = rate_stage._rate_budget(SimpleNamespace(config=cfg), tmp_path / "in.parquet", tmp_path, lambda s: None,
                                 st.add_table)
    assert counts["kept"] == 2 and counts["threshold_chosen"] == 4.5
    d = st.to_dict()
    assert d["rows"] == 4 and d["disagreements"][0]["scores"] == {"a": 2.0, "b": 5.0}
    html = _ensemble_html(d)
    assert "Rows the raters disagree on most" in html and "q3" in html and "Fleiss" in html


def test_a_stopped_job_stops_the_ensemble_row():
    from evoray.errors import BudgetExceeded

    class Stopping:
        async def rate(self, row):
            raise BudgetExceeded("the job's budget was reached")

    e = EnsembleRater({"a": _rater("a", "5"), "b": Stopping()}, "mean")
    with pytest.raises(BudgetExceeded):
        run(e.rate(new_row("q", output="a")))
