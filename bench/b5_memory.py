"""B5 memory at scale: rating a small and a large synthetic set (zero latency, no limit) through
``stage_rate``: peak RSS of the driver and of each Ray worker process, and wall time.

Sizes: 10,000 and ``BENCH_B5_BIG`` rows (default 1,000,000). ``make bench`` runs the small size
three times and the large one once (a million chat completions take about 9 minutes here, each one
a request through the openai SDK to the fake server, about 1 ms of CPU between client and server on
2 cores); ``make bench-full`` (entry ``b5full``) runs the large size three times too, for its median.
Peaks: the kernel's high-water marks (``VmHWM``, reset through ``/proc/PID/clear_refs`` before each
run) and ``VmRSS`` sampled every 0.2 s, read from /proc (no psutil needed). RSS counts the pages of
Ray's shared-memory object store that a process has mapped (``RssShmem``); "own" memory is RSS
without them (private + file-backed pages). Both carry the 1.2x goal: the store's pages are one
pool for the node, capped by its size and counted in the RSS of every process that touched them,
so own memory is what grows with a process's own work.
"""

from __future__ import annotations

import os

import common
from common import FULL, QUICK, ServerProcess, MemorySampler, figure, provider, rate_once, say, synthetic_rows, \
    work_dir

ACTORS = 4
GIB = 2**30


def sizes() -> tuple[int, int]:
    if QUICK:
        return 500, 2000
    return 10_000, int(os.environ.get("BENCH_B5_BIG") or 1_000_000)


def one(srv, n: int) -> dict:
    rows = synthetic_rows(n, work_dir() / f"rows_{n}.parquet")
    srv.reset()
    sampler = MemorySampler(exclude=[srv.pid]).start()
    r = rate_once([provider(srv.openai_base_url)], rows, work_dir() / "b5", rater_actors=ACTORS, batch_size=64)
    mem = sampler.stop()
    workers = mem["workers"]
    top = sorted(workers.values(), key=lambda x: -x[1])
    out = {"n": n, "wall_s": r["wall_s"], "driver": mem["driver"], "worker_max": top[0][1] if top else 0,
           "driver_anon": mem["driver_anon"], "worker_anon_max": max(mem["workers_anon"].values(), default=0),
           "driver_own": mem["driver_own"], "worker_own_max": max(mem["workers_own"].values(), default=0),
           "driver_shmem": mem["driver_shmem"],
           "worker_sum": sum(v for _, v in top), "workers": top, "counts": r["counts"]}
    say(f"  B5 {n:,} rows: wall {r['wall_s']:.1f} s ({n / r['wall_s']:.0f} rows/s), driver peak "
        f"{mem['driver'] / 2**20:.0f} MiB (own {mem['driver_own'] / 2**20:.0f}, object-store pages "
        f"{mem['driver_shmem'] / 2**20:.0f}), largest worker {out['worker_max'] / 2**20:.0f} MiB, "
        f"{len(top)} worker processes ({out['worker_sum'] / 2**20:.0f} MiB together)")
    for name, rss in top[:8]:
        say(f"      {rss / 2**20:7.0f} MiB  {name}")
    return out


def run_full() -> list:
    return run(full=True)


def run(full: bool = False) -> list:
    small, big = sizes()
    res: dict[int, list[dict]] = {small: [], big: []}
    # BENCH_REPEATS runs of each size (default 3), except one run of a size above 100,000 rows in
    # `make bench` (1,000,000 rows is about 9 minutes); `make bench-full` (full=True) repeats it too
    reps = common.repeats()
    reps_small, reps_big = reps, (reps if big <= 100_000 or full or FULL else 1)
    with ServerProcess(latency_s=0.0, latency_dist="fixed") as srv:
        for _ in range(reps_small):
            res[small].append(one(srv, small))
        for _ in range(reps_big):
            res[big].append(one(srv, big))
    med = lambda n, k: common.median([r[k] for r in res[n]])
    d_s, d_b = med(small, "driver"), med(big, "driver")
    w_s, w_b = med(small, "worker_max"), med(big, "worker_max")
    note = ""
    if len(res[big]) < 3:
        note = (f"{big:,} rows ran {len(res[big])} time(s) here, inside make bench's 20 minutes; "
                f"`make bench-full` runs it 3 times for a median.")
    figs = [
        figure("B5", f"driver peak RSS, {big:,} rows / {small:,} rows", [r["driver"] / d_s for r in res[big]],
               goal="<= 1.2", check=lambda v: v <= 1.2),
        figure("B5", f"largest worker peak RSS, {big:,} rows / {small:,} rows", [r["worker_max"] / w_s for r in res[big]],
               goal="<= 1.2", check=lambda v: v <= 1.2),
        figure("B5", f"driver peak RSS at {big:,} rows", [r["driver"] / GIB for r in res[big]], unit="GiB",
               goal="< 2", check=lambda v: v < 2),
        figure("B5", f"largest worker peak RSS at {big:,} rows", [r["worker_max"] / GIB for r in res[big]], unit="GiB",
               goal="< 2", check=lambda v: v < 2),
        figure("B5", f"driver peak RSS at {small:,} rows", [r["driver"] / GIB for r in res[small]], unit="GiB"),
        figure("B5", f"largest worker peak RSS at {small:,} rows", [r["worker_max"] / GIB for r in res[small]], unit="GiB"),
        figure("B5", f"driver own memory (RSS without object-store pages), {big:,} rows / {small:,} rows",
               [r["driver_own"] / med(small, "driver_own") for r in res[big]], goal="<= 1.2", check=lambda v: v <= 1.2),
        figure("B5", f"largest worker own memory, {big:,} rows / {small:,} rows",
               [r["worker_own_max"] / med(small, "worker_own_max") for r in res[big]], goal="<= 1.2",
               check=lambda v: v <= 1.2),
        figure("B5", f"driver object-store pages in RSS at {small:,} rows", [r["driver_shmem"] / 2**20 for r in res[small]],
               unit="MiB"),
        figure("B5", f"driver object-store pages in RSS at {big:,} rows", [r["driver_shmem"] / 2**20 for r in res[big]],
               unit="MiB"),
        figure("B5", f"driver private memory (RssAnon), {big:,} rows / {small:,} rows",
               [r["driver_anon"] / med(small, "driver_anon") for r in res[big]]),
        figure("B5", f"largest worker private memory (RssAnon), {big:,} rows / {small:,} rows",
               [r["worker_anon_max"] / med(small, "worker_anon_max") for r in res[big]]),
        figure("B5", f"all Ray worker processes together at {big:,} rows", [r["worker_sum"] / GIB for r in res[big]],
               unit="GiB"),
        figure("B5", f"wall time {small:,} rows", [r["wall_s"] for r in res[small]], unit="s"),
        figure("B5", f"wall time {big:,} rows", [r["wall_s"] for r in res[big]], unit="s", note=note),
        figure("B5", f"rate at {small:,} rows", [small / r["wall_s"] for r in res[small]], unit="rows/s"),
        figure("B5", f"rate at {big:,} rows", [big / r["wall_s"] for r in res[big]], unit="rows/s"),
    ]
    figs[0].note = "; ".join(f"{r['n']:,} rows: workers " + ", ".join(f"{n.split()[0]} {v / 2**20:.0f} MiB" for n, v in r["workers"][:6])
                             for r in (res[small][0], res[big][0]))
    return figs


if __name__ == "__main__":
    common.main_with_ray(run)
