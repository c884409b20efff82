"""The fake LLM server, exercised through the real OpenAI and Anthropic SDKs (retries off).

SDK exceptions observed (openai 3.x, anthropic 2.x) are pinned by the tests below:

- 429  -> ``RateLimitError`` (``e.response.headers["retry-after"]``)
- 500 / 503 -> ``InternalServerError`` (a subclass of ``APIStatusError``; ``e.status_code``); anthropic
  raises its subclass ``ServiceUnavailableError`` for 503
- 200 with a body that is not JSON (content-type application/json) -> a bare ``json.JSONDecodeError``
  (a ``ValueError``, NOT an SDK ``APIError``) from both SDKs: providers must map it themselves
- 200 with ``choices: []`` / ``content: []`` -> no error; an empty list
- no answer within the client timeout -> ``APITimeoutError``
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time

import anthropic
import openai
import pytest

from evoray.testing.fake_server import (
    REWRITE_FINAL_MARKER,
    FakeLLMServer,
    FakeServerConfig,
    Fault,
    clarification_reply,
    default_reply,
    estimate_tokens,
    extract_instruction,
    fetch_stats,
)

KEY = "sk-test-fake-0123456789"
MODEL = "fake-model"

# What each SDK raises on a 200 whose body is not valid JSON (pinned by test_malformed_body).
MALFORMED_ERRORS = {"openai": json.JSONDecodeError, "anthropic": json.JSONDecodeError}


_CLIENTS: list = []  # closed after each test, so no socket outlives its test's event loop


@pytest.fixture(autouse=True)
async def _close_clients():
    yield
    while _CLIENTS:
        client = _CLIENTS.pop()
        result = client.close()
        if asyncio.iscoroutine(result):
            await result


def _track(client):
    _CLIENTS.append(client)
    return client


def oa(srv: FakeLLMServer, timeout: float = 5.0, key: str = KEY) -> openai.OpenAI:
    return _track(openai.OpenAI(base_url=srv.openai_base_url, api_key=key, max_retries=0, timeout=timeout))


def aoa(srv: FakeLLMServer, timeout: float = 5.0) -> openai.AsyncOpenAI:
    return _track(openai.AsyncOpenAI(base_url=srv.openai_base_url, api_key=KEY, max_retries=0, timeout=timeout))


def aan(srv: FakeLLMServer, timeout: float = 5.0) -> anthropic.AsyncAnthropic:
    return _track(anthropic.AsyncAnthropic(base_url=srv.anthropic_base_url, api_key=KEY, max_retries=0,
                                           timeout=timeout))


def an(srv: FakeLLMServer, timeout: float = 5.0) -> anthropic.Anthropic:
    return _track(anthropic.Anthropic(base_url=srv.anthropic_base_url, api_key=KEY, max_retries=0, timeout=timeout))


def ask(client: openai.OpenAI, text: str = "What is 2 + 2?", **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], **kw)


async def aask(client: openai.AsyncOpenAI, text: str = "What is 2 + 2?", **kw):
    return await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], **kw)


async def amsg(client: anthropic.AsyncAnthropic, text: str = "What is 2 + 2?", **kw):
    return await client.messages.create(model=MODEL, max_tokens=64,
                                        messages=[{"role": "user", "content": text}], **kw)


# ------------------------------------------------------------------------------------------------
# Happy paths
# ------------------------------------------------------------------------------------------------


def test_openai_completion_with_usage():
    with FakeLLMServer() as srv:
        prompt = "Explain photosynthesis in one paragraph."
        r = ask(oa(srv), prompt)
        text = r.choices[0].message.content
        assert r.object == "chat.completion" and r.model == MODEL
        assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "stop"
        assert "photosynthesis" in text
        assert r.usage.prompt_tokens == estimate_tokens(prompt)
        assert r.usage.completion_tokens == estimate_tokens(text)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        s = srv.stats()
        assert (s["requests"], s["ok"], s["input_tokens"], s["output_tokens"]) == (
            1, 1, r.usage.prompt_tokens, r.usage.completion_tokens)


async def test_anthropic_system_prompt_and_usage():
    seen = []

    def responder(kind, body):
        seen.append((kind, body))
        return "Paris."

    with FakeLLMServer(responder=responder) as srv:
        system = "You are a terse geography tutor."
        r = await amsg(aan(srv), "Capital of France?", system=system)
        assert r.type == "message" and r.role == "assistant" and r.stop_reason == "end_turn"
        assert [b.type for b in r.content] == ["text"] and r.content[0].text == "Paris."
        assert r.usage.input_tokens == estimate_tokens(system) + estimate_tokens("Capital of France?")
        assert r.usage.output_tokens == estimate_tokens("Paris.")
        kind, body = seen[0]
        assert kind == "anthropic" and body["system"] == system
        assert srv.stats()["per_endpoint"] == {"/v1/messages": 1}


async def test_default_rating_reply_through_anthropic():
    with FakeLLMServer() as srv:
        r = await amsg(aan(srv), "Please rate the accuracy of the response. Give a score on a scale of 0 to 5.",
                       system="You are a helpful and precise assistant for checking the quality of the answer.")
        assert r.content[0].text.splitlines()[0] == "4.5"


def test_json_schema_reply_parses():
    schema = {"type": "object", "properties": {"score": {"type": "number"}, "explanation": {"type": "string"}},
              "required": ["score", "explanation"], "additionalProperties": False}
    with FakeLLMServer() as srv:
        r = ask(oa(srv), "Rate this.", response_format={
            "type": "json_schema", "json_schema": {"name": "rating", "schema": schema, "strict": True}})
        data = json.loads(r.choices[0].message.content)
        assert data["score"] == 4.5 and isinstance(data["explanation"], str)
        other = {"type": "object", "properties": {"winner": {"type": "string", "enum": ["a", "b"]},
                                                  "n": {"type": "integer"}}}
        r = ask(oa(srv), "Pick.",
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": other}})
        assert json.loads(r.choices[0].message.content) == {"winner": "a", "n": 1}
        r = ask(oa(srv), "Answer in JSON.", response_format={"type": "json_object"})
        assert isinstance(json.loads(r.choices[0].message.content), dict)


async def test_anthropic_structured_output_and_forced_tool():
    schema = {"type": "object", "properties": {"score": {"type": "number"}}}
    with FakeLLMServer() as srv:
        r = await amsg(aan(srv), "Rate this.", tools=[{"name": "rate", "description": "d", "input_schema": schema}],
                       tool_choice={"type": "tool", "name": "rate"})
        assert r.stop_reason == "tool_use" and r.content[0].type == "tool_use"
        assert r.content[0].name == "rate" and r.content[0].input["score"] == 4.5
        r = await amsg(aan(srv), "Rate this.", output_config={"format": {"type": "json_schema", "schema": schema}})
        assert r.stop_reason == "end_turn" and json.loads(r.content[0].text)["score"] == 4.5


def test_scripted_replies_and_faults_in_order():
    with FakeLLMServer() as srv:
        srv.script([Fault.ERROR_503, "first", {"score": 5}])
        client = oa(srv)
        with pytest.raises(openai.InternalServerError) as e:
            ask(client)
        assert e.value.status_code == 503
        assert ask(client).choices[0].message.content == "first"
        assert json.loads(ask(client).choices[0].message.content) == {"score": 5}
        assert srv.pending_script() == 0
        assert "2 + 2" in ask(client).choices[0].message.content  # back to the default responder


# ------------------------------------------------------------------------------------------------
# Failures, as the SDKs see them
# ------------------------------------------------------------------------------------------------


async def test_burst_over_rpm_gets_429_with_retry_after():
    # 120 rpm with a 1 s burst: the bucket holds 2 requests.
    with FakeLLMServer(FakeServerConfig(rpm=120, retry_after_s=1.5)) as srv:
        client = aoa(srv)
        results = await asyncio.gather(*(aask(client) for _ in range(6)), return_exceptions=True)
        limited = [r for r in results if isinstance(r, openai.RateLimitError)]
        ok = [r for r in results if not isinstance(r, Exception)]
        assert len(ok) + len(limited) == 6 and len(ok) in (2, 3), results  # 3 only if the burst took > 0.5 s
        e = limited[0]
        assert e.status_code == 429
        assert e.response.headers["retry-after"] == "2"  # ceil(1.5)
        assert e.response.headers["retry-after-ms"] == "1500"
        assert e.body["type"] == "rate_limit_error"
        s = fetch_stats(srv.url)  # over HTTP, as another process would
        assert (s["requests"], s["ok"], s["rate_limited"]) == (6, len(ok), len(limited))
        assert s["max_rps_1s"] == 6

        # Anthropic shape on /v1/messages; retry_after_s=None sends the window's exact wait.
        srv.update(retry_after_s=None)
        aclient = aan(srv)
        results = await asyncio.gather(*(amsg(aclient) for _ in range(4)), return_exceptions=True)
        limited = [r for r in results if isinstance(r, anthropic.RateLimitError)]
        assert limited, results
        ae = limited[0]
        assert ae.body["type"] == "error" and ae.body["error"]["type"] == "rate_limit_error"
        wait_ms = int(ae.response.headers["retry-after-ms"])
        # a strict window: room again once the oldest arrivals leave it (the rejected ones count too)
        assert 0 < wait_ms <= 1000
        assert ae.response.headers["retry-after"] == "1"
        assert srv.stats()["rate_limited"] == s["rate_limited"] + len(limited)


async def test_bucket_mode_is_the_lenient_token_bucket():
    # 120 rpm with a 1 s burst: the bucket holds 2 requests and refills one every 0.5 s
    with FakeLLMServer(FakeServerConfig(rpm=120, limit_mode="bucket", retry_after_s=None)) as srv:
        client = aoa(srv)
        results = await asyncio.gather(*(aask(client) for _ in range(4)), return_exceptions=True)
        limited = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert len(limited) >= 2
        wait_ms = int(limited[0].response.headers["retry-after-ms"])
        assert 0 < wait_ms <= 500  # a bucket refills continuously: the next fits within 0.5 s


async def test_tpm_bucket_limits_tokens():
    # 600 tpm = 10 tokens/s, 1 s burst -> 10 tokens; a 40-char prompt + reply does not fit twice.
    with FakeLLMServer(FakeServerConfig(tpm=600), responder=lambda k, b: "x" * 16) as srv:
        client = aoa(srv)
        await aask(client, "a" * 20)  # 6 + 5 = 11 tokens > capacity: admitted on a full bucket
        with pytest.raises(openai.RateLimitError):
            await aask(client, "a" * 20)
        assert srv.stats()["rate_limited"] == 1


@pytest.mark.parametrize("status", [500, 503])
async def test_injected_server_errors(status):
    with FakeLLMServer(FakeServerConfig(error_rate=1.0, error_statuses=(status,))) as srv:
        with pytest.raises(openai.InternalServerError) as e:
            await aask(aoa(srv))
        assert isinstance(e.value, openai.APIStatusError) and e.value.status_code == status
        with pytest.raises(anthropic.InternalServerError) as ae:
            await amsg(aan(srv))
        assert isinstance(ae.value, anthropic.APIStatusError) and ae.value.status_code == status
        if status == 503:
            assert type(ae.value) is anthropic.ServiceUnavailableError
        assert srv.stats()["errors"] == 2 and srv.stats()["ok"] == 0


def test_error_rate_mixes_500_and_503():
    with FakeLLMServer(FakeServerConfig(error_rate=0.5, seed=1)) as srv:
        statuses = []
        client = oa(srv)
        for _ in range(20):
            try:
                ask(client)
                statuses.append(200)
            except openai.InternalServerError as e:
                statuses.append(e.status_code)
        assert set(statuses) == {200, 500, 503}
        assert srv.stats()["errors"] == statuses.count(500) + statuses.count(503)


async def test_malformed_body():
    with FakeLLMServer(FakeServerConfig(malformed_rate=1.0)) as srv:
        with pytest.raises(Exception) as e:
            await aask(aoa(srv))
        assert type(e.value) is MALFORMED_ERRORS["openai"] and not isinstance(e.value, openai.APIError)
        with pytest.raises(Exception) as ae:
            await amsg(aan(srv))
        assert type(ae.value) is MALFORMED_ERRORS["anthropic"] and not isinstance(ae.value, anthropic.APIError)
        assert srv.stats()["malformed"] == 2


async def test_empty_choices_and_empty_content():
    with FakeLLMServer(FakeServerConfig(empty_choices_rate=1.0)) as srv:
        r = await aask(aoa(srv))
        assert r.choices == [] and r.usage.completion_tokens == 0
        m = await amsg(aan(srv))
        assert m.content == [] and m.usage.output_tokens == 0
        s = srv.stats()
        assert (s["empty"], s["ok"], s["output_tokens"]) == (2, 0, 0)


async def test_hang_makes_sdk_time_out_and_stop_is_quick():
    srv = FakeLLMServer(FakeServerConfig(hang_rate=1.0, hang_s=5.0)).start()
    try:
        t0 = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            await aask(aoa(srv, timeout=0.3))
        with pytest.raises(anthropic.APITimeoutError):
            await amsg(aan(srv, timeout=0.3))
        assert time.monotonic() - t0 < 2.0
        assert srv.stats()["hangs"] == 2
    finally:
        t0 = time.monotonic()
        srv.stop()
        assert time.monotonic() - t0 < 2.0  # hanging handlers are released, not awaited for hang_s


def test_wrong_key_gets_401_without_echoing_it():
    with FakeLLMServer(FakeServerConfig(required_key="sk-right")) as srv:
        with pytest.raises(openai.AuthenticationError) as e:
            ask(oa(srv))
        assert e.value.status_code == 401 and KEY not in json.dumps(e.value.body) and KEY not in str(e.value)
        with pytest.raises(anthropic.AuthenticationError) as ae:
            an(srv).messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        assert KEY not in json.dumps(ae.value.body)
        assert ask(oa(srv, key="sk-right")).choices
        assert srv.stats()["unauthorized"] == 2 and srv.stats()["ok"] == 1


def test_broken_responder_is_a_500_that_names_it():
    def responder(kind, body):
        raise KeyError("oops")

    with FakeLLMServer(responder=responder) as srv:
        with pytest.raises(openai.InternalServerError, match="responder raised KeyError"):
            ask(oa(srv))
        assert srv.stats()["responder_errors"] == 1


def test_latency_is_applied():
    with FakeLLMServer(FakeServerConfig(latency_s=0.2, latency_dist="fixed")) as srv:
        t0 = time.monotonic()
        ask(oa(srv))
        assert time.monotonic() - t0 >= 0.19


# ------------------------------------------------------------------------------------------------
# Stats, control, lifecycle
# ------------------------------------------------------------------------------------------------


async def test_stats_count_what_was_sent():
    with FakeLLMServer() as srv:
        client, aclient = aoa(srv), aan(srv)
        await asyncio.gather(*(aask(client) for _ in range(3)), *(amsg(aclient) for _ in range(2)))
        srv.script([Fault.MALFORMED, Fault.RATE_LIMITED, Fault.HANG])
        for _ in range(2):
            with pytest.raises(Exception):
                await aask(client)
        with pytest.raises(anthropic.APITimeoutError):
            await amsg(aan(srv, timeout=0.2))
        s = srv.stats()
        assert s["requests"] == 8 and s["ok"] == 5
        assert (s["malformed"], s["rate_limited"], s["hangs"], s["errors"]) == (1, 1, 1, 0)
        assert s["per_endpoint"] == {"/v1/chat/completions": 5, "/v1/messages": 3}
        assert len(s["times"]) == 8 and s["first_request_t"] <= s["last_request_t"]
        assert s["input_tokens"] > 0 and s["output_tokens"] > 0
        assert s["max_rps_1s"] == 8
        srv.reset_stats()
        assert srv.stats()["requests"] == 0 and srv.stats()["times"] == []


def test_update_rpm_at_run_time():
    with FakeLLMServer() as srv:
        client = oa(srv)
        for _ in range(5):
            ask(client)
        srv.update(rpm=60)  # a 1-request bucket
        ask(client)
        with pytest.raises(openai.RateLimitError):
            ask(client)
        srv.update(rpm=None)
        ask(client)
        assert srv.config.rpm is None
        with pytest.raises(TypeError, match="rpn"):
            srv.update(rpn=1)
        with pytest.raises(ValueError):
            srv.update(error_rate=2.0)


def test_two_servers_get_distinct_ports_and_stop_frees_the_port():
    a, b = FakeLLMServer().start(), FakeLLMServer().start()
    try:
        assert a.url != b.url
        assert ask(oa(a)).choices and ask(oa(b)).choices
        assert a.stats()["requests"] == 1 and b.stats()["requests"] == 1
    finally:
        b.stop()
    port = a.port
    a.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    with FakeLLMServer(port=port) as again:  # the same port can be served again
        assert again.port == port and ask(oa(again)).choices


def test_other_process_reaches_server_by_url():
    with FakeLLMServer() as srv:
        code = (
            "import json, sys, urllib.request\n"
            "url = sys.argv[1]\n"
            "body = json.dumps({'model': 'm', 'messages': [{'role': 'user', 'content': 'hi'}]}).encode()\n"
            "req = urllib.request.Request(url + '/v1/chat/completions', body, {'Content-Type': 'application/json'})\n"
            "print(json.loads(urllib.request.urlopen(req).read())['choices'][0]['message']['content'][:4])\n"
            "print(json.loads(urllib.request.urlopen(url + '/health').read())['status'])\n"
        )
        out = subprocess.run([sys.executable, "-c", code, srv.url], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["Here", "ok"]
        assert srv.stats()["requests"] == 1


# ------------------------------------------------------------------------------------------------
# default_reply heuristics (no server)
# ------------------------------------------------------------------------------------------------


def u(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_default_reply_recognises_prompts():
    data = json.loads(default_reply(u("x"), {"type": "object", "properties": {"score": {"type": "number"}}}))
    assert data["score"] == 4.5 and isinstance(data["explanation"], str)
    judge = "[Assistant 1]\nfoo\n[Assistant 2]\nbar\nRate each assistant with a score from 1 to 10."
    assert default_reply(u(judge)).split("\n")[0] == "8 7"
    rating = ("We would like to request your feedback on the performance of AI assistant. Please rate "
              "according to the accuracy. Each assistant receives a score on a scale of 0 to 5.")
    assert default_reply(u(rating)).startswith("4.5\n")
    evolve = ("You are an Instruction Rewriter that rewrites the given #Instruction# into a more complex "
              "version.\n#Instruction#: Name three primes.\n\nPlease reply strictly in the following format:\n"
              "Step 1 #Methods List#:\nStep 2 #Plan#:\nStep 3 #Rewritten Instruction#:\n"
              "Step 4 #Finally Rewritten Instruction#:")
    reply = default_reply(u(evolve))
    last = reply.split(REWRITE_FINAL_MARKER)[-1].strip()
    assert last.startswith("Name three primes.") and len(last) > len("Name three primes.")
    optimizer = ("You are an Instruction Method Optimizer. Based on the feedback, optimize the Evolving Method "
                 "below.\n**Current Method**: You are an Instruction Rewriter ... #Instruction# ...")
    reply = default_reply(u(optimizer))
    assert reply.count("```") == 2 and "#Finally Rewritten Instruction#" in reply
    assert default_reply(u("How do tides work?")).startswith("Here is a clear answer to: How do tides work?")
    assert default_reply(u("Generate an accurate list from 0 to 5.")).startswith("Here is")  # not 'rate'
    assert clarification_reply() == "Sure, could you please provide the details?"


def test_extract_instruction_forms():
    assert extract_instruction("<instruction>\nSort a list.\n</instruction>") == "Sort a list."
    assert extract_instruction("#The Given Prompt#:\nWrite a haiku.\n#Rewritten Prompt#:") == "Write a haiku."
    assert extract_instruction("Rewrite it.\nInstruction: Add two numbers.\n\nPlease reply.") == "Add two numbers."
    assert extract_instruction("Rewrite this.\n\nTranslate 'cat' to French.") == "Translate 'cat' to French."


# ------------------------------------------------------------------------------------------------
# Strict limits, rate-limit headers, transport faults
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count_rejected", [True, False])
def test_strict_window_counts_rejected_requests(count_rejected):
    """120 rpm = 2 in any second. A client that keeps asking every 0.3 s after the window filled is
    refused for as long as it keeps asking when rejected requests count; otherwise it gets through
    once the first two leave the window."""
    with FakeLLMServer(FakeServerConfig(rpm=120, count_rejected=count_rejected)) as srv:
        client = oa(srv)
        ask(client)
        ask(client)
        outcomes = []
        for _ in range(6):
            try:
                ask(client)
                outcomes.append("ok")
            except openai.RateLimitError:
                outcomes.append("429")
            time.sleep(0.3)
        if count_rejected:
            assert outcomes == ["429"] * 6
        else:
            assert outcomes[0] == "429" and "ok" in outcomes[3:]


def test_window_admits_exactly_the_allowance_in_any_window():
    with FakeLLMServer(FakeServerConfig(rpm=600)) as srv:  # 10 in any second
        client = oa(srv)
        results = []
        for _ in range(14):
            try:
                ask(client)
                results.append(True)
            except openai.RateLimitError:
                results.append(False)
        assert results[:10] == [True] * 10 and not any(results[10:])


def test_openai_and_anthropic_rate_limit_headers():
    from evoray.providers.base import rate_limit_info

    cfg = FakeServerConfig(rpm=600, tpm=60_000, advertised_rpm=1200)
    with FakeLLMServer(cfg) as srv:
        raw = oa(srv).chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}])
        h = raw.headers
        assert h["x-ratelimit-limit-requests"] == "1200"  # announced; the server enforces 600
        assert h["x-ratelimit-limit-tokens"] == "60000"
        info = rate_limit_info(h)
        assert info["remaining_requests"] == 540  # 9 of 10 left in the window, per minute
        assert 0.9 <= info["reset_requests_s"] <= 1.0
        araw = an(srv).messages.with_raw_response.create(model=MODEL, max_tokens=16,
                                                         messages=[{"role": "user", "content": "hi"}])
        ah = araw.headers
        assert ah["anthropic-ratelimit-requests-limit"] == "1200"
        assert ah["anthropic-ratelimit-requests-reset"].endswith("Z")
        ainfo = rate_limit_info(ah)
        assert ainfo["remaining_requests"] == 480 and 0.5 <= ainfo["reset_requests_s"] <= 1.0
        srv.update(rate_limit_headers=False)
        raw = oa(srv).chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert "x-ratelimit-limit-requests" not in raw.headers


def test_retry_after_as_an_http_date():
    from evoray.providers.base import retry_after_from_headers

    cfg = FakeServerConfig(rpm=60, retry_after_s=3.0, retry_after_format="http-date", retry_after_ms=False)
    with FakeLLMServer(cfg) as srv:
        client = oa(srv)
        ask(client)
        with pytest.raises(openai.RateLimitError) as e:
            ask(client)
        value = e.value.response.headers["retry-after"]
        assert value.endswith("GMT") and "retry-after-ms" not in e.value.response.headers
        assert 2.0 <= retry_after_from_headers(e.value.response.headers) <= 4.0


def test_reset_connections_and_trickled_bodies():
    with FakeLLMServer(FakeServerConfig(reset_rate=1.0)) as srv:
        with pytest.raises(openai.APIConnectionError):
            ask(oa(srv))
        assert srv.stats()["resets"] == 1 and srv.stats()["ok"] == 0
    with FakeLLMServer(FakeServerConfig(trickle_s=0.6)) as srv:
        t0 = time.monotonic()
        out = ask(oa(srv))
        assert time.monotonic() - t0 >= 0.5 and out.choices[0].message.content
        assert srv.stats()["trickled"] == 1
        # the SDK's timeout bounds each read, not the whole answer: a trickle never trips it (evoray's
        # own per-request timeout does, see test_rate_headers.py)
        t0 = time.monotonic()
        ask(oa(srv, timeout=0.2))
        assert time.monotonic() - t0 >= 0.5


def test_strict_options_are_validated():
    for bad in (dict(limit_mode="leaky"), dict(retry_after_format="minutes"), dict(window_s=0),
                dict(advertised_rpm=-1), dict(reset_rate=2.0)):
        with pytest.raises(ValueError):
            FakeServerConfig(**bad).validate()
# Server profiles and dead ends
# ------------------------------------------------------------------------------------------------

from evoray.testing.fake_server import PROFILES, DeadEndServer, unused_port  # noqa: E402

SCORE_SCHEMA = {"type": "object", "properties": {"score": {"type": "number"}}, "required": ["score"]}


def test_llama_cpp_python_profile_rejects_json_schema_with_its_500_validation_body():
    with FakeLLMServer(FakeServerConfig(profile="llama_cpp_python")) as srv:
        c = oa(srv)
        with pytest.raises(openai.InternalServerError) as ei:
            ask(c, response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": SCORE_SCHEMA}})
        body = ei.value.body
        assert ei.value.status_code == 500 and body["type"] == "internal_server_error"
        assert "literal_error" in body["message"] and "'input': 'json_schema'" in body["message"]
        # json_object with the schema beside it is what this server turns into a grammar
        r = ask(c, response_format={"type": "json_object", "schema": SCORE_SCHEMA})
        assert json.loads(r.choices[0].message.content)["score"] == 4.5
        assert srv.stats()["profile_rejected"] == 1 and srv.stats()["ok"] == 1


def test_profiles_differ_where_the_real_servers_do():
    with FakeLLMServer(FakeServerConfig(profile="ollama")) as srv:
        c = oa(srv)
        # Ollama reads json_schema, and turns json_object into "any JSON" (the schema beside it is ignored)
        r = ask(c, response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": SCORE_SCHEMA}})
        assert "score" in json.loads(r.choices[0].message.content)
        r = ask(c, response_format={"type": "json_object", "schema": SCORE_SCHEMA})
        assert "score" not in json.loads(r.choices[0].message.content)
    with FakeLLMServer(FakeServerConfig(profile="llama_cpp_2024")) as srv:
        with pytest.raises(openai.InternalServerError) as ei:
            ask(oa(srv), response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": SCORE_SCHEMA}})
        assert "must be one of" in ei.value.body["message"]
    with FakeLLMServer(FakeServerConfig(profile="openai_reasoning")) as srv:
        with pytest.raises(openai.BadRequestError) as ei:
            ask(oa(srv), max_tokens=5)
        assert ei.value.body["param"] == "max_tokens"
        assert ask(oa(srv), max_completion_tokens=5).choices[0].message.content
    with pytest.raises(ValueError, match="profile"):
        FakeServerConfig(profile="nonesuch").validate()
    assert all(p.source for p in PROFILES.values())


def test_dead_end_servers_reset_or_stay_silent():
    with DeadEndServer("reset") as dead:
        with pytest.raises(openai.APIConnectionError):
            ask(_track(openai.OpenAI(base_url=dead.url, api_key=KEY, max_retries=0, timeout=5)))
        assert dead.connections >= 1
    with DeadEndServer("silent") as dead:
        with pytest.raises(openai.APITimeoutError):
            ask(_track(openai.OpenAI(base_url=dead.url, api_key=KEY, max_retries=0, timeout=0.3)))
    with pytest.raises(openai.APIConnectionError):
        ask(_track(openai.OpenAI(base_url=f"http://127.0.0.1:{unused_port()}/v1", api_key=KEY, max_retries=0)))
