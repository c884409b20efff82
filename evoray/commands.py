"""Command implementations behind :mod:`evoray.cli` (argument handling and output locations)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .config import JobConfig
from .errors import UsageError


def cmd_ingest(args) -> int:
    from .io import ingest, parse_mapping

    mapping = parse_mapping(args.map) if args.map else None
    s = ingest(args.sources, args.output, fmt=args.format, mapping=mapping, skip_invalid=args.skip_invalid,
               limit=args.limit)
    if not args.quiet:
        print(f"ingested {s.rows} row(s) -> {s.out}")
        for src, n in s.per_source.items():
            print(f"  {src}: {n} row(s), format {s.formats.get(src)}")
        if s.duplicates:
            print(f"  {s.duplicates} repeated row(s) kept with distinct ids")
    if s.quarantined:
        print(f"{s.quarantined} invalid row(s) quarantined in {s.quarantine_path}", file=sys.stderr)
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
    from .jobs import JobContext
    from .stages import run_pipeline, stage_answer, stage_evolve, stage_judge, stage_optimize, stage_rate

    cfg = load_config(args)
    cmd = args.command
    if cmd == "estimate" or args.dry_run:
        from .estimate import estimate, format_estimate

        stages = None if cmd in ("run", "estimate") else [cmd]
        est = estimate(cfg, cfg.input.path, stages=stages) if stages else estimate(cfg, cfg.input.path)
        print(format_estimate(est))
        return 0
    outdir = Path(cfg.output.dir)
    outdir.mkdir(parents=True, exist_ok=True)
    ctx = JobContext(cfg, address=cfg.ray.address, quiet=args.quiet)
    t0 = time.monotonic()
    try:
        if cmd == "rate":
            stage_rate(ctx, cfg.input.path, outdir)
        elif cmd == "evolve":
            stage_evolve(ctx, cfg.input.path, outdir, getattr(args, "method", None))
        elif cmd == "answer":
            stage_answer(ctx, cfg.input.path, outdir)
        elif cmd == "judge":
            stage_judge(ctx, outdir)
        elif cmd == "optimize":
            stage_optimize(ctx, cfg.input.path, outdir)
        elif cmd == "run":
            run_pipeline(ctx, outdir, cfg.input.path)
        else:  # pragma: no cover
            raise UsageError(f"unknown command {cmd}")
    finally:
        _write_job_ledger(ctx, outdir, cmd, args.quiet)
        ctx.close()
    if cmd == "run":
        from .report import write_report

        report = write_report(outdir)
        if not args.quiet:
            print(f"report: {report}")
    if not args.quiet:
        print(f"done in {time.monotonic() - t0:.1f}s; outputs in {outdir.resolve()}")
    return 0


def _write_job_ledger(ctx, outdir: Path, cmd: str, quiet: bool) -> None:
    from .ledger import Ledger

    if ctx._session is None and not ctx.ledger.by_provider:
        # nothing ran (every stage was complete): keep the stages' ledgers, say no request was sent
        led = Ledger()
        if not (outdir / "ledger.json").exists() or cmd == "run":
            (outdir / "ledger.json").write_text(json.dumps(led.to_dict(), indent=2) + "\n")
    else:
        led = Ledger.from_dict(ctx.ledger_dict())
        (outdir / "ledger.json").write_text(json.dumps(led.to_dict(), indent=2) + "\n")
    if not quiet:
        print("ledger:")
        lines = led.summary_lines()
        print("\n".join(lines) if lines else "  no requests sent")
