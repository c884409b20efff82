"""B4 overhead: requests/s through the rater pool on a zero-latency server, through the gate path.

The provider has an rpm limit that never binds (1,000,000), so every request takes a permit from the
key's gate, as a limited job's requests do. Figures: the pool's req/s / the plain asyncio reference
(bench/plain_reference.py, no limiter, 64 in flight) on the same server; req/s with permit leases
(the default) / with one awaited gate call per request (``ray.lease_permits: false``, the old
design); the key gate's CPU per request in both modes. Rates are measured by the server (first to
last request), so Ray start-up and the pool's actor start are not in them; the stage's end-to-end
rate (rows / stage wall time) is given too. Where the time goes: py-spy samples one rater actor
and the driver during an extra run. Sizes: ``BENCH_B4_ROWS`` (2,000).
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
from common import (QUICK, ROOT, ServerProcess, descendants, cmdline, figure, gate_cpu_per_request, provider,
                    rate_once, repeats, run_reference, say, size, synthetic_rows, window_rate, work_dir)

ACTORS = 4
LIMIT_RPM = 1_000_000  # never binds, but every request goes through the key gate


def run(profile: bool = True) -> list:
    n = size("b4_rows", 2000, 300)
    rows = synthetic_rows(n, work_dir() / f"rows_{n}.parquet")
    evo, single, ref, e2e, cpu, cpu_single, calls = [], [], [], [], [], [], []
    prov = lambda url: provider(url, rpm=LIMIT_RPM)  # noqa: E731
    with ServerProcess(latency_s=0.0, latency_dist="fixed") as srv:
        for i in range(repeats()):
            srv.reset()
            r = rate_once([prov(srv.openai_base_url)], rows, work_dir() / "b4", rater_actors=ACTORS)
            st = srv.stats()
            evo.append(window_rate(st))
            e2e.append(n / r["wall_s"])
            cpu.append(gate_cpu_per_request(r) * 1000)
            g, b = r["gates_after"]["fake"], r["gates_before"]["fake"]
            calls.append((g["leases"] - b["leases"]) / max(1, g["permits"] - b["permits"]))
            srv.reset()
            r1 = rate_once([prov(srv.openai_base_url)], rows, work_dir() / "b4", rater_actors=ACTORS,
                           lease_permits=False)
            single.append(window_rate(srv.stats()))
            cpu_single.append(gate_cpu_per_request(r1) * 1000)
            srv.reset()
            ref_out = run_reference(srv.openai_base_url, n)
            st2 = srv.stats()
            ref.append(window_rate(st2))
            say(f"  B4 run {i + 1}: evoray {evo[-1]:.0f} req/s with leases ({calls[-1]:.2f} lease calls a request, "
                f"gate {cpu[-1]:.3f} ms CPU a request), {single[-1]:.0f} req/s with a gate call per request (gate "
                f"{cpu_single[-1]:.3f} ms CPU a request), reference {ref[-1]:.0f} req/s (wall {ref_out['wall_s']:.1f} s)")
        figs = [
            figure("B4", "rater pool req/s / plain asyncio req/s", [e / f for e, f in zip(evo, ref)], goal=">= 0.5",
                   check=lambda v: v >= 0.5),
            figure("B4", "req/s with permit leases / one gate call per request", [e / s for e, s in zip(evo, single)],
                   goal="> 1", check=lambda v: v > 1.0),
            figure("B4", "rater pool req/s (server window), leases", evo, unit="req/s"),
            figure("B4", "rater pool req/s, one gate call per request", single, unit="req/s"),
            figure("B4", "plain asyncio reference req/s", ref, unit="req/s"),
            figure("B4", "key gate CPU per request, leases", cpu, unit="ms"),
            figure("B4", "key gate CPU per request, one gate call per request", cpu_single, unit="ms"),
            figure("B4", "lease calls per request", calls),
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
    rate_once([provider(srv.openai_base_url, rpm=LIMIT_RPM)], rows, work_dir() / "b4", rater_actors=ACTORS)
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
    common.main_with_ray(run)
