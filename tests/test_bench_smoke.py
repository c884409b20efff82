"""Smoke test of the benchmark scripts: they run at tiny sizes and print their figure lines.

Benchmarks are not tests: nothing here asserts a rate, a time or a memory figure (``make bench``
measures them). This only catches a broken script. ``bench/run_all.py`` runs in a subprocess
with ``BENCH_QUICK=1`` (its own local Ray, stopped at the end) and writes into ``tmp_path``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.bench_smoke

EXPECTED = {
    "B1": ["evoray achieved rpm / limit", "evoray 429 share", "peer (a) 429 share", "peer (b) 429 share",
           "peer (c) 429 share"],
    "B1x": ["two jobs on one key, combined rpm / limit", "two jobs on one key, 429 share"],
    "B1a": ["silent, settled rpm / real limit", "headers, settled rpm / real limit"],
    "B2": ["aggregate rate / R"],
    "B3": ["time for m=5 candidates / time for 1"],
    "B4": ["rater pool req/s / plain asyncio req/s", "req/s with permit leases / one gate call per request",
           "key gate CPU per request, leases"],
    "B5": ["driver peak RSS", "largest worker peak RSS", "wall time"],
    "B6": ["evoray local provider tok/s / direct llama-cpp-python tok/s"],
    "B7": ["rpm / limit", "p99 wait for a permit", "key gate CPU per request"],
    "BK": ["rows accounted / rows in", "duplicate rows", "requests beyond one per row"],
    "B8": ["alpaca wall time", "openai peak RSS", "hf peak RSS"],
    "B9": ["online cost of rating", "batch cost of rating", "batch cost / online cost",
           "rows with the same outcome online and in batch"],
    "B10": ["paper precision", "paper recall", "strict precision", "strict recall"],
}


def test_bench_scripts_run_and_print_their_figures(tmp_path):
    pytest.importorskip("ray")
    env = {**os.environ, "BENCH_QUICK": "1", "BENCH_WORK": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("BENCH_FULL", None)
    env.pop("BENCH_REPEATS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, f"run_all.py failed:\n{out[-3000:]}\n{proc.stderr[-3000:]}"
    figures = [line for line in out.splitlines() if line.startswith("FIGURE ")]
    for bench, names in EXPECTED.items():
        for name in names:
            assert any(line.startswith(f"FIGURE {bench} ") and name in line for line in figures), \
                f"no figure line '{bench} {name}' in:\n" + "\n".join(figures)
    # every figure line carries a number (or n/a) and, when it has a goal, a verdict
    for line in figures:
        assert re.match(r"FIGURE B[0-9A-Za-z]+ [^:]+: (n/a|-?[\d,.]+)", line), line
        assert "goal" not in line or ("PASS" in line or "MISS" in line), line
    md = (tmp_path / "BENCHMARKS.quick.md").read_text()
    assert "| B1 |" in md and "| B6 |" in md and "| B7 |" in md and "| BK |" in md and "CPUs" in md
    assert not (tmp_path / "BENCHMARKS.md").exists()
