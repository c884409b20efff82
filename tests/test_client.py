"""The one retry layer, Retry-After, the cache and failover, against scripted providers (no network)."""

import asyncio
import pickle
import random

import pytest

from evoray.cache import ResponseCache, cache_key
from evoray.client import LLMClient, LocalGate
from evoray.config import ProviderConfig
from evoray.errors import ProviderError, RetriesExhausted
from evoray.gate import Gatekeeper
from evoray.providers.base import Request, classify_status
from evoray.testing.scripted import ScriptedProvider


def make(providers, cache=None):
    sleeps = []

    async def sleep(s):
        sleeps.append(s)

    keeper = Gatekeeper([p.config for p in providers])
    client = LLMClient(providers, LocalGate(keeper), cache=cache, sleep=sleep, rng=random.Random(0))
    return client, sleeps


def prov(name="p", **kw):
    return ScriptedProvider(ProviderConfig(name=name, kind="openai", model="m", **kw))


def err(status, retry_after=None):
    return ProviderError("boom", provider="p", model="m", status=status, retryable=classify_status(status),
                         retry_after=retry_after)


REQ = Request(messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("status", [429, 408, 409, 500, 502, 503, 529, None])
def test_retryable_statuses_are_retried(status):
    p = prov(max_attempts=3)
    p.enqueue(err(status), err(status), "ok")
    client, sleeps = make([p])
    out = asyncio.run(client.complete(REQ))
    assert out.text == "ok" and out.attempts == 3
    assert len(p.history) == 3 and len(sleeps) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_other_statuses_fail_at_once(status):
    p = prov(max_attempts=5)
    p.enqueue(err(status), "never")
    client, sleeps = make([p])
    with pytest.raises(ProviderError) as ei:
        asyncio.run(client.complete(REQ))
    assert ei.value.status == status
    assert len(p.history) == 1 and sleeps == []


def test_retry_after_is_honoured_and_backoff_is_jittered_exponential():
    p = prov(max_attempts=5, backoff_base_s=1.0, backoff_max_s=60)
    p.enqueue(err(429, retry_after=12.5), err(500), err(500), "ok")
    client, sleeps = make([p])
    asyncio.run(client.complete(REQ))
    assert sleeps[0] == 12.5
    assert 0 <= sleeps[1] <= 2.0 and 0 <= sleeps[2] <= 4.0


def test_exhausted_retries_name_the_last_cause():
    p = prov(max_attempts=2)
    p.enqueue(err(503), err(503))
    client, _ = make([p])
    with pytest.raises(RetriesExhausted) as ei:
        asyncio.run(client.complete(REQ))
    assert ei.value.attempts == 2 and "503" in str(ei.value)
    pickle.loads(pickle.dumps(ei.value))  # crosses Ray


def test_provider_error_pickles_with_its_fields():
    e = err(429, retry_after=3.0)
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.status, e2.retry_after, e2.retryable, str(e2)) == (429, 3.0, True, str(e))


def test_repeated_request_is_a_cache_hit(tmp_path):
    p = prov()
    p.enqueue("first")
    cache = ResponseCache(tmp_path)
    client, _ = make([p], cache=cache)
    a = asyncio.run(client.complete(REQ))
    b = asyncio.run(client.complete(REQ))
    assert (a.text, a.cached, b.text, b.cached) == ("first", False, "first", True)
    assert len(p.history) == 1
    asyncio.run(client.flush(force=True))
    led = client.gate.keeper.ledger.to_dict()["total"]
    assert (led["cache_hits"], led["requests"], led["succeeded"]) == (1, 1, 1)


def test_cache_key_covers_what_changes_the_answer_only():
    base = cache_key("openai", "m", REQ)
    assert cache_key("openai", "m2", REQ) != base
    assert cache_key("openai", "m", Request(messages=REQ.messages, temperature=0.7)) != base
    assert cache_key("openai", "m", Request(messages=REQ.messages, sample_index=1)) != base
    assert cache_key("openai", "m", Request(messages=REQ.messages, json_schema={"type": "object"})) != base
    assert cache_key("openai", "m", Request(messages=list(REQ.messages))) == base


def test_failover_moves_requests_to_the_healthy_provider():
    bad = prov("bad", failures_before_cooldown=2, cooldown_s=600, max_attempts=4)
    good = prov("good", max_attempts=4)
    bad.responder = lambda r: (_ for _ in ()).throw(err(500))
    good.responder = lambda r: "fine"
    client, _ = make([bad, good])

    async def main():
        return [await client.complete(Request(messages=[{"role": "user", "content": str(i)}])) for i in range(20)]

    outs = asyncio.run(main())
    assert all(o.provider == "good" and o.text == "fine" for o in outs)
    assert len(bad.history) <= 2  # cooled down after two failures


def test_cache_key_separates_sources_and_structured_output_modes():
    base = cache_key("openai", "m", REQ, source="http://a:1/v1")
    assert cache_key("openai", "m", REQ, source="http://b:1/v1") != base
    assert cache_key("openai", "m", REQ, source="http://a:1/v1", variant="so=json_object") != base
    assert cache_key("openai", "m", REQ, source="http://a:1/v1") == base


def test_cache_is_not_reused_across_base_urls_unless_one_namespace_is_named(tmp_path):
    cache = ResponseCache(tmp_path)
    a = prov("a", base_url="http://server-a:8000/v1")
    a.enqueue("from a")
    client_a, _ = make([a], cache=cache)
    assert asyncio.run(client_a.complete(REQ)).text == "from a"
    # the same config pointed at another server asks that server; it does not reuse a's answer
    b = prov("a", base_url="http://server-b:8000/v1")
    b.enqueue("from b")
    client_b, _ = make([b], cache=cache)
    out = asyncio.run(client_b.complete(REQ))
    assert (out.text, out.cached, len(b.history)) == ("from b", False, 1)
    # a trailing slash or upper-case host is the same server
    a2 = prov("a", base_url="http://SERVER-A:8000/v1/")
    client_a2, _ = make([a2], cache=cache)
    assert asyncio.run(client_a2.complete(REQ)).cached and a2.history == []
    # entries that name one cache_namespace share answers across URLs
    n1 = prov("n", base_url="http://replica-1/v1", cache_namespace="my-vllm")
    n1.enqueue("shared")
    asyncio.run(make([n1], cache=cache)[0].complete(REQ))
    n2 = prov("n", base_url="http://replica-2/v1", cache_namespace="my-vllm")
    hit = asyncio.run(make([n2], cache=cache)[0].complete(REQ))
    assert (hit.text, hit.cached, n2.history) == ("shared", True, [])


# ---- fail fast ------------------------------------------------------------------------------------------

from evoray.errors import ProviderHalted  # noqa: E402
from evoray.failfast import FailFast, halt_message, hint, signature  # noqa: E402


def perr(kind, status=None, detail="nope", retryable=None):
    e = ProviderError(detail, provider="p", model="m", status=status, kind=kind,
                      retryable=classify_status(status) if retryable is None else retryable)
    return e


def test_signature_only_for_deterministic_failures():
    assert signature(perr("refused", None, "connection refused by h:1"))
    assert signature(perr("dns")) and signature(perr("tls"))
    assert signature(perr("client", 401, "Incorrect API key")) and signature(perr("client", 404, "model x not found"))
    assert signature(perr("validation", 500, "1 validation error: Input should be 'text'"))
    for transient in (perr("rate_limit", 429), perr("server", 503), perr("timeout"), perr("reset"),
                      perr("client", 408), perr("client", 409), perr("malformed")):
        assert signature(transient) is None, transient.kind
    # a failure that belongs to one row's content is not the provider's fault
    assert signature(perr("client", 400, "This model's maximum context length is 2048 tokens")) is None
    # digits (ids, token counts) do not make two errors different
    assert signature(perr("client", 400, "bad request id 123")) == signature(perr("client", 400, "bad request id 98"))


def test_failfast_trips_on_n_same_failures_before_any_success():
    ff = FailFast(after=3, window=5)
    refused = perr("refused", None, "connection refused by h:1")
    assert [ff.record(refused) for _ in range(3)] == [None, None, "first"]
    ff = FailFast(after=3, window=5)
    # transient failures in between break the run; a different deterministic error does too
    seq = [refused, perr("server", 503), refused, perr("client", 401, "bad key"), refused, refused]
    assert [ff.record(e) for e in seq] == [None] * 6
    assert ff.record(refused) == "first"


def test_failfast_after_a_success_needs_a_full_window():
    ff = FailFast(after=3, window=5)
    ff.record(None)
    bad = perr("client", 404, "model gone")
    assert [ff.record(bad) for _ in range(4)] == [None] * 4
    assert ff.record(bad) == "window"
    assert ff.record(bad) is None  # trips once
    off = FailFast(after=0, window=0)
    assert all(off.record(bad) is None for _ in range(50))


def test_hint_names_the_config_key():
    cfg = ProviderConfig(name="srv", kind="openai", model="m", base_url="http://h/v1")
    assert "providers[srv].base_url" in hint(perr("refused"), cfg)
    assert "OPENAI_API_KEY" in hint(perr("client", 401, "Incorrect API key"), cfg)
    assert "structured_output" in hint(perr("validation", 500, "('body', 'response_format', 'type')"), cfg)
    assert "max_tokens_field" in hint(perr("client", 400, "Unsupported parameter: 'max_tokens'"), cfg)
    assert "providers[srv].model" in hint(perr("client", 404, "The model `x` does not exist"), cfg)
    msg = halt_message(perr("client", 401, "Incorrect API key provided"), cfg, "first", 3)
    assert "provider 'srv'" in msg and "Incorrect API key provided" in msg and "HTTP 401" in msg and "resume" in msg


def test_client_halts_after_n_refused_connections_without_waiting_out_the_retries():
    p = prov(max_attempts=6, fail_fast_after=3)
    refused = perr("refused", None, "connection refused by h:1", retryable=True)
    p.responder = lambda r: (_ for _ in ()).throw(refused)
    client, sleeps = make([p])

    async def main():
        return await asyncio.gather(*(client.complete(Request(messages=[{"role": "user", "content": str(i)}]))
                                      for i in range(5)), return_exceptions=True)

    outs = asyncio.run(main())
    assert all(isinstance(o, ProviderHalted) for o in outs)
    assert "connection refused" in str(outs[0]) and "providers[p].base_url" in str(outs[0])
    # five rows in flight: each sent its first attempt, then the rule tripped; nobody retried 6 times
    assert len(p.history) <= 5 + 3
    assert client.gate.keeper.halted["p"] == str(outs[0])
    # a later request is refused at once, without sending anything
    n = len(p.history)
    with pytest.raises(ProviderHalted):
        asyncio.run(client.complete(REQ))
    assert len(p.history) == n


def test_halted_provider_leaves_the_others_working():
    bad = prov("bad", max_attempts=3, fail_fast_after=2)
    good = prov("good", max_attempts=3)
    bad.responder = lambda r: (_ for _ in ()).throw(perr("client", 401, "Incorrect API key", retryable=False))
    good.responder = lambda r: "fine"
    client, _ = make([bad, good])

    async def main():
        outs = []
        for i in range(12):
            try:
                outs.append(await client.complete(Request(messages=[{"role": "user", "content": str(i)}])))
            except ProviderError as e:
                outs.append(e)
        return outs

    outs = asyncio.run(main())
    assert "bad" in client.halted and len(bad.history) == 2
    assert all(o.text == "fine" for o in outs[-6:])


def test_another_actors_halt_reaches_this_client_through_the_gate():
    p1, p2 = prov("p"), prov("p")
    keeper = Gatekeeper([p1.config])
    c1 = LLMClient([p1], LocalGate(keeper), sleep=lambda s: asyncio.sleep(0))
    c2 = LLMClient([p2], LocalGate(keeper), sleep=lambda s: asyncio.sleep(0))
    p1.responder = lambda r: (_ for _ in ()).throw(perr("dns", None, "host does not resolve"))
    for _ in range(3):
        with pytest.raises((ProviderError, ProviderHalted, RetriesExhausted)):
            asyncio.run(c1.complete(REQ))
    assert "p" in keeper.halted
    asyncio.run(c2.flush(force=True))
    with pytest.raises(ProviderHalted):
        asyncio.run(c2.complete(REQ))
    assert p2.history == []


def test_a_long_row_is_not_taken_for_a_capability_or_a_broken_provider():
    from evoray.providers.openai_provider import OpenAIProvider

    p = OpenAIProvider(ProviderConfig(name="o", kind="openai", base_url="http://h/v1"), environ={"OPENAI_API_KEY": "k"})
    r = Request(messages=[{"role": "user", "content": "x"}], json_schema={"type": "object"})
    too_long = perr("client", 400, "the request exceeds the available context size, try increasing it")
    assert p.adapt(too_long, p.wire_state(r), r) is None and p.choices["structured_output"] == "json_schema"
    assert signature(too_long) is None
    # a bare 400 that names nothing is taken as the server refusing the schema
    assert p.adapt(perr("client", 400, "Bad Request"), p.wire_state(r), r)
    assert p.choices["structured_output"] == "json_object"
