"""Batch mode: the same per-row code, its requests sent through the providers' batch APIs.

Three layers, all Ray-free:

:class:`BatchRunner` (one provider)
    ``await runner.run({custom_id: Request})`` -> ``{custom_id: LineResult}``: builds the lines
    with the provider's own body builder (:mod:`evoray.providers.batch_api`), splits them into
    batches within the API's limits and ``batch.max_requests``, uploads and creates each batch,
    polls it every ``batch.poll_interval_s`` (through an injectable ``sleep``, so tests use no wall
    time) with progress events, downloads the results and maps them back by custom id. A line that
    has no result is reported ``missing``. It neither retries lines nor caches: the caller does.

    Every batch is recorded in a :class:`BatchState` file (``_batches.json`` in the stage folder)
    the moment the provider returns its id, with the list of its custom ids beside it. A later
    ``run`` - a re-run after the job was killed - first looks there: a recorded batch that holds
    wanted custom ids is polled and read instead of submitting those requests again. Only the
    moment between the provider creating a batch and the state file being written is not covered
    (a kill exactly then submits those requests once more).

:class:`BatchJob` and its per-window :class:`BatchClient`
    ``BatchClient`` looks like :class:`~evoray.client.LLMClient` to :class:`~evoray.rating.Rater`,
    :class:`~evoray.answer.Answerer` and :class:`~evoray.judge.Judge`: ``await complete(request)``.
    :meth:`BatchClient.run` starts one task per row of a window; ``complete`` answers from the
    response cache at once (a cached request is never sent) or parks the request; when every
    unfinished row waits on a parked request, the parked requests go out as one round of batches
    and the answers wake the rows, which parse them with their usual code and may ask again (a
    parse retry is a request of the next round). So a row in batch mode ends exactly as it would
    online: same prompts, same parsing, same statuses. Answers are stored in the cache under the
    same key the online client uses (the custom id *is* that key), and priced in the ledger at the
    provider's batch rate (``Price.batch_rates``: ``batch_discount`` 0.5 by default, because OpenAI
    and Anthropic both charge half for batched requests).

    A failed, expired or cancelled line is retried where ``batch.retry`` says: ``online`` hands
    the request to the normal :class:`~evoray.client.LLMClient` (rate limits, retries, online
    price); ``batch`` puts it into the next round until ``batch.max_rounds``. A line failing for a
    reason asking again cannot fix (HTTP 400) fails its row at once, with the provider's message.

``mode`` per stage: :meth:`evoray.config.JobConfig.stage_mode` (the stage's ``mode`` wins; null
means batch when every provider of the role says ``mode: batch``). The stage driver that reads
rows, runs windows and writes tables is :mod:`evoray.batch_stage`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

from .cache import ResponseCache, cache_key
from .config import BatchConfig
from .errors import BudgetExceeded, ProviderError, RetriesExhausted
from .gate import backoff_delay
from .files import write_text_atomic
from .ledger import Ledger
from .providers.base import Completion, Provider, Request
from .providers.batch_api import BatchAPI, BatchStatus, LineResult, batch_api

log = logging.getLogger("evoray")

STATE_FILE = "_batches.json"


# ---- the state file -------------------------------------------------------------------------------------

class BatchState:
    """The batches a stage submitted: ``_batches.json`` plus one ``_batches_ids/<n>.ids`` file of
    custom ids per batch. Written atomically after every change; read back by a re-run."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.dir = self.path.with_name(self.path.stem + "_ids")
        self.entries: list[dict[str, Any]] = []
        if self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text(encoding="utf-8")).get("batches", [])
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                bad = self.path.with_name(self.path.name + ".unreadable")
                os.replace(self.path, bad)
                log.warning("batch state %s was unreadable; moved to %s (its batches will be submitted again)",
                            self.path, bad)
        self._seq = max((int(e.get("seq", 0)) for e in self.entries), default=0)
        self._ids_cache: dict[int, frozenset[str]] = {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps({"version": 1, "batches": self.entries}, indent=1) + "\n")

    def reserve(self, custom_ids: Sequence[str]) -> int:
        """A new entry number, with its custom ids written beside the state file."""
        self._seq += 1
        self.dir.mkdir(parents=True, exist_ok=True)
        target = self.dir / f"{self._seq}.ids"
        write_text_atomic(target, "".join(f"{c}\n" for c in custom_ids))
        self._ids_cache[self._seq] = frozenset(custom_ids)
        return self._seq

    def add(self, entry: dict[str, Any]) -> dict[str, Any]:
        self.entries.append(entry)
        self.save()
        return entry

    def update(self, entry: dict[str, Any], **fields: Any) -> None:
        if any(entry.get(k) != v for k, v in fields.items()):
            entry.update(fields)
            self.save()

    def ids(self, entry: dict[str, Any]) -> frozenset[str]:
        """The custom ids of a recorded batch."""
        seq = int(entry["seq"])
        if seq not in self._ids_cache:
            self._ids_cache[seq] = self._read(f"{seq}.ids")
        return self._ids_cache[seq]

    def usable_ids(self, entry: dict[str, Any]) -> frozenset[str]:
        """The custom ids whose answer can still come from this batch: all of them until it is
        collected, then those that did not fail."""
        ids = self.ids(entry)
        if entry.get("collected") and entry.get("counts", {}).get("failed"):
            ids = ids - self._read(f"{int(entry['seq'])}.failed")
        return ids

    def collected(self, entry: dict[str, Any], ok: Iterable[str], failed: Iterable[str], **fields: Any) -> None:
        """Mark a batch read (for some or all of its ids); its failed custom ids are kept beside its ids."""
        name = f"{int(entry['seq'])}.failed"
        bad = (self._read(name) - set(ok)) | set(failed)
        if bad:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.dir / name, "".join(f"{c}\n" for c in sorted(bad)))
        self.update(entry, collected=True, **fields, counts={"failed": len(bad)})

    def _read(self, name: str) -> frozenset[str]:
        try:
            return frozenset(x for x in (self.dir / name).read_text(encoding="utf-8").splitlines() if x)
        except FileNotFoundError:
            return frozenset()

    def for_provider(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.entries if e.get("provider") == name]


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---- one provider's batches ---------------------------------------------------------------------------

ProgressFn = Callable[[dict[str, Any]], None]


class BatchRunner:
    """Sends requests of one provider through its batch API and reads the answers back.

    ``sleep`` waits between polls (inject a recorder in tests); ``progress`` gets a dict per poll
    (batch id, provider, state, done, total); ``metadata`` is attached to OpenAI batches.
    """

    def __init__(self, provider: Provider, state: BatchState, settings: BatchConfig | None = None, *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, progress: ProgressFn | None = None,
                 metadata: dict[str, str] | None = None, rng: random.Random | None = None,
                 api: BatchAPI | None = None):
        self.provider = provider
        self.api = api or batch_api(provider)
        self.state = state
        self.settings = settings or BatchConfig()
        self.sleep = sleep
        self.progress = progress
        self.metadata = metadata or {}
        self.rng = rng or random.Random()
        self.submitted: list[str] = []  # batch ids this runner created
        self.adopted: list[str] = []  # recorded batch ids it polled instead of submitting again

    @property
    def name(self) -> str:
        return self.provider.name

    async def run(self, items: Mapping[str, Request] | Iterable[tuple[str, Request]]) -> dict[str, LineResult]:
        wanted: dict[str, Request] = dict(items)
        if not wanted:
            return {}
        groups: list[tuple[dict[str, Any], set[str]]] = []
        unclaimed = set(wanted)
        for entry in reversed(self.state.for_provider(self.name)):  # the newest record of an id wins
            if not unclaimed:
                break
            if not entry.get("id") or entry.get("lost"):
                continue
            ids = self.state.usable_ids(entry) & unclaimed
            if ids:
                groups.append((entry, ids))
                unclaimed -= ids
                self.adopted.append(entry["id"])
                log.info("batch %s (%s): resuming it for %d request(s) instead of submitting them again",
                         entry["id"], self.name, len(ids))
        order = [cid for cid in wanted if cid in unclaimed]
        groups += await self._submit_all(order, wanted)
        parts = await asyncio.gather(*(self._collect(entry, ids, wanted) for entry, ids in groups))
        out: dict[str, LineResult] = {}
        for part in parts:
            out.update(part)
        return out

    # -- submitting ---------------------------------------------------------------------------------------
    def _chunks(self, order: list[str], wanted: Mapping[str, Request]) -> list[tuple[list[str], list[dict]]]:
        cap = min(self.settings.max_requests, self.api.max_requests)
        limit = int(self.api.max_bytes * 0.95)  # leave room for the multipart framing
        chunks: list[tuple[list[str], list[dict]]] = []
        ids: list[str] = []
        lines: list[dict] = []
        size = 0
        for cid in order:
            line = self.api.line(cid, wanted[cid])
            n = self.api.line_bytes(line)
            if ids and (len(ids) >= cap or size + n > limit):
                chunks.append((ids, lines))
                ids, lines, size = [], [], 0
            ids.append(cid)
            lines.append(line)
            size += n
        if ids:
            chunks.append((ids, lines))
        return chunks

    async def _submit_all(self, order: list[str], wanted: Mapping[str, Request]) -> list[tuple[dict, set[str]]]:
        groups = []
        for ids, lines in self._chunks(order, wanted):
            entry = await self._submit(ids, lines)
            groups.append((entry, set(ids)))
        return groups

    async def _submit(self, ids: list[str], lines: list[dict]) -> dict[str, Any]:
        seq = self.state.reserve(ids)
        pre: dict[str, Any] = {}
        status = await self._retrying(lambda: self.api.submit(lines, self.metadata, pre.update), "create a batch")
        entry = self.state.add({
            "seq": seq, "id": status.id, "provider": self.name, "kind": self.provider.kind,
            "model": self.provider.model, "lines": len(ids), "created": _now_iso(), "state": status.state,
            "ended": status.ended, "collected": False, **pre,
        })
        self.submitted.append(status.id)
        self._report(status)
        return entry

    # -- waiting and reading --------------------------------------------------------------------------------
    async def _collect(self, entry: dict[str, Any], ids: set[str], wanted: Mapping[str, Request]) -> dict[str, LineResult]:
        status = await self._wait(entry)
        if status is None:  # the provider no longer knows it: submit those requests again
            return await self._resubmit(entry, ids, wanted, "is unknown to the provider")
        if not status.downloadable:
            # the batch failed as a whole (a file the provider refused, an enqueued-token limit): stop
            # the stage rather than send every request online at twice the price; a re-run submits anew
            self.state.collected(entry, (), ids, state=status.state, ended=True)
            raise ProviderError(f"batch {status.id} failed: {status.error or status.state}; nothing of it was "
                                f"answered (fix the cause and run again)", provider=self.name,
                                model=self.provider.model, retryable=False, kind="batch_failed")
        requests = {cid: wanted[cid] for cid in ids}
        try:
            out = await self._retrying(lambda: self._download(status, requests), "download batch results")
        except ProviderError as e:
            if e.status != 404:
                raise
            return await self._resubmit(entry, ids, wanted, "has no results any more (they expire)")
        for cid in ids:
            if cid not in out:
                out[cid] = LineResult(cid, None, "missing", f"batch {status.id} ({status.state}) has no result for it")
        failed = [cid for cid, r in out.items() if r.completion is None]
        self.state.collected(entry, (cid for cid, r in out.items() if r.completion is not None), failed,
                             state=status.state, ended=True)
        return out

    async def _resubmit(self, entry: dict[str, Any], ids: set[str], wanted: Mapping[str, Request],
                        why: str) -> dict[str, LineResult]:
        self.state.update(entry, lost=True)
        log.warning("batch %s (%s) %s; its %d request(s) are submitted again", entry["id"], self.name, why, len(ids))
        order = [cid for cid in wanted if cid in ids]
        parts = [await self._collect(e, i, wanted) for e, i in await self._submit_all(order, wanted)]
        return {k: v for p in parts for k, v in p.items()}

    async def _download(self, status: BatchStatus, requests: Mapping[str, Request]) -> dict[str, LineResult]:
        return {r.custom_id: r async for r in self.api.results(status, requests)}

    async def _wait(self, entry: dict[str, Any]) -> BatchStatus | None:
        """Poll until the batch ends; None when the provider answers 404 for it."""
        bid = entry["id"]
        while True:
            try:
                status = await self._retrying(lambda: self.api.status(bid), f"poll batch {bid}")
            except ProviderError as e:
                if e.status == 404:
                    return None
                raise
            self.state.update(entry, state=status.state, ended=status.ended)
            self._report(status)
            if status.ended:
                return status
            await self.sleep(self.settings.poll_interval_s)

    def _report(self, status: BatchStatus) -> None:
        if self.progress is not None:
            self.progress({"batch": status.id, "provider": self.name, "state": status.state, "done": status.done,
                           "failed": status.failed, "total": status.total, "ended": status.ended})

    async def _retrying(self, fn: Callable[[], Awaitable[Any]], what: str) -> Any:
        """A control call (upload, create, poll, download) with the provider's retry settings."""
        cfg = self.provider.config
        attempt = 0
        while True:
            attempt += 1
            try:
                return await fn()
            except ProviderError as e:
                if not e.retryable or attempt >= cfg.max_attempts:
                    raise ProviderError(f"could not {what}: {e.message}", provider=e.provider, model=e.model,
                                        status=e.status, retryable=e.retryable, kind=e.kind) from None
                delay = e.retry_after if e.retry_after is not None else backoff_delay(
                    attempt, cfg.backoff_base_s, cfg.backoff_max_s, self.rng)
                await self.sleep(delay)


# ---- the client the per-row code calls ----------------------------------------------------------------------

_ONLINE = object()  # a parked request's answer: "ask the online client"


@dataclass
class _Parked:
    provider: str
    request: Request
    waiters: list[asyncio.Future] = field(default_factory=list)
    rounds: int = 0  # batches this request has been through


class BatchJob:
    """What the windows of one batch-mode stage share: providers, their runners, the cache, the
    online client for retries, the ledger and the job's gate (budget).

    ``gate`` is the job's gate (``record(delta) -> {"stop": bool}``); ``online`` an
    :class:`~evoray.client.LLMClient` over the same providers, used for ``batch.retry: online``.
    """

    def __init__(self, providers: Sequence[Provider], runners: Mapping[str, BatchRunner], *,
                 settings: BatchConfig, gate: Any, cache: ResponseCache | None = None, online: Any = None):
        if not providers:
            raise ValueError("batch mode needs at least one provider")
        self.providers = {p.name: p for p in providers}
        self.order = [p.name for p in providers]
        self.runners = dict(runners)
        self.settings = settings
        self.gate = gate
        self.cache = cache
        self.online = online
        self.ledger = Ledger({p.name: p.config.price for p in providers})
        self.stop = False
        self.online_sem = asyncio.Semaphore(settings.online_concurrency)
        total_w = sum(p.config.weight for p in providers)
        self._shares = [(p.name, p.config.weight / total_w) for p in providers]

    def client(self) -> "BatchClient":
        return BatchClient(self)

    def assign(self, request: Request) -> str:
        """The provider a request goes to: by weight, decided by a hash of the request, so a re-run
        sends (and finds) every request at the same provider."""
        if len(self._shares) == 1:
            return self._shares[0][0]
        h = hashlib.sha256(cache_key("", "", request).encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        acc = 0.0
        for name, share in self._shares:
            acc += share
            if u < acc:
                return name
        return self._shares[-1][0]

    async def ship(self) -> None:
        """Send the ledger delta to the job's gate; note when the budget is reached."""
        delta = self.ledger.take_delta()
        status = await self.gate.record(delta)
        if status.get("stop"):
            self.stop = True
        if self.online is not None:
            await self.online.flush(force=True)
            if self.online.stop:
                self.stop = True

    async def aclose(self) -> None:
        await self.ship()
        if self.online is not None:
            await self.online.aclose()
        else:
            close = getattr(self.gate, "close", None)
            if close is not None:
                close()
            for p in self.providers.values():
                await p.aclose()


class BatchClient:
    """One window's client: ``complete`` parks requests; :meth:`run` sends them round by round."""

    def __init__(self, job: BatchJob):
        self.job = job
        self.providers = job.providers  # what the workers read (JSON-schema support)
        self.memo: dict[str, Completion] = {}  # this window's answers (a request asked twice, prefetched ones)
        self._parked: dict[str, _Parked] = {}
        self._blocked = 0
        self._changed: asyncio.Event | None = None
        self.rounds = 0

    @property
    def stop(self) -> bool:
        return self.job.stop

    def _lookup(self, request: Request, count: bool = True) -> Completion | None:
        job = self.job
        for name in job.order:
            p = job.providers[name]
            key = cache_key(p.kind, p.model, request)
            hit = self.memo.get(key)
            if hit is not None:
                return hit
            if job.cache is not None:
                hit = job.cache.get(key)
                if hit is not None:
                    if count:
                        job.ledger.cache_hit(name, p.model)
                    return hit
        return None

    def _key(self, request: Request) -> tuple[str, str]:
        name = self.job.assign(request)
        p = self.job.providers[name]
        return name, cache_key(p.kind, p.model, request)

    def prefetch(self, request: Request) -> None:
        """Put a request into the next round without waiting for it (its answer lands in the memo)."""
        if self._lookup(request, count=False) is not None or self.job.stop:
            return
        name, key = self._key(request)
        self._parked.setdefault(key, _Parked(name, request))

    async def complete(self, request: Request) -> Completion:
        hit = self._lookup(request)
        if hit is not None:
            return hit
        if self.job.stop:
            raise BudgetExceeded("the job's budget was reached")
        name, key = self._key(request)
        fut = asyncio.get_running_loop().create_future()
        self._parked.setdefault(key, _Parked(name, request)).waiters.append(fut)
        self._blocked += 1
        self._signal()
        answer = await fut
        if answer is _ONLINE:
            async with self.job.online_sem:
                return await self.job.online.complete(request)
        return answer

    async def flush(self, force: bool = False) -> None:  # what pool code calls on an LLMClient
        await self.job.ship()

    def _signal(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def run(self, work: Callable[[Any], Awaitable[Any]], rows: Sequence[Any],
                  prefetch: Callable[[Any], Iterable[Request]] | None = None) -> list[Any]:
        """``work(row)`` for every row; results in row order (an exception is returned in its place)."""
        self._changed = asyncio.Event()
        if prefetch is not None:
            for row in rows:
                for req in prefetch(row):
                    self.prefetch(req)
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(work(r)) for r in rows]
        unfinished = len(tasks)

        def finished(_t: asyncio.Task) -> None:
            nonlocal unfinished
            unfinished -= 1
            self._signal()

        for t in tasks:
            t.add_done_callback(finished)
        try:
            while True:
                # every row runs until it finishes or waits on a parked request (or on the online client)
                while unfinished and self._blocked < unfinished:
                    self._changed.clear()
                    await self._changed.wait()
                if not unfinished:
                    break
                if not self._parked:
                    raise RuntimeError("batch mode: rows wait but no request is parked")
                await self._round()
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            self.memo.clear()
        return [t.exception() if t.exception() is not None else t.result() for t in tasks]

    def _resolve(self, parked: _Parked, value: Any) -> None:
        for fut in parked.waiters:
            if fut.done():
                continue
            if isinstance(value, BaseException):
                fut.set_exception(value)
            else:
                fut.set_result(value)
            self._blocked -= 1
        parked.waiters = []

    async def _round(self) -> None:
        """Send the parked requests (one batch set per provider), then wake their rows."""
        job = self.job
        parked, self._parked = self._parked, {}
        self.rounds += 1
        if job.stop:
            for p in parked.values():
                self._resolve(p, BudgetExceeded("the job's budget was reached before this request was sent"))
            return
        by_provider: dict[str, dict[str, Request]] = {}
        for key, p in parked.items():
            by_provider.setdefault(p.provider, {})[key] = p.request
        names = list(by_provider)
        t0 = time.monotonic()
        outcomes = await asyncio.gather(*(job.runners[n].run(by_provider[n]) for n in names))
        elapsed = time.monotonic() - t0
        settings = job.settings
        for name, results in zip(names, outcomes):
            prov = job.providers[name]
            for key in by_provider[name]:
                p = parked[key]
                r = results.get(key) or LineResult(key, None, "missing", "no result came back for it")
                if r.completion is not None:
                    comp = r.completion
                    comp.provider, comp.model = name, prov.model
                    comp.attempts, comp.latency_s = p.rounds + 1, elapsed
                    job.ledger.success(name, prov.model, comp.input_tokens, comp.output_tokens,
                                       retry=p.rounds > 0, batch=True, unhonoured=bool(prov.unhonoured(p.request)))
                    if job.cache is not None:
                        job.cache.put(key, comp)
                    self.memo[key] = comp
                    self._resolve(p, comp)
                    continue
                job.ledger.failure(name, prov.model, r.status, retry=p.rounds > 0)
                p.rounds += 1
                if not p.waiters:  # a prefetched request: the row asks again when it needs it
                    continue
                err = ProviderError(f"batch line {r.kind}: {r.message}", provider=name, model=prov.model,
                                    status=r.status, retryable=r.retryable, kind=f"batch_{r.kind}")
                if not r.retryable:
                    self._resolve(p, err)
                elif settings.retry == "online" and job.online is not None:
                    self._resolve(p, _ONLINE)
                elif settings.retry == "batch" and p.rounds < settings.max_rounds:
                    self._parked[key] = p  # into the next round; its rows keep waiting
                else:
                    self._resolve(p, RetriesExhausted(p.rounds, err))
        await job.ship()


__all__ = ["BatchClient", "BatchJob", "BatchRunner", "BatchState", "STATE_FILE"]
