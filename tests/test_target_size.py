"""``rate.target_rows`` / ``rate.target_fraction`` through the rate stage's selection pass (no Ray:
the pool is replaced by a runner that writes the scored rows), the config checks and the notes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from evoray.stagedefs import rate as rate_stage  # the rate stage's module (its driver and selection)
from evoray.commands import stage_summary
from evoray.config import RateConfig
from evoray.jobs import StageResult
from evoray.schema import RESULT_SCHEMA, new_row, result_row
from evoray.sinks import TableSink

SCORES = [5.0, 4.5, 4.5, 4.5, 4.0, 3.0, 4.5, 2.0]


def _fake_runner(scores):
    def runner(ctx, stage, worker, input_path, outdir, tables, n_actors, formats=None, **kw):
        sink = TableSink(outdir, "_scored", "parquet", RESULT_SCHEMA)
        for i, s in enumerate(scores):
            sink.write([result_row(new_row(f"q{i}", source="t"), status="scored", score=s)])
        sink.close()
        return {"input": len(scores) + 1, "scored": len(scores), "failed": 1, "_scored": len(scores)}
    return lambda ctx, stage: runner


def _ctx(**rate):
    cfg = SimpleNamespace(rate=RateConfig(**rate), output=SimpleNamespace(format="parquet"),
                          ray=SimpleNamespace(rater_actors=1))
    return SimpleNamespace(config=cfg)


@pytest.mark.parametrize("rate,kept,thr", [({"target_rows": 3}, 3, 4.5), ({"target_fraction": 0.5}, 4, 4.5),
                                          ({"target_rows": 6}, 6, 4.0), ({"target_rows": 100}, 8, 2.0),
                                          ({"target_rows": 0}, 0, None)])
def test_rate_target_size_keeps_exactly_the_target(tmp_path, monkeypatch, rate, kept, thr):
    monkeypatch.setattr(rate_stage, "stage_runner", _fake_runner(SCORES))
    seen = []
    counts = rate_stage._rate_budget(_ctx(**rate), tmp_path / "in.parquet", tmp_path, seen.append)
    assert counts["kept"] == kept and counts["rejected"] == len(SCORES) - kept
    assert counts["threshold_chosen"] == thr
    k = pq.read_table(tmp_path / "kept.parquet").column("score").to_pylist()
    assert len(k) == kept and (thr is None or min(k) == thr)
    fields = rate_stage._target_fields(_ctx(**rate).config.rate, counts)
    assert fields["threshold_chosen"] == thr and json.dumps(fields)
    if rate == {"target_rows": 3}:
        assert counts["rows_on_threshold"] == 4 and counts["rows_on_threshold_kept"] == 2
        note = rate_stage.threshold_note(counts)
        assert "threshold 4.5 chosen for the target; 2 of 4 rows on it kept" in note
        line = stage_summary(StageResult("rate", tmp_path, counts, {}))
        assert line.startswith("rate 3 kept, 5 rejected, 1 failed of 9 (threshold 4.5 chosen")


def test_top_k_reports_no_chosen_threshold(tmp_path, monkeypatch):
    monkeypatch.setattr(rate_stage, "stage_runner", _fake_runner(SCORES))
    counts = rate_stage._rate_budget(_ctx(top_k=3), tmp_path / "in.parquet", tmp_path, lambda s: None)
    assert counts["kept"] == 3 and "threshold_chosen" not in counts
    assert rate_stage.threshold_note(counts) == ""


@pytest.mark.parametrize("bad", [{"target_rows": 3, "target_fraction": 0.1}, {"top_k": 3, "target_rows": 3},
                                 {"top_k": 3, "target_fraction": 0.2}])
def test_size_rules_are_mutually_exclusive(bad):
    with pytest.raises(ValueError, match="mutually exclusive"):
        RateConfig(**bad)


@pytest.mark.parametrize("bad", [{"target_fraction": 0}, {"target_fraction": 1.5}, {"target_rows": -1}])
def test_target_bounds(bad):
    with pytest.raises(ValueError):
        RateConfig(**bad)


def test_sized():
    assert not RateConfig().sized and RateConfig(target_fraction=0.1).sized and RateConfig(top_k=1).sized


def test_rate_fingerprint_unchanged_by_the_new_keys_at_their_defaults():
    base = RateConfig().model_dump()
    for k in ("target_rows", "target_fraction", "ensemble", "ensemble_rule"):
        base.pop(k)
    assert rate_stage.rate_fingerprint(RateConfig()) == base
    assert rate_stage.rate_fingerprint(RateConfig(target_rows=5))["target_rows"] == 5
    assert rate_stage.rate_fingerprint(RateConfig(ensemble_rule="min"))["ensemble_rule"] == "min"
