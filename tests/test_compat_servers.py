"""OpenAI-compatible servers that differ from OpenAI, through Ray pools, the real SDK and the fake
server's strict profiles: the structured-output fallback in a job, a stage that stops at once on a
deterministic error (and resumes when the config is fixed), a refused connection named in the exit
message, and a cache that is not reused across base URLs.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from evoray.cli import main
from evoray.config import JobConfig
from evoray.errors import ProviderHalted
from evoray.io import write_table
from evoray.jobs import JobContext
from evoray.schema import new_row
from evoray.stages import stage_rate
from evoray.testing.fake_server import FakeLLMServer, FakeServerConfig, unused_port

pytestmark = pytest.mark.ray


def rows_file(tmp_path, n: int):
    rows = [new_row(f"Name a fact about the number {i}.", "", f"{i} is an integer.", source="compat")
            for i in range(n)]
    write_table(rows, tmp_path / "rows.jsonl")
    return tmp_path / "rows.jsonl"


def job(url: str, tmp_path, n: int, out: str = "out", **provider) -> JobConfig:
    p = {"name": "srv", "kind": "openai", "model": "fake-model", "base_url": url, "max_attempts": 4,
         "backoff_base_s": 0.05, "backoff_max_s": 0.5, "timeout_s": 10, **provider}
    return JobConfig.from_dict({
        "providers": [p],
        "input": {"path": str(rows_file(tmp_path, n))},
        "output": {"dir": str(tmp_path / out)},
        "cache": {"dir": str(tmp_path / "cache")},
        "ray": {"rater_actors": 2, "actor_concurrency": 4, "batch_size": 10},
        "rate": {"parse_retries": 0},
    })


def run_rate(cfg: JobConfig, outdir):
    ctx = JobContext(cfg, quiet=True)
    try:
        try:
            return stage_rate(ctx, None, outdir), ctx.session().gate_status(), None
        except ProviderHalted as e:
            return None, ctx.session().gate_status(), e
    finally:
        ctx.close()


def all_rows(outdir):
    rows = []
    for t in ("kept", "rejected", "failed"):
        p = outdir / f"{t}.parquet"
        if p.exists():
            rows += pq.read_table(p).to_pylist()
    return rows


def test_auto_falls_back_to_json_object_in_a_ray_job_and_every_actor_learns_it(ray_session, fake_key, tmp_path):
    with FakeLLMServer(FakeServerConfig(profile="llama_cpp_python")) as srv:
        res, gate, halted = run_rate(job(srv.openai_base_url, tmp_path, 60), tmp_path / "out")
        stats = srv.stats()
    assert halted is None and res.counts["input"] == 60
    rows = all_rows(tmp_path / "out")
    assert len(rows) == 60 and all(r["status"] in ("kept", "rejected") for r in rows)
    assert gate["providers"]["srv"]["choices"]["structured_output"] == "json_object"
    # each actor paid at most its in-flight requests before the switch, not one per row
    assert 1 <= stats["profile_rejected"] <= 2 * 4
    assert stats["ok"] == 60


def test_a_deterministic_error_stops_the_stage_at_once_and_a_fixed_config_resumes(ray_session, fake_key, tmp_path):
    with FakeLLMServer(FakeServerConfig(profile="llama_cpp_python")) as srv:
        cfg = job(srv.openai_base_url, tmp_path, 300, structured_output="json_schema")
        res, gate, halted = run_rate(cfg, tmp_path / "out")
        sent = srv.stats()["requests"]
        assert halted is not None and res is None
        msg = str(halted)
        assert "provider 'srv'" in msg and "Input should be 'text' or 'json_object'" in msg
        assert "providers[srv].structured_output" in msg and "[rate]" in msg
        # a validation error is not retried, and the stage stopped long before the 300 rows were sent
        assert sent <= 2 * (4 + 3) + 4
        stopped = json.loads((tmp_path / "out/_STOPPED.json").read_text())
        assert stopped["reason"] == "provider_halted" and not (tmp_path / "out/_SUCCESS.json").exists()
        assert gate["providers"]["srv"]["halted"]
        # the same command with the setting fixed finishes the stage: every row accounted once
        cfg2 = JobConfig.from_dict({**cfg.model_dump(mode="json"),
                                    "providers": [{**cfg.providers[0].model_dump(mode="json"),
                                                   "structured_output": "auto"}]})
        res2, _, halted2 = run_rate(cfg2, tmp_path / "out")
    assert halted2 is None
    rows = all_rows(tmp_path / "out")
    assert len(rows) == 300 and len({r["id"] for r in rows}) == 300
    assert res2.counts["kept"] + res2.counts["rejected"] == 300


def test_cli_refused_connection_exit_1_names_it(ray_session, fake_key, tmp_path, capsys):
    url = f"http://127.0.0.1:{unused_port()}/v1"
    cfg = job(url, tmp_path, 40, max_attempts=6, backoff_base_s=1.0, backoff_max_s=60)
    (tmp_path / "job.yaml").write_text(json.dumps(cfg.model_dump(mode="json")))
    code = main(["rate", str(tmp_path / "job.yaml"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "connection refused by 127.0.0.1" in err and "providers[srv].base_url" in err and "resume" in err
    led = json.loads((tmp_path / "out/ledger.json").read_text())
    # each of two actors sends its in-flight rows once and at most a few retries: never 6 attempts a row
    assert 0 < led["total"]["requests"] <= 2 * (4 + 3)


def test_a_config_pointed_at_another_server_does_not_reuse_cached_answers(ray_session, fake_key, tmp_path):
    with FakeLLMServer(FakeServerConfig()) as a:
        res, _, _ = run_rate(job(a.openai_base_url, tmp_path, 20), tmp_path / "a")
        assert res.counts["input"] == 20 and a.stats()["ok"] == 20
    # the first server is gone; the same job pointed at a dead URL must not report cached answers
    dead = f"http://127.0.0.1:{unused_port()}/v1"
    res, _, halted = run_rate(job(dead, tmp_path, 20, out="b"), tmp_path / "b")
    assert halted is not None and "connection refused" in str(halted)
    with FakeLLMServer(FakeServerConfig()) as b:
        res, _, _ = run_rate(job(b.openai_base_url, tmp_path, 20, out="c"), tmp_path / "c")
        assert b.stats()["ok"] == 20  # another server: asked again
        # unless both entries name one cache_namespace
        res, _, _ = run_rate(job(b.openai_base_url, tmp_path, 20, out="d", cache_namespace="shared"), tmp_path / "d")
        n = b.stats()["requests"]
    with FakeLLMServer(FakeServerConfig()) as c:
        res, _, _ = run_rate(job(c.openai_base_url, tmp_path, 20, out="e", cache_namespace="shared"), tmp_path / "e")
        assert c.stats()["requests"] == 0 and res.counts["kept"] + res.counts["rejected"] == 20
    assert n == 40
