"""The driver's Ray session for one job: connect or start Ray, the gate, the local replicas, pools.

``RaySession(config, address)``:

* connects to ``address`` (``--address``, ``ray.address`` or ``RAY_ADDRESS``) or starts a local
  Ray for the job (``ray.num_cpus`` CPUs); an already initialised Ray (tests) is reused;
* creates the job's named :class:`actors.gate.GateActor` (ledger, budget, failover, concurrency)
  and finds or creates the detached :class:`actors.gate.KeyGateActor` of each rate-limited key
  (shared with every other job on the cluster), registering the job's limits there;
* starts the local-model replicas that the job's roles need (whole CPUs each);
* ``run_pool(stage, rows_ds, n_actors)`` streams a Dataset through a pool of
  :class:`actors.pools.StageUDF` actors and yields result batches as they finish.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Iterator

import pyarrow as pa

from evoray.config import JobConfig
from evoray.providers import runs_locally

log = logging.getLogger("evoray")


def resolve_address(cli_address: str | None, config: JobConfig) -> str | None:
    return cli_address or config.ray.address or os.environ.get("RAY_ADDRESS") or None


def local_num_cpus(config: JobConfig) -> int:
    """CPUs for a local Ray started for the job: ``ray.num_cpus``, else the machine's CPUs plus
    what the local-model replicas reserve. Replicas hold whole CPUs for their lifetime; without
    the extra logical CPUs Ray Data's read tasks (1 CPU each) could never be scheduled beside them
    on a small machine and the job would wait forever."""
    if config.ray.num_cpus:
        return config.ray.num_cpus
    reserved = sum(p.num_cpus * p.replicas for p in config.providers if runs_locally(p))
    return int((os.cpu_count() or 1) + -(-reserved // 1))


def init_ray(address: str | None, num_cpus: int | None = None, object_store_mb: int | None = None) -> bool:
    """Connect to ``address`` or start a local Ray; False when Ray was already initialised (tests).

    Worker output is forwarded to the driver (``log_to_driver``); unless ``--verbose`` the job's
    :class:`evoray.console.RayLogRoute` writes it, with Ray's own lines, to ``OUTDIR/logs/ray.log``.
    """
    import ray

    from evoray.console import active_route

    if ray.is_initialized():
        return False
    kwargs = dict(namespace="evoray", log_to_driver=True, configure_logging=False)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False,
                 object_store_memory=object_store_mb * 2**20 if object_store_mb else None, **kwargs)
    _quiet_ray_data()
    route = active_route()
    if route is not None:
        route.ray_started()
    return True


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        ctx.print_on_execution_start = False
    except Exception:
        pass
    logging.getLogger("ray.data").setLevel(logging.WARNING)


#: Ray starts worker processes niced (``worker_niceness``, 15), which suits API-bound pool actors
#: but not model replicas: they compute, and a niced replica loses its CPU to any un-niced process
#: (B6 in BENCHMARKS.md measured 0.88 of direct llama-cpp-python on an idle machine, 0.25 beside
#: another job). Ray honours this variable per runtime env, as its job supervisor does.
REPLICA_RUNTIME_ENV = {"env_vars": {"RAY_worker_niceness": "0"}}


class RaySession:
    def __init__(self, config: JobConfig, address: str | None = None, roles: list[str] | None = None,
                 job_id: str | None = None):
        import ray

        from actors.gate import GateActor, key_gate
        from actors.pools import gate_name
        from evoray.gate import limited, provider_identity
        from evoray.limiter import LimitSpec

        self.config = config
        init_ray(resolve_address(address, config), local_num_cpus(config), config.ray.object_store_mb)
        self.job_id = job_id or uuid.uuid4().hex[:12]
        providers = [p.model_dump(mode="json") for p in config.providers]
        self.gate = GateActor.options(name=gate_name(self.job_id), lifetime=None).remote(
            providers, config.budget_usd, self.job_id)
        # the key gates: found by name when another job made them, made (detached) otherwise
        self.key_gates: dict[str, object] = {}
        regs = []
        for p in config.providers:
            if limited(p):
                h = self.key_gates[p.name] = key_gate(provider_identity(p, self.job_id))
                regs.append(h.register.remote(f"{self.job_id}/{p.name}", LimitSpec.of(p).to_tuple()))
        ray.get(regs)
        self.replicas: dict[str, list] = {}
        self._start_replicas(roles)
        self._config_json = config.model_dump_json()

    def _start_replicas(self, roles: list[str] | None) -> None:
        import ray

        from actors.local_model import LocalModelReplica
        from actors.pools import replica_name

        needed = {p.name for r in (roles or ["rater", "evol", "optimizer", "judge", "answer"])
                  for p in self.config.providers_for(r) if runs_locally(p)}
        for p in self.config.providers:
            if p.name not in needed:
                continue
            handles = []
            for i in range(p.replicas):
                threads = p.n_threads or max(1, int(p.num_cpus))
                handles.append(
                    LocalModelReplica.options(name=replica_name(self.job_id, p.name, i), num_cpus=p.num_cpus,
                                              scheduling_strategy="SPREAD" if self.config.ray.spread else "DEFAULT",
                                              runtime_env=REPLICA_RUNTIME_ENV)
                    .remote(p.model, p.n_ctx, threads, p.extra_buffers)
                )
            # wait for the model to load so a broken model fails here, clearly
            ray.get([h.info.remote() for h in handles])
            self.replicas[p.name] = handles

    # ---- pools ----------------------------------------------------------------------------------
    def run_pool(self, stage: str, ds, n_actors: int, extra: dict | None = None,
                 total_rows: int | None = None, row_bytes: int = 0) -> Iterator[pa.Table]:
        import ray

        from actors.pools import StageUDF
        from evoray.raydata import TASKS_PER_ACTOR, pool_block_rows, read_ahead_mb

        cfg = self.config.ray
        # no scheduling_strategy here: Ray Data (2.60) spreads a pool's actors by default
        # (DataContext.scheduling_strategy "SPREAD"), and passing it through map_batches'
        # ray_remote_args is deprecated (a RayDeprecationWarning on every stage)
        # blocks small enough that every actor gets work from a single input file, large enough that
        # Ray Data's per-block bookkeeping in the driver stays small at a million rows
        block_rows = pool_block_rows(total_rows, cfg.batch_size, n_actors)
        limit_read_ahead(read_ahead_mb(cfg.read_ahead_mb, n_actors, block_rows, row_bytes))
        ds = ds.repartition(target_num_rows_per_block=block_rows)
        # Ray Data (2.60) starts pool actors with max_restarts=-1 and hands them its map transformer
        # and DataContext as object refs, so Ray's core worker logs once per actor "E ... has
        # constructor arguments in the object store and max_restarts > 0". Safe here: the driver
        # owns those objects until the stage's execution ends, so a restarted actor finds them
        # (tests/test_crash_resume.py kills a pool actor mid-stage and every row lands once). The
        # restarts are what lets a stage survive a lost actor, so they stay; the line goes to
        # OUTDIR/logs/ray.log with Ray's other lines (on the terminal only with --verbose).
        out = ds.map_batches(
            StageUDF,
            fn_constructor_kwargs=dict(stage=stage, config_json=self._config_json, job_id=self.job_id, extra=extra or {}),
            compute=ray.data.ActorPoolStrategy(size=n_actors, max_tasks_in_flight_per_actor=TASKS_PER_ACTOR),
            num_cpus=cfg.actor_num_cpus,
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
        )
        for batch in out.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
            yield batch

    def dataset_from_parquet(self, path: str, rows_per_read: int = 4096):
        from evoray.raydata import read_parquet_chunks

        return read_parquet_chunks(path, rows_per_read=rows_per_read, positions=True)

    # ---- job state ----------------------------------------------------------------------------------
    def client_gate(self):
        """A client gate for the driver (batch stages, tools): this job's gate actor and the key gates."""
        from actors.gate import ray_client_gate

        return ray_client_gate(self.config, self.gate, self.job_id)

    def ledger(self) -> dict:
        import ray

        return ray.get(self.gate.ledger.remote())

    def gate_status(self) -> dict:
        import ray

        return ray.get(self.gate.status.remote())

    def key_gate_status(self) -> dict[str, dict]:
        """Each rate-limited provider's key gate: rate, factor, 429s, leases, clients, CPU."""
        import ray

        names = list(self.key_gates)
        return dict(zip(names, ray.get([self.key_gates[n].status.remote() for n in names])))

    def close(self, wait_pool_s: float = 5.0) -> None:
        import ray

        # pool actors exit gracefully after their stage, on their own time: wait (bounded) until each
        # has flushed its ledger and closed its clients, before the gate goes and the driver may exit
        deadline = time.monotonic() + wait_pool_s
        while time.monotonic() < deadline:
            try:
                if ray.get(self.gate.open_pool_actors.remote(), timeout=max(0.1, deadline - time.monotonic())) == 0:
                    break
            except Exception:
                break
            time.sleep(0.05)
        for hs in self.replicas.values():
            for h in hs:
                try:
                    ray.kill(h)
                except Exception:
                    pass
        try:
            ray.kill(self.gate)
        except Exception:
            pass
        # the key gates stay (other jobs may use them; idle ones exit by themselves): only this
        # job's registration goes, so its limits no longer count
        for name, h in self.key_gates.items():
            try:
                h.forget.remote(f"{self.job_id}/{name}")
            except Exception:
                pass


def limit_read_ahead(mb: int) -> None:
    """Cap the object-store bytes this driver's Ray Data executions may hold (``ray.read_ahead_mb``).

    Pools are slower than reading, so without a cap the input is read far ahead of them. Blocks of a
    few dozen rows are small enough for Ray to keep inline in the owner's (the driver's) memory, so
    the read-ahead grew the driver with the input: +300 MiB at 1,000,000 rows (B5 in BENCHMARKS.md).
    """
    import ray.data

    opts = ray.data.DataContext.get_current().execution_options
    # copy(): the other limits stay as they are (a fresh ExecutionResources would set them to 0)
    opts.resource_limits = opts.resource_limits.copy(object_store_memory=mb * 2**20)
