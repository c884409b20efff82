"""The judge stage: pairwise judgments of two answer files, each pair in both orders.

It reads ``judge.answers_a`` and ``judge.answers_b`` (not the pipeline's rows); every prompt gets
one row in ``judgments``, judged or failed (a prompt only one side answered is a failed judgment).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..batch_stage import stage_runner
from ..errors import UsageError
from ..estimate import estimate_judge
from ..io import read_table, write_text_atomic
from ..jobs import JobContext, StageResult, clear_marker, fingerprint, reason_key
from ..sinks import TableSink
from ..stage import Command, ReportSection, StageDef, register
from ..workers import judge_worker
from .common import _finish, _providers_fp, _say, _skip

#: row status -> the table it goes to
ROUTES = {"judged": "judgments", "failed": "judgments"}


def stage_judge(ctx: JobContext, outdir: Path) -> StageResult:
    from ..io import iter_rows
    from ..judge import JUDGMENT_FIELDS, JUDGMENT_SCHEMA, pair_answers, summarize
    from ..plots import wtl_bar_chart

    cfg = ctx.config
    j = cfg.judge
    if not j.answers_a or not j.answers_b:
        raise UsageError("judge needs judge.answers_a and judge.answers_b (answer files of the two models)")
    outdir.mkdir(parents=True, exist_ok=True)
    rows_a = list(iter_rows([j.answers_a], fmt="auto"))
    rows_b = list(iter_rows([j.answers_b], fmt="auto"))
    pairs, only_a, only_b = pair_answers(rows_a, rows_b)
    fp = fingerprint("judge", [(r["instruction"], r.get("answer_a"), r.get("answer_b")) for r in pairs], j.model_dump(),
                     _providers_fp(cfg, "judge"), cfg.output.format)
    if (r := _skip(ctx, "judge", outdir, fp)) is not None:
        return r
    clear_marker(outdir)
    schema = JUDGMENT_SCHEMA.append(pa.field("status", pa.string()))
    pairs_path = outdir / "_pairs.parquet"
    pq.write_table(pa.Table.from_pylist(pairs), pairs_path, row_group_size=64)
    fmt = cfg.output.format
    counts = stage_runner(ctx, "judge")(ctx, "judge", "judge", pairs_path, outdir, ROUTES,
                                        STAGE.pool_size(cfg), schema=schema) if pairs else {"judgments": 0, "input": 0}
    pairs_path.unlink(missing_ok=True)
    # prompts only one side answered are reported as failed judgments, never dropped
    unmatched = []
    for side, rows in (("B", only_a), ("A", only_b)):
        for r in rows:
            row = {k: None for k in JUDGMENT_FIELDS}
            row.update(id=r["id"], test_set=None, instruction=r["instruction"], input=r.get("input") or "",
                       result="failed", reason=f"no answer from model {side} for this prompt", status="failed")
            unmatched.append(row)
    judgments = read_table(outdir / f"judgments.{fmt}").to_pylist() if counts.get("judgments") else []
    if unmatched:
        sink = TableSink(outdir, "judgments", fmt, schema)
        sink.write(judgments + unmatched)
        sink.close()
        judgments += unmatched
    summary = summarize(judgments, test_sets=j.test_sets or None)
    write_text_atomic(outdir / "summary.json", json.dumps(summary, indent=2) + "\n")
    wtl_bar_chart(summary, outdir / "wtl.png")
    counts["judgments"] = len(judgments)
    counts["unmatched"] = len(unmatched)
    counts["input"] = len(judgments)
    counts["failed"] = sum(1 for r in judgments if r.get("status") == "failed")
    counts["judged"] = counts["judgments"] - counts["failed"]
    reasons = dict(counts.get("failure_reasons") or {})
    for r in unmatched:
        key = reason_key(r["reason"])
        reasons[key] = reasons.get(key, 0) + 1
    counts["failure_reasons"] = reasons
    ov = summary.get("overall", {})
    _say(ctx, f"[judge] Win {ov.get('win')} / Tie {ov.get('tie')} / Lose {ov.get('lose')} (failed {ov.get('failed')}), "
              f"winning score {ov.get('winning_score')} (paper: over the test-set size; judged only "
              f"{ov.get('winning_score_judged_only')}) -> {outdir}")
    return _finish(ctx, "judge", outdir, fp, counts, {"judgments": str(outdir / f"judgments.{fmt}")})


def _run(ctx: JobContext, input_src: str | None, outdir: Path) -> StageResult:
    """The judge reads its two answer files, not the stage input."""
    return stage_judge(ctx, outdir)


def _report(ctx) -> str:
    from ..report import _section_judge

    return _section_judge(ctx)


STAGE = register(StageDef(
    name="judge", roles=("judge",), driver=_run, estimator=estimate_judge,
    routes=ROUTES, tables=("judgments",),
    markers=("summary.json", "judgments.parquet", "judgments.jsonl"), worker=judge_worker, pool_key="judge_actors",
    pool_label="judge", report=ReportSection("judge", "Judge: Win / Tie / Lose", _report, rank=40),
    command=Command("pairwise judge with the answer order swapped", with_input=False, rank=50),
    outcomes=("judged",)))
