"""B3 candidates in parallel: m = 5 candidate methods on a dev set of 50, through CandidatePool
(one Ray actor per candidate), divided by the time for one candidate, at a latency-bound setting
(2 s per request, no limit: each dev row is an evolution then an answer, so about 4 s a row; the
longer the wait, the smaller the share of CPU time that 2 oversubscribed cores add to the 5-way run).
"""

from __future__ import annotations

import asyncio
import time

import pyarrow.parquet as pq

import common
from common import QUICK, ServerProcess, figure, job_config, provider, repeats, say, synthetic_rows, work_dir

LATENCY_S = 2.0
M = 5
METHODS = ["initial", "add_constraints", "deepening", "concretizing", "increase_reasoning"]


def run() -> list:
    from actors.candidates import CandidatePool
    from evoray.evolution.methods import load_method
    from evoray.jobs import JobContext

    dev_n = 10 if QUICK else 50
    dev = pq.read_table(synthetic_rows(dev_n, work_dir() / f"rows_{dev_n}.parquet")).to_pylist()
    methods = [load_method(n) for n in METHODS[:M]]
    ratios, t1s, t5s = [], [], []
    with ServerProcess(latency_s=LATENCY_S, latency_dist="fixed") as srv:
        ctx = JobContext(job_config([provider(srv.openai_base_url)], work_dir() / "b3", candidate_actors=M), quiet=True)
        try:
            pool = CandidatePool(ctx.session(), M)
            try:
                asyncio.run(pool.evaluate(methods, dev[:2]))  # actors up, clients built (not timed)
                for i in range(repeats()):
                    t0 = time.perf_counter()
                    asyncio.run(pool.evaluate(methods[:1], dev))
                    t1 = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    res = asyncio.run(pool.evaluate(methods, dev))
                    t5 = time.perf_counter() - t0
                    assert len(res) == M and all(r.n + r.errors == dev_n for r in res)
                    t1s.append(t1)
                    t5s.append(t5)
                    ratios.append(t5 / t1)
                    say(f"  B3 run {i + 1}: one candidate {t1:.2f} s, {M} candidates {t5:.2f} s "
                        f"({len(pool.nodes)} node(s))")
            finally:
                pool.close()
        finally:
            ctx.close()
    return [
        figure("B3", f"time for m={M} candidates / time for 1 (dev {dev_n})", ratios, goal="<= 1.25",
               check=lambda v: v <= 1.25),
        figure("B3", "time for 1 candidate", t1s, unit="s"),
        figure("B3", f"time for {M} candidates", t5s, unit="s"),
    ]


if __name__ == "__main__":
    common.main_with_ray(run)
