"""Batch endpoints of the fake LLM server: OpenAI Files + Batches and Anthropic Message Batches.

:class:`FakeBatches` is mounted on :class:`~evoray.testing.fake_server.FakeLLMServer`'s application
(``srv.batches``) and speaks the wire formats the installed SDKs read:

OpenAI (``openai.AsyncOpenAI(base_url=srv.openai_base_url)``)
    ``POST /v1/files`` (multipart, ``purpose=batch``), ``GET /v1/files/{id}``,
    ``GET /v1/files/{id}/content``; ``POST /v1/batches`` (endpoint ``/v1/chat/completions``,
    window ``24h``), ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``. Input lines are
    ``{"custom_id", "method": "POST", "url", "body"}``; output lines are ``{"id", "custom_id",
    "response": {"status_code", "request_id", "body"}, "error"}``; lines that failed go to a separate
    error file (``error_file=True``, OpenAI's behaviour) or into the output file; expired or cancelled
    lines go to the error file with ``response: null`` and ``error.code`` ``batch_expired`` /
    ``batch_cancelled``. A batch whose file does not validate ends ``failed`` with ``errors.data``.
    ``GET /v1/batches`` lists batches, newest first (``limit``, ``after``).

Anthropic (``anthropic.AsyncAnthropic(base_url=srv.anthropic_base_url)``)
    ``POST /v1/messages/batches`` (``{"requests": [{"custom_id", "params"}]}``),
    ``GET /v1/messages/batches/{id}``, ``POST /v1/messages/batches/{id}/cancel``,
    ``GET /v1/messages/batches/{id}/results`` (JSONL of ``{"custom_id", "result": {"type":
    "succeeded" | "errored" | "expired" | "canceled", ...}}``), with ``results_url`` set once the
    batch has ``ended``.

Every answered line is made by the server's own responder (``srv.responder`` or
:func:`~evoray.testing.fake_server.default_reply`) and reply body builders, so a batched request
gets exactly the reply the same request gets online. Scripted replies (``srv.script``), random
online faults and the rpm / tpm buckets apply to online requests only.

Behaviour (:class:`FakeBatchConfig`, change it with ``srv.batches.update(...)``): a batch ends once
``processing_s`` have passed on ``srv.batches.clock`` *and* it has been retrieved
``polls_to_complete`` times (tests use polls, not wall time); ``line_error_rate`` of the lines fail
with ``line_error_status`` (drawn per line and batch, so a line retried in another batch draws
again); ``expire`` ends batches ``expired`` with only the first ``expire_done_share`` of their lines
processed; ``line_outcome(kind, custom_id, batch_no)`` may decide a line's fate ("ok", "error",
"expired") instead; ``fail_after_create`` answers that many OpenAI batch creations with a 500 after
creating the batch (an answer lost on the way). ``srv.batches.stats()`` counts files, batches, lines and tokens.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import math
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web

OPENAI_ENDPOINT = "/v1/chat/completions"
#: each API's requests per batch (OpenAI: 50,000 a file, 200 MB; Anthropic: 100,000 a batch, 256 MB)
MAX_LINES = {"openai": 50_000, "anthropic": 100_000}
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # Anthropic's rule for custom_id
DAY_S = 24 * 3600


@dataclass
class FakeBatchConfig:
    """How the fake's batches behave."""

    processing_s: float = 0.0  # a batch ends this long (on the clock) after it was created ...
    polls_to_complete: int = 0  # ... and after this many retrievals
    line_error_rate: float = 0.0  # share of lines that fail
    line_error_status: int = 500
    expire: bool = False  # batches end expired with part of their lines unprocessed
    expire_done_share: float = 0.5  # share of the lines (in file order) processed before an expiry
    error_file: bool = True  # OpenAI: failed lines in a separate error file (else in the output file)
    max_lines: dict[str, int] = field(default_factory=lambda: dict(MAX_LINES))
    seed: int = 0
    line_outcome: Callable[[str, str, int], str | None] | None = None  # (kind, custom_id, batch_no) -> outcome
    fail_after_create: int = 0  # this many batch creations answer 500 although the batch was created

    def validate(self) -> None:
        if not 0.0 <= self.line_error_rate <= 1.0:
            raise ValueError(f"FakeBatchConfig.line_error_rate must be in [0, 1], got {self.line_error_rate}")
        if not 0.0 <= self.expire_done_share <= 1.0:
            raise ValueError(f"FakeBatchConfig.expire_done_share must be in [0, 1], got {self.expire_done_share}")
        if self.processing_s < 0 or self.polls_to_complete < 0:
            raise ValueError("FakeBatchConfig: processing_s and polls_to_complete must not be negative")


@dataclass
class _File:
    id: str
    data: bytes
    filename: str
    purpose: str
    created_at: int


@dataclass
class _Batch:
    id: str
    kind: str  # openai | anthropic
    no: int  # the server's batch number (seeds the line draws)
    lines: list[tuple[str, dict]]  # (custom_id, request body / params)
    created_mono: float
    created_at: float  # epoch seconds
    input_file_id: str | None = None
    metadata: dict | None = None
    polls: int = 0
    state: str = "running"  # running | canceling | ended | failed
    end: str | None = None  # completed | expired | cancelled
    ended_at: float | None = None
    cancel_at: float | None = None
    errors: list[dict] | None = None  # validation errors (OpenAI)
    results: list[dict] = field(default_factory=list)  # one record per line once ended
    output_file_id: str | None = None
    error_file_id: str | None = None
    usage: dict[str, int] = field(default_factory=lambda: {"input": 0, "output": 0})
    counts: dict[str, int] = field(default_factory=dict)


def _rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat().replace("+00:00", "Z")


class FakeBatches:
    """The batch endpoints of one :class:`~evoray.testing.fake_server.FakeLLMServer`."""

    def __init__(self, server: Any, config: FakeBatchConfig | None = None, clock: Callable[[], float] = time.monotonic):
        self.server = server
        self._config = dataclasses.replace(config) if config else FakeBatchConfig()
        self._config.validate()
        self.clock = clock
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.files: dict[str, _File] = {}
        self.batches: dict[str, _Batch] = {}
        self._stats = dict.fromkeys(("files", "batches_created", "batches_failed", "polls", "cancels", "downloads",
                                     "lines", "lines_ok", "lines_failed", "lines_expired", "lines_cancelled",
                                     "input_tokens", "output_tokens", "unauthorized", "bad_request"), 0)

    # -- control -------------------------------------------------------------------------------------

    @property
    def config(self) -> FakeBatchConfig:
        with self._lock:
            return dataclasses.replace(self._config)

    def update(self, **changes: Any) -> FakeBatchConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(FakeBatchConfig)}
        if unknown:
            raise TypeError(f"unknown FakeBatchConfig field(s) {sorted(unknown)}")
        with self._lock:
            new = dataclasses.replace(self._config, **changes)
            new.validate()
            self._config = new
            return dataclasses.replace(new)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self._stats, "batch_ids": list(self.batches)}

    def mount(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/v1/files", self._file_create)
        r.add_get("/v1/files/{file_id}", self._file_retrieve)
        r.add_get("/v1/files/{file_id}/content", self._file_content)
        r.add_post("/v1/batches", self._openai_create)
        r.add_get("/v1/batches", self._openai_list)
        r.add_get("/v1/batches/{batch_id}", self._openai_retrieve)
        r.add_post("/v1/batches/{batch_id}/cancel", self._openai_cancel)
        r.add_post("/v1/messages/batches", self._anthropic_create)
        r.add_get("/v1/messages/batches/{batch_id}", self._anthropic_retrieve)
        r.add_post("/v1/messages/batches/{batch_id}/cancel", self._anthropic_cancel)
        r.add_get("/v1/messages/batches/{batch_id}/results", self._anthropic_results)

    # -- helpers -----------------------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):06d}"

    def _error(self, kind: str, status: int, message: str) -> web.Response:
        from .fake_server import _error_body

        if status == 400:
            self._count("bad_request")
        return web.json_response(_error_body(kind, status, message), status=status)

    def _denied(self, request: web.Request, kind: str) -> web.Response | None:
        key = self.server.config.required_key
        if key is not None and not self.server._authorised(request, key):
            self._count("unauthorized")
            return self._error(kind, 401, "Incorrect API key provided." if kind == "openai" else "invalid x-api-key")
        return None

    def _advance(self, b: _Batch, poll: bool) -> None:
        """A retrieval: count it and end the batch when its time has come."""
        cfg = self.config
        if poll:
            b.polls += 1
            self._count("polls")
        if b.state == "canceling":
            self._finish(b, "cancelled", cfg)
        elif b.state == "running" and self.clock() - b.created_mono >= cfg.processing_s and b.polls >= cfg.polls_to_complete:
            self._finish(b, "expired" if cfg.expire else "completed", cfg)

    def _finish(self, b: _Batch, end: str, cfg: FakeBatchConfig) -> None:
        """Answer the lines (with the server's responder) and write the batch's results."""
        n = len(b.lines)
        done = n if end == "completed" else (0 if end == "cancelled" else int(math.floor(n * cfg.expire_done_share)))
        counts = {"ok": 0, "error": 0, "expired": 0, "cancelled": 0}
        for i, (cid, body) in enumerate(b.lines):
            outcome = None
            if cfg.line_outcome is not None:
                outcome = cfg.line_outcome(b.kind, cid, b.no)
            if outcome is None:
                if i >= done:
                    outcome = "cancelled" if end == "cancelled" else "expired"
                else:
                    u = random.Random(f"{cfg.seed}:{b.no}:{cid}").random()
                    outcome = "error" if u < cfg.line_error_rate else "ok"
            rec = self._line_result(b, cid, body, outcome, cfg)
            counts[rec.pop("_outcome")] += 1
            b.results.append(rec)
        b.counts = counts
        b.state, b.end, b.ended_at = "ended", end, time.time()
        with self._lock:
            self._stats["lines_ok"] += counts["ok"]
            self._stats["lines_failed"] += counts["error"]
            self._stats["lines_expired"] += counts["expired"]
            self._stats["lines_cancelled"] += counts["cancelled"]
            self._stats["input_tokens"] += b.usage["input"]
            self._stats["output_tokens"] += b.usage["output"]
        if b.kind == "openai":
            ok = [r for r in b.results if r["_file"] == "output"]
            bad = [r for r in b.results if r["_file"] == "error"]
            if not cfg.error_file:
                ok, bad = ok + [r for r in bad if r.get("response") is not None], [r for r in bad if r.get("response") is None]
            for name, recs in (("output_file_id", ok), ("error_file_id", bad)):
                if recs:
                    data = "".join(json.dumps({k: v for k, v in r.items() if k != "_file"}) + "\n" for r in recs)
                    f = _File(self._new_id("file-out"), data.encode("utf-8"), f"{b.id}_{name[:-8]}.jsonl",
                              "batch_output", int(time.time()))
                    self.files[f.id] = f
                    setattr(b, name, f.id)

    def _line_result(self, b: _Batch, cid: str, body: dict, outcome: str, cfg: FakeBatchConfig) -> dict:
        from .fake_server import _error_body, _normalise, _wants_json, estimate_tokens

        srv = self.server
        req_id = f"req_fake_batch_{next(self._ids)}"
        status = cfg.line_error_status
        message = f"fake server: injected {status} for this batch line"
        if outcome == "ok":
            messages = _normalise(b.kind, body)
            wants_json, tool_name = _wants_json(b.kind, body)
            try:
                text = srv._respond(b.kind, body, messages, wants_json)
            except Exception as e:  # noqa: BLE001 - a broken responder is a 500 line that names it
                outcome, status, message = "error", 500, f"fake server: the responder raised {type(e).__name__}: {e}"
            else:
                prompt = sum(estimate_tokens(m["content"]) for m in messages)
                completion = estimate_tokens(text)
                b.usage["input"] += prompt
                b.usage["output"] += completion
                n = next(self._ids)
                model = str(body.get("model") or "fake-model")
                if b.kind == "openai":
                    reply = srv._openai_body(n, model, text, prompt, completion, False)
                    return {"_outcome": "ok", "_file": "output", "id": f"batch_req_{n}", "custom_id": cid,
                            "response": {"status_code": 200, "request_id": req_id, "body": reply}, "error": None}
                reply = srv._anthropic_body(n, model, text, prompt, completion, False, tool_name)
                return {"_outcome": "ok", "custom_id": cid, "result": {"type": "succeeded", "message": reply}}
        if b.kind == "openai":
            rec: dict[str, Any] = {"_outcome": outcome, "_file": "error", "id": f"batch_req_{next(self._ids)}",
                                   "custom_id": cid}
            if outcome == "error":
                rec.update(response={"status_code": status, "request_id": req_id,
                                     "body": _error_body("openai", status, message)}, error=None)
            else:
                code = "batch_expired" if outcome == "expired" else "batch_cancelled"
                text = ("This request could not be executed before the completion window expired."
                        if outcome == "expired" else "The batch was cancelled before this request was executed.")
                rec.update(response=None, error={"code": code, "message": text})
            return rec
        if outcome == "error":
            err = _error_body("anthropic", status, message)
            return {"_outcome": "error", "custom_id": cid, "result": {"type": "errored", "error": err}}
        return {"_outcome": outcome, "custom_id": cid,
                "result": {"type": "expired" if outcome == "expired" else "canceled"}}

    # -- OpenAI files ----------------------------------------------------------------------------------------

    def _file_json(self, f: _File) -> dict:
        return {"id": f.id, "object": "file", "bytes": len(f.data), "created_at": f.created_at, "filename": f.filename,
                "purpose": f.purpose, "status": "processed", "expires_at": f.created_at + 30 * DAY_S,
                "status_details": None}

    async def _file_create(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request, "openai")) is not None:
            return denied
        if not request.content_type.startswith("multipart/"):
            return self._error("openai", 400, "bad request: a file upload is multipart/form-data")
        purpose, data, filename = None, None, "upload.jsonl"
        reader = await request.multipart()
        async for part in reader:
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                filename = part.filename or filename
                data = bytes(await part.read())
        if data is None or not purpose:
            return self._error("openai", 400, "bad request: 'file' and 'purpose' are required")
        f = _File(self._new_id("file-"), data, filename, purpose, int(time.time()))
        self.files[f.id] = f
        self._count("files")
        return web.json_response(self._file_json(f))

    async def _file_retrieve(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request, "openai")) is not None:
            return denied
        f = self.files.get(request.match_info["file_id"])
        if f is None:
            return self._error("openai", 404, f"No such File object: {request.match_info['file_id']}")
        return web.json_response(self._file_json(f))

    async def _file_content(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request, "openai")) is not None:
            return denied
        f = self.files.get(request.match_info["file_id"])
        if f is None:
            return self._error("openai", 404, f"No such File object: {request.match_info['file_id']}")
        self._count("downloads")
        return web.Response(body=f.data, content_type="application/octet-stream")

    # -- OpenAI batches -----------------------------------------------------------------------------------------

    def _validate_openai_file(self, data: bytes, endpoint: str, cfg: FakeBatchConfig) -> tuple[list, list[dict]]:
        lines, errors, seen, models = [], [], set(), set()
        text_lines = data.decode("utf-8", errors="replace").splitlines()
        if len(text_lines) > cfg.max_lines["openai"]:
            return [], [{"code": "too_many_requests", "line": None, "param": None,
                         "message": f"the file has {len(text_lines)} requests; a batch takes at most "
                                    f"{cfg.max_lines['openai']}"}]
        for i, raw in enumerate(text_lines, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                cid, body = rec["custom_id"], rec["body"]
                if rec.get("method") != "POST" or rec.get("url") != endpoint or not isinstance(body, dict):
                    raise ValueError("each line needs method POST, the batch's url and a body object")
                if not isinstance(body.get("messages"), list):
                    raise ValueError("the body has no messages list")
            except (ValueError, KeyError, TypeError) as e:
                errors.append({"code": "invalid_request", "line": i, "param": None, "message": f"line {i}: {e}"})
                continue
            if cid in seen:
                errors.append({"code": "duplicate_custom_id", "line": i, "param": "custom_id",
                               "message": f"line {i}: custom_id {cid!r} is used twice"})
                continue
            seen.add(cid)
            models.add(body.get("model"))
            lines.append((str(cid), body))
        if len(models) > 1:
            errors.append({"code": "mismatched_model", "line": None, "param": "body.model",
                           "message": "every request of a batch must use the same model"})
        return lines, errors

    def _openai_json(self, b: _Batch) -> dict:
        ended = b.state in ("ended", "failed")
        total = len(b.lines)
        completed = b.counts.get("ok", 0)
        failed = total - completed if b.state == "ended" else 0
        status = {"running": "in_progress" if b.polls else "validating", "canceling": "cancelling",
                  "failed": "failed"}.get(b.state) or b.end
        out = {
            "id": b.id, "object": "batch", "endpoint": OPENAI_ENDPOINT, "errors": None,
            "input_file_id": b.input_file_id, "completion_window": "24h", "status": status,
            "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
            "created_at": int(b.created_at), "in_progress_at": int(b.created_at) if b.state != "failed" else None,
            "expires_at": int(b.created_at) + DAY_S, "finalizing_at": int(b.ended_at) if b.end else None,
            "completed_at": int(b.ended_at) if b.end == "completed" else None,
            "failed_at": int(b.ended_at) if b.state == "failed" and b.ended_at else None,
            "expired_at": int(b.ended_at) if b.end == "expired" else None,
            "cancelling_at": int(b.cancel_at) if b.cancel_at else None,
            "cancelled_at": int(b.ended_at) if b.end == "cancelled" else None,
            "request_counts": {"total": total, "completed": completed, "failed": failed},
            "metadata": b.metadata, "model": (b.lines[0][1].get("model") if b.lines else None),
        }
        if b.errors:
            out["errors"] = {"object": "list", "data": b.errors}
        if ended and b.state == "ended":
            out["usage"] = {"input_tokens": b.usage["input"], "input_tokens_details": {"cached_tokens": 0},
                            "output_tokens": b.usage["output"], "output_tokens_details": {"reasoning_tokens": 0},
                            "total_tokens": b.usage["input"] + b.usage["output"]}
        return out

    async def _openai_create(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request, "openai")) is not None:
            return denied
        try:
            body = json.loads(await request.read())
            file_id, endpoint = body["input_file_id"], body["endpoint"]
            window = body["completion_window"]
        except (ValueError, KeyError, TypeError):
            return self._error("openai", 400, "bad request: input_file_id, endpoint and completion_window are required")
        if endpoint != OPENAI_ENDPOINT:
            return self._error("openai", 400, f"the fake server batches {OPENAI_ENDPOINT} only, not {endpoint!r}")
        if window != "24h":
            return self._error("openai", 400, f"completion_window must be '24h', got {window!r}")
        f = self.files.get(file_id)
        if f is None:
            return self._error("openai", 404, f"No such File object: {file_id}")
        if f.purpose != "batch":
            return self._error("openai", 400, f"file {file_id} was uploaded with purpose {f.purpose!r}, not 'batch'")
        cfg = self.config
        lines, errors = self._validate_openai_file(f.data, endpoint, cfg)
        no = next(self._ids)
        b = _Batch(f"batch_fake{no:06d}", "openai", no, lines, self.clock(), time.time(), input_file_id=file_id,
                   metadata=body.get("metadata"))
        if errors:
            b.state, b.errors, b.lines, b.ended_at = "failed", errors, [], time.time()
            self._count("batches_failed")
        with self._lock:
            self.batches[b.id] = b
            self._stats["batches_created"] += 1
            self._stats["lines"] += len(b.lines)
        if self._lose_answer():
            return self._error("openai", 500, "fake server: the batch was created but the answer was lost")
        return web.json_response(self._openai_json(b))

    def _lose_answer(self) -> bool:
        with self._lock:
            if self._config.fail_after_create > 0:
                self._config = dataclasses.replace(self._config, fail_after_create=self._config.fail_after_create - 1)
                return True
        return False

    async def _openai_list(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request, "openai")) is not None:
            return denied
        limit = min(100, max(1, int(request.query.get("limit", 20))))
        mine = [b for b in reversed(list(self.batches.values())) if b.kind == "openai"]
        after = request.query.get("after")
        if after:
            ids = [b.id for b in mine]
            mine = mine[ids.index(after) + 1:] if after in ids else []
        page = mine[:limit]
        return web.json_response({"object": "list", "data": [self._openai_json(b) for b in page],
                                  "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
                                  "has_more": len(mine) > limit})

    def _get(self, request: web.Request, kind: str) -> _Batch | web.Response:
        b = self.batches.get(request.match_info["batch_id"])
        if b is None or b.kind != kind:
            msg = f"No batch found with id '{request.match_info['batch_id']}'"
            return self._error(kind, 404, msg)
        return b

    async def _openai_retrieve(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request, "openai")) is not None:
            return denied
        b = self._get(request, "openai")
        if isinstance(b, web.Response):
            return b
        self._advance(b, poll=True)
        return web.json_response(self._openai_json(b))

    async def _openai_cancel(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request, "openai")) is not None:
            return denied
        b = self._get(request, "openai")
        if isinstance(b, web.Response):
            return b
        if b.state == "running":
            b.state, b.cancel_at = "canceling", time.time()
            self._count("cancels")
        return web.json_response(self._openai_json(b))

    # -- Anthropic message batches --------------------------------------------------------------------------------

    def _anthropic_json(self, request: web.Request, b: _Batch) -> dict:
        ended = b.state == "ended"
        c = b.counts
        counts = {"processing": 0 if ended else len(b.lines), "succeeded": c.get("ok", 0), "errored": c.get("error", 0),
                  "canceled": c.get("cancelled", 0), "expired": c.get("expired", 0)}
        base = f"{request.scheme}://{request.host}"
        return {
            "id": b.id, "type": "message_batch",
            "processing_status": {"running": "in_progress", "canceling": "canceling"}.get(b.state, "ended"),
            "request_counts": counts, "created_at": _rfc3339(b.created_at), "expires_at": _rfc3339(b.created_at + DAY_S),
            "ended_at": _rfc3339(b.ended_at) if ended else None, "archived_at": None,
            "cancel_initiated_at": _rfc3339(b.cancel_at),
            "results_url": f"{base}/v1/messages/batches/{b.id}/results" if ended else None,
        }

    async def _anthropic_create(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request, "anthropic")) is not None:
            return denied
        cfg = self.config
        try:
            body = json.loads(await request.read())
            reqs = body["requests"]
            if not isinstance(reqs, list) or not reqs:
                raise ValueError("requests must be a non-empty list")
        except (ValueError, KeyError, TypeError) as e:
            return self._error("anthropic", 400, f"bad request: {e}")
        if len(reqs) > cfg.max_lines["anthropic"]:
            return self._error("anthropic", 400, f"a batch takes at most {cfg.max_lines['anthropic']} requests, "
                                                 f"got {len(reqs)}")
        lines, seen = [], set()
        for i, r in enumerate(reqs):
            cid = r.get("custom_id") if isinstance(r, dict) else None
            params = r.get("params") if isinstance(r, dict) else None
            if not isinstance(cid, str) or not _CUSTOM_ID.match(cid):
                return self._error("anthropic", 400, f"requests.{i}.custom_id: must match ^[a-zA-Z0-9_-]{{1,64}}$")
            if cid in seen:
                return self._error("anthropic", 400, f"requests.{i}.custom_id: {cid!r} is used twice")
            if not isinstance(params, dict) or not isinstance(params.get("messages"), list) \
                    or "max_tokens" not in params or "model" not in params:
                return self._error("anthropic", 400, f"requests.{i}.params: model, messages and max_tokens are required")
            if params.get("stream"):
                return self._error("anthropic", 400, f"requests.{i}.params: stream is not allowed in a batch")
            seen.add(cid)
            lines.append((cid, params))
        no = next(self._ids)
        b = _Batch(f"msgbatch_fake{no:06d}", "anthropic", no, lines, self.clock(), time.time())
        with self._lock:
            self.batches[b.id] = b
            self._stats["batches_created"] += 1
            self._stats["lines"] += len(lines)
        return web.json_response(self._anthropic_json(request, b))

    async def _anthropic_retrieve(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request, "anthropic")) is not None:
            return denied
        b = self._get(request, "anthropic")
        if isinstance(b, web.Response):
            return b
        self._advance(b, poll=True)
        return web.json_response(self._anthropic_json(request, b))

    async def _anthropic_cancel(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request, "anthropic")) is not None:
            return denied
        b = self._get(request, "anthropic")
        if isinstance(b, web.Response):
            return b
        if b.state == "running":
            b.state, b.cancel_at = "canceling", time.time()
            self._count("cancels")
        return web.json_response(self._anthropic_json(request, b))

    async def _anthropic_results(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request, "anthropic")) is not None:
            return denied
        b = self._get(request, "anthropic")
        if isinstance(b, web.Response):
            return b
        if b.state != "ended":
            return self._error("anthropic", 404, f"batch {b.id} has not ended; its results are not available yet")
        self._count("downloads")
        data = "".join(json.dumps(r) + "\n" for r in b.results)
        return web.Response(body=data.encode("utf-8"), content_type="application/binary")


__all__ = ["FakeBatchConfig", "FakeBatches", "MAX_LINES"]
