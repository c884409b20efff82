"""Rate-limit state from the providers' replies reaches the key's gate (real SDKs, fake server).

The providers read ``x-ratelimit-*`` / ``anthropic-ratelimit-*`` headers and ``Retry-After`` (seconds,
``retry-after-ms`` or an HTTP-date) from answers and 429s; the client hands them to the gate. Slow
trickled bodies and reset connections are the retry layer's business: named errors, retried.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from evoray.cache import ResponseCache
from evoray.client import LLMClient
from evoray.config import ProviderConfig
from evoray.errors import ProviderError, RetriesExhausted
from evoray.gate import Gatekeeper, LocalGate
from evoray.providers import build_provider
from evoray.providers.base import Request
from evoray.testing.fake_server import FakeLLMServer, FakeServerConfig

KEY = "sk-test-headers-0123456789"
KINDS = ["openai", "anthropic"]


@pytest.fixture(autouse=True)
def _keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)


def config(srv: FakeLLMServer, kind: str, **kw) -> ProviderConfig:
    url = srv.openai_base_url if kind == "openai" else srv.anthropic_base_url
    base = dict(name="main", kind=kind, model="fake-model", base_url=url, timeout_s=5, max_attempts=1)
    base.update(kw)
    return ProviderConfig(**base)


def req(text: str = "Say hi.") -> Request:
    return Request(messages=[{"role": "user", "content": text}], max_tokens=32)


@pytest.mark.parametrize("kind", KINDS)
async def test_completions_carry_the_rate_limit_headers(kind):
    with FakeLLMServer(FakeServerConfig(rpm=600, tpm=100_000, advertised_rpm=500)) as srv:
        prov = build_provider(config(srv, kind))
        out = await prov.complete(req())
        await prov.aclose()
    assert out.limits["limit_requests"] == 500 and out.limits["limit_tokens"] == 100_000
    assert out.limits["remaining_requests"] == 540  # 9 of 10 left in the window, per minute
    assert 0.0 < out.limits["reset_requests_s"] <= 1.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", ["seconds", "http-date"])
async def test_a_429_carries_retry_after_in_either_format_and_the_headers(kind, fmt):
    cfg = FakeServerConfig(rpm=60, retry_after_s=3.0, retry_after_format=fmt, retry_after_ms=False)
    with FakeLLMServer(cfg) as srv:
        prov = build_provider(config(srv, kind))
        await prov.complete(req())
        with pytest.raises(ProviderError) as e:
            await prov.complete(req())
        await prov.aclose()
    err = e.value
    assert err.status == 429 and err.retryable
    assert 2.0 <= err.retry_after <= 4.0  # an HTTP-date has whole seconds
    assert err.limits["limit_requests"] == 60 and err.limits["remaining_requests"] == 0


async def test_the_gate_learns_a_lower_announced_limit_and_headers_are_not_cached(tmp_path):
    with FakeLLMServer(FakeServerConfig(rpm=300)) as srv:
        cfg = config(srv, "openai", rpm=1200)
        keeper = Gatekeeper([cfg])
        client = LLMClient([build_provider(cfg)], LocalGate(keeper), cache=ResponseCache(tmp_path))
        for i in range(3):
            await client.complete(req(f"question {i}"))
        await client.aclose()
    (st,) = keeper.key_status().values()
    assert st["header_rpm"] == 300 and st["ceiling_rpm"] == 300 and st["rpm"] == 300
    for f in tmp_path.rglob("*.json"):
        assert "limits" not in json.loads(f.read_text())


async def test_a_trickling_answer_slower_than_the_timeout_is_a_timeout():
    with FakeLLMServer(FakeServerConfig(trickle_s=1.5)) as srv:
        cfg = config(srv, "openai", timeout_s=0.4, max_attempts=2, backoff_base_s=0.0)
        client = LLMClient([build_provider(cfg)], LocalGate(Gatekeeper([cfg])), cache=None)
        with pytest.raises(RetriesExhausted) as e:
            await client.complete(req())
        await client.aclose()
        await asyncio.sleep(0)
        assert srv.stats()["requests"] == 2
    assert "no answer within 0.4s" in str(e.value)


async def test_a_reset_connection_is_retried():
    # seed 1: the first draw (0.13) resets the connection, the second (0.85) answers
    with FakeLLMServer(FakeServerConfig(reset_rate=0.5, seed=1)) as srv:
        cfg = config(srv, "openai", max_attempts=3, backoff_base_s=0.0)
        client = LLMClient([build_provider(cfg)], LocalGate(Gatekeeper([cfg])), cache=None)
        out = await client.complete(req())
        await client.aclose()
        stats = srv.stats()
    assert out.text and out.attempts == 2
    assert stats["resets"] == 1 and stats["ok"] == 1
