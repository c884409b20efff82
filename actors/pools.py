"""Pool actors over Ray Datasets: the rater, evolver, answer and judge pools.

:class:`StageUDF` is the callable class handed to ``Dataset.map_batches``; Ray Data runs it as a
pool of actors (``concurrency`` = pool size, ``num_cpus`` small because they wait on the network).
Its ``__call__`` is an async generator, so Ray Data feeds an actor several batches at once and the
rows of all of them run concurrently on the actor's event loop, bounded by ``actor_concurrency``.

The work itself is plain core code (``evoray.rating.Rater``, ``evoray.evolution.evolver.Evolver``,
``evoray.judge.Judge`` …) chosen by stage name through the stage registry (``evoray.workers.lookup``);
the UDF only builds clients inside the actor (configs cross Ray, live clients never do), turns
batches into row dicts and back, and ships the ledger to the job's gate. Rate-limit permits come from the key gates
(``actors.gate``), leased to each actor in small batches.

Closing: the clients hold SDK HTTP sessions (aiohttp by default) bound to the actor's event loop.
Ray Data (2.60) ends a pool actor gracefully when its stage is done: ``_MapWorker.__ray_shutdown__``
drops the UDF instance, which runs :meth:`StageUDF.__del__`; that closes every client on the loop
the batches ran on (the loop lives in Ray Data's own thread), so no session is left for the garbage
collector to report as "Unclosed client session". A killed actor closes nothing, but then its
process is gone with its sockets.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from typing import AsyncIterator, Awaitable, Callable

import pyarrow as pa

from evoray.config import JobConfig
from evoray.errors import HALTED_PREFIX, BudgetExceeded, ProviderHalted
from evoray.providers import runs_locally
from evoray.raydata import POS
from evoray.schema import RESULT_SCHEMA, result_row
from evoray.workers import lookup

def gate_name(job_id: str) -> str:
    return f"evoray-gate-{job_id}"


def replica_name(job_id: str, provider: str, i: int) -> str:
    return f"evoray-local-{job_id}-{provider}-{i}"


def worker_context(config_json: str, job_id: str, roles: list[str]):
    """Inside an actor: the clients for these roles, wired to the job's gate, the key gates of its
    rate-limited providers (found by name, shared with other jobs) and the local replicas."""
    import ray

    from actors.gate import ray_client_gate
    from evoray.runtime import build_clients

    config = JobConfig.model_validate_json(config_json)
    gate = ray_client_gate(config, ray.get_actor(gate_name(job_id)), job_id)
    replicas = {
        p.name: [ray.get_actor(replica_name(job_id, p.name, i)) for i in range(p.replicas)]
        for p in config.providers
        if runs_locally(p)
    }
    return config, build_clients(config, roles, gate, replicas)


class StageUDF:
    def __init__(self, stage: str, config_json: str, job_id: str, extra: dict | None = None):
        import ray

        roles, factory = lookup(stage)
        self.stage = stage
        self.config, self.clients = worker_context(config_json, job_id, roles)
        self.work = factory(self.config, self.clients, extra or {})
        self.schema = getattr(self.work, "schema", None) or OUT_SCHEMA
        if POS not in self.schema.names:
            self.schema = self.schema.append(pa.field(POS, pa.int64()))
        self.sem: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.concurrency = self.config.ray.actor_concurrency
        self.node_id = ray.get_runtime_context().get_node_id()
        self.actor_id = ray.get_runtime_context().get_actor_id() or "?"
        try:  # the driver waits for this actor's close at the end of the job (RaySession.close)
            self._job = ray.get_actor(gate_name(job_id))
            self._job.pool_actor_opened.remote(self.actor_id)
        except Exception:
            self._job = None

    async def _one(self, row: dict) -> dict:
        assert self.sem is not None
        pos = row.pop(POS, None)  # the input row's position travels beside the work, never into it
        async with self.sem:
            try:
                out = await self.work(row)
            except BudgetExceeded:
                out = result_row(row, status="failed", reason="budget_exceeded: the job's budget was reached before this row")
            except ProviderHalted as e:
                # the driver stops the stage on the first row it sees with this reason (see jobs.run_pool_stage)
                out = result_row(row, status="failed", reason=f"{HALTED_PREFIX}{e}")
            meta_extra = {"node_id": self.node_id, "actor_id": self.actor_id}
            out.setdefault("_worker", json.dumps(meta_extra))
            out[POS] = pos
            return out

    async def __call__(self, batch: pa.Table) -> AsyncIterator[pa.Table]:
        if self.sem is None:
            self.sem = asyncio.Semaphore(self.concurrency)
            self._loop = asyncio.get_running_loop()
        rows = batch.to_pylist()
        results = await asyncio.gather(*(self._one(r) for r in rows))
        for c in self.clients.values():
            await c.flush(force=True)
        yield rows_to_table(results, self.schema)

    async def aclose(self) -> int:
        """Close every client (and its SDK session) once; returns how many were closed."""
        clients, self.clients = getattr(self, "clients", {}), {}
        for c in clients.values():
            await close_client(c)
        job = getattr(self, "_job", None)
        if job is not None and clients:
            try:
                await asyncio.wait_for(job.pool_actor_closed.remote(self.actor_id), 5.0)
            except BaseException:
                pass
        return len(clients)

    def close(self) -> None:
        """Close the clients from outside their loop (the actor's shutdown)."""
        n = run_on_loop(self.aclose, self._loop)
        if n:
            # goes to the worker's log (OUTDIR/logs/ray.log through the driver), never to the user's screen
            print(f"evoray: {self.stage} pool actor closed {n} client(s)", file=sys.stderr, flush=True)

    def __del__(self):
        try:
            if getattr(self, "clients", None):
                self.close()
        except Exception:
            pass


async def close_client(client, timeout_s: float = 10.0) -> None:
    """``client.aclose()`` (final ledger flush, then the providers' sessions), bounded in time;
    when the flush cannot reach the gate (gone at the end of a job), the providers are still closed."""
    try:
        await asyncio.wait_for(client.aclose(), timeout_s)
    except BaseException:
        for p in client.providers.values():
            try:
                await p.aclose()
            except Exception:
                pass


def run_on_loop(fn: Callable[[], Awaitable], loop: asyncio.AbstractEventLoop | None, timeout_s: float = 15.0):
    """Run ``fn()`` on ``loop`` (where the sessions were made) from another thread and wait for it.

    A loop that never ran a batch made no session: ``fn`` then runs on a fresh loop. Called on the
    loop's own thread, it can only schedule the work.
    """
    if loop is None or loop.is_closed() or not loop.is_running():
        return asyncio.run(fn())
    if getattr(loop, "_thread_id", None) == threading.get_ident():
        loop.create_task(fn())
        return None
    return asyncio.run_coroutine_threadsafe(fn(), loop).result(timeout_s)


OUT_SCHEMA = RESULT_SCHEMA.append(pa.field("_worker", pa.string()))


def rows_to_table(rows: list[dict], schema: pa.Schema = OUT_SCHEMA) -> pa.Table:
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)
