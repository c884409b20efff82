"""B4 overhead: requests/s through the rater pool on a zero-latency server with no limit, divided by
the plain asyncio reference (bench/plain_reference.py, no limiter, 64 in flight) on the same server.

Both rates are measured by the server (first to last request), so Ray start-up and the pool's
actor start are not in them; the stage's end-to-end rate (rows / stage wall time) is given too.
Where the time goes: py-spy samples one rater actor and the driver during an extra run.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import common
from common import (QUICK, ROOT, ServerProcess, descendants, cmdline, figure, provider, rate_once, repeats,
                    run_reference, say, synthetic_rows, window_rate, work_dir)

ACTORS = 4


def run(profile: bool = True) -> list:
    n = 300 if QUICK else 2000
    rows = synthetic_rows(n, work_dir() / f"rows_{n}.parquet")
    evo, ref, e2e = [], [], []
    with ServerProcess(latency_s=0.0, latency_dist="fixed") as srv:
        for i in range(repeats()):
            srv.reset()
            r = rate_once([provider(srv.openai_base_url)], rows, work_dir() / "b4", rater_actors=ACTORS)
            st = srv.stats()
            evo.append(window_rate(st))
            e2e.append(n / r["wall_s"])
            srv.reset()
            ref_out = run_reference(srv.openai_base_url, n)
            st2 = srv.stats()
            ref.append(window_rate(st2))
            say(f"  B4 run {i + 1}: evoray {evo[-1]:.0f} req/s ({st['requests']} requests, stage wall "
                f"{r['wall_s']:.1f} s), reference {ref[-1]:.0f} req/s (wall {ref_out['wall_s']:.1f} s)")
        figs = [
            figure("B4", "rater pool req/s / plain asyncio req/s", [e / f for e, f in zip(evo, ref)], goal=">= 0.5",
                   check=lambda v: v >= 0.5),
            figure("B4", "rater pool req/s (server window)", evo, unit="req/s"),
            figure("B4", "plain asyncio reference req/s", ref, unit="req/s"),
            figure("B4", "rate stage end to end (rows / stage wall)", e2e, unit="rows/s"),
        ]
        if profile and not QUICK:
            srv.reset()
            figs[0].note = profile_run(srv, rows)
    return figs


def _top(raw: Path, k: int = 8) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """Top frames by share of samples, from py-spy's raw (collapsed stacks) output, inclusive."""
    total = 0
    incl: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        try:
            c = int(count)
        except ValueError:
            continue
        total += c
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")" if " (" in f else f
                  for f in stack.split(";")]
        for f in set(frames):
            incl[f] += c
        own[frames[-1]] += c
    if not total:
        return [], []
    return [(f, c / total) for f, c in own.most_common(k)], [(f, c / total) for f, c in incl.most_common(40)]


def profile_run(srv, rows) -> str:
    """Run once more with py-spy on the driver and on one rater actor; return a text summary."""
    py_spy = shutil.which("py-spy") or str(Path(os.sys.executable).parent / "py-spy")
    out_dir = work_dir() / "b4_profile"
    out_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    found: dict[str, int] = {}

    def attach() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and "actor" not in found:
            for pid in descendants(os.getpid()):
                if "StageUDF" in cmdline(pid):
                    found["actor"] = pid
                    break
            time.sleep(0.2)
        for who, pid in (("driver", os.getpid()), ("actor", found.get("actor"))):
            if pid:
                procs.append(subprocess.Popen([py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "50",
                                               "--output", str(out_dir / f"{who}.txt"), "--nonblocking"],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    t = threading.Thread(target=attach, daemon=True)
    t.start()
    rate_once([provider(srv.openai_base_url)], rows, work_dir() / "b4", rater_actors=ACTORS)
    for p in procs:
        p.send_signal(2)  # SIGINT: py-spy writes its output and exits
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    lines = []
    for who in ("actor", "driver"):
        f = out_dir / f"{who}.txt"
        if not f.exists():
            lines.append(f"{who}: no py-spy profile")
            continue
        own, incl = _top(f)
        lines.append(f"{who} (py-spy, share of samples; own time): " +
                     "; ".join(f"{name} {share:.0%}" for name, share in own))
        interesting = [(n, s) for n, s in incl if any(k in n for k in (
            "acquire", "complete", "create", "_one", "rate (", "to_pylist", "rows_to_table", "flush", "record",
            "iter_batches", "write", "run_pool_stage", "json", "post", "send", "parse", "validate", "get_output"))]
        lines.append(f"{who} inclusive: " + "; ".join(f"{n} {s:.0%}" for n, s in interesting[:10]))
    for line in lines:
        say("  B4 profile " + line)
    return "\n".join(lines)


if __name__ == "__main__":
    common.init_ray()
    try:
        run()
    finally:
        common.shutdown_ray()
