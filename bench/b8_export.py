"""B8 export: ``evoray export`` of a synthetic table to Alpaca JSON, OpenAI chat JSONL and a Hugging
Face dataset folder, at a small size and at ``BENCH_B8_BIG`` rows (default 1,000,000).

Each export runs in a fresh Python process (no Ray), so its peak RSS (the kernel's ``VmHWM``, read at
the end of the process) is the export's own. Figures: wall time and rows/s per format at the big
size, peak RSS at the big size, and the peak RSS ratio big / small for the streamed JSON formats
(flat memory: goal <= 1.2). The ``hf`` format goes through ``datasets``' memory-mapped Arrow cache.
"""

from __future__ import annotations

import json
import subprocess
import sys

import common
from common import QUICK, ROOT, figure, repeats_or, say, size, synthetic_rows, work_dir

FORMATS = ("alpaca", "openai", "hf")
GIB = 2**30

_CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
from evoray.export import export
t0 = time.perf_counter()
s = export({src!r}, {out!r}, {fmt!r})
wall = time.perf_counter() - t0
hwm = 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM"):
        hwm = int(line.split()[1]) * 1024
print(json.dumps({{"wall_s": wall, "peak_rss": hwm, "written": s.written, "rows_in": s.rows_in}}))
"""


def once(src, fmt: str, n: int) -> dict:
    out = work_dir() / "b8" / f"out_{n}.{fmt}{'' if fmt == 'hf' else '.json'}"
    out.parent.mkdir(parents=True, exist_ok=True)
    code = _CHILD.format(root=str(ROOT), src=str(src), out=str(out), fmt=fmt)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"export {fmt} of {n} rows failed: {proc.stderr[-2000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if r["written"] != n:
        raise RuntimeError(f"export {fmt}: {r['written']} of {n} rows written")
    say(f"  B8 {fmt} {n:,} rows: {r['wall_s']:.1f} s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB")
    return r


def run() -> list:
    # 100,000, not 10,000: a 10,000-row export ends (in 0.05 s) before the JSON writer and Arrow's
    # buffers reach their steady size (about 120 MiB RSS), so a ratio against it measured warm-up
    small = 500 if QUICK else 100_000
    big = size("b8_big", 1_000_000, 2000)
    src_small = synthetic_rows(small, work_dir() / f"rows_{small}.parquet")
    src_big = synthetic_rows(big, work_dir() / f"rows_{big}.parquet")
    figs = []
    for fmt in FORMATS:
        rs = [once(src_small, fmt, small) for _ in range(repeats_or(1))]
        rb = [once(src_big, fmt, big) for _ in range(repeats_or(1))]
        rss_s = common.median([r["peak_rss"] for r in rs])
        figs.append(figure("B8", f"{fmt} wall time, {big:,} rows", [r["wall_s"] for r in rb], unit="s"))
        figs.append(figure("B8", f"{fmt} rate, {big:,} rows", [big / r["wall_s"] for r in rb], unit="rows/s"))
        figs.append(figure("B8", f"{fmt} peak RSS, {big:,} rows", [r["peak_rss"] / GIB for r in rb], unit="GiB"))
        ratio = [r["peak_rss"] / rss_s for r in rb]
        if fmt == "hf":
            figs.append(figure("B8", f"{fmt} peak RSS, {big:,} rows / {small:,} rows", ratio))
        else:
            figs.append(figure("B8", f"{fmt} peak RSS, {big:,} rows / {small:,} rows", ratio, goal="<= 1.2",
                               check=lambda v: v <= 1.2))
    return figs


if __name__ == "__main__":
    run()
