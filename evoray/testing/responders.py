"""Responders for the fake server that make realistic, deterministic traffic.

``PipelineResponder`` answers like a model would for every evoray prompt (via the fake server's
``default_reply``), but gives ratings from a distribution (the AlpaGasus paper's ChatGPT score
histogram by default) and turns a chosen share of replies into unusable ones: an unparseable
rating, or a clarification question after an evolution ("Sure, could you please provide ...?").
Everything is decided by a hash of the request content, so a repeated request gets the same reply
(as a cached model would) and runs are repeatable.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from .fake_server import _normalise, _wants_json, clarification_reply, default_reply

# the paper's ChatGPT accuracy scores on Alpaca's 52,002 rows
PAPER_SCORES = [(2.5, 1), (3.0, 1550), (3.5, 10811), (4.0, 30240), (4.5, 9218), (5.0, 11)]
UNPARSEABLE = "I am not able to judge this response without more context."


def _u(text: str, salt: str) -> float:
    h = hashlib.sha256((salt + text).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


class PipelineResponder:
    def __init__(self, bad_rating_share: float = 0.0, bad_answer_share: float = 0.0,
                 scores: list[tuple[float, int]] | None = None):
        self.bad_rating_share = bad_rating_share
        self.bad_answer_share = bad_answer_share
        self.scores = scores or PAPER_SCORES
        total = sum(n for _, n in self.scores)
        self.cdf = []
        acc = 0
        for s, n in self.scores:
            acc += n
            self.cdf.append((acc / total, s))

    def _score(self, text: str) -> float:
        u = _u(text, "score")
        for p, s in self.cdf:
            if u <= p:
                return s
        return self.cdf[-1][1]

    def __call__(self, kind: str, body: dict[str, Any]) -> str:
        messages = _normalise(kind, body)
        wants, _ = _wants_json(kind, body)
        content = "\n".join(m["content"] for m in messages)
        low = content.lower()
        is_rating = "0 to 5" in low or "0-5" in low or "scale of 0" in low or (
            isinstance(wants, dict) and "score" in (wants.get("properties") or {}))
        if is_rating and "assistant 1" not in low:
            # decide on the row's own text only, so asking again (the JSON fallback, a repair turn that
            # quotes the reply) meets the same verdict and an unusable row stays unusable
            m = re.search(r"###\s*Instruction:(.*?)Rate the response above", content, re.S)
            row_key = m.group(1) if m else content
            if _u(row_key, "bad") < self.bad_rating_share:
                return UNPARSEABLE
            s = self._score(row_key)
            expl = f"Rated {s} for accuracy."
            if wants:
                return json.dumps({"score": s, "explanation": expl})
            return f"{s}\n{expl}"
        reply = default_reply(messages, wants)
        last_user = messages[-1]["content"] if messages else ""
        if self.bad_answer_share and not wants and "rewrit" not in low and "#instruction#" not in low \
                and _u(last_user, "answer") < self.bad_answer_share:
            return clarification_reply()
        return reply
