"""evoray estimate: requests, tokens and dollars per stage from the real prompts; nothing is sent."""

from __future__ import annotations

import json
import socket
import sys

import pytest

from evoray import estimate as est
from evoray.config import JobConfig
from evoray.errors import UsageError
from evoray.prompts.rating import build_rating_request

PRICE = {"input_per_mtok": 2.0, "output_per_mtok": 8.0}


def _data(path, n: int, out: str = "An answer that is long enough. " * 5):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"Explain idea number {i} to a child.", "input": "",
                                "output": out}) + "\n")
    return path


def _config(data, **kw) -> JobConfig:
    d = {
        "providers": [{"name": "main", "kind": "anthropic", "model": "claude-x", "price": PRICE}],
        "input": {"path": str(data)},
        "optimize": {"steps": 2, "candidates": 2, "dev_size": 4, "batch_size": 3, "trajectory_length": 2},
        "pipeline": ["optimize", "evolve", "answer", "rate", "judge"],
        "judge": {"answers_a": str(data), "answers_b": str(data)},
    }
    d.update(kw)
    return JobConfig.from_dict(d)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test."""

    def guard(*a, **k):
        raise AssertionError("the estimate tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket, "create_connection", guard)
    yield


def test_every_stage_has_requests_tokens_and_dollars(tmp_path, no_network):
    cfg = _config(_data(tmp_path / "d.jsonl", 12))
    res = est.estimate(cfg, None)
    assert [e.stage for e in res] == ["optimize", "evolve", "answer", "rate", "judge"]
    for e in res:
        assert e.requests > 0 and e.input_tokens > 0 and e.output_tokens > 0, e
        want = (e.input_tokens * PRICE["input_per_mtok"] + e.output_tokens * PRICE["output_per_mtok"]) / 1e6
        assert e.dollars == pytest.approx(want)
        assert e.dollars > 0
    by = {e.stage: e for e in res}
    assert by["rate"].requests == 12
    assert by["answer"].requests == 12
    assert by["evolve"].requests == 12 * 3  # 1 round + the equality check (strict rules) + answers
    assert by["judge"].requests == 2 * 12
    # optimize: steps * (batch*l evolutions + batch*l answers + 2m optimizer calls + (m+1)*dev*2), the current
    # method measured again every step, plus an equality check per evolution (batch*l + (m+1)*dev per step)
    assert by["optimize"].requests == 2 * (3 * 2 * 2 + 2 * 2 + 3 * 4 * 2) + 2 * (3 * 2 + 3 * 4)
    text = est.format_estimate(res)
    for stage in ("optimize", "evolve", "answer", "rate", "judge", "total"):
        assert stage in text
    assert "Nothing was sent" in text


def test_estimate_does_not_import_ray(tmp_path):
    import subprocess

    data = _data(tmp_path / "d.jsonl", 5)
    code = (
        "import sys, json\n"
        "from evoray.config import JobConfig\n"
        "from evoray.estimate import estimate\n"
        f"cfg = JobConfig.from_dict({{'input': {{'path': {str(data)!r}}}}})\n"
        "res = estimate(cfg, None)\n"
        "assert all(e.requests > 0 for e in res)\n"
        "print('ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_scales_with_rows(tmp_path, no_network):
    small = est.estimate(_config(_data(tmp_path / "a.jsonl", 10), pipeline=["evolve", "rate"]), None)
    big = est.estimate(_config(_data(tmp_path / "b.jsonl", 40), pipeline=["evolve", "rate"]), None)
    for s, b in zip(small, big):
        assert b.requests == 4 * s.requests
        assert b.input_tokens == pytest.approx(4 * s.input_tokens, rel=0.05)
        assert b.output_tokens == pytest.approx(4 * s.output_tokens, rel=0.01)
        assert b.dollars == pytest.approx(4 * s.dollars, rel=0.05)


def test_input_limit_and_override_path(tmp_path):
    data = _data(tmp_path / "d.jsonl", 30)
    cfg = _config(tmp_path / "missing.jsonl", input={"path": str(tmp_path / "missing.jsonl"), "limit": 7},
                  pipeline=["rate"])
    (rate,) = est.estimate(cfg, str(data))
    assert rate.rows == 7 and rate.requests == 7


def test_tokens_follow_the_prompts(tmp_path, no_network):
    """Longer rows give more rating input tokens: the estimate renders the real rating prompt."""
    short = est.estimate(_config(_data(tmp_path / "s.jsonl", 5, out="ok"), pipeline=["rate"]), None)[0]
    long = est.estimate(_config(_data(tmp_path / "l.jsonl", 5, out="word " * 400), pipeline=["rate"]), None)[0]
    assert long.input_tokens - short.input_tokens >= 5 * (len("word " * 400) - len("ok")) // 4 - 5 * 4
    # the approximation on the real request, row by row
    row = {"instruction": "Explain idea number 0 to a child.", "input": "", "output": "ok"}
    req = build_rating_request(row, "accuracy", use_schema=True, max_tokens=256)
    per_row = sum(est.approx_tokens(m["content"]) + est.TOKENS_PER_MESSAGE for m in req.messages)
    assert abs(short.input_tokens / 5 - per_row) <= 2


def test_weighted_average_price_is_said(tmp_path):
    data = _data(tmp_path / "d.jsonl", 4)
    cfg = _config(data, pipeline=["rate"], providers=[
        {"name": "a", "kind": "anthropic", "model": "x", "weight": 1, "price": {"input_per_mtok": 1, "output_per_mtok": 1}},
        {"name": "b", "kind": "anthropic", "model": "y", "weight": 3, "price": {"input_per_mtok": 5, "output_per_mtok": 9}},
    ])
    (rate,) = est.estimate(cfg, None)
    call = rate.calls[0]
    assert call.input_per_mtok == pytest.approx(4.0) and call.output_per_mtok == pytest.approx(7.0)
    assert "weighted average" in call.price_note
    assert "weighted average" in est.format_estimate([rate])


def test_single_stage_and_no_input(tmp_path):
    data = _data(tmp_path / "d.jsonl", 6)
    cfg = _config(data)
    (ans,) = est.estimate(cfg, None, stages=["answer"])
    assert ans.stage == "answer" and ans.requests == 6
    cfg2 = JobConfig.from_dict({"pipeline": ["rate"]})
    with pytest.raises(UsageError, match="input"):
        est.estimate(cfg2, None)


def test_tiktoken_is_used_only_when_its_encoding_is_cached(tmp_path, monkeypatch, no_network):
    """An OpenAI model without a cached encoding falls back to the approximation at once."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    est._tiktoken_encoding.cache_clear()
    try:
        from evoray.config import ProviderConfig

        c = est.TokenCounter(ProviderConfig(name="o", kind="openai", model="gpt-4o-mini"))
        assert c.name == "approx" and c.text("abcdefgh") == 2
        assert est.TokenCounter(ProviderConfig(name="v", kind="openai", model="my-vllm-model")).name == "approx"
        assert est.TokenCounter(ProviderConfig(name="l", kind="local")).name == "approx"
    finally:
        est._tiktoken_encoding.cache_clear()


def test_filler_is_about_n_tokens():
    assert est.approx_tokens(est.filler(100)) in (99, 100)


def test_corrupt_cached_encoding_falls_back_without_downloading(tmp_path, monkeypatch, no_network):
    import hashlib

    cache = tmp_path / "cache"
    cache.mkdir()
    url = est._TIKTOKEN_URL.format(name="o200k_base")
    (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"not an encoding\n")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    est._tiktoken_encoding.cache_clear()
    try:
        from evoray.config import ProviderConfig

        c = est.TokenCounter(ProviderConfig(name="o", kind="openai", model="gpt-4o-mini"))
        assert c.name == "approx"
    finally:
        est._tiktoken_encoding.cache_clear()
