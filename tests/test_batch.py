"""Batch mode end to end: the batch runner, the batch client the per-row code calls, and the stages
in batch mode, through the real openai and anthropic SDKs against the fake server's batch endpoints.

Polls wait through an injected recording ``sleep`` (no wall time); batches end after a number of
polls (``polls_to_complete``), never after a timed wait. Only the kill test starts a process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from evoray.batch import STATE_FILE, BatchJob, BatchRunner, BatchState
from evoray.cache import ResponseCache, cache_key
from evoray.client import LLMClient, LocalGate
from evoray.config import BatchConfig, JobConfig, ProviderConfig
from evoray.errors import BudgetExceeded, ConfigError
from evoray.gate import Gatekeeper
from evoray.jobs import JobContext
from evoray.providers import build_provider
from evoray.providers.base import Request
from evoray.rating import Rater
from evoray.testing.fake_server import FakeLLMServer
from evoray.testing.responders import PipelineResponder

KEY = "sk-evoray-batch-test-SECRET-5b2d7f"
KINDS = ["openai", "anthropic"]
PRICE = {"input_per_mtok": 2.0, "output_per_mtok": 8.0}


@pytest.fixture(autouse=True)
def _keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)


@pytest.fixture
def srv():
    with FakeLLMServer(responder=PipelineResponder()) as s:
        s.update(required_key=KEY)
        yield s


class Recorder:
    """An injected ``sleep``: records the waits, waits for none of them."""

    def __init__(self):
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


def pconf(srv, kind="openai", name="fake", **kw) -> dict:
    d = {"name": name, "kind": kind, "model": "fake-model",
         "base_url": srv.openai_base_url if kind == "openai" else srv.anthropic_base_url,
         "max_attempts": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 10, "price": dict(PRICE)}
    d.update(kw)
    return d


def rows(n: int, tag: str = "") -> list[dict]:
    return [{"id": f"r{tag}{i:03d}", "instruction": f"Explain idea {tag}{i} to a child.", "input": "",
             "output": f"Idea {tag}{i} is simple: it is explained with a short story.", "source": "t"}
            for i in range(n)]


def requests(n: int) -> dict[str, Request]:
    out = {}
    for i in range(n):
        r = Request(messages=[{"role": "system", "content": "You rate answers."},
                              {"role": "user", "content": f"Rate answer {i} on a scale of 0 to 5."}], max_tokens=32)
        out[f"req-{i:03d}"] = r
    return out


def make_job(srv, tmp_path, kind="openai", *, cache=True, retry="online", sleep=None, budget=None, **batch):
    """A BatchJob as the stage builds it: real providers, an in-process gate, the cache, an online client."""
    settings = BatchConfig(poll_interval_s=5, retry=retry, **batch)
    cfg = ProviderConfig.model_validate(pconf(srv, kind))
    prov = build_provider(cfg)
    keeper = Gatekeeper([cfg], budget_usd=budget)
    gate = LocalGate(keeper)
    store = ResponseCache(tmp_path / "cache") if cache else None
    online = LLMClient([prov], gate, cache=store) if retry == "online" else None
    state = BatchState(tmp_path / STATE_FILE)
    runner = BatchRunner(prov, state, settings, sleep=sleep or Recorder())
    job = BatchJob([prov], {prov.name: runner}, settings=settings, gate=gate, cache=store, online=online)
    return job, keeper, runner


def rate_config(srv, tmp_path, kind="openai", n=30, **over) -> JobConfig:
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(n)))
    d = {"providers": [pconf(srv, kind, mode="batch")], "input": {"path": str(data)},
         "output": {"dir": str(tmp_path / "out")}, "cache": {"dir": str(tmp_path / "cache")},
         "batch": {"poll_interval_s": 0}, "rate": {"parse_retries": 1}}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(d.get(k), dict) else v
    return JobConfig.from_dict(d)


# ---- the runner ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
async def test_runner_answers_like_online_and_polls_with_the_injected_sleep(srv, tmp_path, kind):
    srv.batches.update(polls_to_complete=3)
    job, _, runner = make_job(srv, tmp_path, kind)
    reqs = requests(8)
    try:
        results = await runner.run(reqs)
        assert set(results) == set(reqs)
        prov = runner.provider
        for cid, req in reqs.items():
            online = await prov.complete(req)  # the same request sent online
            got = results[cid].completion
            assert got is not None and got.text == online.text
            assert (got.input_tokens, got.output_tokens) == (online.input_tokens, online.output_tokens)
    finally:
        await job.aclose()
    assert runner.sleep.delays == [5, 5]  # it ends at its third poll: two waits, at the configured interval
    st = srv.batches.stats()
    assert st["batches_created"] == 1 and st["lines"] == 8
    entry, = json.loads((tmp_path / STATE_FILE).read_text())["batches"]
    assert entry["id"] == runner.submitted[0] and entry["collected"] and entry["lines"] == 8
    assert set(BatchState(tmp_path / STATE_FILE).ids(entry)) == set(reqs)


async def test_runner_splits_into_batches_of_max_requests(srv, tmp_path):
    job, _, runner = make_job(srv, tmp_path, max_requests=4)
    try:
        results = await runner.run(requests(10))
    finally:
        await job.aclose()
    assert sum(r.completion is not None for r in results.values()) == 10
    assert len(runner.submitted) == 3 and srv.batches.stats()["lines"] == 10


@pytest.mark.parametrize("kind", KINDS)
async def test_resume_after_kill_polls_the_recorded_batch(srv, tmp_path, kind):
    """A run killed after the batch was created: a re-run finds its id and creates no new batch."""
    srv.batches.update(polls_to_complete=2)

    class Killed(BaseException):
        pass

    async def kill(_s):
        raise Killed()

    job, _, runner = make_job(srv, tmp_path, kind, sleep=kill)
    with pytest.raises(Killed):
        await runner.run(requests(6))
    await job.aclose()
    assert srv.batches.stats()["batches_created"] == 1
    entry, = json.loads((tmp_path / STATE_FILE).read_text())["batches"]
    assert entry["id"] and not entry["collected"]

    job2, _, runner2 = make_job(srv, tmp_path, kind)
    try:
        results = await runner2.run(requests(6))
    finally:
        await job2.aclose()
    assert runner2.submitted == [] and runner2.adopted == [entry["id"]]
    assert srv.batches.stats()["batches_created"] == 1
    assert all(r.completion is not None for r in results.values())
    # a request the recorded batch does not hold is submitted in a new batch
    job3, _, runner3 = make_job(srv, tmp_path, kind)
    more = requests(7)
    try:
        await runner3.run(more)
    finally:
        await job3.aclose()
    assert len(runner3.submitted) == 1 and srv.batches.stats()["lines"] == 7


async def test_recorded_batch_unknown_to_the_provider_is_submitted_again(srv, tmp_path):
    job, _, runner = make_job(srv, tmp_path)
    try:
        await runner.run(requests(3))
    finally:
        await job.aclose()
    srv.batches.batches.clear()  # the provider forgot it (deleted, another account)
    job2, _, runner2 = make_job(srv, tmp_path)
    try:
        results = await runner2.run(requests(3))
    finally:
        await job2.aclose()
    assert len(runner2.submitted) == 1 and all(r.completion for r in results.values())
    assert json.loads((tmp_path / STATE_FILE).read_text())["batches"][0]["lost"] is True


# ---- the batch client: rows, retries, cache, ledger --------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
async def test_partial_failure_is_retried_online(srv, tmp_path, kind):
    failing = {"r003", "r007", "r011"}
    data = {r["id"]: r for r in rows(12)}
    srv.batches.update(line_outcome=lambda k, cid, no: "error" if cid in bad_keys else "ok")
    job, keeper, _ = make_job(srv, tmp_path, kind)
    client = job.client()
    rater = Rater(client, use_schema=True)
    bad_keys = {cache_key(kind, "fake-model", rater.request(data[i])) for i in failing}
    try:
        out = await client.run(rater.rate, list(data.values()))
    finally:
        await job.aclose()
    assert [o["status"] for o in out] == ["scored"] * 12
    st = srv.batches.stats()
    assert st["lines"] == 12 and st["lines_failed"] == 3
    assert srv.stats()["requests"] == 3  # exactly the failed lines went online
    tot = keeper.ledger.to_dict()["total"]
    assert tot["batch_requests"] == 9 and tot["succeeded"] == 12 and tot["errors"] == 3


async def test_retry_in_the_next_batch_then_fail_with_the_cause(srv, tmp_path):
    data = rows(6)
    job, keeper, runner = make_job(srv, tmp_path, retry="batch", max_rounds=2)
    client = job.client()
    rater = Rater(client, use_schema=True)
    keys = [cache_key("openai", "fake-model", rater.request(r)) for r in data]
    # line 0 fails in every batch; line 1 fails only in its first batch
    first_batch: list[int] = []

    def outcome(kind, cid, no):
        first_batch.append(no) if not first_batch else None
        if cid == keys[0] or (cid == keys[1] and no == first_batch[0]):
            return "error"
        return "ok"

    srv.batches.update(line_outcome=outcome)
    try:
        out = await client.run(rater.rate, data)
    finally:
        await job.aclose()
    assert [o["status"] for o in out] == ["failed"] + ["scored"] * 5, [o["reason"] for o in out]
    assert "gave up after 2 attempt(s)" in out[0]["reason"] and "status 500" in out[0]["reason"]
    assert out[0]["attempts"] == 2 and out[1]["attempts"] == 2
    assert len(runner.submitted) == 2 and srv.batches.stats()["lines"] == 6 + 2
    assert srv.stats()["requests"] == 0  # nothing online
    assert client.rounds == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_expired_batch_lines_are_retried(srv, tmp_path, kind):
    srv.batches.update(expire=True, expire_done_share=0.5)
    job, keeper, _ = make_job(srv, tmp_path, kind)
    client = job.client()
    rater = Rater(client, use_schema=True)
    try:
        out = await client.run(rater.rate, rows(10))
    finally:
        await job.aclose()
    assert all(o["status"] == "scored" for o in out)
    st = srv.batches.stats()
    assert st["lines_expired"] == 5 and st["lines_ok"] == 5
    assert srv.stats()["requests"] == 5


async def test_a_line_rejected_as_a_bad_request_fails_its_row_without_retry(srv, tmp_path):
    srv.batches.update(line_error_rate=1.0, line_error_status=400)
    job, _, _ = make_job(srv, tmp_path)
    client = job.client()
    try:
        out = await client.run(Rater(client).rate, rows(3))
    finally:
        await job.aclose()
    assert [o["status"] for o in out] == ["failed"] * 3
    assert all("status 400" in o["reason"] and "batch line errored" in o["reason"] for o in out)
    assert srv.stats()["requests"] == 0


async def test_cache_is_honoured_and_filled(srv, tmp_path):
    job, keeper, _ = make_job(srv, tmp_path)
    client = job.client()
    rater = Rater(client, use_schema=True)
    first = rows(8)
    try:
        out1 = await client.run(rater.rate, first)
    finally:
        await job.aclose()
    store = ResponseCache(tmp_path / "cache")
    assert all(store.get(cache_key("openai", "fake-model", rater.request(r))) is not None for r in first)
    assert srv.batches.stats()["lines"] == 8

    job2, keeper2, _ = make_job(srv, tmp_path)
    client2 = job2.client()
    rater2 = Rater(client2, use_schema=True)
    try:
        out2 = await client2.run(rater2.rate, first + rows(3, tag="new"))
    finally:
        await job2.aclose()
    assert srv.batches.stats()["lines"] == 8 + 3  # cached requests were not sent
    assert [o["score"] for o in out2[:8]] == [o["score"] for o in out1]
    tot = keeper2.ledger.to_dict()["total"]
    assert tot["cache_hits"] == 8 and tot["batch_requests"] == 3


async def test_ledger_prices_batched_lines_at_the_batch_rate(srv, tmp_path):
    job, keeper, _ = make_job(srv, tmp_path)
    client = job.client()
    try:
        await client.run(Rater(client, use_schema=True).rate, rows(5))
    finally:
        await job.aclose()
    t = keeper.ledger.to_dict()["total"]
    st = srv.batches.stats()
    assert (t["input_tokens"], t["output_tokens"]) == (st["input_tokens"], st["output_tokens"])
    half = (st["input_tokens"] * PRICE["input_per_mtok"] + st["output_tokens"] * PRICE["output_per_mtok"]) / 2e6
    assert t["dollars"] == pytest.approx(half)
    # explicit batch prices win over the discount
    from evoray.config import Price
    from evoray.ledger import Ledger

    led = Ledger({"p": Price(input_per_mtok=10, output_per_mtok=10, batch_input_per_mtok=1, batch_discount=0.9)})
    assert led.cost("p", 1_000_000, 1_000_000, batch=True) == pytest.approx(1 + 9)
    assert led.cost("p", 1_000_000, 1_000_000) == pytest.approx(20)


async def test_budget_stops_further_batches(srv, tmp_path):
    job, keeper, _ = make_job(srv, tmp_path, budget=1e-9)
    client = job.client()
    rater = Rater(client, use_schema=True)
    try:
        out = await client.run(rater.rate, rows(4))  # the first round is sent, then the budget is reached
        assert job.stop
        late = await job.client().run(rater.rate, rows(2, tag="late"))
    finally:
        await job.aclose()
    assert all(o["status"] == "scored" for o in out)
    assert all(isinstance(x, BudgetExceeded) for x in late)
    assert srv.batches.stats()["lines"] == 4


# ---- the stages in batch mode ---------------------------------------------------------------------------------

def _online_rows(srv, cfg: JobConfig, data: list[dict]) -> dict[str, dict]:
    """The same rows rated online in-process (LLMClient, no Ray), for comparison."""
    p = build_provider(cfg.providers[0])

    async def go():
        client = LLMClient([p], LocalGate(Gatekeeper([cfg.providers[0]])), cache=None)
        try:
            return await Rater(client, cfg.rate, use_schema=True).rate_batch(data, 8)
        finally:
            await client.aclose()

    return {r["id"]: r for r in asyncio.run(go())}


@pytest.mark.parametrize("kind", KINDS)
def test_rate_stage_in_batch_mode_gives_the_online_rows(tmp_path, kind):
    from evoray.stages import stage_rate

    with FakeLLMServer(responder=PipelineResponder(bad_rating_share=0.1)) as srv:
        srv.batches.update(polls_to_complete=2, line_error_rate=0.2)
        cfg = rate_config(srv, tmp_path, kind, n=30, rate={"threshold": 4.0})
        ctx = JobContext(cfg, quiet=True)
        res = stage_rate(ctx, None, tmp_path / "out")
        assert ctx._session is None  # no Ray: the work is waiting on the provider
        st, online_requests = srv.batches.stats(), srv.stats()["requests"]
        from evoray.io import iter_rows

        online = _online_rows(srv, cfg, list(iter_rows([str(tmp_path / "in.jsonl")])))
    out = tmp_path / "out"
    got = {}
    for t in ("kept", "rejected", "failed"):
        if (out / f"{t}.parquet").exists():
            got.update({r["id"]: r for r in pq.read_table(out / f"{t}.parquet").to_pylist()})
    assert len(got) == 30 == res.counts["input"]
    assert res.counts["kept"] + res.counts["rejected"] + res.counts["failed"] == 30 and res.counts["failed"] >= 1
    for rid, r in got.items():
        o = online[rid]
        want = "failed" if o["status"] == "failed" else ("kept" if o["score"] >= 4.0 else "rejected")
        assert (r["status"], r["score"], r["explanation"], r["reason"]) == (want, o["score"], o["explanation"],
                                                                           o["reason"]), rid
    # the unparseable rows were asked again in a second round of batches; failed lines went online
    assert st["batches_created"] == 2 and st["lines_failed"] > 0
    ledger = json.loads((out / "ledger.json").read_text())["total"]
    assert ledger["batch_requests"] == st["lines_ok"]
    assert ledger["requests"] == st["lines"] + online_requests
    state = (out / STATE_FILE).read_text()
    assert KEY not in state and all(KEY not in p.read_text() for p in (out / "_batches_ids").iterdir())
    assert json.loads((out / "scores.json").read_text())["kept"] == res.counts["kept"]


def test_judge_stage_sends_both_orders_in_one_round(tmp_path):
    from evoray.stages import stage_judge

    a = [{"instruction": f"Question {i}?", "output": f"Answer A{i}."} for i in range(6)]
    b = [{"instruction": f"Question {i}?", "output": f"Answer B{i}, longer."} for i in range(6)]
    for name, data in (("a", a), ("b", b)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    with FakeLLMServer() as srv:
        cfg = JobConfig.from_dict({
            "providers": [pconf(srv, "anthropic")], "judge": {"mode": "batch", "answers_a": str(tmp_path / "a.jsonl"),
                                                               "answers_b": str(tmp_path / "b.jsonl")},
            "output": {"dir": str(tmp_path / "out")}, "cache": {"dir": str(tmp_path / "cache")},
            "batch": {"poll_interval_s": 0}})
        ctx = JobContext(cfg, quiet=True)
        res = stage_judge(ctx, tmp_path / "out")
        st = srv.batches.stats()
        # again into another folder: every request is in the cache, each counted once as a hit
        cfg2 = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(tmp_path / "out2")})})
        stage_judge(JobContext(cfg2, quiet=True), tmp_path / "out2")
        st2 = srv.batches.stats()
    assert st["batches_created"] == 1 and st["lines"] == 12  # 6 pairs x 2 orders in one batch
    assert res.counts["judgments"] == 6
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["overall"]
    assert summary["n"] == 6 and summary["failed"] == 0 and summary["tie"] == 6  # the fake scores 8 / 7 in both orders
    assert st2["lines"] == 12 and st2["batches_created"] == 1
    led2 = json.loads((tmp_path / "out2" / "ledger.json").read_text())["total"]
    assert led2["cache_hits"] == 12 and led2["requests"] == 0
    assert json.loads((tmp_path / "out2" / "summary.json").read_text())["overall"] == summary


def test_answer_stage_in_batch_mode(tmp_path):
    from evoray.stages import stage_answer

    with FakeLLMServer() as srv:
        cfg = rate_config(srv, tmp_path, n=5, answer={"mode": "batch"}, rate={"mode": "online"})
        res = stage_answer(JobContext(cfg, quiet=True), None, tmp_path / "out")
        assert srv.batches.stats()["lines"] == 5 and srv.stats()["requests"] == 0
    answered = pq.read_table(tmp_path / "out" / "answered.parquet").to_pylist()
    assert res.counts["answered"] == 5 and all(r["status"] == "answered" and r["output"] for r in answered)


def test_resume_after_kill_of_the_process(tmp_path):
    """``evoray rate`` in batch mode is killed (SIGKILL) while its batch runs; the re-run polls the
    recorded batch and creates none."""
    from evoray.stages import stage_rate

    with FakeLLMServer(responder=PipelineResponder()) as srv:
        srv.batches.update(polls_to_complete=10_000)  # never ends while the first process runs
        cfg = rate_config(srv, tmp_path, n=12)
        cfg_path = tmp_path / "job.yaml"
        import yaml

        data = cfg.model_dump(mode="json")
        data["batch"]["poll_interval_s"] = 0.05
        cfg_path.write_text(yaml.safe_dump(data))
        env = {**os.environ, "OPENAI_API_KEY": KEY, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        proc = subprocess.Popen([sys.executable, "-c", "import sys; from evoray.cli import main; sys.exit(main(sys.argv[1:]))",
                                 "rate", str(cfg_path), "--quiet"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        state = tmp_path / "out" / STATE_FILE
        try:
            deadline = time.monotonic() + 120
            while not (state.exists() and json.loads(state.read_text())["batches"]) and time.monotonic() < deadline:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                time.sleep(0.1)
            assert state.exists(), "the first run recorded no batch"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        (recorded,) = json.loads(state.read_text())["batches"]
        assert srv.batches.stats()["batches_created"] == 1
        srv.batches.update(polls_to_complete=0)
        res = stage_rate(JobContext(cfg, quiet=True), None, tmp_path / "out")
        st = srv.batches.stats()
    assert st["batches_created"] == 1 and st["lines"] == 12
    assert res.counts["kept"] + res.counts["rejected"] + res.counts.get("failed", 0) == 12
    assert res.counts["batches"] == 1
    assert json.loads(state.read_text())["batches"][0]["id"] == recorded["id"]


# ---- config -----------------------------------------------------------------------------------------------------

def test_mode_precedence_and_errors(tmp_path):
    base = {"name": "a", "kind": "openai", "model": "m"}
    cfg = JobConfig.from_dict({"providers": [{**base, "mode": "batch"}]})
    assert [cfg.stage_mode(s) for s in ("rate", "answer", "judge", "evolve")] == ["batch", "batch", "batch", "online"]
    cfg = JobConfig.from_dict({"providers": [{**base, "mode": "batch"}], "rate": {"mode": "online"}})
    assert cfg.stage_mode("rate") == "online" and cfg.stage_mode("judge") == "batch"
    cfg = JobConfig.from_dict({"providers": [base], "judge": {"mode": "batch"}})
    assert cfg.stage_mode("judge") == "batch" and cfg.stage_mode("rate") == "online"
    mixed = {"providers": [{**base, "mode": "batch"}, {**base, "name": "b"}], "roles": {"rater": ["a"]}}
    with pytest.raises(ConfigError, match="role 'answer' mixes providers.*set answer.mode"):
        JobConfig.from_dict({**mixed, "pipeline": ["rate", "answer"]})
    cfg = JobConfig.from_dict({**mixed, "pipeline": ["evolve", "rate"]})  # answer is not in the pipeline: loads
    assert cfg.stage_mode("rate") == "batch"
    with pytest.raises(ConfigError, match="role 'judge' mixes providers"):
        cfg.stage_mode("judge")  # ... and `evoray judge` stops with the same message when it starts


def test_batch_mode_with_a_local_provider_names_it(tmp_path):
    from evoray.stages import stage_rate

    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps(rows(1)[0]) + "\n")
    cfg = JobConfig.from_dict({"providers": [{"name": "tiny", "kind": "local"}], "rate": {"mode": "batch"},
                               "input": {"path": str(data)}, "output": {"dir": str(tmp_path / "out")}})
    with pytest.raises(ConfigError, match="provider 'tiny' \\(kind local\\) has no batch API"):
        stage_rate(JobContext(cfg, quiet=True), None, tmp_path / "out")


def test_estimate_shows_online_and_batch_cost(tmp_path):
    from evoray.estimate import estimate, format_estimate

    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(20)))
    prov = {"name": "p", "kind": "openai", "model": "gpt-4o-mini", "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}
    cfg = JobConfig.from_dict({"providers": [prov], "input": {"path": str(data)}, "pipeline": ["evolve", "rate"],
                               "rate": {"mode": "batch"}})
    evolve, rate = estimate(cfg, None)
    assert (evolve.mode, rate.mode) == ("online", "batch")
    assert evolve.batch_dollars is None  # evolve has no batch mode
    assert rate.batch_dollars == pytest.approx(rate.dollars / 2) and rate.configured_dollars == rate.batch_dollars
    text = format_estimate([evolve, rate])
    assert "batch dollars" in text and "as configured" in text and "(rate in batch mode)" in text
    # explicit batch prices are used as given
    prov["price"].update(batch_input_per_mtok=0.1, batch_output_per_mtok=0.2)
    (rate2,) = estimate(JobConfig.from_dict({"providers": [prov], "input": {"path": str(data)}, "pipeline": ["rate"]}),
                        None)
    assert rate2.mode == "online" and rate2.configured_dollars == rate2.dollars
    assert rate2.batch_dollars == pytest.approx((rate2.input_tokens * 0.1 + rate2.output_tokens * 0.2) / 1e6)


async def test_recorded_batch_whose_results_expired_is_submitted_again(srv, tmp_path):
    job, _, runner = make_job(srv, tmp_path)
    try:
        await runner.run(requests(3))
    finally:
        await job.aclose()
    srv.batches.files.clear()  # the output file is gone (OpenAI keeps them 30 days)
    job2, _, runner2 = make_job(srv, tmp_path)
    try:
        results = await runner2.run(requests(3))
    finally:
        await job2.aclose()
    assert runner2.adopted and len(runner2.submitted) == 1 and all(r.completion for r in results.values())


def test_rate_stage_top_k_in_batch_mode(tmp_path):
    from evoray.stages import stage_rate

    with FakeLLMServer(responder=PipelineResponder()) as srv:
        cfg = rate_config(srv, tmp_path, n=20, rate={"top_k": 5}, batch={"max_requests": 6, "max_in_flight": 2})
        res = stage_rate(JobContext(cfg, quiet=True), None, tmp_path / "out")
        st = srv.batches.stats()
    assert res.counts["kept"] == 5 and res.counts["rejected"] == 15
    assert st["batches_created"] == 4 == res.counts["batches"] and st["lines"] == 20  # windows of 6 rows, 2 at once
    assert not (tmp_path / "out" / "_scored.parquet").exists()


@pytest.mark.ray
def test_pipeline_mixes_online_ray_stages_and_batch_stages_in_one_ledger(ray_session, tmp_path):
    """A batch stage before the Ray session starts (its spend joins the session's gate) and one after
    (it reports to the gate actor): the job ledger holds both modes' requests."""
    from evoray.stages import run_pipeline

    with FakeLLMServer(responder=PipelineResponder()) as srv:
        for order in (["rate", "answer"], ["answer", "rate"]):
            out = tmp_path / "_".join(order)
            cfg = rate_config(srv, tmp_path, n=8, pipeline=order, rate={"mode": "batch", "threshold": 0},
                              answer={"mode": "online"},
                              output={"dir": str(out)}, cache={"enabled": False},
                              ray={"rater_actors": 1, "evolver_actors": 1})
            lines0, online0 = srv.batches.stats()["lines"], srv.stats()["requests"]
            ctx = JobContext(cfg, quiet=True)
            try:
                run_pipeline(ctx, out)
                tot = ctx.ledger_dict()["total"]
            finally:
                ctx.close()
            lines, online = srv.batches.stats()["lines"] - lines0, srv.stats()["requests"] - online0
            assert lines == 8 and online == 8, order
            assert tot["batch_requests"] == 8 and tot["requests"] == 16, order


async def test_a_lost_create_answer_finds_the_batch_instead_of_creating_another(srv, tmp_path):
    srv.batches.update(fail_after_create=1)  # OpenAI created it, the answer was a 500
    job, _, runner = make_job(srv, tmp_path)
    try:
        results = await runner.run(requests(4))
    finally:
        await job.aclose()
    assert srv.batches.stats()["batches_created"] == 1 and len(runner.submitted) == 1
    assert all(r.completion is not None for r in results.values())


async def test_a_batch_that_fails_as_a_whole_stops_with_its_cause(srv, tmp_path):
    from evoray.errors import ProviderError

    srv.batches.update(max_lines={"openai": 3, "anthropic": 3})  # the provider refuses the file
    job, _, runner = make_job(srv, tmp_path)
    try:
        with pytest.raises(ProviderError, match="failed: too_many_requests.*at most 3"):
            await runner.run(requests(5))
        assert srv.stats()["requests"] == 0  # nothing went online at the online price
        # fixed: a re-run submits the requests again instead of reading the failed batch
        srv.batches.update(max_lines={"openai": 50_000, "anthropic": 100_000})
        results = await runner.run(requests(5))
    finally:
        await job.aclose()
    assert all(r.completion for r in results.values()) and len(runner.submitted) == 2
