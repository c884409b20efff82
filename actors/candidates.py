"""Optimizer candidates as Ray actors: the m candidate methods evaluated concurrently.

Each :class:`CandidateActor` builds its own evol client (under the job's shared gate, so all
candidates together keep the provider limits) and runs :func:`evoray.evolution.optimizer.evaluate_method`
on the dev set: every dev row is evolved once with the candidate's method and answered, rows in
flight at once inside the actor. ``ray.candidate_actors`` actors are started; with m candidates
the methods are dealt round-robin, so m <= candidate_actors evaluates all of them at once and
adding actors or nodes scales the evaluation horizontally.

Closing: :meth:`CandidatePool.close` asks every actor to close its client (the SDK session lives on
the actor's event loop) before it ends them; ``__ray_shutdown__`` does the same when Ray ends an
actor gracefully.
"""

from __future__ import annotations

import asyncio

import ray

from evoray.errors import ProviderHalted
from evoray.evolution.methods import Method
from evoray.evolution.optimizer import EvalResult, evaluate_method


@ray.remote(max_restarts=1, max_task_retries=1)
class CandidateActor:
    def __init__(self, config_json: str, job_id: str):
        from actors.pools import worker_context

        self.config, self.clients = worker_context(config_json, job_id, ["evol"])
        self.node_id = ray.get_runtime_context().get_node_id()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def evaluate(self, method: dict, dev_rows: list[dict]) -> dict:
        self._loop = asyncio.get_running_loop()
        try:
            res = await evaluate_method(self.clients["evol"], Method(**method), dev_rows, self.config.evolve)
        except ProviderHalted as e:  # back to the driver as data, re-raised there as the typed error
            return {"halted": str(e), "provider": e.provider}
        await self.clients["evol"].flush(force=True)
        out = res.to_dict()
        out["node_id"] = self.node_id
        return out

    async def close(self) -> int:
        from actors.pools import close_client

        clients, self.clients = self.clients, {}
        for c in clients.values():
            await close_client(c)
        return len(clients)

    def __ray_shutdown__(self):
        from actors.pools import run_on_loop

        if self.clients:
            try:
                run_on_loop(self.close, self._loop)
            except Exception:
                pass


class CandidatePool:
    """The driver's handle on the candidate actors; ``evaluate`` plugs into ``Optimizer``."""

    def __init__(self, session, n: int):
        cfg = session.config
        opts = dict(num_cpus=cfg.ray.actor_num_cpus)
        if cfg.ray.spread:
            opts["scheduling_strategy"] = "SPREAD"
        self.actors = [CandidateActor.options(**opts).remote(session._config_json, session.job_id) for _ in range(n)]
        self.nodes: set[str] = set()

    async def evaluate(self, methods: list[Method], dev_rows: list[dict]) -> list[EvalResult]:
        refs = [self.actors[i % len(self.actors)].evaluate.remote(m.to_dict(), dev_rows) for i, m in enumerate(methods)]
        outs = await asyncio.gather(*refs)
        for o in outs:
            if "halted" in o:
                raise ProviderHalted(f"[optimize] {o['halted']}", provider=o.get("provider", "?"))
        results = []
        for o in outs:
            self.nodes.add(o.pop("node_id", "?"))
            results.append(EvalResult(**o))
        return results

    def close(self, timeout_s: float = 15.0) -> int:
        """Close the actors' clients, then end the actors; returns how many clients were closed."""
        closed = 0
        try:
            closed = sum(ray.get([a.close.remote() for a in self.actors], timeout=timeout_s))
        except Exception:
            pass  # an actor that died or hangs: killing it below frees its sockets with its process
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        return closed
