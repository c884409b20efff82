"""The answer stage: one answer per instruction from the ``answer`` role's provider."""

from __future__ import annotations

from pathlib import Path

from ..batch_stage import stage_runner
from ..estimate import estimate_answer
from ..jobs import JobContext, StageResult
from ..stage import Command, StageDef, register
from ..workers import answer_worker
from .common import _begin, _check_accounted, _finish, _providers_fp, _say, feed

#: row status -> the table it goes to
ROUTES = {"answered": "answered", "failed": "failed"}


def stage_answer(ctx: JobContext, input_src: str | None, outdir: Path) -> StageResult:
    cfg = ctx.config
    input_path, fp, done = _begin(ctx, "answer", input_src, outdir, cfg.answer.model_dump(),
                                  _providers_fp(cfg, "answer"), cfg.output.format)
    if done is not None:
        return done
    counts = stage_runner(ctx, "answer")(ctx, "answer", "answer", input_path, outdir, ROUTES,
                                         STAGE.pool_size(cfg))
    _check_accounted("answer", counts, ["answered", "failed"])
    _say(ctx, f"[answer] answered {counts.get('answered', 0)}, failed {counts.get('failed', 0)} -> {outdir}")
    fmt = cfg.output.format
    return _finish(ctx, "answer", outdir, fp, counts, {"answered": str(outdir / f"answered.{fmt}")})


STAGE = register(StageDef(
    name="answer", roles=("answer",), driver=stage_answer, estimator=estimate_answer,
    routes=ROUTES, tables=("answered", "failed"),
    markers=("answered.parquet", "answered.jsonl"), worker=answer_worker, pool_key="evolver_actors",
    pool_label="evolver", next_input_fn=feed("answered"), reads_rows=True,
    command=Command("answer instructions with a provider", rank=20), outcomes=("answered",)))
