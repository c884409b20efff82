"""What every stage driver shares: the start (ingest the input, fingerprint, skip a finished
folder), the end (ledger, failed-share check, ``_SUCCESS.json``), and the hand-over to the next
pipeline stage (a table as canonical Parquet)."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import JobConfig
from ..errors import StageFailed
from ..io import read_table, write_text_atomic
from ..jobs import (STOPPED, JobContext, StageResult, _hash_file, clear_marker, done_marker, fingerprint,
                    format_reasons, prepare_input, stop_for_budget, write_canonical, write_ledger, write_marker)
from ..sinks import find_table


def _providers_fp(config: JobConfig, role: str) -> list:
    """What identifies a role's answers: kind, model and where they come from (base_url or
    cache_namespace), so a finished stage is not taken as done for another server."""
    from ..providers import provider_class

    return [(p.kind, p.model, provider_class(p.kind).source_of(p)) for p in config.providers_for(role)]


def _say(ctx: JobContext, msg: str) -> None:
    if not ctx.quiet:
        print(msg, flush=True)


def _finish(ctx: JobContext, stage: str, outdir: Path, fp: str, counts: dict, outputs: dict) -> StageResult:
    write_ledger(ctx, outdir)
    result = StageResult(stage, outdir, counts, outputs)
    ctx.results.append(result)
    if counts.get("budget_stopped"):
        stop_for_budget(ctx, outdir, stage, counts)
    check_failed_share(ctx, result)
    write_marker(outdir, fp, counts, outputs)
    return result


def failed_share(counts: dict) -> tuple[int, int]:
    """(failed rows, rows the stage finished) from a stage's counts."""
    failed = int(counts.get("failed", 0) or 0)
    done = int(counts.get("input", 0) or 0) - int(counts.get("budget_stopped", 0) or 0)
    return failed, max(done, 0)


def check_failed_share(ctx: JobContext, result: StageResult) -> None:
    """More failed rows than ``max_failed_fraction`` allows: the tables stay, ``_STOPPED.json`` says
    why, no ``_SUCCESS.json`` (a re-run redoes the stage), and :class:`StageFailed` (exit 1)."""
    failed, done = failed_share(result.counts)
    limit = ctx.config.max_failed_fraction
    if not done or failed / done <= limit:
        return
    reasons = format_reasons(result.counts.get("failure_reasons") or {})
    write_text_atomic(result.outdir / STOPPED, json.dumps({"stage": result.stage, "reason": "too_many_failed",
                                                           "counts": result.counts}, indent=2))
    where = next((str(p) for p in (result.outdir / "failed.parquet", result.outdir / "failed.jsonl") if p.exists()),
                 str(result.outdir))
    result.failed_job = True
    raise StageFailed(
        f"{result.stage}: {failed} of {done} row(s) failed ({failed / done:.0%}, more than max_failed_fraction "
        f"{limit:g}); most common reasons: {reasons or 'none recorded'}; the failed rows are in {where}. The "
        f"tables are written but the stage is not marked complete: fix the cause and run again (answered "
        f"requests come from the cache), or raise max_failed_fraction")


def _skip(ctx: JobContext, stage: str, outdir: Path, fp: str) -> StageResult | None:
    m = done_marker(outdir, fp)
    if m is None:
        return None
    _say(ctx, f"[{stage}] already complete in {outdir} (skipped; delete {outdir}/_SUCCESS.json to redo)")
    result = StageResult(stage, outdir, m.get("counts", {}), m.get("outputs", {}), skipped=True)
    ctx.results.append(result)
    return result


def _begin(ctx: JobContext, stage: str, input_src: str | None, outdir: Path,
           *fp_parts) -> tuple[Path, str, StageResult | None]:
    """The common start of a stage: ``(input_path, fingerprint, done)``.

    Ingests the input, fingerprints the stage from its name, the input's hash and ``fp_parts``;
    ``done`` is the earlier result when the folder holds a finished run with that fingerprint,
    otherwise None and the folder's marker is cleared for a new run.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    input_path = prepare_input(ctx.config, input_src, outdir)
    fp = fingerprint(stage, _hash_file(input_path), *fp_parts)
    done = _skip(ctx, stage, outdir, fp)
    if done is None:
        clear_marker(outdir)
    return input_path, fp, done


def _check_accounted(stage: str, counts: dict, tables: list[str]) -> None:
    total = sum(counts.get(t, 0) for t in tables) + counts.get("budget_stopped", 0)
    if total != counts["input"]:
        raise RuntimeError(f"{stage}: {counts['input']} rows in but {total} accounted for: {counts}")


def canonical_from(stage_dir: Path, table: str, fmt: str = "") -> str:
    """The next stage's input: a stage's table as canonical Parquet (stable ids and lineage)."""
    src = find_table(stage_dir, table)
    target = stage_dir / f"_{table}_canonical.parquet"
    if src is None:
        raise RuntimeError(f"{stage_dir}: no {table} table to feed the next stage")
    if not target.exists() or target.stat().st_mtime < src.stat().st_mtime:
        write_canonical(read_table(src), target)
    return str(target)


def feed(table: str):
    """A stage's ``next_input``: its ``table`` as canonical Parquet feeds the next stage."""

    def next_input(outdir: Path, fmt: str, current: str) -> str:
        return canonical_from(outdir, table, fmt)

    return next_input
