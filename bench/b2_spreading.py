"""B2 spreading: two providers (two fake servers), each limited to R; aggregate rate / R.

One rater role over both providers; the job's gate spreads requests by free headroom. The goal is
1.94, twice B1's 0.97: each key is used at most at ``1 - limit_margin`` (0.98) of its limit, so 1.96
is the ceiling.
"""

from __future__ import annotations

import common
from common import QUICK, ServerProcess, figure, provider, rate_once, repeats, say, synthetic_rows, work_dir

R = 1200  # rpm of each provider
LATENCY_S = 0.2


def run() -> list:
    n = 160 if QUICK else 1200  # 1,200 requests at 2 x 1,200 rpm: about 30 s a run
    rows = synthetic_rows(n, work_dir() / f"rows_{n}.parquet")
    ratio = []
    with ServerProcess(latency_s=LATENCY_S, latency_dist="fixed", rpm=R, burst_seconds=1.0) as a, \
            ServerProcess(latency_s=LATENCY_S, latency_dist="fixed", rpm=R, burst_seconds=1.0) as b:
        for i in range(repeats()):
            a.reset()
            b.reset()
            r = rate_once([provider(a.openai_base_url, "fake-a", rpm=R), provider(b.openai_base_url, "fake-b", rpm=R)],
                          rows, work_dir() / "b2", rater_actors=4)
            sa, sb = a.stats(), b.stats()
            t0 = min(sa["first_request_t"], sb["first_request_t"])
            t1 = max(sa["last_request_t"], sb["last_request_t"])
            ok = sa["ok"] + sb["ok"]
            agg = (ok - 1) / (t1 - t0) * 60
            ratio.append(agg / R)
            say(f"  B2 run {i + 1}: {sa['ok']} + {sb['ok']} ok, 429s {sa['rate_limited']} + {sb['rate_limited']}, "
                f"aggregate {agg:,.0f} rpm over {t1 - t0:.1f} s (stage wall {r['wall_s']:.1f} s)")
    return [figure("B2", "aggregate rate / R (two providers, R each)", ratio, goal=">= 1.94",
                   check=lambda v: v >= 1.94)]


if __name__ == "__main__":
    common.main_with_ray(run)
