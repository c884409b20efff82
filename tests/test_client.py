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
