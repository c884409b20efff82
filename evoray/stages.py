"""The stages behind the commands, and the pipeline.

Every stage follows the contract in :mod:`evoray.jobs`: canonical input, a Ray pool, every input
row in exactly one output table, ``ledger.json``, and ``_SUCCESS.json`` last (so a re-run skips a
finished stage). Each stage is one object (:mod:`evoray.stage`) defined in its own module of
:mod:`evoray.stagedefs`; this module keeps the driver names (``stage_rate``, ``stage_evolve`` …)
importable from here and runs ``pipeline:`` by looking each stage up in the registry.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .jobs import JobContext, StageResult
from .stage import get_stage

# the names this module always had, re-exported from the stages' own modules
from .stagedefs.answer import stage_answer  # noqa: F401
from .stagedefs.common import (_begin, _check_accounted, _finish, _providers_fp, _say, _skip,  # noqa: F401
                               canonical_from, check_failed_share, failed_share)
from .stagedefs.evolve import (SHOW_FAILED, _measures_note, _rules_label, failed_rows_lines,  # noqa: F401
                               resolve_method, stage_evolve)
from .stagedefs.ingest import run_ingest  # noqa: F401
from .stagedefs.judge import stage_judge  # noqa: F401
from .stagedefs.optimize import _sample_rows, stage_optimize  # noqa: F401
from .stagedefs.rate import (_LATER_RATE_KEYS, _rate_budget, _rate_threshold, _target_fields,  # noqa: F401
                             rate_fingerprint, stage_rate, threshold_note)

log = logging.getLogger("evoray")


def run_pipeline(ctx: JobContext, outdir: Path, input_src: str | None = None) -> dict[str, StageResult]:
    """Run ``pipeline:`` in order; each stage's output feeds the next (see README, "Pipelines").

    Each stage runs in ``OUTDIR/<stage>``; what it hands on (optimize's best method) reaches the
    later stages that take it (evolve's ``method_spec``).
    """
    cfg = ctx.config
    results: dict[str, StageResult] = {}
    current = input_src or cfg.input.path
    carried: dict = {}
    fmt = cfg.output.format
    for name in cfg.pipeline:
        stage = get_stage(name)
        sd = outdir / name
        options = {k: carried[k] for k in getattr(stage, "takes", ()) if k in carried}
        r = stage.run(ctx, current, sd, **options)
        if r is not None:
            carried.update(stage.hand_on(r, sd))
            results[name] = r
        current = stage.next_input(sd, fmt, current)
    return results


def _canonical_from(stage_dir: Path, table: str, fmt: str) -> str:
    return canonical_from(stage_dir, table, fmt)


__all__ = ["SHOW_FAILED", "check_failed_share", "failed_rows_lines", "failed_share", "rate_fingerprint",
           "resolve_method", "run_ingest", "run_pipeline", "stage_answer", "stage_evolve", "stage_judge",
           "stage_optimize", "stage_rate", "threshold_note"]
