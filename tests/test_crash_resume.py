"""Crashes: a killed pool actor, and a killed driver that is run again.

(a) A rater actor and an evolver actor are SIGKILLed mid-stage (their pids come from the GCS actor
    table of the shared Ray session). Ray Data restarts the actor and retries its tasks; the stage
    drops rows it already has (by input position, see evoray/seen.py), so every row lands exactly once.
(b) ``evoray run`` in a subprocess (its own local Ray) is SIGKILLed mid-run with its whole process
    group, then run again: it completes, and the fake server saw no repeated request beyond the
    ones in flight at the kill (bounded by actors x actor_concurrency) - the rest came from the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from evoray.config import JobConfig
from evoray.io import write_table
from evoray.jobs import JobContext
from evoray.schema import new_row
from evoray.stages import stage_evolve, stage_rate
from evoray.testing.fake_server import FakeLLMServer, FakeServerConfig, _normalise, _wants_json, default_reply

from conftest import FAKE_KEY, fake_provider

pytestmark = pytest.mark.ray


def make_rows(path: Path, n: int, what: str = "bread") -> list[str]:
    rows = [new_row(f"Explain step {i} of making {what}, and why it matters.", "",
                    f"Step {i}: knead the dough for ten minutes.", source="crash") for i in range(n)]
    write_table(rows, path)
    return [r["id"] for r in rows]


def alive_pool_actors() -> list[dict]:
    from ray._private import state

    return [a for a in state.actors().values()
            if "MapWorker" in a.get("ActorClassName", "") and a.get("State") == "ALIVE" and a.get("Pid")]


class KillOneActorAfter(threading.Thread):
    """SIGKILLs one live pool actor process once the server has seen ``after`` requests."""

    def __init__(self, srv: FakeLLMServer, after: int):
        super().__init__(daemon=True)
        self.srv, self.after = srv, after
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            if self.srv.stats()["requests"] < self.after:
                continue
            actors = alive_pool_actors()
            if actors:
                pid = actors[0]["Pid"]
                os.kill(pid, signal.SIGKILL)
                self.killed = pid
                return


def test_killed_rater_and_evolver_actors_every_row_once(ray_session, fake_key, tmp_path):
    make_rows(tmp_path / "rate.parquet", 120)
    evolve_ids = make_rows(tmp_path / "evolve.parquet", 40, "pasta")
    rate_ids = pq.read_table(tmp_path / "rate.parquet").column("id").to_pylist()
    with FakeLLMServer(FakeServerConfig(latency_s=0.1)) as srv:
        cfg = JobConfig.from_dict({
            "providers": [fake_provider(srv)],
            "ray": {"rater_actors": 2, "evolver_actors": 2, "batch_size": 10, "actor_concurrency": 4},
            "cache": {"enabled": False},
            "rate": {"random_baseline": False},
        })
        ctx = JobContext(cfg, quiet=True)
        try:
            killer = KillOneActorAfter(srv, after=30)
            killer.start()
            rate = stage_rate(ctx, str(tmp_path / "rate.parquet"), tmp_path / "rate")
            killer.stop.set()
            killer.join()
            assert killer.killed, "a rater actor was killed mid-stage"
            start = srv.stats()["requests"]
            killer2 = KillOneActorAfter(srv, after=start + 20)
            killer2.start()
            evolve = stage_evolve(ctx, str(tmp_path / "evolve.parquet"), tmp_path / "evolve")
            killer2.stop.set()
            killer2.join()
            assert killer2.killed, "an evolver actor was killed mid-stage"
        finally:
            ctx.close()

    out = tmp_path / "rate"
    got = [r["id"] for t in ("kept", "rejected", "failed") for r in pq.read_table(out / f"{t}.parquet").to_pylist()]
    assert sorted(got) == sorted(rate_ids) and len(got) == len(set(got))
    assert rate.counts["input"] == 120
    out = tmp_path / "evolve"
    parents = [r["parent_id"] for t in ("evolved", "failed") for r in pq.read_table(out / f"{t}.parquet").to_pylist()]
    assert sorted(parents) == sorted(evolve_ids) and len(parents) == len(set(parents))
    assert evolve.counts["input"] == 40
    assert json.loads((tmp_path / "evolve" / "_SUCCESS.json").read_text())["counts"]["input"] == 40


# ---- (b) a killed driver ---------------------------------------------------------------------------

class CountingResponder:
    """Default replies; remembers a hash of every request it answered, to count repeats."""

    def __init__(self):
        self.keys: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, kind: str, body: dict) -> str:
        key = hashlib.sha256(json.dumps({k: body.get(k) for k in ("messages", "temperature", "top_p", "max_tokens",
                                                                   "seed", "response_format")},
                                        sort_keys=True).encode()).hexdigest()
        with self.lock:
            self.keys.append(key)
        messages = _normalise(kind, body)
        return default_reply(messages, _wants_json(kind, body)[0])


def _session_pids(sid: int) -> list[int]:
    """Processes whose session id is ``sid`` (everything the killed driver started, Ray included)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: the session id
            out.append(int(d.name))
    return out


def _kill_session(sid: int) -> None:
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        left = _session_pids(sid)
        if not left:
            return
        for pid in left:  # children that made their own process group but stayed in the session
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def test_killed_driver_rerun_completes_repeats_bounded_by_in_flight(fake_key, tmp_path):
    n, actors, conc = 64, 2, 4
    make_rows(tmp_path / "rows.parquet", n)
    responder = CountingResponder()
    ray_tmp = tempfile.mkdtemp(prefix="evr-", dir="/tmp")  # this child's own Ray temp dir (short: socket paths)
    exe = Path(sys.executable).with_name("evoray")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(OPENAI_API_KEY=FAKE_KEY, RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    try:
        with FakeLLMServer(FakeServerConfig(latency_s=0.25, latency_dist="fixed"), responder=responder) as srv:
            cfg = tmp_path / "job.yaml"
            cfg.write_text(json.dumps({
                "providers": [fake_provider(srv)],
                "input": {"path": str(tmp_path / "rows.parquet")},
                "ray": {"num_cpus": 2, "rater_actors": actors, "actor_concurrency": conc, "batch_size": 10},
                "pipeline": ["rate"],
            }))
            args = [str(exe), "run", str(cfg), "--set", f"output.dir={tmp_path / 'out'}",
                    "--set", f"cache.dir={tmp_path / 'cache'}"]
            with open(tmp_path / "run1.log", "w") as log:
                proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        cwd=tmp_path)
                try:
                    deadline = time.monotonic() + 240
                    while srv.stats()["ok"] < n // 3:
                        assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
                        assert time.monotonic() < deadline, "the first run made no progress"
                        time.sleep(0.1)
                finally:
                    _kill_session(proc.pid)
                    proc.wait(10)
            time.sleep(1.0)  # requests that were on the wire at the kill finish at the server
            first = srv.stats()
            assert first["ok"] < n, "the kill came before the end of the stage"
            out = tmp_path / "out" / "rate"
            assert not (out / "_SUCCESS.json").exists() and not (out / "kept.parquet").exists()

            r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            total = srv.stats()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    got = [x["id"] for t in ("kept", "rejected", "failed") for x in pq.read_table(out / f"{t}.parquet").to_pylist()]
    ids = pq.read_table(tmp_path / "rows.parquet").column("id").to_pylist()
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))
    assert (out / "_SUCCESS.json").exists()
    unique = len(set(responder.keys))
    in_flight = actors * conc
    assert total["requests"] <= unique + in_flight, (total["requests"], unique, first["requests"])
    assert total["requests"] > first["requests"]  # the second run did send the rest
    ledger = json.loads((tmp_path / "out" / "ledger.json").read_text())
    assert ledger["total"]["cache_hits"] >= first["ok"] - in_flight  # answered before the kill: from the cache
