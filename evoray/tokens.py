"""The one estimate of tokens from characters, used wherever evoray needs a token count before a call.

* :func:`estimate_tokens` -- a text: ``len(text) / 4`` tokens, rounded up (:data:`CHARS_PER_TOKEN`).
* :func:`estimate_message_tokens` -- chat messages: each message's text plus
  :data:`TOKENS_PER_MESSAGE` for its framing (role, separators).
* :func:`estimate_request_tokens` -- what a request may use at most, charged against a tokens-per-
  minute budget before the call (:mod:`evoray.limiter`, :mod:`evoray.gate`): its messages,
  :data:`REPLY_PRIMING_TOKENS` for the start of the reply, and ``max_tokens``. The charge is
  corrected with the real usage afterwards.

``evoray estimate`` counts OpenAI models with tiktoken when it can (:class:`evoray.estimate.TokenCounter`)
and falls back to this rule. The fake servers in :mod:`evoray.testing` keep their own documented
rule: they imitate a server's count, not ours.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

CHARS_PER_TOKEN = 4
"""Characters per token of the approximation."""

TOKENS_PER_MESSAGE = 4
"""Tokens added per chat message for its framing (role, separators)."""

REPLY_PRIMING_TOKENS = 4
"""Tokens added once per request for the start of the reply."""


def estimate_tokens(text: str) -> int:
    """About ``len(text) / 4`` tokens, rounded up (0 for an empty text)."""
    return -(-len(text) // CHARS_PER_TOKEN)


def estimate_message_tokens(messages: Iterable[Mapping[str, str]]) -> int:
    """The tokens of chat messages: each one's text plus :data:`TOKENS_PER_MESSAGE`."""
    return sum(estimate_tokens(m.get("content") or "") + TOKENS_PER_MESSAGE for m in messages)


def estimate_input_tokens(messages: Iterable[Mapping[str, str]]) -> int:
    """The input tokens of a request before it is sent: its messages plus the reply's priming."""
    return estimate_message_tokens(messages) + REPLY_PRIMING_TOKENS


def estimate_request_tokens(messages: Iterable[Mapping[str, str]], max_tokens: int) -> int:
    """The most tokens a request may use (input estimate + ``max_tokens``): what a limiter charges."""
    return estimate_input_tokens(messages) + max(0, int(max_tokens))


__all__ = ["CHARS_PER_TOKEN", "REPLY_PRIMING_TOKENS", "TOKENS_PER_MESSAGE", "estimate_input_tokens",
           "estimate_message_tokens", "estimate_request_tokens", "estimate_tokens"]
