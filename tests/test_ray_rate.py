"""AlpaGasus end to end through Ray against the fake server (one shared Ray session)."""

import json

import pyarrow.parquet as pq
import pytest

from evoray.config import JobConfig
from evoray.jobs import JobContext
from evoray.stages import stage_judge, stage_rate
from evoray.testing.fake_server import FakeLLMServer, FakeServerConfig
from evoray.testing.responders import UNPARSEABLE, PipelineResponder

from conftest import fake_provider

pytestmark = pytest.mark.ray


def test_rate_1000_rows_two_actors_every_row_accounted(ray_session, shared_data, fake_key, tmp_path):
    responder = PipelineResponder(bad_rating_share=0.03)
    with FakeLLMServer(FakeServerConfig(latency_s=0.002), responder=responder) as srv:
        cfg = JobConfig.from_dict({
            "providers": [fake_provider(srv, rpm=30000)],
            "input": {"path": str(shared_data / "alpagasus/random_9k.json"), "limit": 1000},
            "output": {"dir": str(tmp_path / "out")},
            "ray": {"rater_actors": 2, "batch_size": 50},
            "cache": {"dir": str(tmp_path / "cache")},
            "rate": {"parse_retries": 1},
        })
        ctx = JobContext(cfg, quiet=True)
        try:
            res = stage_rate(ctx, None, tmp_path / "out")
            ledger = ctx.ledger_dict()
        finally:
            ctx.close()
        stats = srv.stats()
    out = tmp_path / "out"
    kept = pq.read_table(out / "kept.parquet").to_pylist()
    rejected = pq.read_table(out / "rejected.parquet").to_pylist()
    failed = pq.read_table(out / "failed.parquet").to_pylist()
    ids = [r["id"] for r in kept + rejected + failed]
    assert len(ids) == 1000 and len(set(ids)) == 1000
    assert all(r["score"] >= 4.5 for r in kept) and all(r["score"] < 4.5 for r in rejected)
    assert {r["status"] for r in kept} == {"kept"} and {r["status"] for r in rejected} == {"rejected"}
    assert not (out / "_scored.parquet").exists()  # the threshold rule is applied as rows arrive
    # the injected unusable replies end as failed rows carrying the raw text
    assert failed and all(r["raw"] == UNPARSEABLE and r["reason"] == "unparseable reply" for r in failed)
    assert all(r["provider"] == "fake" and r["model"] for r in kept + rejected)
    scores = json.loads((out / "scores.json").read_text())
    assert sum(scores["buckets"].values()) == 1000 and scores["buckets"]["unparsed"] == len(failed)
    base = pq.read_table(out / "random_baseline.parquet")
    assert base.num_rows == len(kept)
    # the ledger matches what the server saw, and nothing was rate limited
    assert ledger["total"]["requests"] == stats["requests"]
    assert stats["rate_limited"] == 0
    assert res.counts["kept"] == len(kept)

    # the same rows under a top_k budget (answers from the cache): the streamed selection keeps
    # exactly what select() picks from the (id, score) pairs, and the baseline is the seeded draw
    from evoray.selection import random_baseline, select

    cfg2 = JobConfig.from_dict({**cfg.model_dump(mode="json"), "rate": {"parse_retries": 1, "top_k": 300, "seed": 7},
                                "output": {"dir": str(tmp_path / "out2")}})
    ctx = JobContext(cfg2, quiet=True)
    try:
        stage_rate(ctx, None, tmp_path / "out2")
    finally:
        ctx.close()
    pairs = [(r["id"], r["score"]) for r in kept + rejected]
    kept2 = pq.read_table(tmp_path / "out2/kept.parquet").column("id").to_pylist()
    assert sorted(kept2) == sorted(select(pairs, top_k=300)[0]) and len(kept2) == 300
    assert json.loads((tmp_path / "out2/scores.json").read_text())["buckets"] == scores["buckets"]
    base2 = pq.read_table(tmp_path / "out2/random_baseline.parquet").column("id").to_pylist()
    assert sorted(base2) == random_baseline(ids, 300, seed=7)


def test_judge_vicuna_counts_add_up_per_order(ray_session, shared_data, fake_key, tmp_path):
    from evoray.io import iter_rows, write_table

    rows = list(iter_rows([str(shared_data / "alpagasus/vicuna_test_set.jsonl")]))
    a = [dict(r, output=f"Answer A to: {r['instruction'][:40]}") for r in rows]
    b = [dict(r, output=f"Answer B, longer, to: {r['instruction'][:40]}") for r in rows]
    write_table(a, tmp_path / "a.jsonl")
    write_table(b, tmp_path / "b.jsonl")
    with FakeLLMServer(FakeServerConfig(latency_s=0.001)) as srv:
        cfg = JobConfig.from_dict({
            "providers": [fake_provider(srv)],
            "judge": {"answers_a": str(tmp_path / "a.jsonl"), "answers_b": str(tmp_path / "b.jsonl")},
            "ray": {"judge_actors": 2},
            "cache": {"dir": str(tmp_path / "cache")},
        })
        ctx = JobContext(cfg, quiet=True)
        try:
            stage_judge(ctx, tmp_path / "judge")
        finally:
            ctx.close()
        assert srv.stats()["requests"] == 160  # every prompt judged twice, the order swapped
    summary = json.loads((tmp_path / "judge/summary.json").read_text())
    ov = summary["overall"]
    assert ov["win"] + ov["tie"] + ov["lose"] + ov["failed"] == 80
    for order in summary["overall"]["by_order"].values():
        assert sum(order.values()) == 80
    j = pq.read_table(tmp_path / "judge/judgments.parquet")
    assert j.num_rows == 80 and j.column("raw_order1").null_count == 0
