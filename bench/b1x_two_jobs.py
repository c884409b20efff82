"""B1x two jobs on one cluster, one key: two ``evoray rate`` drivers at once against one strict server.

Each job is its own driver process connected to the benchmark's Ray (``--address``), with its own
job gate and ledger; both name the same key and base URL, so they find the same key gate by name
and share one limit. Server: strict window (at most 20 requests in ANY second, rejected counted),
1,200 rpm, 150-250 ms latency. Figures: the two jobs' combined admitted rate / the limit and their
combined 429 share. Without the shared gate each job would hold the full limit and together send
twice it. Sizes: ``BENCH_B1X_ROWS`` rows per job (600), ``BENCH_B1X_ACTORS`` raters per job (2).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import yaml

import common
from common import (FAKE_KEY, ROOT, ServerProcess, admitted_rate, figure, provider, repeats_or, say, size,
                    synthetic_rows, work_dir)

RPM = 1200


def _job(address: str, cfg_path, rows, out) -> subprocess.Popen:
    env = {**os.environ, "OPENAI_API_KEY": FAKE_KEY, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "evoray.cli", "rate", str(cfg_path), "-i", str(rows), "-o", str(out),
                             "--address", address, "--quiet"], env=env, cwd=str(ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run() -> list:
    import ray

    n = size("b1x_rows", 600, 40)
    actors = size("b1x_actors", 2, 1)
    rows = synthetic_rows(n, work_dir() / f"rows_{n}.parquet")
    address = ray.get_runtime_context().gcs_address
    use, share, rows_ok = [], [], []
    with ServerProcess(latency_s=0.2, latency_jitter_s=0.05, latency_dist="uniform", rpm=RPM) as srv:
        for i in range(repeats_or(1)):
            srv.reset()
            procs, outs = [], []
            for j in range(2):
                d = work_dir() / f"b1x_{j}"
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
                cfg = {"providers": [provider(srv.openai_base_url, rpm=RPM)],
                       "ray": {"rater_actors": actors, "batch_size": 64},
                       "cache": {"enabled": False}, "rate": {"random_baseline": False, "parse_retries": 0}}
                (d / "job.yaml").write_text(yaml.safe_dump(cfg))
                outs.append(d / "out")
                procs.append(_job(address, d / "job.yaml", rows, d / "out"))
            t0 = time.perf_counter()
            logs = [p.communicate(timeout=3600)[0] for p in procs]
            wall = time.perf_counter() - t0
            for p, log in zip(procs, logs):
                if p.returncode != 0:
                    raise RuntimeError(f"an evoray rate job failed (exit {p.returncode}):\n{log[-3000:]}")
            st = srv.stats()
            use.append(admitted_rate(st) * 60 / RPM)
            share.append(st["rate_limited"] / max(1, st["requests"]))
            done = sum(_rows_out(o) for o in outs)
            rows_ok.append(done / (2 * n))
            say(f"  B1x run {i + 1}: two jobs x {n} rows: {st['ok']} ok, {st['rate_limited']} 429 of "
                f"{st['requests']} requests, max {st['max_rps_1s']} req in 1 s, {done} rows out, wall {wall:.1f} s")
    return [
        figure("B1x", "two jobs on one key, combined rpm / limit", use, goal=">= 0.95", check=lambda v: v >= 0.95),
        figure("B1x", "two jobs on one key, 429 share", share, goal="< 0.001", check=lambda v: v < 0.001),
        figure("B1x", "rows out / rows in", rows_ok, goal="1.0", check=lambda v: v == 1.0),
    ]


def _rows_out(out) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(out / f"{t}.parquet").metadata.num_rows for t in ("kept", "rejected", "failed")
               if (out / f"{t}.parquet").exists())


if __name__ == "__main__":
    common.main_with_ray(run)
