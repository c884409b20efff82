"""B7 gate scale: 32 rater actors on one key, 6,000 rpm, a zero-latency server.

Every request needs a permit from the one key gate; with leases most do not wait for an answer
from it. Strict server (100 in any second, rejected counted), no latency, so the gate and the
pool are the only limits. Figures: admitted rate / the limit, 429 share, p99 of the time a request
waits for its permit (queueing for the rate included: the pool has far more rows in flight than
the limit admits), p99 of how late requests start behind their permit's time, and the key gate's
CPU per request and its CPU share of the run. Sizes: ``BENCH_B7_ACTORS`` (32), ``BENCH_B7_ROWS``
(6,000: one minute at the limit).
"""

from __future__ import annotations

import common
from common import (ServerProcess, admitted_rate, figure, gate_cpu_per_request, provider, rate_once, repeats_or, say,
                    size, synthetic_rows, work_dir)

RPM = 6000


def run() -> list:
    actors = size("b7_actors", 32, 4)
    n = size("b7_rows", 6000, 200)
    rows = synthetic_rows(n, work_dir() / f"rows_{n}.parquet")
    use, share, wait99, late99, cpu, cpu_share = [], [], [], [], [], []
    with ServerProcess(latency_s=0.0, latency_dist="fixed", rpm=RPM) as srv:
        for i in range(repeats_or(1)):
            srv.reset()
            # 32 actors on a small machine: each asks 0.05 CPU (they wait on the gate and the network); at
            # 0.1 the 32 actors and Ray Data's read task need 4.2 of the bench Ray's 4 CPUs, which the
            # resource check refuses
            r = rate_once([provider(srv.openai_base_url, rpm=RPM)], rows, work_dir() / "b7", rater_actors=actors,
                          actor_num_cpus=0.05, actor_concurrency=8, batch_size=16)
            st = srv.stats()
            g, b = r["gates_after"]["fake"], r["gates_before"]["fake"]
            use.append(admitted_rate(st) * 60 / RPM)
            share.append(st["rate_limited"] / max(1, st["requests"]))
            wait99.append(g["wait_p99_ms"])
            late99.append(g["late_p99_ms"])
            cpu.append(gate_cpu_per_request(r) * 1000)
            cpu_share.append((g["cpu_s"] - b["cpu_s"]) / r["wall_s"] if g["pid"] == b["pid"] else float("nan"))
            say(f"  B7 run {i + 1}: {actors} actors, {st['ok']} ok, {st['rate_limited']} 429 of {st['requests']}, "
                f"{g['clients']} clients at the gate, leases {g['leases'] - b['leases']} for "
                f"{g['permits'] - b['permits']} permits, stage wall {r['wall_s']:.1f} s")
    return [
        figure("B7", f"rpm / limit ({actors} actors, 6,000 rpm)", use, goal=">= 0.95", check=lambda v: v >= 0.95),
        figure("B7", "429 share", share, goal="< 0.001", check=lambda v: v < 0.001),
        figure("B7", "p99 wait for a permit (queueing for the rate included)", wait99, unit="ms"),
        figure("B7", "p99 lateness behind the permit's time", late99, unit="ms", goal="< 20 (the margin)",
               check=lambda v: v < 20),
        figure("B7", "key gate CPU per request", cpu, unit="ms"),
        figure("B7", "key gate CPU share of the run (cores)", cpu_share),
    ]


if __name__ == "__main__":
    common.main_with_ray(run)
