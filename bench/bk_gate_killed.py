"""BK gate killed mid-run: the key gate actor is killed a third of the way through a rate stage.

Strict server, 1,200 rpm, 150-250 ms latency, 4 rater actors. Ray restarts the gate
(``max_restarts=-1``); the new one waits one lease horizon (permits of the old one may still be
in use) and starts at half the rate. Figures: rows accounted (every input row in exactly one output
table) / rows in, duplicate ids, requests sent beyond one per row (retries), 429s, and the longest
pause in the server's arrivals (the restart's cost). ``BENCH_BK_NO_RESTART=1`` kills it for good
instead (the clients create it again by name). Sizes: ``BENCH_BK_ROWS`` (600).
"""

from __future__ import annotations

import os
import time

import common
from common import ServerProcess, figure, max_gap, provider, rate_once, repeats_or, say, size, synthetic_rows, work_dir

RPM = 1200


def run() -> list:
    import pyarrow.parquet as pq
    import ray

    n = size("bk_rows", 600, 60)
    no_restart = os.environ.get("BENCH_BK_NO_RESTART") == "1"
    rows = synthetic_rows(n, work_dir() / f"rows_{n}.parquet")
    accounted, dups, extra, limited, gap = [], [], [], [], []
    with ServerProcess(latency_s=0.2, latency_jitter_s=0.05, latency_dist="uniform", rpm=RPM) as srv:
        for i in range(repeats_or(1)):
            srv.reset()
            killed = {}

            def kill(session) -> None:
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline and srv.stats()["requests"] < n // 3:
                    time.sleep(0.05)
                ray.kill(session.key_gates["fake"], no_restart=no_restart)
                killed["at"] = srv.stats()["requests"]

            out = work_dir() / "bk"
            r = rate_once([provider(srv.openai_base_url, rpm=RPM)], rows, out, during=kill, rater_actors=4)
            st = srv.stats()
            ids = [x for t in ("kept", "rejected", "failed") for x in pq.read_table(out / f"{t}.parquet").column("id").to_pylist()]
            accounted.append(len(set(ids)) / n)
            dups.append(len(ids) - len(set(ids)))
            extra.append(st["requests"] - n)
            limited.append(st["rate_limited"])
            gap.append(max_gap(st))
            say(f"  BK run {i + 1}: gate killed after {killed.get('at')} requests ({'for good' if no_restart else 'restarted'}); "
                f"{len(ids)} rows out of {n}, {st['requests']} requests, {st['rate_limited']} 429, longest pause "
                f"{gap[-1]:.2f} s, stage wall {r['wall_s']:.1f} s, gate restarted: {r['gates_after']['fake']['restarted']}")
    return [
        figure("BK", "rows accounted / rows in", accounted, goal="1.0", check=lambda v: v == 1.0),
        figure("BK", "duplicate rows", dups, goal="0", check=lambda v: v == 0),
        figure("BK", "requests beyond one per row", extra),
        figure("BK", "429s", limited),
        figure("BK", "longest pause in arrivals (the restart)", gap, unit="s"),
    ]


if __name__ == "__main__":
    common.main_with_ray(run)
