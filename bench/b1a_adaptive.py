"""B1a adaptive limit: the job says 1,200 rpm, the key's real limit is 900.

Strict server enforcing 900 rpm (15 in any second, rejected requests counted), 150-250 ms latency,
4 rater actors. Two variants:

* **silent**: the server's headers announce 1,200 (``advertised_rpm``), so only its 429s reveal the
  real limit; the key gate must learn it (multiplicative decrease, then probing);
* **headers**: the server announces its real limit (``x-ratelimit-limit-requests: 900``), which
  lowers the gate's ceiling after the first answer.

Figures: settled rate (admitted requests per minute over the last half of the run) / 900, and the
429 share of the whole run. Sizes: ``BENCH_B1A_ROWS`` (1,800: two minutes at 900 rpm).
"""

from __future__ import annotations

import common
from common import (ServerProcess, admitted_rate, figure, provider, rate_once, repeats_or, say, size, synthetic_rows,
                    work_dir)

CONFIGURED, REAL = 1200, 900


def run() -> list:
    n = size("b1a_rows", 1800, 80)
    rows = synthetic_rows(n, work_dir() / f"rows_{n}.parquet")
    figs = []
    for variant, advertised in (("silent", CONFIGURED), ("headers", REAL)):
        settled, share = [], []
        with ServerProcess(latency_s=0.2, latency_jitter_s=0.05, latency_dist="uniform", rpm=REAL,
                           advertised_rpm=advertised) as srv:
            for i in range(repeats_or(1)):
                srv.reset()
                r = rate_once([provider(srv.openai_base_url, rpm=CONFIGURED)], rows, work_dir() / "b1a",
                              rater_actors=4)
                st = srv.stats()
                times = sorted(st["admitted_times"])
                half = (times[-1] - times[0]) / 2 if len(times) > 1 else 0.0
                settled.append(admitted_rate(st, last_s=half) * 60 / REAL)
                share.append(st["rate_limited"] / max(1, st["requests"]))
                g = r["gates_after"]["fake"]
                say(f"  B1a {variant} run {i + 1}: {st['ok']} ok, {st['rate_limited']} 429 of {st['requests']} requests, "
                    f"gate rate {g['rpm']:.0f} rpm (factor {g['factor']}, {g['decreases']} decreases, ceiling "
                    f"{g['ceiling_rpm']:.0f}), stage wall {r['wall_s']:.1f} s")
        figs += [
            figure("B1a", f"{variant}, settled rpm / real limit", settled, goal=">= 0.9", check=lambda v: v >= 0.9),
            figure("B1a", f"{variant}, 429 share", share, goal="< 0.01", check=lambda v: v < 0.01),
        ]
    return figs


if __name__ == "__main__":
    common.main_with_ray(run)
