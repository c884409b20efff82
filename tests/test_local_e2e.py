"""End to end on the embedded SmolLM2 model through Ray: rating 20 rows, and one optimization step.

The model is weak; the tests check that every row ends scored or failed with a reason, and that
the optimizer completes a step and writes its history, not that the model is good.
"""

import json

import pyarrow.parquet as pq
import pytest

from evoray.config import JobConfig
from evoray.jobs import JobContext
from evoray.stages import stage_optimize, stage_rate

pytestmark = [pytest.mark.ray, pytest.mark.local_model]

LOCAL = {"name": "local", "kind": "local", "model": "smollm2-135m", "replicas": 1, "num_cpus": 1, "n_threads": 2}


@pytest.fixture(autouse=True)
def _needs_llama():
    pytest.importorskip("llama_cpp")


def test_rate_20_rows_on_the_local_model(ray_session, shared_data, tmp_path):
    cfg = JobConfig.from_dict({
        "providers": [LOCAL],
        "input": {"path": str(shared_data / "alpagasus/random_9k.json"), "limit": 20},
        "cache": {"dir": str(tmp_path / "cache")},
        "ray": {"rater_actors": 1, "actor_concurrency": 4, "batch_size": 5},
        "rate": {"max_tokens": 48, "parse_retries": 1},
    })
    ctx = JobContext(cfg, quiet=True)
    try:
        session = ctx.session()
        # replicas compute: they run un-niced, unlike Ray's other workers (niceness 15)
        infos = ray_session.get([h.info.remote() for h in session.replicas["local"]])
        assert [i["niceness"] for i in infos] == [0]
        stage_rate(ctx, None, tmp_path / "rate")
    finally:
        ctx.close()
    rows = []
    for t in ("kept", "rejected", "failed"):
        rows += pq.read_table(tmp_path / f"rate/{t}.parquet").to_pylist()
    assert len(rows) == 20 and len({r["id"] for r in rows}) == 20
    for r in rows:
        if r["status"] == "failed":
            assert r["reason"]
        else:
            assert 0 <= r["score"] <= 5 and r["model"] == "smollm2-135m"
    # JSON-schema constrained output makes the tiny model's scores parseable
    assert sum(r["status"] != "failed" for r in rows) >= 15


def test_one_optimization_step_on_gsm8k(ray_session, shared_data, tmp_path):
    cfg = JobConfig.from_dict({
        "providers": [LOCAL],
        "input": {"path": str(shared_data / "gsm8k/train.jsonl"), "limit": 10},
        "cache": {"dir": str(tmp_path / "cache")},
        "ray": {"candidate_actors": 3, "actor_concurrency": 4},
        "evolve": {"json_output": True, "max_tokens": 128, "answer_max_tokens": 96},
        "optimize": {"sample_size": 10, "batch_size": 2, "trajectory_length": 1, "candidates": 2, "dev_size": 6,
                     "steps": 1, "max_tokens": 256, "json_output": True},
    })
    ctx = JobContext(cfg, quiet=True)
    try:
        stage_optimize(ctx, None, tmp_path / "opt")
    finally:
        ctx.close()
    hist = json.loads((tmp_path / "opt/history.json").read_text())
    assert len(hist["steps"]) == 1
    step = hist["steps"][0]
    # m proposals, asked once more when none of them gave a usable method (issue 17)
    assert len(step["candidates"]) + len(step["failed_proposals"]) == (4 if step["proposals_retried"] else 2)
    assert hist["baseline_failure_rate"] is not None
    assert (tmp_path / "opt/best_method.txt").read_text().strip()
