"""`evoray submit` against a fake Ray dashboard: waiting for the job agent, transient errors,
a dropped log stream, the final status and exit code (Ray's real JobSubmissionClient, no cluster).

The fake speaks the parts of the Jobs API the client uses (version, authentication mode, package
upload, job submission, job info, logs, the websocket log tail) and misbehaves the way a fresh head
does: 500 "No available agent to submit job" until its agent "registers", a 503 from a proxy, and
a log stream that drops in the middle of the job.
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import yaml
from aiohttp import web

from evoray.cli import main

LOG = "".join(f"line {i}: evoray is working\n" for i in range(12)) + "evoray run done in 1.0s\n"


class FakeDashboard:
    def __init__(self, no_agent: int = 2, unavailable: int = 1, drop_after: int = 5, status: str = "SUCCEEDED",
                 exit_code: int = 0):
        self.no_agent = no_agent          # POST /api/jobs/ answers 500 "No available agent" this many times
        self.unavailable = unavailable    # then 503 this many times
        self.drop_after = drop_after      # the first log stream breaks after this many lines
        self.status = status
        self.exit_code = exit_code
        self.posts: list[dict] = []
        self.tails = 0
        self.jobs: dict[str, dict] = {}
        self.packages: set[str] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.url = ""

    def __enter__(self):
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _start(self):
        app = web.Application()
        app.router.add_get("/api/version", self.version)
        app.router.add_get("/api/authentication_mode", lambda r: web.json_response({"authentication_mode": "disabled"}))
        app.router.add_route("GET", "/api/packages/{protocol}/{name}", self.package_get)
        app.router.add_route("PUT", "/api/packages/{protocol}/{name}", self.package_put)
        app.router.add_post("/api/jobs/", self.submit)
        app.router.add_get("/api/jobs/{job}/logs/tail", self.tail)
        app.router.add_get("/api/jobs/{job}/logs", self.logs)
        app.router.add_get("/api/jobs/{job}", self.info)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def version(self, request):
        return web.json_response({"version": "4", "ray_version": "2.60.0", "ray_commit": "fake"})

    async def package_get(self, request):
        return web.Response(status=200 if request.match_info["name"] in self.packages else 404)

    async def package_put(self, request):
        await request.read()
        self.packages.add(request.match_info["name"])
        return web.Response(status=200)

    async def submit(self, request):
        body = await request.json()
        self.posts.append(body)
        if len(self.posts) <= self.no_agent:
            return web.Response(status=500, text="No available agent to submit job, please try again later.")
        if len(self.posts) <= self.no_agent + self.unavailable:
            return web.Response(status=503, text="Service Unavailable")
        sid = body["submission_id"]
        self.jobs[sid] = {"type": "SUBMISSION", "job_id": None, "submission_id": sid, "status": "RUNNING",
                          "entrypoint": body["entrypoint"], "message": None, "driver_exit_code": None,
                          "runtime_env": body.get("runtime_env"), "metadata": body.get("metadata")}
        return web.json_response({"job_id": sid, "submission_id": sid})

    async def info(self, request):
        job = self.jobs.get(request.match_info["job"])
        if job is None:
            return web.Response(status=404, text="Job does not exist")
        return web.json_response(job)

    async def logs(self, request):
        return web.json_response({"logs": LOG})

    async def tail(self, request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.tails += 1
        lines = LOG.splitlines(keepends=True)
        job = self.jobs[request.match_info["job"]]
        if self.tails == 1:  # the first stream breaks in the middle of the job (no close frame)
            for line in lines[:self.drop_after]:
                await ws.send_str(line)
            await asyncio.sleep(0.05)
            request.transport.close()
            return ws
        for line in lines:  # a reconnected stream starts again at the beginning of the log
            await ws.send_str(line)
        job.update(status=self.status, driver_exit_code=self.exit_code,
                   message=None if self.status == "SUCCEEDED" else "evoray exited with code 3")
        await ws.close()
        return ws


@pytest.fixture
def job_config(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({"providers": [{"name": "x", "kind": "openai", "base_url": "http://127.0.0.1:9/v1"}],
                                   "pipeline": ["rate"]}))
    return cfg


def test_submit_waits_for_the_job_agent_and_follow_survives_a_dropped_stream(job_config, capsys, monkeypatch):
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    with FakeDashboard(no_agent=2, unavailable=1, drop_after=5) as dash:
        code = main(["submit", str(job_config), "--address", dash.url, "--follow", "--timeout", "60"])
        out, err = capsys.readouterr()
        posts, tails = dash.posts, dash.tails
    assert code == 0, out + err
    # one line says what it waits for, once, however many times it asked
    assert err.count("waiting for the cluster's job agent") == 1, err
    assert "not answering (HTTP 503)" in err
    # every attempt used the same submission id, and the job was created once
    assert len(posts) == 4 and len({p["submission_id"] for p in posts}) == 1
    assert f"job id: {posts[0]['submission_id']}" in out
    # the stream dropped after 5 lines and was reconnected: every log line printed exactly once
    assert tails == 2 and "dropped" in err and "reconnecting" in err
    for line in LOG.splitlines():
        assert out.count(line + "\n") == 1, line
    assert f"job {posts[0]['submission_id']}: SUCCEEDED, exit code 0" in out


def test_follow_reports_the_jobs_exit_code(job_config, capsys, monkeypatch):
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    with FakeDashboard(no_agent=0, unavailable=0, status="FAILED", exit_code=3) as dash:
        code = main(["submit", str(job_config), "--address", dash.url, "--follow", "--quiet"])
        out, err = capsys.readouterr()
    assert code == 3  # the job's own exit code (evoray: stopped at the budget cap)
    assert "FAILED, exit code 3" in err and "line 0" not in out  # --quiet: no log lines


def test_agent_that_never_comes_times_out_with_exit_2(job_config, capsys, monkeypatch):
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    with FakeDashboard(no_agent=10**6) as dash:
        code = main(["submit", str(job_config), "--address", dash.url, "--timeout", "2"])
        err = capsys.readouterr().err
    assert code == 2
    assert "did not become ready within 2 s" in err and "job agent never registered" in err


def test_patience_retries_only_transient_errors_with_a_fake_clock():
    from cluster.submit import Patience, transient

    assert transient(RuntimeError("Request failed with status code 500: No available agent to submit job")) == "job agent"
    assert transient(RuntimeError("Request failed with status code 502: Bad Gateway")) == "HTTP 502"
    assert transient(ConnectionError("refused")).startswith("cannot connect")
    assert transient(RuntimeError("Request failed with status code 400: bad runtime_env")) is None
    assert transient(RuntimeError("Request failed with status code 500: Traceback ... ValueError")) is None

    now = [0.0]
    slept: list[float] = []
    said: list[str] = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    p = Patience("http://head:8265", 20.0, said.append, clock=lambda: now[0], sleep=sleep)
    calls = iter([RuntimeError("status code 500: No available agent"), RuntimeError("status code 500: No available agent"),
                  "ok"])

    def fn():
        v = next(calls)
        if isinstance(v, Exception):
            raise v
        return v

    assert p.call(fn, "submitting") == "ok" and p.retries == 2 and len(said) == 1
    assert slept == [0.5, 1.0]
    with pytest.raises(RuntimeError, match="400"):
        p.call(lambda: (_ for _ in ()).throw(RuntimeError("status code 400: bad")), "submitting")
    # a refused connection is retried for at most 30 s, even with a longer --timeout
    p2 = Patience("http://head:8265", 300.0, said.append, clock=lambda: now[0], sleep=sleep)
    from evoray.errors import UsageError

    t0 = now[0]
    with pytest.raises(UsageError, match="within 30 s"):
        p2.call(lambda: (_ for _ in ()).throw(ConnectionError("refused")), "connecting")
    assert 30 <= now[0] - t0 <= 36
