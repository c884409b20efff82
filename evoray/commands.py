"""Command implementations behind :mod:`evoray.cli` (argument handling and output locations)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .config import JobConfig
from .errors import EvorayError, UsageError
from .io import write_text_atomic


def cmd_ingest(args) -> int:
    from .io import ingest, parse_mapping

    mapping = parse_mapping(args.map) if args.map else None
    s = ingest(args.sources, args.output, fmt=args.format, mapping=mapping, skip_invalid=args.skip_invalid,
               limit=args.limit)
    final = f"ingested {s.rows} row(s) -> {s.out}"
    if not args.quiet:
        print(final)
        for src, n in s.per_source.items():
            print(f"  {src}: {n} row(s), format {s.formats.get(src)}")
        if s.duplicates:
            print(f"  {s.duplicates} repeated row(s) kept with distinct ids")
        if s.quarantined:
            print(f"{s.quarantined} invalid row(s) quarantined in {s.quarantine_path}", file=sys.stderr)
    else:  # the final line names every output and count
        print(final + (f"; {s.quarantined} invalid row(s) quarantined in {s.quarantine_path}" if s.quarantined else ""))
    return 0


def cmd_export(args) -> int:
    from .export import default_out, export

    out = args.output or default_out(args.source, args.format, args.table)
    s = export(args.source, out, args.format, table=args.table, system=args.system, keep_empty=args.keep_empty,
               progress=getattr(args, "verbose", False))
    print(s.line())  # the final line, printed at every level
    return 0


def load_config(args) -> JobConfig:
    cfg = JobConfig.from_yaml(args.config, overrides=args.overrides)
    if getattr(args, "input", None):
        cfg.input.path = args.input
    if getattr(args, "output", None):
        cfg.output.dir = args.output
    if getattr(args, "address", None):
        cfg.ray.address = args.address
    return cfg


def cmd_job(args) -> int:
    """Run a job command. Errors raised once the job runs are reported here (one line on stderr),
    followed by the final line on stdout, which every outcome prints: the counts of every stage
    (kept / rejected / failed, or the stage's own words), the three most common failure reasons and
    where the outputs are; it names ``OUTDIR/logs/ray.log`` only when something went wrong."""
    from .console import QUIET, VERBOSE, level_of
    from .jobs import JobContext
    from .resources import job_stages
    from .stage import get_stage, stage_names
    from .stages import run_pipeline

    cfg = load_config(args)
    cmd = args.command
    if cmd == "estimate" or args.dry_run:
        from .estimate import estimate, format_estimate

        stages = None if cmd in ("run", "estimate") else [cmd]
        est = estimate(cfg, cfg.input.path, stages=stages) if stages else estimate(cfg, cfg.input.path)
        print(format_estimate(est))
        return 0
    level = level_of(args)
    quiet = level == QUIET
    outdir = Path(cfg.output.dir)
    outdir.mkdir(parents=True, exist_ok=True)
    ctx = JobContext(cfg, address=cfg.ray.address, quiet=quiet, stages=job_stages(cfg, cmd),
                     log_path=None if level == VERBOSE else outdir / "logs" / "ray.log")
    t0 = time.monotonic()
    error: BaseException | None = None
    report = None
    try:
        if cmd == "run":
            run_pipeline(ctx, outdir, cfg.input.path)
        else:  # a stage's own command (the parser offers the registered stages that have one)
            stage = get_stage(cmd) if cmd in stage_names() else None
            if stage is None or getattr(stage, "command", None) is None:  # pragma: no cover
                raise UsageError(f"unknown command {cmd}")
            options = stage.command.options(args) if stage.command.options is not None else {}
            stage.run(ctx, cfg.input.path, outdir, **options)
    except BaseException as e:
        lost = ctx.as_ray_loss(e)
        error = lost if lost is not None else e
    where = ctx.logs_where() if error is not None else None
    try:
        _write_job_ledger(ctx, outdir, cmd, quiet)
    finally:
        ctx.close()
    if error is not None and (not isinstance(error, Exception) or isinstance(error, UsageError)):
        raise error  # the CLI's own messages (interrupted; bad usage, exit 2)
    if error is None and cmd == "run":
        from .report import write_report

        report = write_report(outdir)
    code = 0
    if error is not None:
        from .cli import describe_error

        if not isinstance(error, EvorayError):
            _keep_traceback(error, ctx.log_path)
        msg, code = describe_error(error, logs=where)
        print(msg, file=sys.stderr, flush=True)
    print(final_line(cmd, ctx.results, outdir, time.monotonic() - t0, code, where, report), flush=True)
    return code


def _keep_traceback(error: BaseException, log_path: Path | None) -> None:
    """An unexpected error's traceback: into ray.log when there is one (the user sees one line),
    else on stderr (``--verbose``)."""
    import traceback

    text = "".join(traceback.format_exception(error))
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(text)
    else:
        print(text, file=sys.stderr, end="")


def _stage(name: str):
    from .stage import STAGES, load_builtin

    load_builtin()
    return STAGES.get(name)


def outcome_words(stage: str) -> tuple[str, ...]:
    """Words for a stage's row outcomes besides "failed", in the final line (the stage object's ``outcomes``)."""
    return tuple(getattr(_stage(stage), "outcomes", ()))


def stage_summary(result) -> str:
    c = result.counts
    st = _stage(result.stage)
    if getattr(st, "summary_fn", None) is not None:  # a stage that counts something else than rows (optimize)
        return st.summary_fn(c)
    by = c.get("by_status") or {}
    parts = [f"{c.get(w, by.get(w, 0))} {w}" for w in outcome_words(result.stage)]
    parts.append(f"{c.get('failed', 0)} failed")
    text = f"{result.stage} " + ", ".join(parts) + f" of {c.get('input', '?')}"
    if getattr(st, "note_fn", None) is not None:  # rate: the threshold a target size chose
        text += st.note_fn(c)
    if c.get("budget_stopped"):
        text += f" ({c['budget_stopped']} not done: budget)"
    if result.failed_job:
        text += " (too many failed)"
    if result.stopped:
        text += f" ({result.stopped})"
    return text + (" (already complete)" if result.skipped else "")


def final_line(cmd: str, results: list, outdir: Path, elapsed_s: float, code: int, where: str | None,
               report: Path | str | None = None) -> str:
    """The last line of every job command (see :func:`cmd_job`)."""
    from collections import Counter

    from .jobs import format_reasons

    head = {0: "done in", 1: "failed after", 2: "stopped (bad usage) after", 3: "stopped at the budget cap after"}
    line = f"evoray {cmd} {head.get(code, 'failed after')} {elapsed_s:.1f}s: "
    line += "; ".join(stage_summary(r) for r in results) if results else "no stage finished"
    reasons: Counter = Counter()
    for r in results:
        reasons.update(r.counts.get("failure_reasons") or {})
    if any("failed" in r.counts for r in results):
        line += f"; most common failure reasons: {format_reasons(reasons)}" if reasons else "; no failed rows"
    line += f" -> {outdir.resolve()}"
    if report is not None:
        line += f" (report: {Path(report).name})"
    if where:
        line += f"; Ray's log: {where}"
    return line


def _write_job_ledger(ctx, outdir: Path, cmd: str, quiet: bool) -> None:
    from .ledger import Ledger

    if ctx.is_lost():
        if not quiet:
            print("ledger: not available (Ray was lost under the job; each stage folder keeps what it wrote)")
        return
    if ctx._session is None and not ctx.ledger.by_provider:
        # nothing ran (every stage was complete): keep the stages' ledgers, say no request was sent
        led = Ledger()
        if not (outdir / "ledger.json").exists() or cmd == "run":
            write_text_atomic(outdir / "ledger.json", json.dumps(led.to_dict(), indent=2) + "\n")
    else:
        led = Ledger.from_dict(ctx.ledger_dict())
        write_text_atomic(outdir / "ledger.json", json.dumps(led.to_dict(), indent=2) + "\n")
    if not quiet:
        print("ledger:")
        lines = led.summary_lines()
        print("\n".join(lines) if lines else "  no requests sent")
