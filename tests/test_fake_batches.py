"""The fake server's batch endpoints through the real openai and anthropic SDKs (retries off)."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from evoray.testing.fake_server import FakeLLMServer, default_reply

KEY = "sk-test-batches-0123456789"
BODY = {"model": "fake-model", "max_tokens": 32,
        "messages": [{"role": "user", "content": "Rate the answer on a scale of 0 to 5."}]}


@pytest.fixture
def srv():
    with FakeLLMServer() as s:
        yield s


def _jsonl(ids, body=BODY, url="/v1/chat/completions") -> bytes:
    return "".join(json.dumps({"custom_id": c, "method": "POST", "url": url, "body": body}) + "\n" for c in ids).encode()


async def test_openai_file_batch_output_and_error_files(srv):
    srv.batches.update(polls_to_complete=2, line_outcome=lambda kind, cid, no: "error" if cid == "b" else "ok")
    async with openai.AsyncOpenAI(base_url=srv.openai_base_url, api_key=KEY, max_retries=0) as c:
        f = await c.files.create(file=("in.jsonl", _jsonl(["a", "b", "c"]), "application/jsonl"), purpose="batch")
        assert f.purpose == "batch" and f.bytes > 0
        b = await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert b.status == "validating" and b.request_counts.total == 3
        states = [(await c.batches.retrieve(b.id)).status for _ in range(3)]
        assert states == ["in_progress", "completed", "completed"]
        b = await c.batches.retrieve(b.id)
        assert (b.request_counts.completed, b.request_counts.failed) == (2, 1)
        assert b.usage.input_tokens > 0 and b.output_file_id and b.error_file_id
        out = [json.loads(x) for x in (await c.files.content(b.output_file_id)).content.splitlines()]
        err = [json.loads(x) for x in (await c.files.content(b.error_file_id)).content.splitlines()]
    assert sorted(r["custom_id"] for r in out) == ["a", "c"]
    # the answer is the one the same request gets online
    want = default_reply(BODY["messages"])
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in out)
    assert {r["response"]["body"]["choices"][0]["message"]["content"] for r in out} == {want}
    assert [r["custom_id"] for r in err] == ["b"] and err[0]["response"]["status_code"] == 500


async def test_openai_expired_batch_and_merged_error_file(srv):
    srv.batches.update(expire=True, expire_done_share=0.5, error_file=False)
    async with openai.AsyncOpenAI(base_url=srv.openai_base_url, api_key=KEY, max_retries=0) as c:
        f = await c.files.create(file=("in.jsonl", _jsonl(list("abcd")), "application/jsonl"), purpose="batch")
        b = await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        b = await c.batches.retrieve(b.id)
        assert b.status == "expired" and b.expired_at
        out = [json.loads(x) for x in (await c.files.content(b.output_file_id)).content.splitlines()]
        err = [json.loads(x) for x in (await c.files.content(b.error_file_id)).content.splitlines()]
    assert [r["custom_id"] for r in out] == ["a", "b"]
    assert [r["custom_id"] for r in err] == ["c", "d"]
    assert all(r["response"] is None and r["error"]["code"] == "batch_expired" for r in err)


async def test_openai_batch_that_does_not_validate_fails_with_errors(srv):
    async with openai.AsyncOpenAI(base_url=srv.openai_base_url, api_key=KEY, max_retries=0) as c:
        f = await c.files.create(file=("in.jsonl", _jsonl(["a", "a"]), "application/jsonl"), purpose="batch")
        b = await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert b.status == "failed"
        assert b.errors.data[0].code == "duplicate_custom_id" and b.errors.data[0].line == 2
        other = await c.files.create(file=("x.jsonl", b"{}\n", "application/jsonl"), purpose="fine-tune")
        with pytest.raises(openai.BadRequestError):
            await c.batches.create(input_file_id=other.id, endpoint="/v1/chat/completions", completion_window="24h")
        with pytest.raises(openai.NotFoundError):
            await c.batches.retrieve("batch_nope")


async def test_openai_cancel(srv):
    srv.batches.update(polls_to_complete=5)
    async with openai.AsyncOpenAI(base_url=srv.openai_base_url, api_key=KEY, max_retries=0) as c:
        f = await c.files.create(file=("in.jsonl", _jsonl(["a", "b"]), "application/jsonl"), purpose="batch")
        b = await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert (await c.batches.cancel(b.id)).status == "cancelling"
        b = await c.batches.retrieve(b.id)
        assert b.status == "cancelled"
        err = [json.loads(x) for x in (await c.files.content(b.error_file_id)).content.splitlines()]
    assert {r["error"]["code"] for r in err} == {"batch_cancelled"}


async def test_anthropic_message_batch_results(srv):
    srv.batches.update(polls_to_complete=1, line_outcome=lambda kind, cid, no: {"b": "error", "c": "expired"}.get(cid))
    async with anthropic.AsyncAnthropic(base_url=srv.anthropic_base_url, api_key=KEY, max_retries=0) as c:
        reqs = [{"custom_id": x, "params": {**BODY, "system": "You rate answers."}} for x in "abcd"]
        mb = await c.messages.batches.create(requests=reqs)
        assert mb.processing_status == "in_progress" and mb.request_counts.processing == 4 and mb.results_url is None
        mb = await c.messages.batches.retrieve(mb.id)
        assert mb.processing_status == "ended" and mb.results_url
        assert (mb.request_counts.succeeded, mb.request_counts.errored, mb.request_counts.expired) == (2, 1, 1)
        got = {item.custom_id: item.result async for item in await c.messages.batches.results(mb.id)}
    assert {k: v.type for k, v in got.items()} == {"a": "succeeded", "b": "errored", "c": "expired", "d": "succeeded"}
    assert got["a"].message.content[0].text == default_reply([{"role": "system", "content": "You rate answers."},
                                                              *BODY["messages"]])
    assert got["b"].error.error.type == "api_error"


async def test_anthropic_rejects_bad_custom_ids_and_early_results(srv):
    srv.batches.update(polls_to_complete=3)
    async with anthropic.AsyncAnthropic(base_url=srv.anthropic_base_url, api_key=KEY, max_retries=0) as c:
        with pytest.raises(anthropic.BadRequestError):
            await c.messages.batches.create(requests=[{"custom_id": "a b", "params": BODY}])
        with pytest.raises(anthropic.BadRequestError):
            await c.messages.batches.create(requests=[{"custom_id": "a", "params": BODY}] * 2)
        mb = await c.messages.batches.create(requests=[{"custom_id": "a", "params": BODY}])
        with pytest.raises(anthropic.AnthropicError, match="results_url"):
            await c.messages.batches.results(mb.id)
        assert (await c.messages.batches.cancel(mb.id)).processing_status == "canceling"
        mb = await c.messages.batches.retrieve(mb.id)
        assert mb.processing_status == "ended" and mb.request_counts.canceled == 1


async def test_batch_endpoints_check_the_key():
    with FakeLLMServer() as srv:
        srv.update(required_key=KEY)
        async with openai.AsyncOpenAI(base_url=srv.openai_base_url, api_key="sk-wrong", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                await c.files.create(file=("in.jsonl", _jsonl(["a"]), "application/jsonl"), purpose="batch")
        async with anthropic.AsyncAnthropic(base_url=srv.anthropic_base_url, api_key="sk-wrong", max_retries=0) as c:
            with pytest.raises(anthropic.AuthenticationError):
                await c.messages.batches.create(requests=[{"custom_id": "a", "params": BODY}])
        assert srv.batches.stats()["unauthorized"] == 2


async def test_fake_clock_ends_batches_by_time(srv):
    now = [0.0]
    srv.batches.clock = lambda: now[0]
    srv.batches.update(processing_s=60)
    async with anthropic.AsyncAnthropic(base_url=srv.anthropic_base_url, api_key=KEY, max_retries=0) as c:
        mb = await c.messages.batches.create(requests=[{"custom_id": "a", "params": BODY}])
        assert (await c.messages.batches.retrieve(mb.id)).processing_status == "in_progress"
        now[0] = 61.0
        assert (await c.messages.batches.retrieve(mb.id)).processing_status == "ended"
