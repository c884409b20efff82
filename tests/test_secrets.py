"""A distinctive fake key never appears in logs, exception text, pickles or any written file.

Failing calls go through the real SDKs against the fake server with every logger at DEBUG
(the SDKs' own loggers and their HTTP stacks included), then every place the key could leak is
searched for it: captured log records, ``str``/``repr``/traceback of the errors, pickled errors
(they cross Ray), the cache directory and ``ledger.json``.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import random
import traceback

import pytest

from evoray.cache import ResponseCache
from evoray.client import LLMClient, LocalGate
from evoray.config import ProviderConfig
from evoray.errors import EvorayError, ProviderError, RetriesExhausted
from evoray.gate import Gatekeeper
from evoray.providers import build_provider
from evoray.providers.base import Request
from evoray.secrets import RedactingFilter, redact
from evoray.testing.fake_server import FakeLLMServer, FakeServerConfig

KEY = "sk-evoray-test-DISTINCTIVE-1234567890"
MARK = "DISTINCTIVE"  # a fragment: a partly masked key must not show either
LOGGERS = ["", "openai", "anthropic", "httpx2", "httpcore2", "httpx", "httpcore", "evoray", "asyncio", "aiohttp"]


@pytest.fixture(autouse=True)
def _keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)


@pytest.fixture
def debug_logs(caplog):
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name or None)
    return caplog


async def _no_sleep(_s: float) -> None:
    await asyncio.sleep(0)


def _client(srv: FakeLLMServer, kind: str, cache_dir, **kw) -> LLMClient:
    url = srv.openai_base_url if kind == "openai" else srv.anthropic_base_url
    cfg = ProviderConfig(name=f"{kind}-main", kind=kind, model="fake-model", base_url=url, **kw)
    return LLMClient([build_provider(cfg)], LocalGate(Gatekeeper([cfg])), cache=ResponseCache(cache_dir),
                     sleep=_no_sleep, rng=random.Random(0))


def _texts_of(err: BaseException) -> list[str]:
    return [str(err), repr(err), "".join(traceback.format_exception(err)), repr(err.__dict__)]


def _assert_clean(text: str, where: str) -> None:
    assert KEY not in text, f"the key leaked into {where}"
    assert MARK not in text, f"part of the key leaked into {where}"


def _key_leaking_responder(kind, body):
    # a server that echoes the key in its error message (some APIs echo part of a bad key)
    raise ValueError(f"Incorrect API key provided: {KEY}")


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_key_never_appears_in_logs_errors_pickles_or_files(kind, tmp_path, debug_logs):
    cache_dir = tmp_path / "cache"
    errors: list[BaseException] = []

    # 1. a 401: the server wants another key
    with FakeLLMServer(FakeServerConfig(required_key="sk-the-right-key-000000000")) as srv:
        client = _client(srv, kind, cache_dir, max_attempts=3)
        with pytest.raises(ProviderError) as ei:
            await client.complete(Request(messages=[{"role": "user", "content": "hello"}]))
        await client.aclose()
        assert ei.value.status == 401
        errors.append(ei.value)
        ledger = client.gate.keeper.ledger

    # 2. 500s until the attempts run out
    with FakeLLMServer(FakeServerConfig(error_rate=1.0, error_statuses=(500,))) as srv:
        client = _client(srv, kind, cache_dir, max_attempts=3)
        with pytest.raises(RetriesExhausted) as ei:
            await client.complete(Request(messages=[{"role": "user", "content": "hello"}]))
        await client.aclose()
        errors.append(ei.value)
        ledger.merge(client.gate.keeper.ledger.take_delta())

    # 3. a 500 whose error body echoes the key
    with FakeLLMServer(responder=_key_leaking_responder) as srv:
        client = _client(srv, kind, cache_dir, max_attempts=2)
        with pytest.raises(RetriesExhausted) as ei:
            await client.complete(Request(messages=[{"role": "user", "content": "hello"}]))
        await client.aclose()
        assert srv.stats()["responder_errors"] == 2  # the key really was in the body sent back
        errors.append(ei.value)

    # 4. a success, so the cache has a file to search
    with FakeLLMServer() as srv:
        client = _client(srv, kind, cache_dir)
        out = await client.complete(Request(messages=[{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": "hello"}]))
        await client.aclose()
        assert out.text
        ledger.merge(client.gate.keeper.ledger.take_delta())
        _assert_clean(repr(client.providers[f"{kind}-main"]), "the provider's repr")
        _assert_clean(repr(client.providers[f"{kind}-main"].config), "the config's repr")

    ledger.write(tmp_path / "ledger.json")

    # logs: something was logged (the test can see leaks), and none of it has the key
    assert debug_logs.records, "DEBUG logging captured nothing: the test could not see a leak"
    for rec in debug_logs.records:
        _assert_clean(rec.getMessage(), f"a log record of {rec.name!r}")
        _assert_clean(repr(rec.args), f"the args of a log record of {rec.name!r}")
    _assert_clean(debug_logs.text, "the formatted log")

    # exceptions: text, repr, traceback, fields, pickles (they cross Ray)
    for err in errors:
        for text in _texts_of(err):
            _assert_clean(text, f"a {type(err).__name__}")
        blob = pickle.dumps(err)
        assert KEY.encode() not in blob and MARK.encode() not in blob
        again = pickle.loads(blob)
        assert isinstance(again, EvorayError) and str(again) == str(err)
        assert err.__cause__ is None  # SDK exceptions (which hold the request) are not chained

    # every file written
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert (tmp_path / "ledger.json") in files and any(p.is_relative_to(cache_dir) for p in files)
    for p in files:
        data = p.read_bytes()
        assert KEY.encode() not in data and MARK.encode() not in data, f"the key leaked into {p}"


# ---- redact() ------------------------------------------------------------------------------------------


def test_redact_removes_the_values_of_key_variables(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "plain-value-without-prefix-77")
    out = redact("token=plain-value-without-prefix-77 and more")
    assert "plain-value-without-prefix-77" not in out and out.endswith("and more")


def test_redact_removes_key_shaped_strings_even_when_unknown():
    for secret in ("sk-abcdefghijklmnop", "sk-ant-api03-abcdefghijklmnop", "sk-proj-ABCdef_123-456xyz"):
        out = redact(f"calling with {secret} now")
        assert secret not in out and "***" in out and out.startswith("calling with") and out.endswith("now")


@pytest.mark.parametrize("text,secret", [
    ("Authorization: Bearer abcdefghijklmnop", "abcdefghijklmnop"),
    ("authorization=Bearer abcdefghijklmnop", "abcdefghijklmnop"),
    ("x-api-key: anthropic-secret-999", "anthropic-secret-999"),
    ("api_key=hunter2hunter2", "hunter2hunter2"),
    ('{"api_key": "json-secret-value-1"}', "json-secret-value-1"),
    ("API-KEY: upper-case-secret", "upper-case-secret"),
    ("bearer tok_live_abcdefgh", "tok_live_abcdefgh"),
])
def test_redact_removes_values_after_key_names(text, secret):
    out = redact(text)
    assert secret not in out and "***" in out


def test_redact_leaves_ordinary_text_alone():
    for text in ("", "The score is 4.5 out of 5.", "a task-oriented skeleton", "provider 'main' status 429"):
        assert redact(text) == text


def test_redacting_filter_cleans_log_records():
    logger = logging.getLogger("evoray.test_secrets.filter")
    logger.propagate = False
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    try:
        logger.warning("key is %s", KEY)
        logger.warning("header Authorization: Bearer %s", "opaque-token-123456")
        logger.warning("nothing secret here: %d rows", 3)
    finally:
        logger.removeHandler(handler)
    assert len(seen) == 3
    assert KEY not in seen[0] and "opaque-token-123456" not in seen[1]
    assert seen[2] == "nothing secret here: 3 rows"


def test_provider_error_carries_no_key_even_if_given_one():
    # the provider boundary redacts error bodies; ProviderError itself holds only what it is given
    from evoray.providers.sdk import error_detail

    detail = error_detail({"error": {"message": f"Incorrect API key provided: {KEY}"}})
    assert KEY not in detail and MARK not in detail
    e = ProviderError(detail, provider="p", model="m", status=401)
    assert KEY not in str(e) and KEY.encode() not in pickle.dumps(e)
