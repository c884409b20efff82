"""Local-model replicas: Ray actors that each load the GGUF model once and generate.

They compute, so each reserves whole CPUs (``num_cpus`` of the provider entry, default 1) and
runs llama.cpp with ``n_threads`` (default: its CPUs). One generation at a time per replica;
requests queue in the actor's mailbox. Add replicas (``replicas:``) to use more cores or nodes.
"""

from __future__ import annotations

import ray

from evoray.providers.local import LocalEngine


@ray.remote(max_restarts=1)
class LocalModelReplica:
    def __init__(self, model: str, n_ctx: int, n_threads: int | None):
        self.engine = LocalEngine(model, n_ctx=n_ctx, n_threads=n_threads)
        self.node_id = ray.get_runtime_context().get_node_id()

    def generate(self, req: dict) -> dict:
        return self.engine.generate(req)

    def info(self) -> dict:
        return {"node_id": self.node_id, "path": str(self.engine.path)}
