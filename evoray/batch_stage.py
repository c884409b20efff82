"""The driver side of batch mode: a stage's rows through :mod:`evoray.batch`, no Ray pool.

:func:`run_batch_stage` has the signature and the contract of :func:`evoray.jobs.run_pool_stage`
(every input row lands in exactly one table, ``route`` sees every landed batch, budget-stopped rows
are counted and not written), so the rate, answer and judge stages call whichever
:func:`stage_runner` names for their mode. The work is waiting on the provider, not computing, so it
runs in the driver: the input is read in windows of ``batch.max_requests`` rows, up to
``batch.max_in_flight`` windows are out at once, and each window's rows run the stage's registered
worker (:mod:`evoray.workers`) with a :class:`~evoray.batch.BatchClient` in place of the online
client. Batches are recorded in ``_batches.json`` in the stage folder, so a re-run after a kill
resumes polling them.

Rate limits and the budget: online retries of failed lines and the ledger go through the job's
gate - the Ray gate actor when the job has a Ray session, an in-process
:class:`~evoray.gate.Gatekeeper` over the job's ledger otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from .batch import STATE_FILE, BatchJob, BatchRunner, BatchState
from .errors import BudgetExceeded
from .schema import RESULT_SCHEMA

log = logging.getLogger("evoray")


def stage_runner(ctx, stage: str) -> Callable[..., dict[str, int]]:
    """:func:`run_batch_stage` when ``stage`` runs in batch mode, else :func:`evoray.jobs.run_pool_stage`."""
    if ctx.config.stage_mode(stage) == "batch":
        return run_batch_stage
    from .jobs import run_pool_stage

    return run_pool_stage


def job_gate(ctx):
    """The job's gate seen from the driver: the Ray gate actor when a session runs, else an
    in-process gatekeeper that keeps the job's ledger (``ctx.ledger``) and its budget."""
    from .client import LocalGate
    from .gate import Gatekeeper

    if ctx._session is not None:
        return ctx._session.client_gate()
    keeper = Gatekeeper(ctx.config.providers, budget_usd=ctx.config.budget_usd)
    keeper.ledger = ctx.ledger  # one ledger for the job: what the stage writes as ledger.json
    return LocalGate(keeper)


class _Progress:
    """A line per batch when its state changes, and when its count changed at most every ``every_s``
    (stderr; nothing with --quiet)."""

    def __init__(self, stage: str, quiet: bool, every_s: float = 60.0):
        self.stage, self.quiet, self.every_s = stage, quiet, every_s
        self.last: dict[str, tuple] = {}

    def __call__(self, ev: dict[str, Any]) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        state, done, t = self.last.get(ev["batch"], (None, None, 0.0))
        if state == ev["state"] and (done == ev["done"] or now - t < self.every_s):
            return
        self.last[ev["batch"]] = (ev["state"], ev["done"], now)
        print(f"[{self.stage}] batch {ev['batch']} ({ev['provider']}): {ev['state']}, {ev['done']:,}/{ev['total']:,} "
              f"done, {ev['failed']:,} failed", file=sys.stderr, flush=True)


def run_batch_stage(ctx, stage: str, worker: str, input_path: Path, outdir: Path, tables: dict[str, str],
                    n_actors: int | None = None, extra: dict | None = None, schema: pa.Schema = RESULT_SCHEMA,
                    formats: dict[str, str] | None = None, route: Callable[[pa.Table], pa.Table] | None = None,
                    *, sleep: Callable[[float], Any] = asyncio.sleep) -> dict[str, int]:
    """Like :func:`evoray.jobs.run_pool_stage`, through the providers' batch APIs (``n_actors`` is
    ignored: no pool). ``sleep`` is the wait between polls (tests pass a recorder)."""
    from .jobs import count_rows
    from .sinks import TableSink

    cfg = ctx.config
    for name in ("httpx", "httpx2"):  # the SDKs' transport logs every request at INFO; the driver says less
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)
    total = count_rows(input_path)
    fmt = cfg.output.format
    sinks = {name: TableSink(outdir, name, (formats or {}).get(name, fmt), schema) for name in set(tables.values())}
    from .progress import StageProgress

    prog = StageProgress(stage, total, quiet=ctx.quiet, ledger_fn=ctx.ledger_dict)
    counts_extra = {"budget_stopped": 0}
    ok = False
    t0 = time.monotonic()
    try:
        batches = asyncio.run(_drive(ctx, stage, worker, input_path, outdir, tables, extra or {}, schema, route,
                                     sinks, prog, counts_extra, sleep))
        ok = True
    finally:
        prog.close()
        for s in sinks.values():
            s.close() if ok else s.abort()
    counts = {name: s.rows for name, s in sinks.items()}
    counts.update(input=total, budget_stopped=counts_extra["budget_stopped"], duplicates_dropped=0, nodes=0,
                  batches=len(batches))
    log.info("%s: %d row(s) through %d batch(es) in %.1fs", stage, total, len(batches), time.monotonic() - t0)
    return counts


async def _drive(ctx, stage, worker, input_path, outdir, tables, extra, schema, route, sinks, prog, counts_extra,
                 sleep) -> list[str]:
    from .cache import ResponseCache
    from .client import LLMClient
    from .io import parquet_stream
    from .runtime import build_providers
    from .workers import lookup

    cfg = ctx.config
    roles, factory = lookup(worker)
    (role,) = roles  # the batch-capable workers serve one role each
    pcfgs = cfg.providers_for(role)
    for p in pcfgs:
        p.api_key()  # a missing key is named before anything is sent
    providers = build_providers(cfg, {p.name for p in pcfgs})
    ordered = [providers[p.name] for p in pcfgs]
    state = BatchState(outdir / STATE_FILE)
    report = _Progress(stage, ctx.quiet)
    runners = {p.name: BatchRunner(p, state, cfg.batch, sleep=sleep, progress=report,
                                   metadata={"evoray_stage": stage}) for p in ordered}
    gate = job_gate(ctx)
    cache = ResponseCache(cfg.cache.dir) if cfg.cache.enabled else None
    online = LLMClient(ordered, gate, cache=cache) if cfg.batch.retry == "online" else None
    job = BatchJob(ordered, runners, settings=cfg.batch, gate=gate, cache=cache, online=online)

    async def window(rows: list[dict]) -> tuple[list[dict], list[Any]]:
        client = job.client()
        work = factory(cfg, {role: client}, extra)
        results = await client.run(work, rows, prefetch=getattr(work, "first_requests", None))
        return rows, results

    def land(rows: list[dict], results: list[Any]) -> None:
        out = []
        for row, res in zip(rows, results):
            if isinstance(res, BudgetExceeded):
                counts_extra["budget_stopped"] += 1
            elif isinstance(res, BaseException):
                raise res
            else:
                out.append(res)
        if not out:
            return
        batch = pa.Table.from_pydict({f.name: [r.get(f.name) for r in out] for f in schema}, schema=schema)
        if route is not None:
            batch = route(batch)
        st_col = batch.column("status")
        unknown = set(st_col.to_pylist()) - set(tables)
        if unknown:
            raise RuntimeError(f"stage {stage}: rows with unexpected status {sorted(unknown)}")
        n_failed = 0
        for st, name in tables.items():
            part = batch.filter(pc.equal(st_col, st))
            if part.num_rows:
                sinks[name].write(part.select([f.name for f in schema]))
                if st == "failed":
                    n_failed += part.num_rows
        prog.update(done=batch.num_rows, failed=n_failed)

    running: set[asyncio.Task] = set()
    try:
        reader = parquet_stream(input_path).iter_batches(batch_size=cfg.batch.max_requests)
        for rb in reader:
            while len(running) >= cfg.batch.max_in_flight:
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    land(*t.result())
            running.add(asyncio.ensure_future(window(rb.to_pylist())))
        while running:
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                land(*t.result())
    except BaseException:
        for t in running:
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        raise
    finally:
        await job.aclose()
    return [b for r in runners.values() for b in (*r.adopted, *r.submitted)]


__all__ = ["job_gate", "run_batch_stage", "stage_runner"]
