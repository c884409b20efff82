"""The one token estimate from characters (evoray.tokens) and its users."""

from __future__ import annotations

from evoray import estimate as est
from evoray import tokens
from evoray.providers.base import Request


def test_estimate_tokens_rounds_up():
    assert [tokens.estimate_tokens("x" * n) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]


def test_request_charge_is_messages_priming_and_max_tokens():
    msgs = [{"role": "system", "content": "abcde"}, {"role": "user", "content": "x" * 12}]
    assert tokens.estimate_message_tokens(msgs) == (2 + 4) + (3 + 4)
    assert tokens.estimate_input_tokens(msgs) == 13 + tokens.REPLY_PRIMING_TOKENS
    assert tokens.estimate_request_tokens(msgs, 100) == 17 + 100
    req = Request(messages=msgs, max_tokens=100)
    assert req.estimate_input_tokens() == 17 and req.estimate_tokens() == 117


def test_estimate_command_falls_back_to_the_same_rule():
    msgs = [{"role": "user", "content": "word " * 33}]
    counter = est.TokenCounter(None)
    assert counter.name == "approx"
    assert counter.messages(msgs) == tokens.estimate_message_tokens(msgs)
    assert est.approx_tokens("abcdefghi") == tokens.estimate_tokens("abcdefghi") == 3
