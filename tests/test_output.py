"""What the user sees: quiet runs print their final line only, Ray's lines go to OUTDIR/logs/ray.log,
clients are closed, the final line and exit code of a failing stage, a lost Ray, the resource check
and the stall watchdog.

Most checks run in this process (on the shared Ray session, or without Ray); two run the real
``evoray`` console script with its own local Ray (5-10 s to start here): the issue's quiet 600-row
``rate`` with 4 rater actors, and a job whose local Ray is killed under it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from evoray.cli import main
from evoray.config import JobConfig
from evoray.errors import ConfigError
from evoray.testing.fake_server import FakeLLMServer, FakeServerConfig
from evoray.testing.responders import PipelineResponder

from conftest import FAKE_KEY, fake_provider

EXE = Path(sys.executable).with_name("evoray")


# ---- without Ray: the route, the resource check, the watchdog, the final line ------------------------

def test_route_sends_ray_output_to_the_log_and_keeps_evoray_on_the_terminal(tmp_path, capfd, caplog):
    import ray

    from evoray.console import RayLogRoute

    log_path = tmp_path / "out" / "logs" / "ray.log"
    with RayLogRoute(log_path) as route:
        os.write(2, b"[2026 E 1 1] core_worker.cc:2465: has constructor arguments in the object store\n")
        print("evoray: a message of ours", file=sys.stderr)
        logging.getLogger("ray.data").warning("Progress bars disabled")
        logging.getLogger("ray").warning("The node ... has been marked dead because the detector missed heartbeats")
        warnings.warn_explicit("a warning from inside Ray", UserWarning, ray.__file__, 1)
        route._worker_lines({"pid": 4242, "actor_name": "MapWorker(MapBatches(StageUDF))", "ip": "10.0.0.1",
                             "localhost": "10.0.0.1", "lines": ["a worker line", "Task was killed due to the node "
                                                                "running low on memory"]})
    os.write(2, b"after the route\n")
    out, err = capfd.readouterr()
    text = log_path.read_text()
    for needle in ("constructor arguments", "Progress bars disabled", "marked dead", "a warning from inside Ray",
                   "(MapWorker(MapBatches(StageUDF)) pid=4242) a worker line"):
        assert needle in text, needle
    assert "evoray: a message of ours" in err and "after the route" in err
    for needle in ("constructor", "Progress bars", "marked dead", "inside Ray", "worker line"):
        assert needle not in err + out, needle
    # what matters is said again in evoray's words, once each
    said = [r.getMessage() for r in caplog.records if r.name == "evoray"]
    assert sum("node stopped" in m for m in said) == 1 and sum("low on memory" in m for m in said) == 1
    assert logging.getLogger("ray.data").handlers and all(h is not None for h in logging.getLogger("ray.data").handlers)


def test_route_takes_the_raylets_error_messages_off_stdout(tmp_path, capfd):
    """The raylet's messages to the driver ("N PYTHON worker processes have been started") go through
    ray._private.worker.print_to_stdstream, not the worker-log dispatcher: routed too, and restored."""
    import ray._private.worker as rw

    from evoray.console import RayLogRoute

    original = rw.print_to_stdstream
    log_path = tmp_path / "logs" / "ray.log"
    with RayLogRoute(log_path) as route:
        route._attach_worker_logs()
        rw.print_to_stdstream({"lines": ["WARNING: 8 PYTHON worker processes have been started on node"],
                               "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert rw.print_to_stdstream is original
    out, err = capfd.readouterr()
    assert "PYTHON worker processes" not in out + err
    assert "(raylet) WARNING: 8 PYTHON worker processes" in log_path.read_text()


def _local_cfg(**ray) -> JobConfig:
    return JobConfig.from_dict({"providers": [{"name": "local", "kind": "local"}], "ray": ray})


def test_resource_check_refuses_a_config_that_would_deadlock():
    from evoray.resources import check_fits

    # the case: ray.num_cpus 2 and one local replica (1 CPU): 2 raters take 0.5, 0.5 is left
    # beside a 1-CPU Ray Data task
    cfg = _local_cfg(num_cpus=2)
    with pytest.raises(ConfigError) as e:
        check_fits(cfg, ["rate"], 2, source="a local Ray with 2 CPUs (ray.num_cpus)")
    msg = str(e.value)
    assert "rate stage cannot be scheduled" in msg and "needs 2.5 CPUs" in msg and "has 2" in msg
    assert "local-model replica" in msg and "ray.rater_actors 2" in msg and "Ray Data" in msg
    assert "raise ray.num_cpus to 3" in msg
    check_fits(cfg, ["rate"], 3)                           # one more CPU fits
    check_fits(_local_cfg(num_cpus=2, rater_actors=1), ["rate"], 2.25)
    with pytest.raises(ConfigError, match="optimize stage"):  # 6 candidates (0.25 each) + the replica on 2 CPUs
        check_fits(JobConfig.from_dict({"providers": [{"name": "local", "kind": "local"}],
                                        "ray": {"candidate_actors": 8}}), ["optimize"], 2)
    # an API provider needs no replica: 2 raters and the tasks fit on 2 CPUs
    api = JobConfig.from_dict({"providers": [{"name": "x", "kind": "openai"}]})
    check_fits(api, ["rate", "evolve", "judge"], 2)
    # a replica larger than any node
    big = JobConfig.from_dict({"providers": [{"name": "local", "kind": "local", "num_cpus": 4}]})
    with pytest.raises(ConfigError, match="largest node"):
        check_fits(big, ["rate"], 8, node_cpus=[2, 2, 2, 2])


def test_deadlocking_config_refused_by_the_cli_before_ray_starts(tmp_path, capsys, monkeypatch):
    import ray

    import actors.session

    def boom(*a, **k):
        raise AssertionError("Ray was started for a config that cannot fit")

    monkeypatch.setattr(actors.session, "init_ray", boom)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    src = tmp_path / "in.jsonl"
    src.write_text('{"instruction": "a", "output": "b"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text("providers:\n  - {name: local, kind: local}\nray: {num_cpus: 2}\n")
    assert main(["rate", str(cfg), "-i", str(src), "-o", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot be scheduled" in err and "ray.num_cpus" in err
    assert not (tmp_path / "o" / "logs").exists()  # nothing of Ray's was started or written


def test_stall_watchdog_says_what_is_in_flight_with_a_fake_clock():
    from evoray.progress import StageProgress

    now = [100.0]
    p = StageProgress("rate", 10, quiet=True, stall_s=60, status_fn=lambda: "3 request(s) in flight; provider x: paused",
                      clock=lambda: now[0], watch=False)
    now[0] += 59
    assert p.check_stall() is None
    now[0] += 2
    line = p.check_stall()
    assert line == "[rate] no row finished for 61 s (0/10 rows done; 3 request(s) in flight; provider x: paused)"
    now[0] += 30
    assert p.check_stall() is None          # said once per stall_s
    now[0] += 31
    assert "for 122 s" in p.check_stall()
    p.update(done=4)                        # a row lands: the stall is over
    now[0] += 59
    assert p.check_stall() is None
    now[0] += 1
    assert "4/10 rows done" in p.check_stall()
    p.update(done=6)
    now[0] += 1000
    assert p.check_stall() is None          # finished: nothing to say
    assert StageProgress("rate", 10, quiet=True, stall_s=0, clock=lambda: now[0], watch=False).check_stall() is None


def test_final_line_states_counts_and_the_three_most_common_reasons(tmp_path):
    from evoray.commands import final_line
    from evoray.jobs import StageResult

    reasons = {"unparseable reply": 5, "gave up after 6 attempt(s)": 3, "out of range": 2, "rare": 1}
    rate = StageResult("rate", tmp_path, {"kept": 10, "rejected": 4, "failed": 11, "input": 25,
                                          "failure_reasons": reasons})
    line = final_line("rate", [rate], tmp_path, 3.2, 0, None)
    assert line.startswith("evoray rate done in 3.2s: rate 10 kept, 4 rejected, 11 failed of 25")
    assert "unparseable reply (5); gave up after 6 attempt(s) (3); out of range (2)" in line and "rare" not in line
    assert line.endswith(f"-> {tmp_path.resolve()}") and "ray.log" not in line
    evolve = StageResult("evolve", tmp_path, {"evolved": 9, "failed": 0, "input": 9, "failure_reasons": {}})
    line = final_line("run", [evolve, rate], tmp_path, 1.0, 1, "OUT/logs/ray.log")
    assert "evolve 9 evolved, 0 failed of 9; rate 10 kept" in line and line.endswith("Ray's log: OUT/logs/ray.log")
    assert line.startswith("evoray run failed after")


# ---- on the shared Ray session ----------------------------------------------------------------------------

def _job(tmp_path: Path, srv, name: str, **extra) -> Path:
    cfg = {"providers": [fake_provider(srv, rpm=30000)], "cache": {"dir": str(tmp_path / "cache")},
           "ray": {"rater_actors": 2, "evolver_actors": 2, "judge_actors": 2, "candidate_actors": 2, "batch_size": 8},
           "optimize": {"sample_size": 12, "batch_size": 3, "trajectory_length": 1, "candidates": 2, "dev_size": 4,
                        "steps": 1}}
    cfg.update(extra)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.ray
def test_quiet_commands_print_only_their_final_line(ray_session, shared_data, fake_key, tmp_path, capfd):
    """Every command with --quiet: stdout is the final line (naming outputs and counts), and stderr is
    empty (captured at the file descriptor: Ray's C++ lines would show)."""
    rows = tmp_path / "rows.parquet"
    with FakeLLMServer(FakeServerConfig(latency_s=0.002), responder=PipelineResponder()) as srv:
        def quiet(argv: list[str], first: str) -> str:
            assert main(argv + ["--quiet"]) == 0, capfd.readouterr()
            out, err = capfd.readouterr()
            assert err == "", (argv[0], err)
            assert out.count("\n") == 1 and out.startswith(first), (argv[0], out)
            return out

        quiet(["ingest", str(shared_data / "gsm8k/train.jsonl"), "-o", str(rows), "--limit", "24"],
              f"ingested 24 row(s) -> {rows}")
        cfg = _job(tmp_path, srv, "job", input={"path": str(rows)})
        assert main(["estimate", str(cfg), "--quiet"]) == 0  # the estimate is the command's output
        out, err = capfd.readouterr()
        assert err == "" and "rate" in out
        line = quiet(["rate", str(cfg), "-o", str(tmp_path / "rate")], "evoray rate done in ")
        assert re.search(r"rate \d+ kept, \d+ rejected, 0 failed of 24; no failed rows -> ", line)
        quiet(["evolve", str(cfg), "-o", str(tmp_path / "evolve")], "evoray evolve done in ")
        quiet(["answer", str(cfg), "-o", str(tmp_path / "answer")], "evoray answer done in ")
        quiet(["optimize", str(cfg), "-o", str(tmp_path / "optimize")], "evoray optimize done in ")
        answered = tmp_path / "answer" / "answered.parquet"
        judge = _job(tmp_path, srv, "judge", judge={"answers_a": str(answered), "answers_b": str(answered)})
        quiet(["judge", str(judge), "-o", str(tmp_path / "judge")], "evoray judge done in ")
        run = _job(tmp_path, srv, "run", input={"path": str(rows)}, pipeline=["evolve", "rate"])
        line = quiet(["run", str(run), "-o", str(tmp_path / "run")], "evoray run done in ")
        assert "evolve " in line and "; rate " in line and "(report: report.html)" in line
        quiet(["report", str(tmp_path / "run")], "report: ")
    assert (tmp_path / "rate" / "logs" / "ray.log").exists()


@pytest.mark.ray
def test_all_failed_rate_exits_1_with_the_reasons_counted(ray_session, fake_key, tmp_path, capfd):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i}"}) + "\n" for i in range(20)))
    with FakeLLMServer(FakeServerConfig(latency_s=0.001), responder=PipelineResponder(bad_rating_share=1.0)) as srv:
        cfg = _job(tmp_path, srv, "job", rate={"parse_retries": 0})
        code = main(["rate", str(cfg), "-i", str(src), "-o", str(tmp_path / "o"), "--quiet"])
    out, err = capfd.readouterr()
    assert code == 1
    assert err.count("\n") == 1 and "20 of 20 row(s) failed (100%, more than max_failed_fraction 0.5)" in err
    assert "unparseable reply (20)" in err
    assert out.count("\n") == 1 and out.startswith("evoray rate failed after")
    assert "rate 0 kept, 0 rejected, 20 failed of 20 (too many failed)" in out and "unparseable reply (20)" in out
    o = tmp_path / "o"
    assert pq.read_table(o / "failed.parquet").num_rows == 20  # the rows and their reasons are kept
    assert not (o / "_SUCCESS.json").exists()                   # ... but the stage is not complete
    assert json.loads((o / "_STOPPED.json").read_text())["reason"] == "too_many_failed"
    # the threshold is a setting: allowed, the same rows finish the stage with exit 0
    with FakeLLMServer(FakeServerConfig(latency_s=0.001), responder=PipelineResponder(bad_rating_share=1.0)) as srv:
        cfg = _job(tmp_path, srv, "job", rate={"parse_retries": 0}, max_failed_fraction=1.0)
        assert main(["rate", str(cfg), "-i", str(src), "-o", str(tmp_path / "o"), "--quiet"]) == 0
    assert (o / "_SUCCESS.json").exists()


# ---- the real console script with its own local Ray ------------------------------------------------------

def _env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(OPENAI_API_KEY=FAKE_KEY, RAY_TMPDIR=tempfile.mkdtemp(prefix="evo-", dir="/tmp"), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _session_logs(out: Path) -> Path:
    m = re.search(r"^Ray session logs: (\S+)$", (out / "logs" / "ray.log").read_text(), re.M)
    assert m, "ray.log names the Ray session's log folder"
    return Path(m.group(1))


@pytest.mark.ray
def test_quiet_600_row_rate_prints_one_line_and_closes_every_client(shared_data, tmp_path):
    """The issue's run: `evoray rate --quiet`, 600 rows, 4 rater actors, an OpenAI-compatible server,
    with ResourceWarning and asyncio debug on in every process: only the final line appears, and no
    actor leaves an aiohttp session or connector unclosed (Ray's worker logs are searched)."""
    from test_crash_resume import _kill_session

    env = _env(tmp_path, PYTHONASYNCIODEBUG="1", PYTHONWARNINGS="always::ResourceWarning")
    with FakeLLMServer(FakeServerConfig(latency_s=0.005)) as srv:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump({"providers": [fake_provider(srv, rpm=30000)], "ray": {"rater_actors": 4},
                                       "cache": {"enabled": False}}))
        out = tmp_path / "o"
        proc = subprocess.Popen([str(EXE), "rate", str(cfg), "-i", str(shared_data / "alpagasus/random_9k.json"),
                                 "--set", "input.limit=600", "-o", str(out), "--quiet"], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        worker_files: dict[str, str] = {}
        try:
            stdout, stderr = proc.communicate(timeout=400)
            if (out / "logs" / "ray.log").exists():  # the workers' own files, read before the Ray folder goes
                worker_files = {p.stem.rsplit("-", 1)[-1]: p.read_text(errors="replace")
                                for p in _session_logs(out).glob("worker-*.err")}
        finally:
            _kill_session(proc.pid)
            shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert proc.returncode == 0, stdout + stderr
    assert stderr == "", stderr
    assert stdout.count("\n") == 1 and re.match(r"evoray rate done in [\d.]+s: rate \d+ kept, \d+ rejected, 0 failed "
                                                r"of 600; no failed rows -> ", stdout), stdout
    # Ray's core_worker line about constructor arguments (once per process) is in the log, not on screen
    ray_log = (out / "logs" / "ray.log").read_text()
    assert "constructor arguments in the object store" in ray_log
    # every pool actor closed its client: counted by process, from its own file or its line forwarded to ray.log
    closed = "rate pool actor closed 1 client(s)"
    pids = {pid for pid, text in worker_files.items() if closed in text}
    pids |= set(re.findall(r"pid=(\d+)\) evoray: " + re.escape(closed), ray_log))
    assert len(pids) >= 4, (pids, sorted(worker_files))
    worker_text = "".join(worker_files.values()) + ray_log
    assert "Unclosed client session" not in worker_text and "Unclosed connector" not in worker_text


@pytest.mark.ray
def test_killed_local_ray_is_reported_in_one_line_and_finished_rows_are_kept(shared_data, tmp_path):
    from test_crash_resume import _kill_session, _session_pids

    env = _env(tmp_path)
    with FakeLLMServer(FakeServerConfig(latency_s=0.01)) as srv:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump({"providers": [fake_provider(srv, rpm=1200)], "cache": {"enabled": False},
                                       "ray": {"rater_actors": 2, "actor_concurrency": 4, "batch_size": 8}}))
        out = tmp_path / "o"
        proc = subprocess.Popen([str(EXE), "rate", str(cfg), "-i", str(shared_data / "alpagasus/random_9k.json"),
                                 "--set", "input.limit=600", "-o", str(out), "--quiet"], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while srv.stats()["ok"] < 120:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.2)
            gcs = [p for p in _session_pids(proc.pid)
                   if "gcs_server" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
            assert len(gcs) == 1
            os.kill(gcs[0], signal.SIGKILL)  # the local Ray's head process, as `ray stop` or the OOM killer would
            killed_at = time.monotonic()
            stdout, stderr = proc.communicate(timeout=120)
            took = time.monotonic() - killed_at
        finally:
            _kill_session(proc.pid)
            shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert proc.returncode == 1, stdout + stderr
    # one line on stderr says what happened and where Ray's logs are; the final line follows
    assert stderr.count("\n") == 1, stderr
    assert "Ray was lost under the job (the local Ray's GCS process ended" in stderr
    assert f"Ray's logs: {out / 'logs' / 'ray.log'}" in stderr and "Ray session logs:" in stderr
    assert stdout.count("\n") == 1 and "(unfinished: Ray was lost)" in stdout and stdout.startswith("evoray rate failed")
    assert took < 55, took  # noticed by evoray, not by Ray's own exit 60 s after the GCS died
    # the rows finished before the loss are kept, each once; the stage is not marked complete
    ids = [i for t in ("kept", "rejected", "failed") for i in pq.read_table(out / f"{t}.parquet").column("id").to_pylist()]
    assert 0 < len(ids) < 600 and len(set(ids)) == len(ids)
    assert not (out / "_SUCCESS.json").exists()
    assert json.loads((out / "_STOPPED.json").read_text())["reason"] == "ray_lost"


def test_ray_loss_names_lost_ray_and_not_a_failing_task():
    import ray.exceptions as rex

    from actors.watch import ray_loss
    from evoray.errors import RayLost

    assert ray_loss(rex.LocalRayletDiedError()) == "the raylet of this node died"
    assert ray_loss(rex.RpcError("Timed out while waiting for GCS to become available.")).startswith("the Ray cluster's head")
    wrapped = RuntimeError("iteration failed")
    wrapped.__cause__ = rex.NodeDiedError("node 1 died")
    assert ray_loss(wrapped) == "a Ray node died"
    assert ray_loss(RayLost("the local Ray's GCS process ended")) == "the local Ray's GCS process ended"
    assert ray_loss(ValueError("a bug in a stage")) is None
    assert ray_loss(rex.GetTimeoutError("timed out")) is None
