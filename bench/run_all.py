"""Run every benchmark in one process under one local Ray and write BENCHMARKS.md.

``python bench/run_all.py [b1 b2 ...]`` (``make bench`` runs them all; about 20 minutes on 2 cores).
``BENCH_QUICK=1`` shrinks sizes and repetitions (the smoke test) and writes
``out/bench/BENCHMARKS.quick.md`` instead of BENCHMARKS.md. The hand-written closing note of
BENCHMARKS.md (between the ``notes`` markers) is kept when the file is regenerated.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import QUICK, ROOT, Figure, machine, say, work_dir  # noqa: E402

BENCHES = {
    "b1": ("b1_rate_limit", "B1 rate-limit use"),
    "b2": ("b2_spreading", "B2 spreading over two providers"),
    "b3": ("b3_candidates", "B3 optimizer candidates in parallel"),
    "b4": ("b4_overhead", "B4 overhead of the rater pool"),
    "b5": ("b5_memory", "B5 memory at scale"),
    "b6": ("b6_local_model", "B6 embedded model"),
}
NOTES_BEGIN, NOTES_END = "<!-- notes: kept by run_all.py -->", "<!-- /notes -->"


def main(argv: list[str]) -> int:
    chosen = [a.lower() for a in argv] or list(BENCHES)
    unknown = [c for c in chosen if c not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    started = datetime.datetime.now().astimezone()
    m0 = machine()
    say(f"machine: {m0['nproc']} CPUs ({m0['cpu']}), {m0['mem_gib']} GiB, load {m0['load']}; "
        f"quick={QUICK} full={common.FULL} repeats={common.repeats()}")
    t_all = time.perf_counter()
    common.init_ray()
    results: dict[str, dict] = {}
    try:
        for key in chosen:
            mod_name, title = BENCHES[key]
            say(f"== {title} ==")
            t0 = time.perf_counter()
            load0 = os.getloadavg()
            try:
                figs = importlib.import_module(mod_name).run()
                err = None
            except Exception as e:  # noqa: BLE001 - one broken benchmark must not hide the others
                traceback.print_exc()
                figs, err = [], f"{type(e).__name__}: {e}"
                say(f"FIGURE {title.split()[0]} error: {err}")
            results[key] = {"title": title, "figures": [f.to_dict() for f in figs], "error": err,
                            "seconds": time.perf_counter() - t0, "load_before": load0, "load_after": os.getloadavg()}
    finally:
        common.shutdown_ray()
    total = time.perf_counter() - t_all
    m1 = machine()
    say(f"all benchmarks: {total / 60:.1f} min")
    out = work_dir() / ("results.quick.json" if QUICK else "results.json")
    out.write_text(json.dumps({"started": started.isoformat(), "machine": m0, "load_end": m1["load"],
                               "total_s": total, "results": results}, indent=2) + "\n")
    md = ROOT / "BENCHMARKS.md" if not QUICK else work_dir() / "BENCHMARKS.quick.md"
    md.write_text(render(started, m0, m1, total, results, chosen, md))
    say(f"wrote {md}")
    return 0 if all(r["error"] is None for r in results.values()) else 1


def _v(f: dict) -> str:
    return Figure(**f).line().split(": ", 1)[1].split("  goal")[0].split("  (runs")[0].strip()


def render(started, m0, m1, total, results, chosen, md_path: Path) -> str:
    notes = ""
    if md_path.exists():
        old = md_path.read_text()
        if NOTES_BEGIN in old and NOTES_END in old:
            notes = old.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0].strip("\n")
    cmd = "BENCH_QUICK=1 " if QUICK else ""
    cmd += "BENCH_FULL=1 " if common.FULL else ""
    cmd += "python bench/run_all.py" + ("" if chosen == list(BENCHES) else " " + " ".join(chosen))
    lines = [
        "# Benchmarks",
        "",
        "Written by `bench/run_all.py` (`make bench`); every figure is the median of the runs listed beside it.",
        "All API traffic goes to the fake LLM server (`evoray.testing.fake_server`) on 127.0.0.1, run in its own",
        "process; the Ray benchmarks share one local Ray started by the script.",
        "",
        f"- date: {started:%Y-%m-%d %H:%M %Z}",
        f"- command: `{cmd}` ({total / 60:.1f} min in all)",
        f"- machine: {m0['nproc']} CPUs ({m0['cpu']}), {m0['mem_gib']} GiB RAM, Python {m0['python']}",
        f"- load average (1/5/15 min) at start {_load(m0['load'])}, at end {_load(m1['load'])}: other people's test "
        "suites and Ray clusters ran on the same 2 cores, so rates and times are lower and noisier than on an idle machine",
        "",
        "| | figure | value | goal | result | runs |",
        "|---|---|---|---|---|---|",
    ]
    for key in chosen:
        r = results.get(key)
        if r is None:
            continue
        if r["error"]:
            lines.append(f"| {key.upper()} | {r['title']} | error: {r['error']} | | ERROR | |")
        for f in r["figures"]:
            verdict = "" if f["passed"] is None else ("pass" if f["passed"] else "**miss**")
            runs = ", ".join(Figure(**{**f, "value": x}).line().split(": ", 1)[1].split("  ")[0] for x in f["runs"])
            lines.append(f"| {f['bench']} | {f['name']} | {_v(f)} | {f['goal']} | {verdict} | {runs} |")
    lines += ["", "## Per benchmark", ""]
    for key in chosen:
        r = results.get(key)
        if r is None:
            continue
        lines.append(f"- **{r['title']}** ({r['seconds']:.0f} s, load {_load(r['load_before'])} -> "
                     f"{_load(r['load_after'])})")
        for f in r["figures"]:
            if f.get("note"):
                for i, part in enumerate(f["note"].splitlines()):
                    lines.append(f"  - {part}" if i == 0 else f"    {part}" if part.startswith(" ") else f"  - {part}")
    lines += ["", "## Closing note", "", NOTES_BEGIN, notes or "(no notes yet)", NOTES_END, ""]
    return "\n".join(lines)


def _load(t) -> str:
    return "/".join(f"{x:.1f}" for x in t)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
