"""B1 rate-limit use: 4 rater actors on one provider, rpm 1,200, 200 ms latency, 1,200 requests.

Figures: achieved requests/min / the limit and the share of requests that drew a 429, for evoray
and, on the same server, for the plain reference (bench/plain_reference.py, AsyncLimiter(rpm, 60)).
The server enforces the limit as a token bucket holding one second's worth (burst_seconds=1), as
providers enforce per-minute limits over short windows. The reference runs at the same time as
evoray, against its own server process with the same limit (both are rate-bound at 20 requests/s,
so neither takes CPU the other needs), which halves B1's minutes.
"""

from __future__ import annotations

import threading

import common
from common import QUICK, ServerProcess, figure, provider, rate_once, repeats, run_reference, say, synthetic_rows, \
    window_rate, work_dir

RPM = 1200
LATENCY_S = 0.2


def run() -> list:
    n = 120 if QUICK else 1200
    rows = synthetic_rows(n, work_dir() / f"rows_{n}.parquet")
    use, share, ref_use, ref_share, ref_failed = [], [], [], [], []
    cfg = dict(latency_s=LATENCY_S, latency_dist="fixed", rpm=RPM, burst_seconds=1.0)
    with ServerProcess(**cfg) as srv, ServerProcess(**cfg) as ref_srv:
        for i in range(repeats()):
            srv.reset()
            ref_srv.reset()
            ref_out: dict = {}
            ref_thread = threading.Thread(target=lambda: ref_out.update(run_reference(ref_srv.openai_base_url, n, rpm=RPM)))
            ref_thread.start()
            try:
                r = rate_once([provider(srv.openai_base_url, rpm=RPM)], rows, work_dir() / "b1", rater_actors=4)
            finally:
                ref_thread.join()
            if "failed" not in ref_out:
                raise RuntimeError("the plain reference did not report (see its stderr above)")
            st = srv.stats()
            use.append(window_rate(st, "ok") * 60 / RPM)
            share.append(st["rate_limited"] / max(1, st["requests"]))
            say(f"  B1 run {i + 1}: evoray {st['ok']} ok, {st['rate_limited']} 429 of {st['requests']} requests, "
                f"max {st['max_rps_1s']} req in 1 s, stage wall {r['wall_s']:.1f} s")
            st = ref_srv.stats()
            ref_use.append(window_rate(st, "ok") * 60 / RPM)
            ref_share.append(st["rate_limited"] / max(1, st["requests"]))
            ref_failed.append(ref_out["failed"] / n)
            say(f"  B1 run {i + 1}: reference {st['ok']} ok, {st['rate_limited']} 429 of {st['requests']} requests, "
                f"{ref_out['failed']} prompts failed after SDK retries, wall {ref_out['wall_s']:.1f} s")
    return [
        figure("B1", "evoray achieved rpm / limit", use, goal=">= 0.98", check=lambda v: v >= 0.98),
        figure("B1", "evoray 429 share", share, goal="< 0.001", check=lambda v: v < 0.001),
        figure("B1", "plain reference achieved rpm / limit", ref_use),
        figure("B1", "plain reference 429 share", ref_share),
        figure("B1", "plain reference prompts lost (429 after SDK retries)", ref_failed),
    ]


if __name__ == "__main__":
    common.init_ray()
    try:
        run()
    finally:
        common.shutdown_ray()
