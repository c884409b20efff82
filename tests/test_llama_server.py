"""A real third-party OpenAI-compatible server in the suite: llama-cpp-python's own server.

The session fixture ``llama_server`` runs ``llama_cpp.server`` with the shipped SmolLM2 GGUF on
127.0.0.1 (one thread). Every stage talks to it as a user would: ``kind: openai``, ``base_url`` and
default settings, so ``structured_output: auto`` meets a server that refuses ``response_format``
json_schema with an HTTP 500 validation body and must fall back to json_object (which that server
turns into a grammar). Replies are short (small ``max_tokens``): the model is tiny and the CPU is
shared; the tests check that every row is accounted for and the server's rules are met, not that
the model judges well.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from evoray.cli import main
from evoray.config import JobConfig
from evoray.errors import ProviderHalted
from evoray.io import iter_rows, write_table
from evoray.jobs import JobContext
from evoray.stages import stage_answer, stage_evolve, stage_judge, stage_rate

pytestmark = [pytest.mark.ray, pytest.mark.local_model]


def provider(srv, **kw) -> dict:
    return {"name": "llama", "kind": "openai", "model": "smollm2", "base_url": srv.base_url, "timeout_s": 120, **kw}


def config(srv, tmp_path, inp, **sections) -> JobConfig:
    return JobConfig.from_dict({
        "providers": [provider(srv, **sections.pop("provider", {}))],
        "input": {"path": str(inp)},
        "cache": {"dir": str(tmp_path / "cache")},
        "ray": {"rater_actors": 1, "evolver_actors": 1, "judge_actors": 1, "actor_concurrency": 2, "batch_size": 5},
        # the server is what is tested, not the 135M model's evolutions: its failed rows must not fail the job
        "max_failed_fraction": 1.0,
        **sections,
    })


def run_stage(cfg, fn, *args):
    ctx = JobContext(cfg, quiet=True)
    try:
        res = fn(ctx, *args)
        return res, ctx.session().gate_status()
    finally:
        ctx.close()


def tables(outdir, names):
    rows = []
    for t in names:
        p = outdir / f"{t}.parquet"
        if p.exists():
            rows += pq.read_table(p).to_pylist()
    return rows


@pytest.fixture(scope="module")
def alpaca20(shared_data, tmp_path_factory):
    rows = list(iter_rows([str(shared_data / "alpagasus/random_9k.json")]))[:20]
    path = tmp_path_factory.mktemp("alpaca") / "rows.jsonl"
    write_table(rows, path)
    return path


def test_rate_20_rows_with_default_settings_falls_back_to_json_object(ray_session, llama_server, alpaca20, tmp_path):
    cfg = config(llama_server, tmp_path, alpaca20, rate={"max_tokens": 24})
    assert cfg.providers[0].structured_output == "auto" and cfg.rate.json_scores
    res, gate = run_stage(cfg, stage_rate, None, tmp_path / "rate")
    rows = tables(tmp_path / "rate", ("kept", "rejected", "failed"))
    assert len(rows) == 20 and len({r["id"] for r in rows}) == 20
    assert gate["providers"]["llama"]["choices"]["structured_output"] == "json_object"
    scored = [r for r in rows if r["status"] != "failed"]
    # the grammar makes the tiny model's replies JSON with a score; nearly every row is rated
    assert len(scored) >= 18, [r["reason"] for r in rows if r["status"] == "failed"]
    assert all(0 <= r["score"] <= 5 and r["provider"] == "llama" for r in scored)
    assert all(r["reason"] for r in rows if r["status"] == "failed")
    assert llama_server.alive()


def test_a_wrong_structured_output_stops_within_seconds_naming_the_servers_complaint(
        ray_session, llama_server, alpaca20, tmp_path, capsys):
    cfg = config(llama_server, tmp_path, alpaca20, provider={"structured_output": "json_schema"},
                 output={"dir": str(tmp_path / "out")}, rate={"max_tokens": 24})
    (tmp_path / "job.yaml").write_text(json.dumps(cfg.model_dump(mode="json")))
    code = main(["rate", str(tmp_path / "job.yaml"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Input should be 'text' or 'json_object'" in err and "providers[llama].structured_output" in err
    led = json.loads((tmp_path / "out/ledger.json").read_text())
    assert led["total"]["requests"] <= 2 + 3  # the in-flight rows once each; a validation 500 is not retried
    # a base_url without /v1: the server's 404, and the key that fixes it
    bad = config(llama_server, tmp_path, alpaca20, output={"dir": str(tmp_path / "out2")})
    bad.providers[0].base_url = llama_server.base_url.removesuffix("/v1")
    with pytest.raises(ProviderHalted) as ei:
        run_stage(bad, stage_rate, None, tmp_path / "out2")
    assert "HTTP 404" in str(ei.value) and "providers[llama].base_url" in str(ei.value)


def test_evolve_answer_and_judge_through_the_server(ray_session, llama_server, alpaca20, tmp_path):
    rows = list(iter_rows([str(alpaca20)]))[:3]
    write_table(rows, tmp_path / "three.jsonl")
    cfg = config(llama_server, tmp_path, tmp_path / "three.jsonl",
                 evolve={"json_output": True, "max_tokens": 64, "answer_max_tokens": 32},
                 answer={"max_tokens": 32}, judge={"json_output": True, "max_tokens": 24})
    res, gate = run_stage(cfg, stage_evolve, None, tmp_path / "evolve")
    evolved = tables(tmp_path / "evolve", ("evolved", "failed"))
    assert len(evolved) == 3 and all(r["status"] in ("evolved", "failed") for r in evolved)
    assert all(r["reason"] for r in evolved if r["status"] == "failed")
    assert gate["providers"]["llama"]["choices"]["structured_output"] == "json_object"

    res, _ = run_stage(cfg, stage_answer, None, tmp_path / "answer")
    answered = tables(tmp_path / "answer", ("answered", "failed"))
    assert len(answered) == 3 and sum(r["status"] == "answered" for r in answered) >= 2
    assert all(r["output"] for r in answered if r["status"] == "answered")

    # judge the model's answers against the data set's own
    mine = [dict(r) for r in answered if r["status"] == "answered"]
    write_table(mine, tmp_path / "a.jsonl")
    write_table(rows, tmp_path / "b.jsonl")
    cfg.judge.answers_a, cfg.judge.answers_b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    res, _ = run_stage(cfg, stage_judge, tmp_path / "judge")
    summary = json.loads((tmp_path / "judge/summary.json").read_text())
    ov = summary["overall"]
    assert ov["total"] == 3 and ov["win"] + ov["tie"] + ov["lose"] >= 1
    j = pq.read_table(tmp_path / "judge/judgments.parquet").to_pylist()
    judged = [r for r in j if r["result"] != "failed" and r["raw_order1"]]
    assert all(1 <= r["score_a_order1"] <= 10 for r in judged)
