"""The ingest stage of a pipeline: read ``input.path`` into canonical rows once (driver-only; the
``evoray ingest`` command has its own arguments and calls :func:`evoray.io.ingest` directly)."""

from __future__ import annotations

from pathlib import Path

from ..estimate import estimate_ingest
from ..jobs import JobContext, write_marker
from ..stage import StageDef, register


def run_ingest(ctx: JobContext, input_src: str | None, outdir: Path) -> None:
    """``OUTDIR/rows.parquet`` from ``input_src`` (comma-separated files), unless already done."""
    from ..io import ingest

    cfg = ctx.config
    outdir.mkdir(parents=True, exist_ok=True)
    target = outdir / "rows.parquet"
    if not (outdir / "_SUCCESS.json").exists():
        s = ingest([x for x in str(input_src).split(",")], str(target), fmt=cfg.input.format,
                   mapping=cfg.input.map or None, skip_invalid=cfg.input.skip_invalid, limit=cfg.input.limit)
        write_marker(outdir, "ingest", {"rows": s.rows, "quarantined": s.quarantined}, {"rows": str(target)})
    return None


STAGE = register(StageDef(
    name="ingest", roles=(), driver=run_ingest, estimator=estimate_ingest,
    next_input_fn=lambda outdir, fmt, current: str(outdir / "rows.parquet")))
