"""Stages as jobs: inputs, pools, output tables, completion markers and resume.

Each stage reads canonical rows, streams them through a Ray pool (``actors.session``), writes
every input row into exactly one output table, and finishes by writing ``_SUCCESS.json`` (counts
and a fingerprint of the stage's input and settings). A stage whose marker matches is skipped, so
a re-run of ``evoray run`` resumes after the last finished stage; inside an unfinished stage the
response cache makes already-answered requests free. Tables are written under temporary names and
renamed when complete, so a crash never leaves a table a re-run would trust.

When the job's budget is reached, the rows finished so far are written, ``_STOPPED.json`` says
why, and :class:`~evoray.errors.BudgetExceeded` ends the job (exit code 3). When a provider is
halted by the fail-fast rule (:mod:`evoray.failfast`), pool actors file the rows they cannot do with
a ``provider_halted:`` reason; the driver stops reading the pool at the first such row, writes the
rows finished so far, and :class:`~evoray.errors.ProviderHalted` ends the job (exit code 1) with
the server's error and the config key that likely fixes it. A re-run resumes: the stage has no
``_SUCCESS.json``, and the answers already received come from the response cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import JobConfig
from .errors import HALTED_PREFIX, BudgetExceeded, InputError, ProviderHalted, UsageError
from .ledger import Ledger
from .progress import StageProgress
from .raydata import POS, canonicalize, parquet_row_bytes
from .schema import RESULT_SCHEMA, ROW_FIELDS, ROW_SCHEMA
from .seen import SeenRows
from .sinks import TableSink, find_table

log = logging.getLogger("evoray")

SUCCESS = "_SUCCESS.json"
STOPPED = "_STOPPED.json"


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StageResult:
    stage: str
    outdir: Path
    counts: dict[str, int]
    outputs: dict[str, str] = field(default_factory=dict)
    skipped: bool = False


class JobContext:
    """What every stage of one job shares: config, Ray session (started lazily), progress settings."""

    def __init__(self, config: JobConfig, address: str | None = None, quiet: bool = False):
        self.config = config
        self.address = address
        self.quiet = quiet
        self._session = None
        self.ledger = Ledger({p.name: p.price for p in config.providers})

    def session(self):
        if self._session is None:
            from actors.session import RaySession

            # a missing key is a usage error here, named, before any actor starts
            for p in self.config.providers:
                p.api_key()

            self._session = RaySession(self.config, self.address)
            if self.ledger.by_provider:  # spend of earlier driver-side (batch mode) stages joins the job's gate
                import ray

                ray.get(self._session.gate.record.remote(self.ledger.to_dict()["providers"]))
        return self._session

    def ledger_dict(self) -> dict:
        return self._session.ledger() if self._session is not None else self.ledger.to_dict()

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def progress(self, stage: str, total: int | None) -> StageProgress:
        return StageProgress(stage, total, quiet=self.quiet,
                             ledger_fn=(lambda: self._session.ledger()) if self._session is not None else None)

    def check_budget(self) -> None:
        if self._session is None:
            return
        st = self._session.gate_status()
        if st.get("stopped"):
            raise BudgetExceeded(st["stopped"])


# ---- inputs ---------------------------------------------------------------------------------------

def prepare_input(config: JobConfig, src: str | None, outdir: Path) -> Path:
    """A canonical Parquet file for the stage: a previous stage's table as is, or ingested data
    (:func:`evoray.raydata.canonicalize`), ingested once per set of inputs and input settings."""
    src = src or config.input.path
    if not src:
        raise UsageError("no input: pass -i INPUT or set input.path in the config")
    sources = [s.strip() for s in str(src).split(",") if s.strip()]
    for s in sources:
        if not Path(s).exists():
            raise InputError("input file not found", where=s)
    inp = config.input
    target = outdir / "input.parquet"
    marker = outdir / ".input.fingerprint"
    fp = fingerprint([(s, os.path.getsize(s), os.path.getmtime(s)) for s in sources], inp.model_dump())
    if target.exists() and marker.exists() and marker.read_text() == fp:
        return target
    outdir.mkdir(parents=True, exist_ok=True)
    path, summary = canonicalize(sources, fmt=inp.format, mapping=inp.map or None, skip_invalid=inp.skip_invalid,
                                 limit=inp.limit, work_dir=outdir)
    if summary is not None:
        q = getattr(summary, "quarantined", 0)
        if q:
            log.warning("%d invalid input row(s) quarantined in %s", q, getattr(summary, "quarantine_path", "?"))
        marker.write_text(fp)
    return path


def count_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def canonical_table(table: pa.Table) -> pa.Table:
    cols = {n: (table.column(n) if n in table.column_names else pa.nulls(table.num_rows)) for n, _ in ROW_FIELDS}
    return pa.Table.from_pydict(cols).cast(ROW_SCHEMA)


def write_canonical(table: pa.Table, path: Path, row_group: int = 256) -> Path:
    tmp = path.with_name(f".{path.name}.partial")
    pq.write_table(canonical_table(table), tmp, row_group_size=row_group)
    os.replace(tmp, path)
    return path


# ---- markers ----------------------------------------------------------------------------------------

def done_marker(outdir: Path, fp: str) -> dict | None:
    p = outdir / SUCCESS
    if not p.exists():
        return None
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
    return data if data.get("fingerprint") == fp else None


def write_marker(outdir: Path, fp: str, counts: dict, outputs: dict, extra: dict | None = None) -> None:
    (outdir / STOPPED).unlink(missing_ok=True)
    data = {"fingerprint": fp, "counts": counts, "outputs": outputs, **(extra or {})}
    tmp = outdir / f".{SUCCESS}.partial"
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, outdir / SUCCESS)


def clear_marker(outdir: Path) -> None:
    (outdir / SUCCESS).unlink(missing_ok=True)


def write_ledger(ctx: JobContext, outdir: Path) -> dict:
    led = ctx.ledger_dict()
    (outdir / "ledger.json").write_text(json.dumps(led, indent=2) + "\n")
    return led


# ---- the generic pool stage ------------------------------------------------------------------------

def run_pool_stage(ctx: JobContext, stage: str, worker: str, input_path: Path, outdir: Path,
                   tables: dict[str, str], n_actors: int, extra: dict | None = None,
                   schema: pa.Schema = RESULT_SCHEMA, formats: dict[str, str] | None = None,
                   route: Callable[[pa.Table], pa.Table] | None = None) -> dict[str, int]:
    """Stream the input through a pool; route result rows by status into tables.

    ``tables`` maps a status to a table name (e.g. {"scored": "scored", "failed": "failed"});
    ``formats`` overrides the output format for some tables (intermediate ones are always Parquet).
    ``route``, when given, sees every batch of rows that land (each input row once) and returns it
    with its final statuses, e.g. the rate stage's threshold rule turning ``scored`` into
    ``kept`` / ``rejected`` as rows arrive.
    Rows failed by the budget cap are not written (they were not done); returns counts per table
    and ``budget_stopped``.
    """
    session = ctx.session()
    total = count_rows(input_path)
    fmt = ctx.config.output.format
    sinks = {name: TableSink(outdir, name, (formats or {}).get(name, fmt), schema) for name in set(tables.values())}
    prog = ctx.progress(stage, total)
    budget_stopped = 0
    duplicates = 0
    nodes: set[str] = set()
    seen = SeenRows(total)  # one bit per input row
    halted: str | None = None  # the first provider_halted reason: the stage stops after this batch
    ok = False
    batches = None
    try:
        ds = session.dataset_from_parquet(str(input_path))
        batches = session.run_pool(worker, ds, n_actors, extra, total_rows=total, row_bytes=parquet_row_bytes(input_path))
        for batch in batches:
            status = batch.column("status").to_pylist()
            reasons = batch.column("reason").to_pylist() if "reason" in batch.column_names else [None] * len(status)
            if POS not in batch.column_names:
                raise RuntimeError(f"stage {stage}: pool output without the {POS} column")
            keys = batch.column(POS).to_pylist()
            if halted is None:
                halted = next((r_[len(HALTED_PREFIX):] for s_, r_ in zip(status, reasons)
                               if s_ == "failed" and (r_ or "").startswith(HALTED_PREFIX)), None)
            done = [not (s_ == "failed" and (r_ or "").startswith(("budget_exceeded", HALTED_PREFIX)))
                    for s_, r_ in zip(status, reasons)]
            budget_stopped += sum(1 for s_, r_ in zip(status, reasons)
                                  if s_ == "failed" and (r_ or "").startswith("budget_exceeded"))
            # a retried task may repeat a row: each input row lands once
            fresh = iter(seen.add_new(k_ for k_, d in zip(keys, done) if d))
            keep = [d and next(fresh) for d in done]
            duplicates += done.count(True) - keep.count(True)
            if not all(keep):
                batch = batch.filter(pa.array(keep))
            if route is not None:
                batch = route(batch)
            if "_worker" in batch.column_names:
                for w in set(batch.column("_worker").to_pylist()):
                    if w:
                        nodes.add(json.loads(w).get("node_id", "?"))
            st_col = batch.column("status")
            n_failed = 0
            for st, name in tables.items():
                part = batch.filter(pc.equal(st_col, st))
                if part.num_rows:
                    sinks[name].write(part.select([f.name for f in schema]))
                    if st == "failed":
                        n_failed += part.num_rows
            unknown = set(st_col.to_pylist()) - set(tables)
            if unknown:
                raise RuntimeError(f"stage {stage}: rows with unexpected status {sorted(unknown)}")
            prog.update(done=batch.num_rows, failed=n_failed)
            if halted is not None:
                break  # stop reading the pool: every further row would fail the same way
        ok = True
    finally:
        if batches is not None and hasattr(batches, "close"):
            batches.close()  # a stage stopped early shuts its Ray Data execution down here
        prog.close()
        if ok:
            for s in sinks.values():
                s.close()
        else:
            for s in sinks.values():
                s.abort()
    counts = {name: s.rows for name, s in sinks.items()}
    counts["input"] = total
    counts["budget_stopped"] = budget_stopped
    counts["duplicates_dropped"] = duplicates
    counts["nodes"] = len(nodes)
    (outdir / "_nodes.json").write_text(json.dumps(sorted(nodes)))
    if halted is not None:
        counts["not_done"] = total - len(seen)
        (outdir / STOPPED).write_text(json.dumps({"stage": stage, "reason": "provider_halted", "message": halted,
                                                  "counts": counts}, indent=2))
        write_ledger(ctx, outdir)
        raise ProviderHalted(f"[{stage}] {halted}")
    return counts


def stop_for_budget(ctx: JobContext, outdir: Path, stage: str, counts: dict) -> None:
    (outdir / STOPPED).write_text(json.dumps({"stage": stage, "reason": "budget", "counts": counts}, indent=2))
    write_ledger(ctx, outdir)
    raise BudgetExceeded(
        f"stage '{stage}' stopped with {counts.get('budget_stopped', 0)} row(s) not done; finished rows are in {outdir}"
    )
