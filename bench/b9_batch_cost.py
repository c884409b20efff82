"""B9 cost of rating N rows (10,000 by default) online vs in batch mode, on the fake server's prices.

Both runs rate the same synthetic rows with the same fake server (in this process: the figures are
dollars, not speeds) and the same provider entry, priced like gpt-4o-mini ($0.15 / $0.60 per million
input / output tokens, OpenAI's list price) with the default batch price, half of that (OpenAI's
Batch API and Anthropic's Message Batches both charge 50 %). Tokens are the fake server's counts
(``len(text) // 4 + 1`` a message). The online run is ``stage_rate`` through the Ray rater pool; the
batch run is ``stage_rate`` with ``rate.mode: batch`` (driver-side, the fake server's Batches API).
2 % of the rows get an unparseable rating, so both runs also pay for parse retries.

Figures: the two ledgers' dollars, their ratio (goal: at most 0.5) and the share of rows whose
outcome (status, score) is the same in both runs (goal: 1). ``BENCH_B9_ROWS`` or the first argument
sets N; ``BENCH_QUICK=1`` uses 200.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import common
from common import FAKE_KEY, QUICK, figure, say, synthetic_rows, work_dir

PRICE = {"input_per_mtok": 0.15, "output_per_mtok": 0.60}  # gpt-4o-mini, OpenAI's price list
BAD_SHARE = 0.02


def _rows_n() -> int:
    return int(os.environ.get("BENCH_B9_ROWS") or (200 if QUICK else 10_000))


def _config(url: str, outdir, mode: str):
    from evoray.config import JobConfig

    return JobConfig.from_dict({
        "providers": [{"name": "fake", "kind": "openai", "model": "fake-model", "base_url": url, "price": PRICE,
                       "max_attempts": 6, "backoff_base_s": 0.05, "backoff_max_s": 1.0, "timeout_s": 30}],
        "output": {"dir": str(outdir)},
        "ray": {"rater_actors": 4, "batch_size": 64},
        "cache": {"enabled": False},  # every request must reach the server
        "rate": {"random_baseline": False, "parse_retries": 1, "mode": mode},
        "batch": {"poll_interval_s": 0.2},
    })


def _outcomes(outdir) -> dict[str, tuple]:
    import pyarrow.parquet as pq

    out = {}
    for t in ("kept", "rejected", "failed"):
        p = outdir / f"{t}.parquet"
        if p.exists():
            for r in pq.read_table(p, columns=["id", "status", "score"]).to_pylist():
                out[r["id"]] = (r["status"], r["score"])
    return out


def _rate(url: str, rows, mode: str) -> dict:
    from evoray.jobs import JobContext
    from evoray.stages import stage_rate

    outdir = work_dir() / f"b9_{mode}"
    shutil.rmtree(outdir, ignore_errors=True)
    ctx = JobContext(_config(url, outdir, mode), quiet=True)
    try:
        t0 = time.perf_counter()
        res = stage_rate(ctx, str(rows), outdir)
        wall = time.perf_counter() - t0
        ledger = ctx.ledger_dict()["total"]
    finally:
        ctx.close()
    return {"ledger": ledger, "counts": res.counts, "wall_s": wall, "outcomes": _outcomes(outdir)}


def run(n: int | None = None) -> list:
    from evoray.testing.fake_server import FakeLLMServer
    from evoray.testing.responders import PipelineResponder

    n = n or _rows_n()
    os.environ.setdefault("OPENAI_API_KEY", FAKE_KEY)
    rows = synthetic_rows(n, work_dir() / f"rows_{n}.parquet")
    with FakeLLMServer(responder=PipelineResponder(bad_rating_share=BAD_SHARE)) as srv:
        online = _rate(srv.openai_base_url, rows, "online")
        batch = _rate(srv.openai_base_url, rows, "batch")
        bstats = srv.batches.stats()
    lo, lb = online["ledger"], batch["ledger"]
    same = sum(1 for k, v in online["outcomes"].items() if batch["outcomes"].get(k) == v) / max(1, n)
    ratio = lb["dollars"] / lo["dollars"] if lo["dollars"] else float("nan")
    for name, r in (("online", online), ("batch", batch)):
        led = r["ledger"]
        say(f"  B9 {name}: {led['requests']:,} requests ({led['batch_requests']:,} batched), "
            f"{led['input_tokens']:,} + {led['output_tokens']:,} tokens, ${led['dollars']:.4f}, "
            f"kept {r['counts']['kept']:,} / rejected {r['counts']['rejected']:,} / failed {r['counts'].get('failed', 0):,}, "
            f"{r['wall_s']:.1f} s")
    say(f"  B9 batch side: {bstats['batches_created']} batch(es), {bstats['lines']:,} lines")
    note = (f"{n:,} synthetic rows, {BAD_SHARE:.0%} unparseable ratings (parse_retries 1), prices $0.15 / $0.60 per "
            f"Mtok (gpt-4o-mini) and the default batch price (50 %); online {lo['requests']:,} requests, "
            f"{lo['input_tokens']:,} + {lo['output_tokens']:,} tokens; batch {lb['requests']:,} requests in "
            f"{bstats['batches_created']} batch(es), {lb['input_tokens']:,} + {lb['output_tokens']:,} tokens")
    label = f"{n:,} rows"
    return [
        figure("B9", f"online cost of rating {label}", [lo["dollars"]], unit="USD"),
        figure("B9", f"batch cost of rating {label}", [lb["dollars"]], unit="USD"),
        figure("B9", "batch cost / online cost", [ratio], goal="<= 0.5", check=lambda v: v <= 0.5 + 1e-9,
               note=note),
        figure("B9", "rows with the same outcome online and in batch", [same], goal="= 1", check=lambda v: v == 1.0),
    ]


if __name__ == "__main__":
    common.init_ray()
    try:
        figs = run(int(sys.argv[1]) if len(sys.argv) > 1 else None)
        print(json.dumps([f.to_dict() for f in figs], indent=1))
    finally:
        common.shutdown_ray()
