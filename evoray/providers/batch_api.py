"""The providers' batch APIs: OpenAI's Files + Batches and Anthropic's Message Batches.

A :class:`BatchAPI` wraps one provider object and reuses what its online path has: the SDK client
(built lazily in this process, SDK retries off), the error mapping to
:class:`~evoray.errors.ProviderError`, the request body builder (so a batched request is byte for
byte the request the provider would send online) and the reply parser (so a batched answer becomes
the same :class:`~evoray.providers.base.Completion`). It knows nothing of rows, caches, state files
or retries: :mod:`evoray.batch` drives it.

``batch_api(provider)`` is the registry lookup (kind -> class); a kind without a batch API (the
local model) is a :class:`~evoray.errors.ConfigError` that names the provider.

Wire formats (as the installed SDKs read them):

* OpenAI: a JSONL file of ``{"custom_id", "method": "POST", "url": "/v1/chat/completions",
  "body"}`` uploaded with ``purpose=batch``; ``batches.create(input_file_id, endpoint,
  completion_window="24h")``; status ``validating`` / ``in_progress`` / ``finalizing`` /
  ``cancelling`` while it runs and ``completed`` / ``expired`` / ``cancelled`` / ``failed`` at the
  end; the answers are in ``output_file_id`` and the failed, expired and cancelled lines in
  ``error_file_id``. Limits: 50,000 requests and 200 MB a file. When the answer to ``create`` is
  lost (a timeout or a 5xx after the batch was made), the batch is looked up by its input file
  among the newest 100 before the caller retries, so it is not created twice.
* Anthropic: ``messages.batches.create(requests=[{"custom_id", "params"}])`` with ``params`` as
  ``messages.create`` takes them; ``processing_status`` ``in_progress`` / ``canceling`` /
  ``ended``; ``messages.batches.results(id)`` streams ``succeeded`` / ``errored`` / ``expired`` /
  ``canceled`` results. Limits: 100,000 requests and 256 MB a batch; ``custom_id`` matches
  ``^[a-zA-Z0-9_-]{1,64}$``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, ClassVar, Mapping

from ..errors import ConfigError, ProviderError
from .base import Completion, Provider, Request, classify_status
from .sdk import error_detail


@dataclass
class BatchStatus:
    """Where a submitted batch stands."""

    id: str
    state: str  # the provider's own status word
    ended: bool  # nothing more will happen to it
    downloadable: bool = False  # ended with results to read (completed, expired, cancelled)
    total: int = 0
    done: int = 0  # lines finished (answered or failed) so far, when the provider says
    failed: int = 0
    error: str | None = None  # why a batch failed as a whole (a file that did not validate)
    refs: dict[str, Any] = field(default_factory=dict)  # what downloading needs (file ids)


@dataclass
class LineResult:
    """One line's outcome: a Completion, or why it failed (``kind``: errored, expired, cancelled,
    malformed) and whether asking again may help."""

    custom_id: str
    completion: Completion | None = None
    kind: str = ""
    message: str = ""
    status: int | None = None
    retryable: bool = True


class BatchAPI:
    kind: ClassVar[str] = ""
    max_requests: ClassVar[int] = 0
    max_bytes: ClassVar[int] = 0

    def __init__(self, provider: Provider):
        self.provider = provider

    def line(self, custom_id: str, request: Request) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def line_bytes(line: dict[str, Any]) -> int:
        return len(json.dumps(line, ensure_ascii=False).encode("utf-8")) + 1

    async def submit(self, lines: list[dict[str, Any]], metadata: dict[str, str],
                     note: Callable[[dict[str, Any]], None]) -> BatchStatus:  # pragma: no cover - abstract
        """Create the batch. ``note(refs)`` is called with what exists before the batch does (an
        uploaded file id), so a caller can record it."""
        raise NotImplementedError

    async def status(self, batch_id: str) -> BatchStatus:  # pragma: no cover - abstract
        raise NotImplementedError

    async def cancel(self, batch_id: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def results(self, status: BatchStatus, requests: Mapping[str, Request]) -> AsyncIterator[LineResult]:  # pragma: no cover
        """The results of the lines whose custom id is in ``requests`` (others are skipped)."""
        raise NotImplementedError

    def _failed(self, cid: str, kind: str, message: str, status: int | None = None,
                retryable: bool | None = None) -> LineResult:
        if retryable is None:
            retryable = classify_status(status) or status in getattr(self.provider, "extra_retryable", ())
        return LineResult(cid, None, kind, message, status, bool(retryable))


# ---- OpenAI ---------------------------------------------------------------------------------------------

_OPENAI_RUNNING = {"validating", "in_progress", "finalizing", "cancelling"}
_OPENAI_READABLE = {"completed", "expired", "cancelled"}
_OPENAI_LINE_ERRORS = {"batch_expired": "expired", "batch_cancelled": "cancelled"}


class OpenAIBatchAPI(BatchAPI):
    kind = "openai"
    max_requests = 50_000
    max_bytes = 200 * 1000 * 1000
    endpoint = "/v1/chat/completions"

    def line(self, custom_id: str, request: Request) -> dict[str, Any]:
        return {"custom_id": custom_id, "method": "POST", "url": self.endpoint, "body": self.provider.chat_body(request)}

    async def submit(self, lines, metadata, note) -> BatchStatus:
        p = self.provider
        sdk = p._sdk()
        data = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode("utf-8")
        f = await p._call(sdk.files.create, file=("evoray-batch.jsonl", data, "application/jsonl"), purpose="batch")
        note({"input_file_id": f.id})
        try:
            b = await p._call(sdk.batches.create, input_file_id=f.id, endpoint=self.endpoint, completion_window="24h",
                              metadata=metadata or None)
        except ProviderError as e:
            # a timeout or a 5xx may come after the batch was created: find it by its input file
            # rather than create (and pay for) a second one
            if not e.retryable or (found := await self._find(f.id)) is None:
                raise
            b = found
        return self._status(b)

    async def _find(self, input_file_id: str) -> Any:
        """The batch made from ``input_file_id`` among the newest 100, or None."""
        p = self.provider
        try:
            page = await p._call(p._sdk().batches.list, limit=100)
        except ProviderError:
            return None
        return next((b for b in page.data if b.input_file_id == input_file_id), None)

    async def status(self, batch_id: str) -> BatchStatus:
        p = self.provider
        return self._status(await p._call(p._sdk().batches.retrieve, batch_id=batch_id))

    async def cancel(self, batch_id: str) -> None:
        p = self.provider
        await p._call(p._sdk().batches.cancel, batch_id=batch_id)

    def _status(self, b: Any) -> BatchStatus:
        counts = getattr(b, "request_counts", None)
        total = int(getattr(counts, "total", 0) or 0)
        completed = int(getattr(counts, "completed", 0) or 0)
        failed = int(getattr(counts, "failed", 0) or 0)
        error = None
        errs = getattr(getattr(b, "errors", None), "data", None) or []
        if b.status == "failed":
            error = "; ".join(f"{e.code or 'error'}: {e.message}" for e in errs[:5]) or "the batch failed"
        return BatchStatus(b.id, b.status, b.status not in _OPENAI_RUNNING, b.status in _OPENAI_READABLE, total,
                           completed + failed, failed, error,
                           {"output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
                            "input_file_id": b.input_file_id})

    async def results(self, status, requests):
        p = self.provider
        for ref in ("output_file_id", "error_file_id"):
            fid = status.refs.get(ref)
            if not fid:
                continue
            content = await p._call(p._sdk().files.content, file_id=fid)
            for raw in content.content.decode("utf-8").splitlines():
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                    cid = rec["custom_id"]
                except (ValueError, KeyError, TypeError):
                    continue  # not a result line; its request is reported missing by the caller
                req = requests.get(cid)
                if req is None:
                    continue
                yield self._line(cid, rec, req)

    def _line(self, cid: str, rec: dict, req: Request) -> LineResult:
        resp = rec.get("response")
        err = rec.get("error")
        if isinstance(resp, dict):
            code = resp.get("status_code")
            body = resp.get("body")
            if code == 200:
                try:
                    comp = self.provider._completion(json.dumps(body).encode("utf-8"), req.json_schema is not None)
                except ProviderError as e:
                    return self._failed(cid, "malformed", e.message, None, True)
                return LineResult(cid, comp)
            return self._failed(cid, "errored", error_detail(body) or f"HTTP {code}", code)
        if isinstance(err, dict):
            kind = _OPENAI_LINE_ERRORS.get(str(err.get("code")), "errored")
            from ..secrets import redact

            msg = redact(str(err.get("message") or err.get("code") or "failed")[:300])
            return self._failed(cid, kind, msg, None, True)
        return self._failed(cid, "malformed", "a result line with neither response nor error", None, True)


# ---- Anthropic ----------------------------------------------------------------------------------------------

#: the HTTP status each Anthropic error type stands for (their errors page)
_ANTHROPIC_ERROR_STATUS = {
    "invalid_request_error": 400, "authentication_error": 401, "billing_error": 402, "permission_error": 403,
    "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
    "timeout_error": 504, "overloaded_error": 529,
}


class AnthropicBatchAPI(BatchAPI):
    kind = "anthropic"
    max_requests = 100_000
    max_bytes = 256 * 1000 * 1000

    def line(self, custom_id: str, request: Request) -> dict[str, Any]:
        params = self.provider.message_params(request)
        params.update(params.pop("extra_body", None) or {})  # a batch line is the plain JSON body
        return {"custom_id": custom_id, "params": params}

    async def submit(self, lines, metadata, note) -> BatchStatus:
        p = self.provider
        return self._status(await p._call(p._sdk().messages.batches.create, requests=lines))

    async def status(self, batch_id: str) -> BatchStatus:
        p = self.provider
        return self._status(await p._call(p._sdk().messages.batches.retrieve, message_batch_id=batch_id))

    async def cancel(self, batch_id: str) -> None:
        p = self.provider
        await p._call(p._sdk().messages.batches.cancel, message_batch_id=batch_id)

    def _status(self, b: Any) -> BatchStatus:
        c = b.request_counts
        done = int(c.succeeded) + int(c.errored) + int(c.canceled) + int(c.expired)
        ended = b.processing_status == "ended"
        return BatchStatus(b.id, b.processing_status, ended, ended, done + int(c.processing), done,
                           int(c.errored) + int(c.canceled) + int(c.expired), None, {"results_url": b.results_url})

    async def results(self, status, requests):
        p = self.provider

        async def download() -> list:
            return [item async for item in await p._sdk().messages.batches.results(message_batch_id=status.id)]

        for item in await p._call(download):
            req = requests.get(item.custom_id)
            if req is None:
                continue
            yield self._line(item.custom_id, item.result, req)

    def _line(self, cid: str, result: Any, req: Request) -> LineResult:
        kind = getattr(result, "type", "")
        if kind == "succeeded":
            try:
                return LineResult(cid, self.provider.completion_from_message(result.message, req))
            except ProviderError as e:
                return self._failed(cid, "malformed", e.message, None, True)
        if kind == "errored":
            inner = getattr(getattr(result, "error", None), "error", None)
            etype = str(getattr(inner, "type", "") or "api_error")
            from ..secrets import redact

            msg = redact(str(getattr(inner, "message", "") or etype)[:300])
            return self._failed(cid, "errored", msg, _ANTHROPIC_ERROR_STATUS.get(etype, 500))
        if kind in ("expired", "canceled"):
            return self._failed(cid, "expired" if kind == "expired" else "cancelled",
                                f"the request was {kind} before it was processed", None, True)
        return self._failed(cid, "malformed", f"unknown result type {kind!r}", None, True)


BATCH_APIS: dict[str, type[BatchAPI]] = {}


def register_batch_api(kind: str, cls: type[BatchAPI]) -> None:
    if kind in BATCH_APIS:
        raise ValueError(f"a batch API for kind '{kind}' is already registered ({BATCH_APIS[kind].__name__})")
    BATCH_APIS[kind] = cls


register_batch_api("openai", OpenAIBatchAPI)
register_batch_api("anthropic", AnthropicBatchAPI)


def batch_api(provider: Provider) -> BatchAPI:
    """The batch API of ``provider``, or a ConfigError naming it when its kind has none."""
    cls = BATCH_APIS.get(provider.kind)
    if cls is None:
        raise ConfigError(f"provider '{provider.name}' (kind {provider.kind}) has no batch API; batch mode needs "
                          f"kind {' or '.join(sorted(BATCH_APIS))} (set the stage's mode to online)")
    return cls(provider)


__all__ = ["BATCH_APIS", "AnthropicBatchAPI", "BatchAPI", "BatchStatus", "LineResult", "OpenAIBatchAPI", "batch_api",
           "register_batch_api"]
