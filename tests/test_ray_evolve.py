"""Auto Evol-Instruct end to end through Ray against the fake server: optimize, then evolve."""

import json

import pyarrow.parquet as pq
import pytest

from evoray.config import JobConfig
from evoray.jobs import JobContext
from evoray.stages import stage_evolve, stage_optimize
from evoray.testing.fake_server import FakeLLMServer, FakeServerConfig
from evoray.testing.responders import PipelineResponder

from conftest import fake_provider

pytestmark = pytest.mark.ray


def test_optimize_two_steps_then_evolve_100_gsm8k_rows(ray_session, shared_data, fake_key, tmp_path):
    responder = PipelineResponder(bad_answer_share=0.2)
    with FakeLLMServer(FakeServerConfig(latency_s=0.002), responder=responder) as srv:
        cfg = JobConfig.from_dict({
            "providers": [fake_provider(srv, rpm=20000)],
            "input": {"path": str(shared_data / "gsm8k/train.jsonl"), "limit": 100},
            "ray": {"evolver_actors": 2, "candidate_actors": 3, "batch_size": 25},
            "cache": {"dir": str(tmp_path / "cache")},
            "optimize": {"sample_size": 60, "batch_size": 4, "trajectory_length": 2, "candidates": 3,
                         "dev_size": 12, "steps": 2, "patience": 2},
            "evolve": {"rounds": 2},
        })
        ctx = JobContext(cfg, quiet=True)
        try:
            opt = stage_optimize(ctx, None, tmp_path / "optimize")
            evo = stage_evolve(ctx, None, tmp_path / "evolve", opt.outputs["best_method"])
        finally:
            ctx.close()
        assert srv.stats()["rate_limited"] == 0
    hist = json.loads((tmp_path / "optimize/history.json").read_text())
    assert len(hist["steps"]) == 2
    for step in hist["steps"]:
        assert len(step["candidates"]) == 3
        assert all(0.0 <= c["failure_rate"] <= 1.0 for c in step["candidates"])
    assert (tmp_path / "optimize/best_method.txt").read_text().strip()
    assert (tmp_path / "optimize/failure_rate.png").stat().st_size > 0
    evolved = pq.read_table(tmp_path / "evolve/evolved.parquet").to_pylist()
    failed = pq.read_table(tmp_path / "evolve/failed.parquet").to_pylist()
    assert len(evolved) + len(failed) == 100
    parents = [r["parent_id"] for r in evolved + failed]
    assert len(set(parents)) == 100
    seeds = {r["id"] for r in pq.read_table(tmp_path / "evolve/input.parquet").to_pylist()}
    assert set(parents) == seeds
    assert json.loads((tmp_path / "evolve/_SUCCESS.json").read_text())["counts"]["input"] == 100
    assert evo.counts["evolved"] == len(evolved)
    for r in evolved:
        assert r["round"] == 2 and r["method_id"] and r["source"] == "train"
        assert r["output"]  # answered by the evol LLM
    assert all(r["rule"] or r["reason"] for r in failed)
