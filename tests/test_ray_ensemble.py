"""A rater ensemble through Ray against two fake servers: every row rated by both, the target size
kept exactly, agreement in scores.json (one shared Ray session)."""

import json

import pyarrow.parquet as pq
import pytest

from evoray.config import JobConfig
from evoray.ensemble import combine, per_rater_scores
from evoray.jobs import JobContext
from evoray.stages import stage_rate
from evoray.testing.fake_server import FakeLLMServer, FakeServerConfig
from evoray.testing.responders import PipelineResponder

from conftest import fake_provider

pytestmark = pytest.mark.ray


def test_ensemble_of_two_raters_with_a_target_size(ray_session, shared_data, fake_key, tmp_path):
    kind = PipelineResponder(scores=[(3.0, 1), (4.0, 1), (4.5, 1), (5.0, 1)])
    with FakeLLMServer(FakeServerConfig(latency_s=0.001), responder=PipelineResponder()) as a, \
            FakeLLMServer(FakeServerConfig(latency_s=0.001), responder=kind) as b:
        cfg = JobConfig.from_dict({
            "providers": [fake_provider(a, name="a", rpm=30000), fake_provider(b, name="b", rpm=30000)],
            "roles": {"rater": ["a", "b"]},
            "input": {"path": str(shared_data / "alpagasus/random_9k.json"), "limit": 200},
            "output": {"dir": str(tmp_path / "out")},
            "ray": {"rater_actors": 1, "batch_size": 50},
            "cache": {"dir": str(tmp_path / "cache")},
            "rate": {"ensemble": "all", "ensemble_rule": "min", "target_rows": 60, "random_baseline": False},
        })
        ctx = JobContext(cfg, quiet=True)
        try:
            res = stage_rate(ctx, None, tmp_path / "out")
            ledger = ctx.ledger_dict()
        finally:
            ctx.close()
        sa, sb = a.stats(), b.stats()
    out = tmp_path / "out"
    kept = pq.read_table(out / "kept.parquet").to_pylist()
    rejected = pq.read_table(out / "rejected.parquet").to_pylist()
    failed = pq.read_table(out / "failed.parquet").to_pylist() if (out / "failed.parquet").exists() else []
    assert len(kept) + len(rejected) + len(failed) == 200
    assert len(kept) == 60 and res.counts["threshold_chosen"] is not None
    assert sa["requests"] >= 200 and sb["requests"] >= 200  # every row went to both raters
    for r in kept + rejected:
        per = per_rater_scores(r["raw"])
        assert set(per) == {"a", "b"} and r["score"] == combine(list(per.values()), "min")
        assert r["provider"] == "a,b"
    scores = json.loads((out / "scores.json").read_text())
    e = scores["ensemble"]
    assert e["raters"] == ["a", "b"] and e["rows"] == len(kept) + len(rejected)
    assert sum(e["histograms"]["a"].values()) == e["rows"]
    assert "a|b" in e["spearman_pairs"] and len(e["disagreements"]) == 10
    assert scores["threshold_chosen"] == res.counts["threshold_chosen"] and scores["target_rows"] == 60
    assert ledger["providers"]["a"]["requests"] >= 200 and ledger["providers"]["b"]["requests"] >= 200
