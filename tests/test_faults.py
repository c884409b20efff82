"""API faults through the rater and evolver pools: nothing lost, nothing counted twice.

The fake server answers 10 % of requests with 500/503, 5 % with a malformed body, hangs 2 % past
the provider's timeout, and halves its rate limit mid-run while the job keeps the original rpm and
the server's headers keep announcing it (so the server answers 429 with ``retry-after``, the
client must back off and the key's gate must learn the lower limit from the 429s). A few "poison" rows
always draw a 500, so the failed table is never empty and its rows can be checked.

CI size: 400 rows through the rater pool, 60 through the evolver pool; the full size (5,000 and
500) is ``bench/faults_full.py``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from evoray.config import JobConfig
from evoray.io import write_table
from evoray.jobs import JobContext
from evoray.schema import new_row
from evoray.stages import stage_evolve, stage_rate
from evoray.testing.fake_server import FakeLLMServer, FakeServerConfig, _normalise, _wants_json, default_reply

from conftest import fake_provider

POISON = "POISON-ROW"
MAX_ATTEMPTS = 8
# Hangs last HANG_S, past the provider's timeout. The timeout leaves room for a slow normal answer on
# a busy 2-core machine: an attempt that times out before the server reads it is an attempt the
# ledger counts and the server never saw (found when this test ran at timeout_s=1 under load 30+).
TIMEOUT_S, HANG_S = 2.0, 2.5


def poison_responder(kind: str, body: dict) -> str:
    """Normal replies, except for rows whose text holds POISON: the responder raises -> a 500."""
    messages = _normalise(kind, body)
    if any(POISON in m["content"] for m in messages):
        raise RuntimeError("poisoned row")
    return default_reply(messages, _wants_json(kind, body)[0])


def write_rows(path: Path, n: int, n_poison: int) -> list[str]:
    rows = []
    for i in range(n):
        tag = f" {POISON}" if i % (n // n_poison) == 0 else ""
        rows.append(new_row(f"Explain point {i} of baking bread and why it matters.{tag}", "",
                            f"Point {i}: let the dough rest so the gluten relaxes.", source="faults"))
    write_table(rows, path)
    return [r["id"] for r in rows]


def fault_config(srv: FakeLLMServer, tmp: Path, rpm: float, **ray_kw) -> JobConfig:
    return JobConfig.from_dict({
        "providers": [fake_provider(srv, rpm=rpm, timeout_s=TIMEOUT_S, max_attempts=MAX_ATTEMPTS,
                                    backoff_base_s=0.05, backoff_max_s=0.5, cooldown_s=0.5,
                                    failures_before_cooldown=50)],
        "output": {"dir": str(tmp / "out")},
        "ray": {"batch_size": 25, **ray_kw},
        "cache": {"dir": str(tmp / "cache")},
        "rate": {"random_baseline": False, "parse_retries": 1},
        "evolve": {"rounds": 1},
    })


class HalveLimitAfter:
    """Halves the server's rpm from a background thread once it has seen ``after`` requests; its
    headers keep announcing the original limit, so only 429s tell the job."""

    def __init__(self, srv: FakeLLMServer, rpm: float, after: int):
        self.srv, self.rpm, self.after = srv, rpm, after
        self.done = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            if self.srv.stats()["requests"] >= self.after:
                self.srv.update(rpm=self.rpm / 2, advertised_rpm=self.rpm)
                self.done.set()
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)


def server_config(rpm: float) -> FakeServerConfig:
    return FakeServerConfig(error_rate=0.10, error_statuses=(500, 503), malformed_rate=0.05, hang_rate=0.02,
                            hang_s=HANG_S, rpm=rpm, burst_seconds=0.5, retry_after_s=0.5, latency_s=0.005, seed=7)


def check_failed_rows(failed: list[dict], poison_keys: set[str], key: str) -> None:
    assert poison_keys <= {r[key] for r in failed}, "every poison row ends in the failed table"
    for r in failed:
        assert r["status"] == "failed"
        assert r["reason"], r
        assert r["attempts"] is not None and r["attempts"] >= 1, r
    for r in failed:
        if r[key] in poison_keys:  # a 500 every time: the retry layer gave up after max_attempts
            assert r["attempts"] >= MAX_ATTEMPTS and "gave up after" in r["reason"] and "500" in r["reason"], r


def check_ledger(ledger: dict, stats: dict) -> None:
    assert ledger["total"]["requests"] == stats["requests"], (ledger["total"], {k: stats[k] for k in (
        "requests", "ok", "rate_limited", "errors", "malformed", "hangs", "responder_errors")})
    assert ledger["total"]["rate_limited"] == stats["rate_limited"]
    assert ledger["total"]["succeeded"] == stats["ok"]


@pytest.mark.ray
def test_rate_400_rows_under_faults_every_row_once(ray_session, fake_key, tmp_path):
    n, rpm = 400, 3000
    inp = tmp_path / "rows.parquet"
    ids = write_rows(inp, n, n_poison=4)
    poison_ids = {i for i, r in zip(ids, pq.read_table(inp).column("instruction").to_pylist()) if POISON in r}
    assert len(poison_ids) == 4
    with FakeLLMServer(server_config(rpm), responder=poison_responder) as srv:
        cfg = fault_config(srv, tmp_path, rpm, rater_actors=2, actor_concurrency=16)
        ctx = JobContext(cfg, quiet=True)
        try:
            with HalveLimitAfter(srv, rpm, after=120) as halver:
                res = stage_rate(ctx, str(inp), tmp_path / "out")
            ledger = ctx.ledger_dict()
        finally:
            ctx.close()
        stats = srv.stats()
    assert halver.done.is_set(), "the limit was halved mid-run"
    out = tmp_path / "out"
    kept = pq.read_table(out / "kept.parquet").to_pylist()
    rejected = pq.read_table(out / "rejected.parquet").to_pylist()
    failed = pq.read_table(out / "failed.parquet").to_pylist()
    got = [r["id"] for r in kept + rejected + failed]
    assert len(got) == len(set(got)), "no row in two tables, no duplicate ids"
    assert sorted(got) == sorted(ids), "every input row in exactly one table"
    assert res.counts["input"] == n and res.counts.get("budget_stopped", 0) == 0
    check_failed_rows(failed, poison_ids, "id")
    assert len(failed) <= len(poison_ids) + n * 0.02, "max_attempts lets nearly every row through"
    assert all(r["score"] is not None and r["attempts"] >= 1 for r in kept + rejected)
    # every kind of fault happened, and the 429s came after the halving
    for k in ("errors", "malformed", "hangs", "rate_limited", "responder_errors"):
        assert stats[k] > 0, (k, stats)
    check_ledger(ledger, stats)


@pytest.mark.ray
def test_evolve_60_rows_under_faults_every_parent_once(ray_session, fake_key, tmp_path):
    n, rpm = 60, 3000
    inp = tmp_path / "rows.parquet"
    ids = write_rows(inp, n, n_poison=3)
    poison_ids = {i for i, r in zip(ids, pq.read_table(inp).column("instruction").to_pylist()) if POISON in r}
    assert len(poison_ids) == 3
    with FakeLLMServer(server_config(rpm), responder=poison_responder) as srv:
        cfg = fault_config(srv, tmp_path, rpm, evolver_actors=2, actor_concurrency=8, batch_size=10)
        ctx = JobContext(cfg, quiet=True)
        try:
            with HalveLimitAfter(srv, rpm, after=40) as halver:
                res = stage_evolve(ctx, str(inp), tmp_path / "out")
            ledger = ctx.ledger_dict()
        finally:
            ctx.close()
        stats = srv.stats()
    assert halver.done.is_set()
    out = tmp_path / "out"
    evolved = pq.read_table(out / "evolved.parquet").to_pylist()
    failed = pq.read_table(out / "failed.parquet").to_pylist()
    parents = [r["parent_id"] for r in evolved + failed]
    assert len(parents) == len(set(parents)), "each seed row evolved once"
    assert sorted(parents) == sorted(ids)
    ids_out = [r["id"] for r in evolved + failed]
    assert len(ids_out) == len(set(ids_out))
    assert res.counts["input"] == n
    check_failed_rows(failed, poison_ids, "parent_id")
    assert len(failed) <= len(poison_ids) + 3
    for r in evolved:
        assert r["output"] and r["round"] == 1 and r["attempts"] >= 2  # evolve + answer (a cache hit counts 1)
    for k in ("errors", "malformed", "responder_errors"):
        assert stats[k] > 0, (k, stats)
    check_ledger(ledger, stats)


async def test_a_cancelled_attempt_is_still_counted(fake_key):
    """A row cancelled while its request is on the wire (budget stop, shutdown): the provider saw the
    request, so the ledger counts it too (no Ray)."""
    import asyncio

    from evoray.client import LLMClient, LocalGate
    from evoray.config import ProviderConfig
    from evoray.gate import Gatekeeper
    from evoray.providers import build_provider
    from evoray.providers.base import Request

    with FakeLLMServer(FakeServerConfig(hang_rate=1.0, hang_s=10)) as srv:
        cfg = ProviderConfig(name="fake", kind="openai", model="m", base_url=srv.openai_base_url, timeout_s=20)
        client = LLMClient([build_provider(cfg)], LocalGate(Gatekeeper([cfg])), cache=None)
        task = asyncio.ensure_future(client.complete(Request(messages=[{"role": "user", "content": "hi"}])))
        for _ in range(200):
            await asyncio.sleep(0.05)
            if srv.stats()["requests"]:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert srv.stats()["requests"] == 1
        assert client.ledger.totals().requests == 1
        await client.aclose()
