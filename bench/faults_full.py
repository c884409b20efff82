"""Faults at full size: 5,000 rows through the rater pool and 500 through the evolver pool.

The fake server (in its own process) answers 10 % of requests with 500/503, 5 % with a malformed
body, hangs 2 % past the provider's timeout, and halves its rate limit mid-run while the job keeps
the original rpm. Figures: rows accounted for / rows in (goal 1.0), duplicate ids (goal 0), failed
rows without reason or attempts (goal 0), ledger requests - server requests (goal 0), the share of
rows failed, 429s, and wall time. ``tests/test_faults.py`` is the same at CI size.

Run: ``.venv/bin/python bench/faults_full.py`` (``BENCH_QUICK=1`` for 500 / 60 rows); also part of
``make bench`` when ``bench/run_all.py`` lists it.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import common
from common import QUICK, ServerProcess, figure, say, synthetic_rows, work_dir

RPM = 6000
MAX_ATTEMPTS = 8
SERVER = dict(error_rate=0.10, error_statuses=[500, 503], malformed_rate=0.05, hang_rate=0.02, hang_s=2.5,
              rpm=RPM, burst_seconds=0.5, retry_after_s=0.5, latency_s=0.02, seed=11)


class FaultServer(ServerProcess):
    """The fake server in its own process (like :class:`common.ServerProcess`) that also takes
    ``rpm X`` on stdin: the mid-run change of the limit."""

    def __init__(self, **config):
        import subprocess
        import sys

        self.config = config
        self.proc = subprocess.Popen([sys.executable, __file__, "serve", json.dumps(config)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=str(common.ROOT))
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http"):
            self.proc.kill()
            raise RuntimeError(f"fake server did not start: {line!r}")
        self.url, self.openai_base_url, self.pid = line, line + "/v1", self.proc.pid


def _serve(config_json: str) -> None:
    import sys

    from evoray.testing.fake_server import FakeLLMServer, FakeServerConfig

    cfg = json.loads(config_json)
    cfg["error_statuses"] = tuple(cfg.get("error_statuses", (500, 503)))
    with FakeLLMServer(FakeServerConfig(**cfg)) as srv:
        print(srv.url, flush=True)
        for line in sys.stdin:  # until the parent closes stdin
            parts = line.split()
            if parts[:1] == ["rpm"]:  # the headers keep announcing the original limit
                srv.update(rpm=float(parts[1]), advertised_rpm=srv.config.advertised_rpm or srv.config.rpm)
            print("ok", flush=True)


def _halve_after(srv: ServerProcess, after: int, stop: threading.Event, done: threading.Event) -> None:
    """Halve the server's rpm once it has seen ``after`` requests (the job keeps the original rpm)."""
    while not stop.wait(0.05):
        if srv.stats()["requests"] >= after:
            srv.command(f"rpm {RPM / 2}")
            done.set()
            return


def _config(srv: ServerProcess, outdir: Path):
    from evoray.config import JobConfig

    return JobConfig.from_dict({
        "providers": [common.provider(srv.openai_base_url, rpm=RPM, timeout_s=2.0, max_attempts=MAX_ATTEMPTS,
                                      backoff_base_s=0.05, backoff_max_s=0.5, cooldown_s=0.5,
                                      failures_before_cooldown=50)],
        "output": {"dir": str(outdir)},
        "ray": {"rater_actors": 4, "evolver_actors": 4, "batch_size": 64, "actor_concurrency": 16},
        "cache": {"enabled": False},
        "rate": {"random_baseline": False, "parse_retries": 1},
        "evolve": {"rounds": 1},
    })


def _one(stage: str, n: int) -> list:
    import pyarrow.parquet as pq

    from evoray.jobs import JobContext
    from evoray.stages import stage_evolve, stage_rate

    rows = synthetic_rows(n, work_dir() / f"rows_{n}.parquet")
    ids = pq.read_table(rows, columns=["id"]).column("id").to_pylist()
    outdir = work_dir() / f"faults_{stage}"
    import shutil

    shutil.rmtree(outdir, ignore_errors=True)
    with FaultServer(**SERVER) as srv:
        ctx = JobContext(_config(srv, outdir), quiet=True)
        stop, done = threading.Event(), threading.Event()
        t = threading.Thread(target=_halve_after, args=(srv, max(50, n // 4), stop, done), daemon=True)
        try:
            ctx.session()
            t.start()
            t0 = time.perf_counter()
            if stage == "rate":
                res = stage_rate(ctx, str(rows), outdir)
                tables, key = ("kept", "rejected", "failed"), "id"
            else:
                res = stage_evolve(ctx, str(rows), outdir)
                tables, key = ("evolved", "failed"), "parent_id"
            wall = time.perf_counter() - t0
            ledger = ctx.ledger_dict()
        finally:
            stop.set()
            ctx.close()
        stats = srv.stats()
    out = []
    for name in tables:
        p = outdir / f"{name}.parquet"
        out += pq.read_table(p).to_pylist() if p.exists() else []
    keys = [r[key] for r in out]
    failed = [r for r in out if r["status"] == "failed"]
    bad_failed = [r for r in failed if not r["reason"] or not r["attempts"] or r["attempts"] < 1]
    say(f"  faults {stage}: {n} rows in, {len(out)} out ({len(failed)} failed), server {stats['requests']} requests "
        f"({stats['errors']} 5xx, {stats['malformed']} malformed, {stats['hangs']} hangs, {stats['rate_limited']} 429), "
        f"ledger {ledger['total']['requests']} requests, limit halved: {done.is_set()}, wall {wall:.1f} s")
    say("  counts " + json.dumps(res.counts))
    tag = f"faults {stage} {n} rows"
    return [
        figure("F", f"{tag}: rows accounted / rows in", [len(set(keys) & set(ids)) / n], goal="= 1.0",
               check=lambda v: v == 1.0),
        figure("F", f"{tag}: duplicate ids", [len(keys) - len(set(keys))], goal="= 0", check=lambda v: v == 0),
        figure("F", f"{tag}: failed rows without reason or attempts", [len(bad_failed)], goal="= 0",
               check=lambda v: v == 0),
        figure("F", f"{tag}: ledger requests - server requests", [ledger["total"]["requests"] - stats["requests"]],
               goal="= 0", check=lambda v: v == 0),
        figure("F", f"{tag}: share of rows failed", [len(failed) / n], goal="< 0.01", check=lambda v: v < 0.01),
        figure("F", f"{tag}: 429s after the halving", [stats["rate_limited"]]),
        figure("F", f"{tag}: wall time", [wall], unit="s"),
    ]


def run() -> list:
    n_rate, n_evolve = (500, 60) if QUICK else (5000, 500)
    return _one("rate", n_rate) + _one("evolve", n_evolve)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["serve"]:
        _serve(sys.argv[2])
        raise SystemExit(0)
    common.init_ray()
    try:
        run()
    finally:
        common.shutdown_ray()
