"""The gates as Ray actors: one per job (ledger, budget, failover) and one per API key (the limit).

* :class:`GateActor`, named per job, wraps :class:`evoray.gate.Gatekeeper`: the job's ledger and
  budget, failover cool-downs and ``max_concurrency`` slots. It lives and dies with the job.
* :class:`KeyGateActor` wraps :class:`evoray.limiter.KeyGate`: the rpm/tpm limit of one API key,
  shared by every job on the cluster. It is **detached** and **named** in the ``evoray`` namespace
  (:func:`evoray.limiter.gate_actor_name` of kind + base URL + sha256 of the key; the actor never
  sees the key), created by the first job that needs it (``get_if_exists``) and found by the
  next. It restarts when it dies (``max_restarts=-1``), starting conservatively (see
  :mod:`evoray.limiter`), and exits by itself after :data:`IDLE_EXIT_S` (10 minutes) without a
  lease, a report or a parked request.
* :func:`ray_client_gate` builds the :class:`evoray.gate.ClientGate` a process's clients use, with
  links that survive the key gate's death: a call that fails because the actor died or is
  restarting is retried (backoff 0.1 s doubling to 2 s) on the actor found or created again by
  name, so the permit request is simply late, never lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
import warnings

import ray

from evoray.config import JobConfig, ProviderConfig
from evoray.gate import ClientGate, Gatekeeper, limited, provider_identity
from evoray.ledger import Ledger
from evoray.limiter import KeyGate, LimitSpec, gate_actor_name, identity_label

log = logging.getLogger("evoray")

#: the namespace of the key gates: every job on the cluster finds them there
NAMESPACE = "evoray"
#: a key gate with no lease, report or parked request for this long exits by itself
IDLE_EXIT_S = 600.0


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class GateActor:
    """The job's gate: ledger, budget, failover cool-downs and max_concurrency slots.

    It restarts when its process dies (Ray 2.60 was seen to abort an async actor's worker on an
    internal check under load), and the calls in flight are retried on the new instance. Its
    state comes back from its callers: each link sends its cumulative tallies
    (:meth:`record_total`, idempotent), so the ledger and the budget are whole again after each
    live caller's next flush; cool-downs, halts and slots start empty (conservatively re-learned).
    """

    def __init__(self, providers: list[dict], budget_usd: float | None, job_id: str = "job"):
        self.keeper = Gatekeeper([ProviderConfig.model_validate(p) for p in providers], budget_usd=budget_usd,
                                 job_id=job_id)
        self.totals: dict[str, dict] = {}  # link id -> its cumulative tallies (see record_total)
        self.pool_open: set[str] = set()
        self.pool_closed: set[str] = set()

    # pool actors say when they start and when they have closed their clients, so that the driver can
    # wait for their final ledger flush before the job ends (a graceful exit is asynchronous)
    async def pool_actor_opened(self, actor_id: str) -> None:
        if actor_id not in self.pool_closed:
            self.pool_open.add(actor_id)

    async def pool_actor_closed(self, actor_id: str) -> None:
        self.pool_open.discard(actor_id)
        self.pool_closed.add(actor_id)

    async def open_pool_actors(self) -> int:
        return len(self.pool_open)

    async def record(self, delta: dict) -> dict:
        return self.keeper.record(delta)

    async def record_total(self, link_id: str, total: dict) -> dict:
        """Merge what ``link_id``'s cumulative tallies ``total`` added since its last call (a retried or
        repeated call adds nothing; after a restart, the first call brings the whole total back)."""
        delta = Ledger.difference(total, self.totals.get(link_id))
        self.totals[link_id] = total
        return self.keeper.record(delta)

    async def cool_down(self, provider: str) -> float:
        return self.keeper.cool_down(provider)

    async def take_slot(self, provider: str) -> int:
        return await self.keeper.take_slot(provider)

    async def drop_slot(self, provider: str, slot: int) -> None:
        self.keeper.drop_slot(provider, slot)

    async def halt(self, provider: str, message: str) -> bool:
        return self.keeper.halt(provider, message)

    async def learn(self, provider: str, choices: dict) -> bool:
        return self.keeper.learn(provider, choices)

    async def ledger(self) -> dict:
        return self.keeper.ledger_dict()

    async def status(self) -> dict:
        return {"providers": self.keeper.status(), "stopped": self.keeper.stop_reason(),
                "dollars": self.keeper.ledger.dollars}

@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class KeyGateActor:
    """The limit of one API key for every job on the cluster (detached, named, restartable)."""

    def __init__(self, label: str, idle_exit_s: float = IDLE_EXIT_S):
        with warnings.catch_warnings():  # Ray's own property warns about an API it calls inside
            warnings.simplefilter("ignore", DeprecationWarning)
            self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self.gate = KeyGate(label, restarted=self.restarted)
        self.idle_exit_s = idle_exit_s
        self.node = ray.get_runtime_context().get_node_id()
        self._watch: asyncio.Task | None = None
        self._cpu0 = time.process_time()

    def _watching(self) -> None:
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._idle_watch())

    async def _idle_watch(self) -> None:
        step = min(30.0, max(0.2, self.idle_exit_s / 4))
        while True:
            await asyncio.sleep(step)
            if self.gate.idle_for() >= self.idle_exit_s:
                log.info("key gate %s: idle for %.0f s, exiting", self.gate.label, self.gate.idle_for())
                # an intentional exit (queued like a call), so Ray does not restart it
                ray.get_runtime_context().current_actor.__ray_terminate__.remote()
                return

    async def lease(self, client_id: str, owner: str, spec: tuple, want: int, ests: list[int], reports: dict | None,
                    batching: bool = True, watch: int | None = None) -> dict:
        self._watching()
        reply = await self.gate.lease(client_id, owner, spec, want, ests, reports, batching, watch)
        # when the reply was made, by the wall clock of this node: a client on the same node takes
        # the reply's time in transit out of the permits' delays (see RayKeyLink.lease)
        reply["wall"], reply["node"] = time.time(), self.node
        return reply

    async def report(self, client_id: str, owner: str, reports: dict) -> None:
        self._watching()
        self.gate.report(client_id, owner, reports)

    async def register(self, owner: str, spec: tuple) -> dict:
        self._watching()
        self.gate.register(owner, LimitSpec.from_tuple(spec))
        return self.gate.status()

    async def forget(self, owner: str) -> None:
        self.gate.forget(owner)

    async def status(self) -> dict:
        self._watching()
        return {**self.gate.status(), "pid": os.getpid(), "cpu_s": time.process_time() - self._cpu0,
                "idle_exit_s": self.idle_exit_s}


def key_gate(identity: str, idle_exit_s: float = IDLE_EXIT_S):
    """The key's gate actor: found by name, or created (detached) when no job has it yet."""
    return KeyGateActor.options(name=gate_actor_name(identity), namespace=NAMESPACE, lifetime="detached",
                                get_if_exists=True).remote(identity_label(identity), idle_exit_s)


#: what a call to a dead or restarting actor raises (ActorDiedError and ActorUnavailableError are
#: RayActorError subclasses in current Ray; GetTimeoutError when a restart takes long)
def _actor_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [ray.exceptions.RayActorError]
    for name in ("ActorUnavailableError", "ActorDiedError", "GetTimeoutError"):
        e = getattr(ray.exceptions, name, None)
        if e is not None:
            errs.append(e)
    return tuple(errs)


class RayKeyLink:
    """A :class:`evoray.limiter.KeyLink` to a key's gate actor that survives the actor's death."""

    def __init__(self, identity: str, max_backoff_s: float = 2.0):
        self.identity = identity
        self.max_backoff_s = max_backoff_s
        self.handle = None
        self.reconnects = 0
        self._errors = _actor_errors()
        self.node = ray.get_runtime_context().get_node_id()

    def _get(self):
        if self.handle is None:
            self.handle = key_gate(self.identity)
        return self.handle

    async def lease(self, client_id, owner, spec, want, ests, reports, batching, watch=None):
        delay = 0.1
        while True:
            try:
                reply = await self._get().lease.remote(client_id, owner, spec, want, ests, reports, batching, watch)
            except self._errors as e:
                # the gate died (or is restarting): find or create it again and ask again; the
                # reports of this call are lost, which only delays what the gate learns
                reports = None
                self.handle = None
                self.reconnects += 1
                log.warning("key gate %s unavailable (%s); asking again in %.1f s",
                            identity_label(self.identity), type(e).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(self.max_backoff_s, delay * 2)
                continue
            if reply.get("node") == self.node and reply.get("permits"):
                # same node, same wall clock: measure each permit from when the gate made the reply, so
                # the reply's varying time in transit does not shift this actor's permits against the
                # other actors' (across nodes the delays stand as sent: clocks may disagree)
                transit = max(0.0, time.time() - reply["wall"])
                reply["permits"] = [(pid, d - transit) for pid, d in reply["permits"]]
            return reply

    def report(self, client_id, owner, reports):
        try:
            self._get().report.remote(client_id, owner, reports)  # fire and forget
        except self._errors:
            self.handle = None
        return None


class RayJobLink:
    """A :class:`evoray.gate.JobLink` to the job's :class:`GateActor`: deltas are summed here and sent
    as this link's cumulative tallies, so that a restarted gate actor gets them back."""

    def __init__(self, handle, link_id: str | None = None):
        self.handle = handle
        self._stop: str | None = None
        self.link_id = link_id or uuid.uuid4().hex
        self.total = Ledger()

    async def record(self, delta):
        if delta:
            self.total.merge(delta)
        st = await self.handle.record_total.remote(self.link_id, self.total.to_dict()["providers"])
        if st.get("stop"):
            self._stop = st.get("reason")
        return st

    async def cool_down(self, provider):
        return await self.handle.cool_down.remote(provider)

    async def take_slot(self, provider):
        return await self.handle.take_slot.remote(provider)

    def drop_slot(self, provider, slot):
        self.handle.drop_slot.remote(provider, slot)  # fire and forget

    def known_stop(self):
        return self._stop

    async def halt(self, provider, message):
        return await self.handle.halt.remote(provider, message)

    async def learn(self, provider, choices):
        return await self.handle.learn.remote(provider, choices)


def ray_client_gate(config: JobConfig, job_handle, job_id: str, environ: dict | None = None) -> ClientGate:
    """The gate of one process (a pool actor, or the driver): its job's gate actor, and a link to
    the gate actor of each rate-limited provider's key."""
    keys = {p.name: RayKeyLink(provider_identity(p, job_id, environ)) for p in config.providers if limited(p)}
    return ClientGate(config.providers, RayJobLink(job_handle), keys, job_id=job_id,
                      batching=config.ray.lease_permits)
