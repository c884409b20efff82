"""`evoray run` end to end on the fake server: pipeline, resume from the cache and markers, budget cap, report."""

import json
import time

import pyarrow.parquet as pq
import pytest
import yaml

from evoray.cli import main
from evoray.testing.fake_server import FakeLLMServer, FakeServerConfig
from evoray.testing.responders import PipelineResponder

from conftest import fake_provider

pytestmark = pytest.mark.ray


def _config(tmp_path, srv, shared_data, **extra):
    cfg = {
        "providers": [fake_provider(srv, rpm=20000)],
        "input": {"path": str(shared_data / "gsm8k/train.jsonl"), "limit": 40},
        "output": {"dir": str(tmp_path / "run")},
        "cache": {"dir": str(tmp_path / "cache")},
        "ray": {"evolver_actors": 2, "rater_actors": 2, "candidate_actors": 2, "batch_size": 10},
        "optimize": {"sample_size": 30, "batch_size": 3, "trajectory_length": 1, "candidates": 2, "dev_size": 6,
                     "steps": 1},
        "pipeline": ["optimize", "evolve", "rate"],
    }
    cfg.update(extra)
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_run_twice_second_run_sends_nothing(ray_session, shared_data, fake_key, tmp_path, capsys):
    with FakeLLMServer(FakeServerConfig(latency_s=0.002), responder=PipelineResponder(bad_answer_share=0.1)) as srv:
        cfg = _config(tmp_path, srv, shared_data)
        t0 = time.monotonic()
        assert main(["run", str(cfg), "--quiet"]) == 0
        first = time.monotonic() - t0
        sent = srv.stats()["requests"]
        out = tmp_path / "run"
        led1 = json.loads((out / "ledger.json").read_text())
        assert led1["total"]["requests"] == sent > 0
        t0 = time.monotonic()
        assert main(["run", str(cfg), "--quiet"]) == 0
        second = time.monotonic() - t0
        assert srv.stats()["requests"] == sent  # nothing sent the second time
    led2 = json.loads((out / "ledger.json").read_text())
    assert led2["total"]["requests"] == 0
    print(f"first run {first:.1f}s, second run {second:.1f}s")
    # the stages fed each other and every row is accounted for
    evolved = pq.read_table(out / "evolve/evolved.parquet").num_rows
    failed = pq.read_table(out / "evolve/failed.parquet").num_rows
    assert evolved + failed == 40
    rated = sum(pq.read_table(out / f"rate/{t}.parquet").num_rows for t in ("kept", "rejected", "failed"))
    assert rated == evolved
    html = (out / "report.html").read_text()
    for sec in ("summary", "scores", "optimization", "evolution", "ledger"):
        assert f'id="{sec}"' in html


def test_budget_cap_stops_with_exit_3_and_keeps_finished_rows(ray_session, shared_data, fake_key, tmp_path, capsys):
    with FakeLLMServer(FakeServerConfig(latency_s=0.01)) as srv:
        prov = fake_provider(srv, rpm=3000, price={"input_per_mtok": 1000.0, "output_per_mtok": 1000.0})
        cfg = _config(tmp_path, srv, shared_data, providers=[prov], pipeline=["rate"], budget_usd=5.0,
                      input={"path": str(shared_data / "alpagasus/random_9k.json"), "limit": 300})
        code = main(["run", str(cfg), "--quiet"])
        err = capsys.readouterr().err
        assert code == 3 and "budget" in err
        rate = tmp_path / "run/rate"
        assert (rate / "_STOPPED.json").exists() and not (rate / "_SUCCESS.json").exists()
        done = sum(pq.read_table(rate / f"{t}.parquet").num_rows for t in ("kept", "rejected", "failed"))
        stopped = json.loads((rate / "_STOPPED.json").read_text())["counts"]["budget_stopped"]
        assert 0 < done < 300 and done + stopped == 300
        # a larger budget resumes: answered requests come from the cache, the rest are sent
        assert main(["run", str(cfg), "--quiet", "--set", "budget_usd=1000000"]) == 0
    done = sum(pq.read_table(rate / f"{t}.parquet").num_rows for t in ("kept", "rejected", "failed"))
    assert done == 300 and (rate / "_SUCCESS.json").exists()
