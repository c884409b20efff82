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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import JobConfig
from .errors import HALTED_PREFIX, BudgetExceeded, InputError, ProviderHalted, RayLost, UsageError
from .io import atomic_path, write_json_atomic, write_text_atomic
from .ledger import Ledger
from .progress import StageProgress
from .providers import runs_locally
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
    counts: dict[str, Any]
    outputs: dict[str, str] = field(default_factory=dict)
    skipped: bool = False
    failed_job: bool = False  # more failed rows than max_failed_fraction allows
    stopped: str | None = None  # why an unfinished stage stopped (its finished rows are kept)


class JobContext:
    """What every stage of one job shares: config, Ray session (started lazily), progress settings.

    ``stages`` are the stages the job will run (for the resource check before Ray starts; None =
    the config's pipeline). ``log_path``, when set, is where Ray's own output goes while the session
    lives (:class:`evoray.console.RayLogRoute`; None with ``--verbose``). ``results`` collects each
    stage's :class:`StageResult` for the final line, failed stages included.
    """

    def __init__(self, config: JobConfig, address: str | None = None, quiet: bool = False,
                 stages: list[str] | None = None, log_path: str | os.PathLike | None = None):
        self.config = config
        self.address = address
        self.quiet = quiet
        self.stages = stages
        self.log_path = Path(log_path) if log_path is not None else None
        self.route = None
        self.owns_ray = False
        self.watch = None
        self.lost: RayLost | None = None
        self.results: list[StageResult] = []
        self._session = None
        self.ledger = Ledger({p.name: p.price for p in config.providers})

    def session(self):
        if self._session is None:
            import ray

            from actors import session as rs
            from actors.watch import RayWatch

            from .resources import check_fits, job_stages

            # a missing key is a usage error here, named, before any actor starts
            for p in self.config.providers:
                p.api_key()
            stages = self.stages if self.stages is not None else job_stages(self.config, "run")
            address = rs.resolve_address(self.address, self.config)
            local_cpus = rs.local_num_cpus(self.config)
            if not address and not ray.is_initialized():
                # refused before a local Ray starts: the config alone says it cannot fit
                check_fits(self.config, stages, local_cpus,
                           source=f"a local Ray with {local_cpus} CPUs "
                                  f"({'ray.num_cpus' if self.config.ray.num_cpus else 'this machine'})")
            if self.log_path is not None and self.route is None:
                from .console import RayLogRoute

                self.route = RayLogRoute(self.log_path).__enter__()
            self.owns_ray = rs.init_ray(address, local_cpus, self.config.ray.object_store_mb)
            if address or not self.owns_ray:
                nodes = [n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
                check_fits(self.config, stages, ray.cluster_resources().get("CPU", 0.0), nodes,
                           source=f"the Ray cluster ({len(nodes)} node(s))")
            self._session = rs.RaySession(self.config, self.address)
            self.watch = RayWatch(local=self.owns_ray and not address).start()
            if self.ledger.by_provider:  # spend of earlier driver-side (batch mode) stages joins the job's gate
                ray.get(self._session.gate.record_total.remote("driver:before-session",
                                                               self.ledger.to_dict()["providers"]))
        return self._session

    def ledger_dict(self) -> dict:
        if self._session is not None and not self.is_lost():
            return self._session.ledger()
        return self.ledger.to_dict()

    def is_lost(self) -> bool:
        return self.lost is not None or (self.watch is not None and self.watch.lost is not None)

    def as_ray_loss(self, exc: BaseException) -> RayLost | None:
        """``exc`` as :class:`RayLost` when it means Ray went away under the job, else None."""
        if isinstance(exc, RayLost):
            self.lost = exc
            return exc
        detail = self.watch.lost if self.watch is not None else None
        if detail is None:
            from actors.watch import ray_loss

            detail = ray_loss(exc)
        if detail is None:
            return None
        self.lost = RayLost(detail)
        return self.lost

    def logs_where(self) -> str:
        """Where Ray's logs are, for messages."""
        if self.route is not None:
            return self.route.where()
        if self.log_path is not None:  # Ray never started: the CLI writes the traceback there
            return str(self.log_path)
        try:
            import ray._private.worker as rw

            return rw._global_node.get_logs_dir_path()
        except Exception:
            return "the Ray session's logs folder (/tmp/ray/session_latest/logs)"

    def close(self) -> None:
        lost = self.is_lost()
        try:
            if self.watch is not None:
                self.watch.stop()
            if self._session is not None and not lost:
                self._session.close()
            self._session = None
            if self.owns_ray:
                import ray

                ray.shutdown()  # inside the route: what Ray prints on the way out goes to ray.log
                self.owns_ray = False
        finally:
            if self.route is not None:
                self.route.__exit__(None, None, None)
                self.route = None

    def progress(self, stage: str, total: int | None) -> StageProgress:
        return StageProgress(stage, total, quiet=self.quiet,
                             ledger_fn=(lambda: self._session.ledger()) if self._session is not None else None,
                             stall_s=self.config.ray.stall_warning_s,
                             status_fn=self.stall_detail if self._session is not None else None)

    def stall_detail(self) -> str:
        """What the watchdog line says besides the time: requests in flight, each provider's state,
        free CPUs."""
        parts = []
        try:
            provs = (self._session.gate_status() or {}).get("providers", {})
            try:
                keys = self._session.key_gate_status() or {}
            except Exception:  # noqa: BLE001 - a key gate restarting: say what the job gate knows
                keys = {}
            kinds = {p.name: p for p in self.config.providers}
            slots = sum(int(v.get("inflight", 0)) for v in provs.values())
            if slots:
                parts.append(f"{slots} request(s) holding max_concurrency slots")
            for name, v in provs.items():
                pc_ = kinds.get(name)
                k = keys.get(name) or {}
                if v.get("halted"):
                    state = "halted by the fail-fast rule"
                elif v.get("cooling"):
                    state = "cooling down after repeated failures"
                elif k.get("paused_for"):
                    state = f"paused {k['paused_for']:.0f}s more after a 429"
                elif k:
                    state = (f"{k.get('granted', 0)} permit(s) granted at {k.get('rpm') or 0:.0f} rpm, "
                             f"{k.get('rate_limited', 0)} 429(s)")
                elif pc_ is not None and runs_locally(pc_):
                    state = (f"local model, {pc_.replicas} replica(s) answering one request at a time each "
                             f"(timeout_s {pc_.timeout_s:g})")
                else:
                    state = "no rpm/tpm set, so no gate counts its requests"
                parts.append(f"provider {name}: {state}")
        except Exception:
            parts.append("the job's gate did not answer")
        try:
            import ray

            parts.append(f"Ray: {ray.available_resources().get('CPU', 0.0):g} of "
                         f"{ray.cluster_resources().get('CPU', 0.0):g} CPUs free")
        except Exception:
            pass
        return "; ".join(parts)

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
        write_text_atomic(marker, fp)
    return path


def count_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def canonical_table(table: pa.Table) -> pa.Table:
    cols = {n: (table.column(n) if n in table.column_names else pa.nulls(table.num_rows)) for n, _ in ROW_FIELDS}
    return pa.Table.from_pydict(cols).cast(ROW_SCHEMA)


def write_canonical(table: pa.Table, path: Path, row_group: int = 256) -> Path:
    with atomic_path(path) as tmp:
        pq.write_table(canonical_table(table), tmp, row_group_size=row_group)
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
    write_json_atomic(outdir / SUCCESS, data, indent=2)


def clear_marker(outdir: Path) -> None:
    (outdir / SUCCESS).unlink(missing_ok=True)


def write_ledger(ctx: JobContext, outdir: Path) -> dict:
    led = ctx.ledger_dict()
    write_text_atomic(outdir / "ledger.json", json.dumps(led, indent=2) + "\n")
    return led


# ---- the generic pool stage ------------------------------------------------------------------------

def run_pool_stage(ctx: JobContext, stage: str, worker: str, input_path: Path, outdir: Path,
                   tables: dict[str, str], n_actors: int, extra: dict | None = None,
                   schema: pa.Schema = RESULT_SCHEMA, formats: dict[str, str] | None = None,
                   route: Callable[[pa.Table], pa.Table] | None = None) -> dict[str, Any]:
    """Stream the input through a pool; route result rows by status into tables.

    ``tables`` maps a status to a table name (e.g. {"scored": "scored", "failed": "failed"});
    ``formats`` overrides the output format for some tables (intermediate ones are always Parquet).
    ``route``, when given, sees every batch of rows that land (each input row once) and returns it
    with its final statuses, e.g. the rate stage's threshold rule turning ``scored`` into
    ``kept`` / ``rejected`` as rows arrive.
    Rows failed by the budget cap are not written (they were not done); returns counts per table,
    ``budget_stopped``, ``by_status`` (rows per final status) and ``failure_reasons`` (the most
    common reasons of failed rows, counted).

    When Ray is lost under the stage (:meth:`JobContext.as_ray_loss`), the rows finished so far
    are written to the tables, ``_STOPPED.json`` says why, and :class:`RayLost` ends the job; the
    stage is not marked complete, so a re-run redoes it (answered requests come from the cache).
    """
    session = ctx.session()
    total = count_rows(input_path)
    fmt = ctx.config.output.format
    sinks = {name: TableSink(outdir, name, (formats or {}).get(name, fmt), schema) for name in set(tables.values())}
    prog = ctx.progress(stage, total)
    budget_stopped = 0
    duplicates = 0
    nodes: set[str] = set()
    by_status: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    seen = SeenRows(total)  # one bit per input row
    halted: str | None = None  # the first provider_halted reason: the stage stops after this batch
    ok = False
    batches = None
    lost: RayLost | None = None
    try:
        ds = session.dataset_from_parquet(str(input_path))
        batches = session.run_pool(worker, ds, n_actors, extra, total_rows=total, row_bytes=parquet_row_bytes(input_path))
        for batch in batches:
            status = batch.column("status").to_pylist()
            reasons_col = batch.column("reason").to_pylist() if "reason" in batch.column_names else [None] * len(status)
            if POS not in batch.column_names:
                raise RuntimeError(f"stage {stage}: pool output without the {POS} column")
            keys = batch.column(POS).to_pylist()
            if halted is None:
                halted = next((r_[len(HALTED_PREFIX):] for s_, r_ in zip(status, reasons_col)
                               if s_ == "failed" and (r_ or "").startswith(HALTED_PREFIX)), None)
            done = [not (s_ == "failed" and (r_ or "").startswith(("budget_exceeded", HALTED_PREFIX)))
                    for s_, r_ in zip(status, reasons_col)]
            budget_stopped += sum(1 for s_, r_ in zip(status, reasons_col)
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
            statuses = st_col.to_pylist()
            by_status.update(statuses)
            n_failed = statuses.count("failed")
            if n_failed and "reason" in batch.column_names:
                failed_reasons = batch.filter(pc.equal(st_col, "failed")).column("reason").to_pylist()
                reasons.update(reason_key(r) for r in failed_reasons)
            for st, name in tables.items():
                part = batch.filter(pc.equal(st_col, st))
                if part.num_rows:
                    sinks[name].write(part.select([f.name for f in schema]))
            unknown = set(statuses) - set(tables)
            if unknown:
                raise RuntimeError(f"stage {stage}: rows with unexpected status {sorted(unknown)}")
            prog.update(done=batch.num_rows, failed=n_failed)
            if halted is not None:
                break  # stop reading the pool: every further row would fail the same way
        ok = True
    except BaseException as e:
        lost = ctx.as_ray_loss(e)
        if lost is None:
            raise
    finally:
        if batches is not None and hasattr(batches, "close"):
            batches.close()  # a stage stopped early shuts its Ray Data execution down here
        prog.close()
        if ok or lost is not None:  # a lost Ray: the finished rows are kept
            for s in sinks.values():
                s.close()
        else:
            for s in sinks.values():
                s.abort()
    counts: dict[str, Any] = {name: s.rows for name, s in sinks.items()}
    counts["input"] = total
    counts["budget_stopped"] = budget_stopped
    counts["duplicates_dropped"] = duplicates
    counts["nodes"] = len(nodes)
    counts["by_status"] = dict(by_status)
    counts["failure_reasons"] = dict(reasons.most_common(MAX_REASONS))
    write_text_atomic(outdir / "_nodes.json", json.dumps(sorted(nodes)))
    if lost is not None:
        kept = sum(s.rows for s in sinks.values())
        ctx.results.append(StageResult(stage, outdir, counts, stopped="unfinished: Ray was lost"))
        write_text_atomic(outdir / STOPPED, json.dumps({"stage": stage, "reason": "ray_lost", "detail": lost.detail,
                                                        "counts": counts}, indent=2))
        raise RayLost(lost.detail, f"Ray was lost under the job ({lost.detail}); stage {stage}: {kept} finished "
                                   f"row(s) of {total} kept in {outdir}, the stage is not marked complete (a re-run "
                                   f"redoes it; answered requests come from the cache)") from None
    if halted is not None:
        counts["not_done"] = total - len(seen)
        write_text_atomic(outdir / STOPPED, json.dumps({"stage": stage, "reason": "provider_halted",
                                                        "message": halted, "counts": counts}, indent=2))
        write_ledger(ctx, outdir)
        raise ProviderHalted(f"[{stage}] {halted}")
    return counts


#: failure reasons kept per stage (counted) in ``counts["failure_reasons"]``
MAX_REASONS = 10


def reason_key(reason: str | None) -> str:
    """A failed row's reason as counted: its first line, at most 160 characters."""
    text = (reason or "").strip().splitlines()[0] if (reason or "").strip() else "no reason given"
    return text if len(text) <= 160 else text[:157] + "..."


def format_reasons(reasons: dict[str, int] | Counter, n: int = 3) -> str:
    """``'unparseable reply' (17); 'timeout' (3)`` for the ``n`` most common reasons."""
    top = Counter(reasons).most_common(n)
    return "; ".join(f"{r} ({c})" for r, c in top)


def stop_for_budget(ctx: JobContext, outdir: Path, stage: str, counts: dict) -> None:
    write_text_atomic(outdir / STOPPED, json.dumps({"stage": stage, "reason": "budget", "counts": counts}, indent=2))
    write_ledger(ctx, outdir)
    raise BudgetExceeded(
        f"stage '{stage}' stopped with {counts.get('budget_stopped', 0)} row(s) not done; finished rows are in {outdir}"
    )
