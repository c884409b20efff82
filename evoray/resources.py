"""Will the job fit on the cluster's CPUs? Checked before anything starts (Ray-free).

What a stage holds at once on a Ray cluster:

* the local-model replicas of every ``kind: local`` provider the job's roles use: ``replicas x
  num_cpus`` each, for the whole job (each replica also needs a node with that many CPUs);
* the stage's pool of API-bound actors: pool size x ``ray.actor_num_cpus`` (raters for rate,
  evolvers for evolve and answer, judges for judge, candidates for optimize: each stage object's
  ``pool_key``, :mod:`evoray.stage`);
* Ray Data's tasks that feed a pool: the chunked Parquet reads ask 0.25 CPU, the repartition into
  pool-sized blocks asks Ray Data's default of 1 CPU (``Dataset.repartition`` takes no resource
  arguments), so a pool stage needs 1 free CPU besides its actors. The optimizer's candidates are
  plain actors without Ray Data.

If replicas + pool + tasks exceed the cluster's CPUs, the actors take their share and the tasks
wait forever: a silent deadlock (``ray.num_cpus: 2`` with one ``kind: local`` replica left 0.75 CPU
beside a 1-CPU task). :func:`check_fits` refuses such a config with a message that names the parts
and the settings to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ROLES, JobConfig
from .errors import ConfigError
from .providers import runs_locally

#: CPUs Ray Data's largest task in a pool stage asks for (the repartition, Ray Data's default)
RAY_DATA_TASK_CPUS = 1.0


@dataclass
class Part:
    what: str
    cpus: float


def local_providers(config: JobConfig):
    """The ``kind: local`` providers some role uses: the job starts their replicas."""
    used = {p.name for r in ROLES for p in config.providers_for(r)}
    return [p for p in config.providers if runs_locally(p) and p.name in used]


def replica_parts(config: JobConfig) -> list[Part]:
    return [Part(f"{p.replicas} local-model replica(s) of provider '{p.name}' (replicas {p.replicas} x num_cpus {p.num_cpus:g})",
                 p.replicas * p.num_cpus)
            for p in local_providers(config)]


def stage_parts(config: JobConfig, stage: str) -> list[Part]:
    from .stage import STAGES, load_builtin

    load_builtin()
    st = STAGES.get(stage)
    key = getattr(st, "pool_key", None)
    if key is None:
        return []
    r = config.ray
    n = st.pool_size(config) if hasattr(st, "pool_size") else getattr(r, key)
    label = getattr(st, "pool_label", "") or stage
    if not getattr(st, "ray_data", True):  # plain actors (optimize's candidates), no Ray Data tasks
        return [Part(f"{n} {label} actor(s) (ray.{key} x ray.actor_num_cpus {r.actor_num_cpus:g})",
                     n * r.actor_num_cpus)]
    return [Part(f"{n} {label} actor(s) (ray.{key} {n} x ray.actor_num_cpus {r.actor_num_cpus:g})", n * r.actor_num_cpus),
            Part("Ray Data's read and repartition tasks", RAY_DATA_TASK_CPUS)]


def job_stages(config: JobConfig, command: str) -> list[str]:
    if command == "run":
        return [s for s in config.pipeline if s != "ingest"]
    return [command]


def check_fits(config: JobConfig, stages: list[str], total_cpus: float, node_cpus: list[float] | None = None,
               source: str = "the Ray cluster") -> None:
    """Raise :class:`ConfigError` when a stage cannot have all it needs at once on ``total_cpus``
    (or a replica needs more CPUs than any one node has)."""
    replicas = replica_parts(config)
    if node_cpus:
        biggest = max(node_cpus)
        for p in local_providers(config):
            if p.num_cpus > biggest:
                raise ConfigError(
                    f"provider '{p.name}' asks num_cpus {p.num_cpus:g} per local-model replica, but the largest node "
                    f"of {source} has {biggest:g} CPUs: lower num_cpus (n_threads sets llama.cpp's threads)")
    for stage in stages:
        parts = replicas + stage_parts(config, stage)
        need = sum(p.cpus for p in parts)
        if need <= total_cpus + 1e-9:
            continue
        detail = "; ".join(f"{p.cpus:g} for {p.what}" for p in parts if p.cpus)
        fixes = []
        if source.startswith("a local Ray"):
            fixes.append(f"raise ray.num_cpus to {math.ceil(need)} or leave it unset (a local Ray then adds the "
                         f"replicas' CPUs to the machine's)")
        else:
            fixes.append(f"add nodes (at least {math.ceil(need - total_cpus)} more CPU(s))")
        fixes.append("lower the pool size, ray.actor_num_cpus, or the replicas / num_cpus of local providers")
        raise ConfigError(
            f"the {stage} stage cannot be scheduled: it needs {need:g} CPUs at once but {source} has {total_cpus:g} "
            f"({detail}); Ray would start the actors and wait forever for the rest. To fix: {', or '.join(fixes)}.")
