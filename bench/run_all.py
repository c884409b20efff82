"""Run every benchmark in one process under one local Ray and write BENCHMARKS.md.

``python bench/run_all.py [b1 b2 ...]`` (``make bench`` runs DEFAULT, B5's 1,000,000 rows once;
``make bench-full`` runs ``b5full``, B5 with three 1,000,000-row runs for their median). Each run merges its
entries into ``bench/results.json``, and BENCHMARKS.md shows the latest run of every entry.
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
    "b1": ("b1_rate_limit", "B1 rate-limit use on a strict server"),
    "b1x": ("b1x_two_jobs", "B1x two jobs on one cluster, one key"),
    "b1a": ("b1a_adaptive", "B1a adaptive limit (configured 1,200 rpm, real 900)"),
    "b2": ("b2_spreading", "B2 spreading over two providers"),
    "b3": ("b3_candidates", "B3 optimizer candidates in parallel"),
    "b4": ("b4_overhead", "B4 overhead of the rater pool"),
    "b5": ("b5_memory", "B5 memory at scale"),
    "b6": ("b6_local_model", "B6 embedded model"),
    "b7": ("b7_gate_scale", "B7 gate scale (32 actors, 6,000 rpm)"),
    "bk": ("bk_gate_killed", "BK gate killed mid-run"),
    "b8": ("b8_export", "B8 export of a stage table (Alpaca JSON, OpenAI JSONL, HF dataset)"),
    "b9": ("b9_batch_cost", "B9 cost of rating online vs in batch mode"),
    "b10": ("b10_detector", "B10 failure detector: paper vs strict rules on a labelled set"),
    "b5full": ("b5_memory", "B5 memory at scale, three large runs", "run_full"),
}
DEFAULT = ["b1", "b1x", "b1a", "b2", "b3", "b4", "b5", "b6", "b7", "bk", "b8", "b9", "b10"]  # `make bench`; b5full is `make bench-full`
NO_RAY = {"b8", "b10"}  # entries that run without Ray: a run of only these starts none
RESULTS = ROOT / "bench" / "results.json"  # every entry's latest full-size run, merged across invocations
NOTES_BEGIN, NOTES_END = "<!-- notes: kept by run_all.py -->", "<!-- /notes -->"


def main(argv: list[str]) -> int:
    chosen = [a.lower() for a in argv] or list(DEFAULT)
    unknown = [c for c in chosen if c not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    started = datetime.datetime.now().astimezone()
    m0 = machine()
    say(f"machine: {m0['nproc']} CPUs ({m0['cpu']}), {m0['mem_gib']} GiB, load {m0['load']}; "
        f"quick={QUICK} full={common.FULL} repeats={common.repeats()}")
    cmd = "".join(f"{k}={os.environ[k]} " for k in sorted(os.environ)
                  if k.startswith("BENCH_") and k != "BENCH_WORK" and os.environ.get(k)) + "python bench/run_all.py"
    cmd += "" if chosen == DEFAULT else " " + " ".join(chosen)
    t_all = time.perf_counter()
    if set(chosen) - NO_RAY:
        common.init_ray()
    results: dict[str, dict] = {}
    try:
        for key in chosen:
            mod_name, title, *fn = BENCHES[key]
            say(f"== {title} ==")
            t0 = time.perf_counter()
            load0 = os.getloadavg()
            try:
                figs = getattr(importlib.import_module(mod_name), fn[0] if fn else "run")()
                err = None
            except Exception as e:  # noqa: BLE001 - one broken benchmark must not hide the others
                traceback.print_exc()
                figs, err = [], f"{type(e).__name__}: {e}"
                say(f"FIGURE {title.split()[0]} error: {err}")
            results[key] = {"title": title, "figures": [f.to_dict() for f in figs], "error": err,
                            "seconds": time.perf_counter() - t0, "load_before": load0, "load_after": os.getloadavg(),
                            "date": f"{started:%Y-%m-%d %H:%M %Z}", "command": cmd}
    finally:
        common.shutdown_ray()
    total = time.perf_counter() - t_all
    m1 = machine()
    say(f"all benchmarks: {total / 60:.1f} min")
    run = {"started": started.isoformat(), "command": cmd, "machine": m0, "load_end": m1["load"], "total_s": total,
           "chosen": chosen}
    out = work_dir() / ("results.quick.json" if QUICK else "results.json")
    out.write_text(json.dumps({**run, "results": results}, indent=2) + "\n")
    if QUICK:
        merged, runs = results, [run]
    else:  # BENCHMARKS.md shows every entry's latest run: `make bench` and `make bench-full` add up
        old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": [], "results": {}}
        merged = {**old.get("results", {}), **results}
        runs = [r for r in old.get("runs", []) if set(r.get("chosen", [])) - set(chosen)] + [run]
        RESULTS.write_text(json.dumps({"runs": runs, "results": merged}, indent=2) + "\n")
    md = ROOT / "BENCHMARKS.md" if not QUICK else work_dir() / "BENCHMARKS.quick.md"
    md.write_text(render(runs, merged, md))
    say(f"wrote {md}")
    return 0 if all(r["error"] is None for r in results.values()) else 1


def _v(f: dict) -> str:
    return Figure(**f).line().split(": ", 1)[1].split("  goal")[0].split("  (runs")[0].strip()


def render(runs: list[dict], results: dict[str, dict], md_path: Path) -> str:
    notes = ""
    if md_path.exists():
        old = md_path.read_text()
        if NOTES_BEGIN in old and NOTES_END in old:
            notes = old.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0].strip("\n")
    m0 = runs[-1]["machine"]
    machines = {(r["machine"]["nproc"], r["machine"]["cpu"]) for r in runs}
    lines = [
        "# Benchmarks",
        "",
        "Written by `bench/run_all.py` (`make bench`; `make bench-full` repeats B5's 1,000,000 rows); every figure",
        "is the median of the runs listed beside it. All API traffic goes to the fake LLM server",
        "(`evoray.testing.fake_server`) on 127.0.0.1, run in its own process; the Ray benchmarks share one local",
        "Ray started by the script. The figures of each entry come from its latest run (`bench/results.json`).",
        "",
        f"- machine: {m0['nproc']} CPUs ({m0['cpu']}), {m0['mem_gib']} GiB RAM, Python {m0['python']}"
        if len(machines) == 1 else "- machines: the runs below ran on different machines (named in each run's line)",
    ]
    for r in runs:
        where = f" on {r['machine']['nproc']} CPUs ({r['machine']['cpu']})" if len(machines) > 1 else ""
        lines.append(f"- run {r['started'][:16].replace('T', ' ')}: `{r['command']}`{where}, {r['total_s'] / 60:.1f} min "
                     f"in all, load average (1/5/15 min) {_load(r['machine']['load'])} at start, {_load(r['load_end'])} "
                     "at end")
    lines += ["", "| | figure | value | goal | result | runs |", "|---|---|---|---|---|---|"]
    order = [k for k in BENCHES if k in results]
    for key in order:
        r = results[key]
        if r["error"]:
            lines.append(f"| {key.upper()} | {r['title']} | error: {r['error']} | | ERROR | |")
        for f in r["figures"]:
            verdict = "" if f["passed"] is None else ("pass" if f["passed"] else "**miss**")
            runs_s = ", ".join(Figure(**{**f, "value": x}).line().split(": ", 1)[1].split("  ")[0] for x in f["runs"])
            lines.append(f"| {f['bench']} | {f['name']} | {_v(f)} | {f['goal']} | {verdict} | {runs_s} |")
    lines += ["", "## Per benchmark", ""]
    for key in order:
        r = results[key]
        lines.append(f"- **{r['title']}** ({r['seconds']:.0f} s, run {r.get('date', '?')}, load {_load(r['load_before'])} -> "
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
