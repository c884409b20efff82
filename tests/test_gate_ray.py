"""The key gates on the shared Ray session: shared across jobs, found by name, killed mid-stage.

Strict fake server (at most rpm/60 requests in ANY second, rejected requests counted). These tests
run many requests from several processes on a loaded 2-core machine, so they grant a 10 % margin
(``limit_margin``: a request may arrive 100 ms after its permit); the default margin's guarantee
is a property of the schedule, checked on the fake clock in test_limiter.py.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pyarrow.parquet as pq
import pytest

from evoray.config import JobConfig
from evoray.io import write_table
from evoray.jobs import JobContext
from evoray.limiter import gate_actor_name, key_identity
from evoray.schema import new_row
from evoray.stages import stage_rate
from evoray.testing.clock import max_in_window
from evoray.testing.fake_server import FakeLLMServer, FakeServerConfig

from conftest import fake_provider

pytestmark = pytest.mark.ray

MARGIN = 0.1


def rows_file(path, n: int) -> list[str]:
    rows = [new_row(f"Explain step {i} of making tea and why it matters.", "", f"Step {i}: warm the pot.",
                    source="gate") for i in range(n)]
    write_table(rows, path)
    return [r["id"] for r in rows]


def job_config(srv, tmp, rpm, **ray_kw) -> JobConfig:
    return JobConfig.from_dict({
        "providers": [fake_provider(srv, rpm=rpm, limit_margin=MARGIN, max_attempts=6)],
        "output": {"dir": str(tmp / "out")},
        "ray": {"rater_actors": 2, "batch_size": 20, "actor_concurrency": 8, **ray_kw},
        "cache": {"enabled": False},
        "rate": {"random_baseline": False, "parse_retries": 0},
    })


def all_ids(out) -> list[str]:
    return [i for t in ("kept", "rejected", "failed") for i in pq.read_table(out / f"{t}.parquet").column("id").to_pylist()]


class KillGateAfter:
    """Kills the key gate actor (Ray restarts it, or not) once the server has seen ``after`` requests."""

    def __init__(self, srv, name: str, after: int, no_restart: bool, namespace: str | None = "evoray"):
        self.srv, self.name, self.after, self.no_restart = srv, name, after, no_restart
        self.namespace = namespace
        self.killed = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import ray

        while not self.stop.wait(0.05):
            if self.srv.stats()["requests"] >= self.after:
                ray.kill(ray.get_actor(self.name, namespace=self.namespace), no_restart=self.no_restart)
                self.killed.set()
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)


@pytest.mark.parametrize("no_restart", [False, True], ids=["restarted", "recreated"])
def test_killing_the_key_gate_mid_stage_loses_and_duplicates_no_row(ray_session, fake_key, tmp_path, no_restart):
    import ray

    n, rpm = 160, 1200
    ids = rows_file(tmp_path / "rows.parquet", n)
    with FakeLLMServer(FakeServerConfig(rpm=rpm, latency_s=0.05)) as srv:
        cfg = job_config(srv, tmp_path, rpm)
        name = gate_actor_name(key_identity("openai", srv.openai_base_url, fake_key))
        ctx = JobContext(cfg, quiet=True)
        try:
            with KillGateAfter(srv, name, after=50, no_restart=no_restart) as killer:
                res = stage_rate(ctx, str(tmp_path / "rows.parquet"), tmp_path / "out")
            ledger = ctx.ledger_dict()
        finally:
            ctx.close()
        stats = srv.stats()
        status = ray.get(ray.get_actor(name, namespace="evoray").status.remote())
    assert killer.killed.is_set(), "the gate was killed mid-stage"
    got = all_ids(tmp_path / "out")
    assert sorted(got) == sorted(ids) and len(got) == len(set(got)), "every row once"
    assert res.counts["input"] == n
    assert pq.read_table(tmp_path / "out" / "failed.parquet").num_rows == 0
    assert ledger["total"]["requests"] == stats["requests"] and stats["ok"] == n
    # a restarted gate knows it is one (and starts slow); a killed one is made anew by the clients
    assert status["restarted"] is (not no_restart)
    assert stats["rate_limited"] <= 3, stats["rate_limited"]


def test_a_job_gate_that_dies_mid_stage_restarts_with_its_ledger_whole(ray_session, fake_key, tmp_path):
    """The job's own gate actor (ledger, budget) dies mid-stage: Ray restarts it, the calls in flight
    are retried, every link sends its cumulative tallies again, and the ledger ends whole."""
    from actors.pools import gate_name

    n = 120
    ids = rows_file(tmp_path / "rows.parquet", n)
    with FakeLLMServer(FakeServerConfig(rpm=6000, latency_s=0.05)) as srv:
        cfg = job_config(srv, tmp_path, 6000)
        ctx = JobContext(cfg, quiet=True)
        try:
            name = gate_name(ctx.session().job_id)
            with KillGateAfter(srv, name, after=40, no_restart=False, namespace=None) as killer:
                res = stage_rate(ctx, str(tmp_path / "rows.parquet"), tmp_path / "out")
            ledger = ctx.ledger_dict()
        finally:
            ctx.close()
        stats = srv.stats()
    assert killer.killed.is_set(), "the job gate was killed mid-stage"
    got = all_ids(tmp_path / "out")
    assert sorted(got) == sorted(ids) and len(got) == len(set(got)), "every row once"
    assert res.counts["input"] == n and pq.read_table(tmp_path / "out" / "failed.parquet").num_rows == 0
    assert ledger["total"]["requests"] == stats["requests"] and ledger["total"]["succeeded"] == stats["ok"] == n


def test_two_jobs_on_one_key_share_one_gate_and_the_lower_limit(ray_session, fake_key, tmp_path):
    """Two jobs (own job gates, own ledgers) at once on one key: one key gate, found by name; the
    job configured lower sets the limit; together they stay within it."""
    import ray

    from actors.session import RaySession

    n_each = 60
    with FakeLLMServer(FakeServerConfig(rpm=600, latency_s=0.05)) as srv:
        sessions = [RaySession(job_config(srv, tmp_path, rpm), job_id=f"two-{uuid.uuid4().hex[:6]}")
                    for rpm in (1200, 600)]
        try:
            st = sessions[0].key_gate_status()["fake"]
            assert len(st["jobs"]) == 2 and st["rpm"] == 600  # the lower one wins
            assert st["label"].startswith("openai @ http://127.0.0.1")
            assert fake_key not in json.dumps(st) and fake_key not in gate_actor_name(
                key_identity("openai", srv.openai_base_url, fake_key))  # the gate never sees the key
            refs = [_send.remote(s._config_json, s.job_id, n_each, tag) for s, tag in zip(sessions, "ab")]
            outs = ray.get(refs)
            ledgers = [s.ledger() for s in sessions]
        finally:
            for s in sessions:
                s.close()
        stats = srv.stats()
    assert outs == [n_each, n_each]
    assert stats["ok"] == 2 * n_each and stats["rate_limited"] == 0
    assert max_in_window(stats["times"], 1.0) <= 10
    assert [lg["total"]["succeeded"] for lg in ledgers] == [n_each, n_each]  # each job its own ledger


def _remote_send():
    import ray

    @ray.remote(num_cpus=0.25)
    def send(config_json: str, job_id: str, n: int, tag: str) -> int:
        import asyncio

        from actors.pools import worker_context
        from evoray.providers.base import Request

        async def go():
            _, clients = worker_context(config_json, job_id, ["rater"])
            c = clients["rater"]
            outs = await asyncio.gather(*(c.complete(Request([{"role": "user", "content": f"{tag} {i}"}],
                                                             max_tokens=16)) for i in range(n)))
            await c.aclose()
            return len(outs)

        return asyncio.run(go())

    return send


class _Lazy:
    """``_send.remote(...)`` without importing ray at collection time."""

    _fn = None

    def remote(self, *a):
        if _Lazy._fn is None:
            _Lazy._fn = _remote_send()
        return _Lazy._fn.remote(*a)


_send = _Lazy()


def test_an_idle_key_gate_exits_by_itself(ray_session):
    import ray

    from actors.gate import key_gate

    ident = key_identity("openai", f"http://idle-{uuid.uuid4().hex[:8]}.test/v1", "sk-idle-key-000000")
    handle = key_gate(ident, idle_exit_s=1.0)
    assert ray.get(handle.status.remote())["idle_exit_s"] == 1.0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get_actor(gate_actor_name(ident), namespace="evoray")
        except ValueError:
            break  # gone: the name is free for the next job
        time.sleep(0.5)
    else:
        pytest.fail("the idle key gate did not exit")
