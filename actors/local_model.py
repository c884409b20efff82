"""Local-model replicas: Ray actors that each load the GGUF model once and generate.

They compute, so each runs at normal priority (Ray nices its workers; see
``actors.session.REPLICA_RUNTIME_ENV``), reserves whole CPUs (``num_cpus`` of the provider entry, default 1) and
runs llama.cpp with ``n_threads`` (default: its CPUs). One generation at a time per replica;
requests queue in the actor's mailbox. Add replicas (``replicas:``) to use more cores or nodes.
"""

from __future__ import annotations

import os

import ray

from evoray.providers.local import LocalEngine


@ray.remote(max_restarts=1)
class LocalModelReplica:
    def __init__(self, model: str, n_ctx: int, n_threads: int | None, extra_buffers: bool = False):
        self.engine = LocalEngine(model, n_ctx=n_ctx, n_threads=n_threads, extra_buffers=extra_buffers)
        self.node_id = ray.get_runtime_context().get_node_id()

    def generate(self, req: dict) -> dict:
        return self.engine.generate(req)

    def info(self) -> dict:
        return {"node_id": self.node_id, "path": str(self.engine.path), "niceness": os.nice(0)}
