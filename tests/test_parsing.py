"""The reply-reading helpers rating and judging share (evoray.parsing)."""

from __future__ import annotations

import re

import pytest

from evoray import parsing
from evoray.errors import ParseError

_HEAD = re.compile(r'^\s*\{\s*"n"\s*:\s*(?P<n>[0-9]+)')


def _parse(text, parsed=None):
    return parsing.parse_reply(
        text, parsed,
        from_object=lambda obj, raw: ("object", obj),
        json_head=_HEAD,
        from_head=lambda m, raw: ("head", m.group("n")),
        not_json="not a JSON object",
        from_text=lambda body, raw: ("text", body),
    )


def test_parse_reply_reads_in_order():
    assert _parse("ignored", {"n": 1}) == ("object", {"n": 1})
    assert _parse('```json\n{"n": 2}\n```') == ("object", {"n": 2})
    assert _parse('{"n": 3, "why": "cut off') == ("head", "3")
    assert _parse("<think>hmm {</think>\n  4 of 5 ") == ("text", "4 of 5")
    with pytest.raises(ParseError, match="not a JSON object") as e:
        _parse('{"m": ')
    assert e.value.kind == "unparseable" and e.value.raw == '{"m": '
    with pytest.raises(ParseError, match="empty reply"):
        _parse("<think>only thinking</think>  ")


def test_on_scale_tells_out_of_range_from_unparseable():
    assert parsing.on_scale("4.5", 0, 5, "the score", "raw") == 4.5
    with pytest.raises(ParseError) as e:
        parsing.on_scale(7, 0, 5, "the score", "raw")
    assert e.value.kind == "out_of_range" and e.value.message == "the score 7 is not on the 0-5 scale"
    for bad in ("high", True, float("nan"), None):
        with pytest.raises(ParseError) as e:
            parsing.on_scale(bad, 0, 5, "the score", "raw")
        assert e.value.kind == "unparseable"


def test_clean_number_and_failure_reason():
    assert parsing.clean("  **Score: 4** ") == "Score: 4"
    assert parsing.number(" 3.5 ") == 3.5 and parsing.number("3.5.1") is None
    assert parsing.in_range(11, 1, 10) is None and parsing.in_range(10, 1, 10) == 10.0
    assert parsing.failure_reason(None) == "unparseable reply"
    err = ParseError("x 7 is not on the 0-5 scale", kind="out_of_range")
    assert parsing.failure_reason(err, "scores") == "scores out of range: x 7 is not on the 0-5 scale"
