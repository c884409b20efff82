"""A fake LLM API server for tests and benchmarks: real HTTP on 127.0.0.1, both wire formats.

``FakeLLMServer`` runs an :mod:`aiohttp.web` application on its own event loop in a background
thread, so sync tests, async tests and other processes (Ray actors given ``srv.url``) can all call
it through the real SDKs::

    with FakeLLMServer(FakeServerConfig(rpm=600, error_rate=0.1)) as srv:
        client = openai.OpenAI(base_url=srv.openai_base_url, api_key="sk-test", max_retries=0)
        ...
        srv.update(rpm=300)            # halve the limit mid-run (advertised_rpm=600: headers still say 600)
        print(srv.stats()["rate_limited"])

Endpoints:

- ``POST /v1/chat/completions``: OpenAI Chat Completions (``response_format`` json_schema /
  json_object answered with JSON text);
- ``POST /v1/messages``: Anthropic Messages (top-level ``system``; ``output_format`` /
  ``output_config.format`` json_schema, or a forced tool, answered with JSON);
- ``GET /stats`` (the dict :meth:`FakeLLMServer.stats` returns) and ``GET /health``;
- the batch endpoints of both APIs (``srv.batches``, :mod:`evoray.testing.fake_batches`).

Each POST goes through, in order: the key check (401), the rpm and tpm limits (429 with
``retry-after`` and ``retry-after-ms``; by default a strict sliding window that counts rejected
requests, see "Strict limits" below), then one random draw that picks a hang, an injected 5xx, a
malformed body, an empty reply, a reset connection or a normal answer (after the configured
latency; its body may trickle out slowly). Answers and 429s carry OpenAI- or Anthropic-style
rate-limit headers. A reply queued
with :meth:`FakeLLMServer.script` (text, a dict sent as JSON, or a :class:`Fault`) is used before
the responder; a random fault does not consume a queued text reply.

Replies come from ``responder(kind, request_json) -> str`` (``kind`` is ``"openai"`` or
``"anthropic"``) or, by default, :func:`default_reply`, which recognises the project's prompts by
loose, case-insensitive keywords (the ``*_MARKERS`` constants below).

Tokens are estimated as ``len(text) // 4 + 1`` per message (prompt) and for the reply
(completion); the tpm limit is charged prompt + completion for every request it admits.
Not supported: streaming (``stream: true`` is answered 400), token logprobs, images.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import email.utils
import json
import math
import random
import re
import socket
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

from aiohttp import web

__all__ = [
    "ANALYSIS_MARKERS",
    "FakeLLMServer",
    "FakeServerConfig",
    "Fault",
    "JSON_SCORE_FIELD",
    "OPTIMIZER_MARKERS",
    "OPTIMIZER_WEAK_MARKERS",
    "PAIRWISE_MARKERS",
    "RATING_MARKERS",
    "RATING_SCALE_PATTERN",
    "REWRITE_MARKERS",
    "REWRITE_FINAL_MARKER",
    "analysis_reply",
    "answer_reply",
    "clarification_reply",
    "copied_prompt_reply",
    "default_reply",
    "estimate_tokens",
    "extract_instruction",
    "fetch_stats",
    "json_score_reply",
    "json_reply_for_schema",
    "optimizer_reply",
    "pairwise_reply",
    "rating_reply",
    "rewrite_reply",
    "sorry_reply",
    "unchanged_rewrite_reply",
    "DeadEndServer",
    "PROFILES",
    "ServerProfile",
    "unused_port",
]

OPENAI_PATH = "/v1/chat/completions"
ANTHROPIC_PATH = "/v1/messages"

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

LATENCY_DISTRIBUTIONS = ("fixed", "uniform", "exponential")


@dataclass
class FakeServerConfig:
    """How the fake server behaves. Change it at run time with :meth:`FakeLLMServer.update`."""

    latency_s: float = 0.0  # mean latency of an answered request (not of 401 / 429)
    latency_jitter_s: float = 0.0  # "uniform": latency_s +- jitter (clamped at 0)
    latency_dist: str = "uniform"  # "fixed" | "uniform" | "exponential" (mean latency_s)
    rpm: float | None = None  # requests per minute (None: unlimited)
    tpm: float | None = None  # tokens per minute, input + output (None: unlimited)
    burst_seconds: float = 1.0  # bucket capacity = per-second rate * burst_seconds
    error_rate: float = 0.0  # share answered with a status from error_statuses
    error_statuses: tuple[int, ...] = (500, 503)  # picked at random for injected errors
    malformed_rate: float = 0.0  # share answered 200 with a body that is not valid JSON
    empty_choices_rate: float = 0.0  # share answered 200 with choices: [] / content: []
    hang_rate: float = 0.0  # share that gets no answer for hang_s (then a 504)
    hang_s: float = 30.0
    retry_after_s: float | None = 1.0  # advised on 429; None: the bucket's exact wait
    seed: int = 0
    required_key: str | None = None  # a wrong / missing key -> 401 (the key is never echoed)
    # -- strict limits, rate-limit headers and transport faults (see "Strict limits" below) --
    limit_mode: str = "window"  # "window": strict sliding window; "bucket": lenient token bucket (burst_seconds)
    window_s: float = 1.0  # window mode: at most rpm/60 * window_s requests in ANY window of this length
    count_rejected: bool = True  # window mode: a rejected request still counts in the window (as strict APIs do)
    advertised_rpm: float | None = None  # the limit the headers announce (None: rpm); above rpm = "the real
    advertised_tpm: float | None = None  # limit is lower than configured", which only 429s reveal
    rate_limit_headers: bool = True  # x-ratelimit-* (OpenAI path) / anthropic-ratelimit-* (Anthropic path)
    retry_after_format: str = "seconds"  # Retry-After on 429: "seconds" | "http-date" | "none"
    retry_after_ms: bool = True  # also send retry-after-ms (as OpenAI does)
    trickle_s: float = 0.0  # answers' bodies trickle out in chunks over this many seconds
    reset_rate: float = 0.0  # share of admitted requests whose connection is closed without an answer
    # server profile (see PROFILES): reject request fields the way that real server does; None accepts all
    profile: str | None = None

    def validate(self) -> None:
        rates = {
            "error_rate": self.error_rate,
            "malformed_rate": self.malformed_rate,
            "empty_choices_rate": self.empty_choices_rate,
            "hang_rate": self.hang_rate,
            "reset_rate": self.reset_rate,
        }
        for name, value in rates.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"FakeServerConfig.{name} must be in [0, 1], got {value}")
        if sum(rates.values()) > 1.0 + 1e-9:
            raise ValueError(f"FakeServerConfig: the fault rates add up to more than 1: {rates}")
        if self.latency_dist not in LATENCY_DISTRIBUTIONS:
            raise ValueError(
                f"FakeServerConfig.latency_dist must be one of {LATENCY_DISTRIBUTIONS}, got {self.latency_dist!r}"
            )
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"FakeServerConfig.{name} must be positive or None, got {value}")
        if self.burst_seconds <= 0:
            raise ValueError(f"FakeServerConfig.burst_seconds must be positive, got {self.burst_seconds}")
        if self.error_rate and not self.error_statuses:
            raise ValueError("FakeServerConfig.error_statuses is empty but error_rate > 0")
        validate_strict_options(self)
        if self.profile is not None and self.profile not in PROFILES:
            raise ValueError(f"FakeServerConfig.profile must be one of {sorted(PROFILES)} or None, got {self.profile!r}")


class Fault(str, Enum):
    """A scripted outcome for one request: ``srv.script([Fault.RATE_LIMITED, "ok text"])``."""

    RATE_LIMITED = "rate_limited"  # 429 (no bucket is charged)
    ERROR_500 = "error_500"
    ERROR_503 = "error_503"
    MALFORMED = "malformed"
    EMPTY = "empty"
    HANG = "hang"


_FAULT_STATUS = {Fault.ERROR_500: 500, Fault.ERROR_503: 503}

# ---------------------------------------------------------------------------------------------
# Default replies: recognise the project's prompts by loose keywords
# ---------------------------------------------------------------------------------------------

# Keywords are matched case-insensitively at the start of a word ("rate" matches "rated" and
# "rating" but not "accurate"). The precise prompt texts are not fixed; keep these loose.
JSON_SCORE_FIELD = "score"  # a JSON schema with this property gets {"score": 4.5, "explanation": ...}
PAIRWISE_MARKERS = ("assistant 1", "assistant 2")  # both present: a pairwise judge prompt
RATING_MARKERS = ("score", "rate", "rating")  # one of these ...
RATING_SCALE_PATTERN = r"\b[01]\s*(?:-|–|to|and)\s*5\b|out of 5|five-point|5-point"  # ... and a 0-5 scale
OPTIMIZER_MARKERS = ("evolving method", "method optimizer", "optimize the method", "optimise the method",
                     "optimized method", "optimizing the method")
OPTIMIZER_WEAK_MARKERS = ("feedback",)  # counts only together with the word "method"
ANALYSIS_MARKERS = ("failed to evolve", "evolution trajectory", "trajectory")  # failure analysis step
REWRITE_MARKERS = ("#instruction#", "rewritten instruction", "rewrite", "rewriting", "#given prompt#",
                   "#the given prompt#", "rewritten prompt")
REWRITE_FINAL_MARKER = "#Finally Rewritten Instruction#"
ADDED_CONSTRAINT = "Additionally, justify each step of your answer and keep it under 200 words."
#: constraints a rewrite appends, in order: round r of an evolution adds the r-th
CONSTRAINTS = (ADDED_CONSTRAINT, "Also state one assumption you make and check the result against it.",
               "Finally, give the answer in a table with one row per intermediate quantity.",
               "Mention one common mistake a beginner could make here.")

DEFAULT_SCORE = 4.5
DEFAULT_EXPLANATION = "The response is accurate, relevant and complete; it follows the instruction closely."


def _has_any(text: str, markers: tuple[str, ...] | list[str]) -> bool:
    return any(re.search(r"(?<!\w)" + re.escape(m.lower()), text) for m in markers)


def rating_reply(score: float = DEFAULT_SCORE, explanation: str = DEFAULT_EXPLANATION) -> str:
    """An AlpaGasus-style rating: the score on the first line, then the explanation."""
    return f"{score:g}\n{explanation}"


def json_score_reply(score: float = DEFAULT_SCORE, explanation: str = DEFAULT_EXPLANATION) -> str:
    return json.dumps({"score": score, "explanation": explanation})


def pairwise_reply(score_1: float = 8, score_2: float = 7) -> str:
    """A judge reply: the two scores on the first line, then the reasoning."""
    return (
        f"{score_1:g} {score_2:g}\n"
        "Assistant 1 gives a more complete and precise answer; Assistant 2 is correct but omits "
        "some details, so it receives a slightly lower score."
    )


_INSTRUCTION_END = (
    r"(?=\n[ \t]*\n[ \t]*(?:#|step\b|please\b|reply\b|respond\b|output\b|format\b|now\b|your\b|return\b)"
    r"|\n[ \t]*#|\n[ \t]*step\s*\d|\Z)"
)
_INSTRUCTION_PATTERNS = (
    # evoray's own methods fence the instruction (before the next pattern: their text says "instruction: ...")
    re.compile(r"<<<BEGIN INSTRUCTION>>>\n(.*?)\n<<<END INSTRUCTION>>>", re.S),
    re.compile(r"<instruction>\s*(.*?)\s*</instruction>", re.I | re.S),
    re.compile(r"#(?:the\s+)?given\s+(?:instruction|prompt)#[ \t]*:?[ \t]*\n?(.+?)" + _INSTRUCTION_END, re.I | re.S),
    re.compile(r"#instruction#[ \t]*(?::[ \t]*\n?|\n)(.+?)" + _INSTRUCTION_END, re.I | re.S),
    re.compile(r"^[ \t]*instruction[ \t]*:[ \t]*(.+?)" + _INSTRUCTION_END, re.I | re.S | re.M),
)


def extract_instruction(text: str) -> str:
    """The instruction a rewrite prompt carries (evoray's ``<<<BEGIN INSTRUCTION>>>`` fence, tags,
    ``#Instruction#:``, ``Instruction:``), else
    the prompt's last paragraph."""
    for pattern in _INSTRUCTION_PATTERNS:
        found = [m.strip() for m in pattern.findall(text) if m.strip()]
        if found:
            return found[-1]
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return paragraphs[-1] if paragraphs else text.strip()


def rewrite_reply(instruction: str, constraint: str | None = None) -> str:
    """An Evol-Instruct rewrite whose last part is ``#Finally Rewritten Instruction#`` + the new text:
    the instruction with ``constraint`` appended, by default the first of :data:`CONSTRAINTS` it
    does not hold yet (:data:`ADDED_CONSTRAINT` on a first round), so every round adds information."""
    if constraint is None:
        constraint = next((c for c in CONSTRAINTS if c not in instruction), ADDED_CONSTRAINT)
    evolved = f"{instruction.rstrip()} {constraint}".strip()
    return (
        "Step 1 #Methods List#:\n- Add a constraint on the form of the answer\n- Ask for justification\n"
        "Step 2 #Plan#:\nKeep the original task and add one explicit constraint.\n"
        f"Step 3 #Rewritten Instruction#:\n{evolved}\n"
        f"{REWRITE_FINAL_MARKER}\n{evolved}"
    )


def unchanged_rewrite_reply(instruction: str) -> str:
    """A failed evolution: the 'rewritten' instruction is the original one."""
    return f"{REWRITE_FINAL_MARKER}\n{instruction.strip()}"


def equality_reply(prompt: str) -> str:
    """The no-information-gain check: Equal when the second fenced instruction adds no word the
    first lacks (the same text, a whitespace or case change, or a shortened copy), else Not Equal.
    A stand-in for an LLM's judgement, not one: it cannot see a paraphrase that adds nothing."""
    first = re.search(r"<<<FIRST INSTRUCTION>>>\n(.*?)\n<<<END FIRST INSTRUCTION>>>", prompt, re.S | re.I)
    second = re.search(r"<<<SECOND INSTRUCTION>>>\n(.*?)\n<<<END SECOND INSTRUCTION>>>", prompt, re.S | re.I)
    if not first or not second:
        return "Not Equal"
    words = lambda text: set(re.findall(r"\w+", text.lower()))  # noqa: E731
    return "Equal" if words(second.group(1)) <= words(first.group(1)) else "Not Equal"


def clarification_reply() -> str:
    """A failed evolution / answer: the model asks for the details instead of doing the task."""
    return "Sure, could you please provide the details?"


def sorry_reply() -> str:
    """A short refusal ('sorry' in a short reply is one of the Auto Evol-Instruct failure rules)."""
    return "I'm sorry, but I can't help with that."


def copied_prompt_reply() -> str:
    """A failed evolution that copies words of the evolving prompt instead of an instruction."""
    return (f"{REWRITE_FINAL_MARKER}\n"
            "#Rewritten Instruction#: rewrite the given #Instruction# into a more complex version.")


DEFAULT_METHOD = (
    "You are an Instruction Rewriter that rewrites the given #Instruction# into a more complex version.\n"
    "Step 1: Read the #Instruction# carefully and list methods that make it more complex without "
    "changing its topic or dropping any of its information.\n"
    "Step 2: Write a plan that uses several of the listed methods.\n"
    "Step 3: Execute the plan and write the #Rewritten Instruction#; it must be answerable without "
    "asking for more details.\n"
    "Step 4: Review the #Rewritten Instruction# and fix anything unreasonable, then write only the "
    "final version after #Finally Rewritten Instruction#."
)


def optimizer_reply(method: str = DEFAULT_METHOD) -> str:
    """An optimizer answer: a short analysis, then the method in a fenced block."""
    return (
        "Analysis: several evolved instructions lost information from the original or asked the "
        "user for details, so the method must require a self-contained rewrite and a final review.\n\n"
        f"Optimized method:\n```\n{method}\n```"
    )


def analysis_reply() -> str:
    """Feedback on an evolution trajectory (the Auto Evol-Instruct analysis step)."""
    return (
        "Case 1 failed to evolve: the rewritten instruction asks for more details instead of adding "
        "complexity.\nCase 2 evolved correctly.\nFeedback: require the rewrite to stay self-contained "
        "and to add exactly one verifiable constraint."
    )


def answer_reply(prompt: str) -> str:
    """A plausible answer that names what was asked."""
    topic = " ".join(prompt.split()[:12]) or "your request"
    return (
        f"Here is a clear answer to: {topic}\n\n"
        "1. Start from the facts stated in the request.\n"
        "2. Work through the steps one at a time and check each result.\n"
        "3. Summarise the outcome in one sentence.\n\n"
        "In short, following these steps gives a correct and complete result."
    )


def _json_value(schema: Any, name: str = "") -> Any:
    if not isinstance(schema, dict):
        return "example"
    if "enum" in schema and schema["enum"]:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for combinator in ("anyOf", "oneOf", "allOf"):
        if schema.get(combinator):
            return _json_value(schema[combinator][0], name)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object" or "properties" in schema:
        return {k: _json_value(v, k) for k, v in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [_json_value(schema.get("items", {}), name)]
    if kind == "number":
        return DEFAULT_SCORE if name == JSON_SCORE_FIELD else 1.5
    if kind == "integer":
        return 4 if name == JSON_SCORE_FIELD else 1
    if kind == "boolean":
        return True
    if name == "explanation":
        return DEFAULT_EXPLANATION
    return "example"


def json_reply_for_schema(schema: dict | None) -> str:
    """JSON text for a schema: {"score": 4.5, "explanation": ...} when it has a score property,
    otherwise an object filled with plausible values (or {"answer": ...} without a schema)."""
    props = (schema or {}).get("properties") or {}
    if JSON_SCORE_FIELD in props:
        value = _json_value(schema)
        value[JSON_SCORE_FIELD] = _json_value(props[JSON_SCORE_FIELD], JSON_SCORE_FIELD)
        if "explanation" in props or not props.keys() - {JSON_SCORE_FIELD}:
            value["explanation"] = DEFAULT_EXPLANATION
        return json.dumps(value)
    if schema:
        return json.dumps(_json_value(schema))
    return json.dumps({"answer": "Here is a clear and complete answer."})


def default_reply(messages: list[dict[str, Any]], wants_json: bool | dict = False) -> str:
    """Plausible content for a request, by recognising the prompt (see the ``*_MARKERS``).

    ``messages`` are ``{"role", "content"}`` dicts (a system message included); ``wants_json`` is
    False, True (JSON object wanted) or the JSON schema (a dict).

    In order: JSON wanted -> :func:`json_reply_for_schema`; "Assistant 1" and "Assistant 2" ->
    :func:`pairwise_reply`; a rating keyword with a 0-5 scale -> :func:`rating_reply`; an optimizer
    prompt -> :func:`optimizer_reply`; a trajectory analysis -> :func:`analysis_reply`; a rewrite
    prompt -> :func:`rewrite_reply` of the instruction found in it; a lone rating keyword ->
    :func:`rating_reply`; otherwise :func:`answer_reply`.
    """
    if wants_json:
        return json_reply_for_schema(wants_json if isinstance(wants_json, dict) else None)
    users = [_text_of(m.get("content")) for m in messages if m.get("role") == "user"]
    last_user = users[-1] if users else ""
    everything = "\n\n".join(_text_of(m.get("content")) for m in messages).lower()
    if all(_has_any(everything, (m,)) for m in PAIRWISE_MARKERS):
        return pairwise_reply()
    if "<<<first instruction>>>" in everything and "<<<second instruction>>>" in everything:
        return equality_reply(last_user or everything)
    if _has_any(everything, RATING_MARKERS) and re.search(RATING_SCALE_PATTERN, everything):
        return rating_reply()
    if _has_any(everything, OPTIMIZER_MARKERS) or (
        _has_any(everything, OPTIMIZER_WEAK_MARKERS) and _has_any(everything, ("method",))
    ):
        return optimizer_reply()
    if _has_any(everything, ANALYSIS_MARKERS):
        return analysis_reply()
    if _has_any(everything, REWRITE_MARKERS):
        return rewrite_reply(extract_instruction(last_user or everything))
    if _has_any(everything, ("score", "rating")):
        return rating_reply()
    return answer_reply(last_user)


# ---------------------------------------------------------------------------------------------
# Wire-format helpers
# ---------------------------------------------------------------------------------------------


def _text_of(content: Any) -> str:
    """Text of a message content: a string, or a list of parts / blocks with "text"."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif part.get("type") == "tool_result":
                    parts.append(_text_of(part.get("content")))
        return "\n".join(parts)
    if isinstance(content, dict) and isinstance(content.get("text"), str):
        return content["text"]
    return str(content)


def estimate_tokens(text: str) -> int:
    """The fake's token estimate for one message or reply: ``len(text) // 4 + 1`` (it imitates a server's
    count; evoray's own estimate is :mod:`evoray.tokens`)."""
    return len(text) // 4 + 1


def _normalise(kind: str, body: dict) -> list[dict[str, str]]:
    messages = []
    if kind == "anthropic" and body.get("system"):
        messages.append({"role": "system", "content": _text_of(body["system"])})
    for m in body.get("messages") or []:
        if isinstance(m, dict):
            messages.append({"role": str(m.get("role", "user")), "content": _text_of(m.get("content"))})
    return messages


def _wants_json(kind: str, body: dict) -> tuple[bool | dict, str | None]:
    """(False | True | schema, forced tool name) the request asks for."""
    if kind == "openai":
        rf = body.get("response_format") or {}
        if isinstance(rf, dict):
            if rf.get("type") == "json_schema":
                js = rf.get("json_schema") or {}
                return (js.get("schema") or True), None
            if rf.get("type") == "json_object":
                schema = rf.get("schema")  # llama.cpp and llama-cpp-python read a schema beside json_object
                return (schema if isinstance(schema, dict) and schema else True), None
        return False, None
    for fmt in (body.get("output_format"), (body.get("output_config") or {}).get("format")):
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            return (fmt.get("schema") or True), None
    choice = body.get("tool_choice") or {}
    if isinstance(choice, dict) and choice.get("type") in ("tool", "any"):
        tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
        tool = next((t for t in tools if t.get("name") == choice.get("name")), tools[0] if tools else None)
        if tool:
            return (tool.get("input_schema") or True), str(tool.get("name"))
    return False, None


def _error_body(kind: str, status: int, message: str) -> dict:
    openai_types = {400: "invalid_request_error", 401: "invalid_request_error", 429: "rate_limit_error",
                    504: "timeout"}
    anthropic_types = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error",
                       503: "overloaded_error", 529: "overloaded_error", 504: "timeout_error"}
    if kind == "anthropic":
        return {"type": "error", "error": {"type": anthropic_types.get(status, "api_error"), "message": message}}
    error: dict[str, Any] = {"message": message, "type": openai_types.get(status, "server_error"),
                             "param": None, "code": None}
    if status == 401:
        error["code"] = "invalid_api_key"
    return {"error": error}


# ---------------------------------------------------------------------------------------------
# Token buckets and stats
# ---------------------------------------------------------------------------------------------


class _Bucket:
    """A token bucket: ``rate`` per second, holding ``capacity``; refills continuously.

    A cost larger than the capacity is admitted when the bucket is full (the level goes negative),
    so a single huge request is slow, not impossible. Not thread-safe: the server holds its lock.
    """

    def __init__(self, rate: float, capacity: float, now: float):
        self.rate = rate
        self.capacity = capacity
        self.level = capacity
        self.t = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now

    def wait_for(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` fits (0: fits now)."""
        self._refill(now)
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need - 1e-9 else (need - self.level) / self.rate

    def take(self, cost: float, now: float | None = None) -> None:
        self.level -= cost

    def remaining_per_minute(self, now: float) -> float:
        self._refill(now)
        return max(0.0, self.level) * self.rate * 60.0 / self.capacity

    def reset_s(self, now: float) -> float:
        self._refill(now)
        return max(0.0, self.capacity - self.level) / self.rate

    def retune(self, rate: float, capacity: float, now: float) -> None:
        self._refill(now)
        self.rate, self.capacity = rate, capacity
        self.level = min(self.level, capacity)


COUNTERS = ("requests", "ok", "rate_limited", "errors", "malformed", "empty", "hangs", "unauthorized",
            "bad_request", "responder_errors", "input_tokens", "output_tokens", "resets", "trickled")
MAX_TIMES = 10_000


class _Stats:
    def __init__(self) -> None:
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.per_endpoint: dict[str, int] = {}
        self.window: deque[float] = deque()  # monotonic times of the last second's requests
        self.max_rps_1s = 0
        self.first_request_t: float | None = None
        self.last_request_t: float | None = None
        self.times: deque[float] = deque(maxlen=MAX_TIMES)  # wall-clock times of the latest requests
        self.admitted_times: deque[float] = deque(maxlen=MAX_TIMES)  # ... of those the limits admitted
        self.in_flight = 0
        self.max_in_flight = 0

    def arrive(self, path: str, mono: float, wall: float) -> None:
        self.counts["requests"] += 1
        self.per_endpoint[path] = self.per_endpoint.get(path, 0) + 1
        self.window.append(mono)
        while self.window and self.window[0] <= mono - 1.0:
            self.window.popleft()
        self.max_rps_1s = max(self.max_rps_1s, len(self.window))
        if self.first_request_t is None:
            self.first_request_t = wall
        self.last_request_t = wall
        self.times.append(wall)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.counts,
            "per_endpoint": dict(self.per_endpoint),
            "max_rps_1s": self.max_rps_1s,
            "first_request_t": self.first_request_t,
            "last_request_t": self.last_request_t,
            "times": list(self.times),
            "admitted_times": list(self.admitted_times),
            "times_dropped": max(0, self.counts["requests"] - len(self.times)),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
        }


# ---------------------------------------------------------------------------------------------
# Strict limits, rate-limit headers and transport faults
# ---------------------------------------------------------------------------------------------
#
# The default limit mode, "window", is the strictest behaviour real APIs show: a per-minute limit
# enforced as at most ``rpm/60 * window_s`` requests in ANY sliding window of ``window_s`` seconds
# (600 rpm: 10 in any second), where a rejected request still counts; tokens likewise (a request
# larger than the window's allowance is admitted alone into an empty window). "bucket" is the
# older, lenient token bucket (``burst_seconds`` of burst), kept for comparison.
#
# Every 200 and 429 carries the limit state the way the real APIs do: on /v1/chat/completions
# ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (remaining scaled to per minute, reset
# as a duration until the window is empty: "20ms", "1.2s"), on /v1/messages
# ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`` (reset as an RFC 3339 time).
# ``advertised_rpm`` above ``rpm`` announces a limit the server does not honour. A 429 carries
# ``Retry-After`` in seconds or as an HTTP-date (``retry_after_format``) and ``retry-after-ms``.

LIMIT_MODES = ("window", "bucket")
RETRY_AFTER_FORMATS = ("seconds", "http-date", "none")


def validate_strict_options(cfg: "FakeServerConfig") -> None:
    if cfg.limit_mode not in LIMIT_MODES:
        raise ValueError(f"FakeServerConfig.limit_mode must be one of {LIMIT_MODES}, got {cfg.limit_mode!r}")
    if cfg.retry_after_format not in RETRY_AFTER_FORMATS:
        raise ValueError(f"FakeServerConfig.retry_after_format must be one of {RETRY_AFTER_FORMATS}, "
                         f"got {cfg.retry_after_format!r}")
    if cfg.window_s <= 0:
        raise ValueError(f"FakeServerConfig.window_s must be positive, got {cfg.window_s}")
    if cfg.trickle_s < 0:
        raise ValueError(f"FakeServerConfig.trickle_s must be >= 0, got {cfg.trickle_s}")
    for name in ("advertised_rpm", "advertised_tpm"):
        v = getattr(cfg, name)
        if v is not None and v <= 0:
            raise ValueError(f"FakeServerConfig.{name} must be positive or None, got {v}")


class _Window:
    """A strict sliding window: at most ``per_minute/60 * window`` units in any ``window`` seconds.

    Windows shorter than one unit's share (30 rpm in 1 s) are widened to ``60/per_minute`` seconds,
    so such a limit admits one request per two seconds. Not thread-safe: the server holds its lock."""

    def __init__(self, per_minute: float, window_s: float, count_rejected: bool):
        self.events: deque[list] = deque()  # [time, units]
        self.used = 0.0
        self.retune(per_minute, window_s, count_rejected)

    def retune(self, per_minute: float, window_s: float, count_rejected: bool) -> None:
        self.per_minute = per_minute
        self.window = max(window_s, 60.0 / per_minute)
        self.capacity = float(math.floor(per_minute / 60.0 * self.window + 1e-9))
        self.count_rejected = count_rejected

    def _expire(self, now: float) -> None:
        while self.events and self.events[0][0] <= now - self.window:
            self.used -= self.events.popleft()[1]
        if not self.events:
            self.used = 0.0

    def wait_for(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` fits (0: fits now)."""
        self._expire(now)
        if self.used + cost <= self.capacity + 1e-9 or not self.events:
            return 0.0
        need = self.used + min(cost, self.capacity) - self.capacity
        freed = 0.0
        for t, units in self.events:
            freed += units
            if freed >= need - 1e-9:
                return max(1e-6, t + self.window - now)
        return self.window

    def take(self, cost: float, now: float) -> None:
        self.events.append([now, cost])
        self.used += cost

    def note_rejected(self, now: float) -> None:
        if self.count_rejected:
            self.take(1.0, now)

    def remaining_per_minute(self, now: float) -> float:
        self._expire(now)
        return max(0.0, self.capacity - self.used) * 60.0 / self.window

    def reset_s(self, now: float) -> float:
        self._expire(now)
        return (self.events[-1][0] + self.window - now) if self.events else 0.0


def _duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms" under a second, else "1.5s" / "6m0s"."""
    if seconds < 1.0:
        return f"{max(0, int(math.ceil(seconds * 1000)))}ms"
    if seconds < 60.0:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    m, s = divmod(seconds, 60.0)
    return f"{int(m)}m{int(s)}s"


def rate_limit_headers(kind: str, state: list[tuple[str, float, float, float]]) -> dict[str, str]:
    """Headers for ``state`` = [(dimension, limit per minute, remaining per minute, seconds to reset)]."""
    out: dict[str, str] = {}
    for dim, limit, remaining, reset in state:
        if kind == "openai":
            out[f"x-ratelimit-limit-{dim}"] = str(int(limit))
            out[f"x-ratelimit-remaining-{dim}"] = str(int(remaining))
            out[f"x-ratelimit-reset-{dim}"] = _duration(reset)
        else:
            when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=reset)
            out[f"anthropic-ratelimit-{dim}-limit"] = str(int(limit))
            out[f"anthropic-ratelimit-{dim}-remaining"] = str(int(remaining))
            out[f"anthropic-ratelimit-{dim}-reset"] = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return out


def retry_after_headers(advise: float, cfg: "FakeServerConfig") -> dict[str, str]:
    out: dict[str, str] = {}
    if cfg.retry_after_format == "seconds":
        out["retry-after"] = str(max(0, math.ceil(advise)))
    elif cfg.retry_after_format == "http-date":
        out["retry-after"] = email.utils.formatdate(math.ceil(time.time() + advise), usegmt=True)
    if cfg.retry_after_ms:
        out["retry-after-ms"] = str(max(0, int(round(advise * 1000))))
    return out


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------

Responder = Callable[[str, dict], Any]


class FakeLLMServer:
    """A real HTTP server on 127.0.0.1 speaking the OpenAI and Anthropic wire formats.

    ``config``: a :class:`FakeServerConfig`; ``responder(kind, request_json) -> str`` answers
    when no scripted reply is queued (default: :func:`default_reply`); ``port=0`` picks a free port.
    Thread-safe: ``stats()``, ``update()``, ``script()`` and ``reset_stats()`` may be called from any
    thread; other processes read ``GET {url}/stats`` (see :func:`fetch_stats`).
    """

    def __init__(self, config: FakeServerConfig | None = None, responder: Responder | None = None,
                 *, host: str = "127.0.0.1", port: int = 0):
        self._config = dataclasses.replace(config) if config else FakeServerConfig()
        self._config.validate()
        self.responder = responder
        self.host = host
        self._want_port = port
        self.port: int | None = None
        self._lock = threading.Lock()
        self._queue: deque[Any] = deque()
        self._stats = _Stats()
        self._rng = random.Random(self._config.seed)
        self._rpm: _Bucket | _Window | None = None
        self._tpm: _Bucket | _Window | None = None
        self._retune_buckets(time.monotonic())
        self._ids = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        from .fake_batches import FakeBatches  # the batch endpoints (OpenAI Files/Batches, Anthropic Message Batches)

        self.batches = FakeBatches(self)

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("FakeLLMServer is not started: call start() or use it as a context manager")
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.url

    @property
    def config(self) -> FakeServerConfig:
        with self._lock:
            return dataclasses.replace(self._config)

    def start(self) -> "FakeLLMServer":
        if self._thread is not None:
            raise RuntimeError("FakeLLMServer already started")
        ready: dict[str, Any] = {}
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready, started), name="fake-llm-server",
                                        daemon=True)
        self._thread.start()
        started.wait(30)
        if "error" in ready or not started.is_set():
            self._thread.join(5)
            self._thread = None
            raise RuntimeError(f"FakeLLMServer could not start: {ready.get('error', 'timed out')}")
        self.port = ready["port"]
        return self

    def stop(self) -> None:
        """Stop serving and free the port (hanging requests are released at once)."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            try:
                fut.result(10)
            except Exception:  # noqa: BLE001 - stopping must not raise in teardown
                pass
            loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._thread = None
        self._loop = None
        self.port = None

    def __enter__(self) -> "FakeLLMServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __reduce__(self):
        raise TypeError("a FakeLLMServer lives in one process; pass its url to other processes instead")

    def _serve(self, ready: dict, started: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._startup(ready))
        except BaseException as e:  # noqa: BLE001 - reported to start()
            ready["error"] = repr(e)
            started.set()
            loop.close()
            return
        started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _startup(self, ready: dict) -> None:
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(OPENAI_PATH, self._handle_openai)
        app.router.add_post(ANTHROPIC_PATH, self._handle_anthropic)
        app.router.add_get("/stats", self._handle_stats)
        app.router.add_get("/health", self._handle_health)
        self.batches.mount(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handle_signals=False)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self._want_port))
        except OSError:
            sock.close()
            await runner.cleanup()
            raise
        site = web.SockSite(runner, sock)
        await site.start()
        self._runner = runner
        ready["port"] = sock.getsockname()[1]

    async def _shutdown(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- control -----------------------------------------------------------------------------------

    def update(self, **changes: Any) -> FakeServerConfig:
        """Change the config at run time (``srv.update(rpm=300)``); buckets keep their level,
        clamped to the new capacity. Returns the new config."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(FakeServerConfig)}
        if unknown:
            known = ", ".join(f.name for f in dataclasses.fields(FakeServerConfig))
            raise TypeError(f"unknown FakeServerConfig field(s) {sorted(unknown)}; known: {known}")
        with self._lock:
            new = dataclasses.replace(self._config, **changes)
            new.validate()
            self._config = new
            if "seed" in changes:
                self._rng = random.Random(new.seed)
            self._retune_buckets(time.monotonic())
            return dataclasses.replace(new)

    def script(self, replies: list[Any] | tuple[Any, ...] | str) -> "FakeLLMServer":
        """Queue replies for the next requests, in order: text, a dict/list (sent as JSON text) or a
        :class:`Fault`. A queued reply is used before the responder."""
        if isinstance(replies, (str, Fault, dict)):
            replies = [replies]
        with self._lock:
            self._queue.extend(replies)
        return self

    def pending_script(self) -> int:
        with self._lock:
            return len(self._queue)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return self._stats.snapshot()

    def reset_stats(self) -> None:
        """Zero the counters (rate-limit buckets and the script queue are kept)."""
        with self._lock:
            in_flight = self._stats.in_flight
            self._stats = _Stats()
            self._stats.in_flight = in_flight

    def reset_limits(self) -> None:
        """Refill the rate-limit buckets."""
        with self._lock:
            self._rpm = self._tpm = None
            self._retune_buckets(time.monotonic())

    def _retune_buckets(self, now: float) -> None:
        c = self._config
        for attr, per_min in (("_rpm", c.rpm), ("_tpm", c.tpm)):
            if per_min is None:
                setattr(self, attr, None)
                continue
            current = getattr(self, attr)
            if c.limit_mode == "window":
                counts_rejects = c.count_rejected and attr == "_rpm"
                if isinstance(current, _Window):
                    current.retune(per_min, c.window_s, counts_rejects)
                else:
                    setattr(self, attr, _Window(per_min, c.window_s, counts_rejects))
                continue
            rate = per_min / 60.0
            capacity = max(1.0, rate * c.burst_seconds)
            if isinstance(current, _Bucket):
                current.retune(rate, capacity, now)
            else:
                setattr(self, attr, _Bucket(rate, capacity, now))

    # -- handlers ----------------------------------------------------------------------------------

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _handle_openai(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "openai", OPENAI_PATH)

    async def _handle_anthropic(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "anthropic", ANTHROPIC_PATH)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats.counts[name] += n

    def _authorised(self, request: web.Request, required: str) -> bool:
        auth = request.headers.get("Authorization", "")
        bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        return required in (bearer, request.headers.get("x-api-key"), request.headers.get("api-key"))

    async def _handle(self, request: web.Request, kind: str, path: str) -> web.StreamResponse:
        with self._lock:
            stats = self._stats
            stats.arrive(path, time.monotonic(), time.time())
        try:
            return await self._answer(request, kind)
        finally:
            with self._lock:
                stats.in_flight -= 1
                if stats is not self._stats:  # reset_stats() ran meanwhile
                    self._stats.in_flight = max(0, self._stats.in_flight - 1)

    async def _answer(self, request: web.Request, kind: str) -> web.StreamResponse:
        cfg = self.config
        if cfg.required_key is not None and not self._authorised(request, cfg.required_key):
            self._count("unauthorized")
            msg = ("Incorrect API key provided." if kind == "openai" else "invalid x-api-key")
            return web.json_response(_error_body(kind, 401, msg), status=401)
        try:
            body = json.loads(await request.read())
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                raise ValueError("the body must be a JSON object with a 'messages' list")
            if body.get("stream"):
                raise ValueError("stream: true is not supported by the fake server")
        except (ValueError, UnicodeDecodeError) as e:
            self._count("bad_request")
            return web.json_response(_error_body(kind, 400, f"bad request: {e}"), status=400)

        profile = PROFILES.get(cfg.profile) if kind == "openai" and cfg.profile else None
        if profile is not None:
            rejected = profile.check(body)
            if rejected is not None:
                with self._lock:  # a counter that exists only on servers with a profile
                    self._stats.counts["profile_rejected"] = self._stats.counts.get("profile_rejected", 0) + 1
                return web.json_response(rejected[1], status=rejected[0])
        messages = _normalise(kind, body)
        wants_json, tool_name = _wants_json(kind, body) if profile is None else (profile.wants_json(body), None)
        prompt_tokens = sum(estimate_tokens(m["content"]) for m in messages)

        # Decide the outcome and the reply text before the buckets are charged, so the tpm bucket is
        # charged exactly the usage the answer reports. The queue is consumed only when admitted.
        with self._lock:
            head = self._queue[0] if self._queue else None
        if isinstance(head, Fault):
            text = ""
        elif head is not None:
            text = head if isinstance(head, str) else json.dumps(head)
        else:
            try:
                text = self._respond(kind, body, messages, wants_json)
            except Exception as e:  # noqa: BLE001 - a broken test responder shows up as a 500 that names it
                self._count("responder_errors")
                msg = f"fake server: the responder raised {type(e).__name__}: {e}"
                return web.json_response(_error_body(kind, 500, msg), status=500)
        completion_tokens = estimate_tokens(text)

        # No await between the peek above and the pop below, and other threads only append, so the
        # head cannot change in between.
        with self._lock:
            limited, wait = False, 0.0
            if head is Fault.RATE_LIMITED:
                self._queue.popleft()
                limited = True
            else:
                cost = prompt_tokens + completion_tokens
                now = time.monotonic()
                buckets = [(b, c) for b, c in ((self._rpm, 1), (self._tpm, cost)) if b is not None]
                wait = max((b.wait_for(c, now) for b, c in buckets), default=0.0)
                limited = wait > 0
            if limited:
                self._stats.counts["rate_limited"] += 1
                if isinstance(self._rpm, _Window):
                    self._rpm.note_rejected(time.monotonic())  # a strict API counts it all the same
            else:
                for b, c in buckets:
                    b.take(c, now)
                self._stats.admitted_times.append(time.time())
                scripted_fault = head if isinstance(head, Fault) else None
                outcome, status, latency = self._draw(cfg, scripted_fault)
                if head is not None and (scripted_fault is not None or outcome == "ok"):
                    self._queue.popleft()
        limit_headers = self._limit_headers(kind, cfg)
        if limited:
            return self._rate_limited(kind, cfg, wait, limit_headers)

        if outcome == "hang":
            self._count("hangs")
            assert self._stopping is not None
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=cfg.hang_s)
            except asyncio.TimeoutError:
                pass
            return web.json_response(_error_body(kind, 504, "fake server: the request hung"), status=504)

        if latency > 0:
            assert self._stopping is not None
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=latency)
            except asyncio.TimeoutError:
                pass

        if outcome == "error":
            self._count("errors")
            return web.json_response(_error_body(kind, status, f"fake server: injected {status}"), status=status)
        if outcome == "reset":
            self._count("resets")
            return self._reset_connection(request)
        if outcome == "malformed":
            self._count("malformed")
            broken = '{"id": "fake-malformed", "choices": [{"index": 0, "message": {"role": "assistant", "cont'
            return web.Response(text=broken, status=200, content_type="application/json")

        empty = outcome == "empty"
        with self._lock:
            self._ids += 1
            n = self._ids
            self._stats.counts["empty" if empty else "ok"] += 1
            if not empty:
                self._stats.counts["input_tokens"] += prompt_tokens
                self._stats.counts["output_tokens"] += completion_tokens
        model = str(body.get("model") or "fake-model")
        if kind == "openai":
            payload = self._openai_body(n, model, "" if empty else text, prompt_tokens,
                                        0 if empty else completion_tokens, empty)
        else:
            payload = self._anthropic_body(n, model, text, prompt_tokens, 0 if empty else completion_tokens,
                                           empty, tool_name)
        headers = {"x-request-id": f"req_fake_{n}", **limit_headers}
        if cfg.trickle_s > 0:
            return await self._trickle(request, payload, headers, cfg.trickle_s)
        return web.json_response(payload, headers=headers)

    def _respond(self, kind: str, body: dict, messages: list[dict[str, str]], wants_json: bool | dict) -> str:
        if self.responder is not None:
            reply = self.responder(kind, body)
            return reply if isinstance(reply, str) else json.dumps(reply)
        return default_reply(messages, wants_json)

    def _draw(self, cfg: FakeServerConfig, scripted: Fault | None) -> tuple[str, int, float]:
        """(outcome, status, latency) for an admitted request; the caller holds the lock."""
        rng = self._rng
        if scripted is not None:
            outcome = {Fault.HANG: "hang", Fault.MALFORMED: "malformed", Fault.EMPTY: "empty"}.get(scripted, "error")
            status = _FAULT_STATUS.get(scripted, 500)
        else:
            u = rng.random()
            outcome, status = "ok", 200
            edge = 0.0
            for name, rate in (("hang", cfg.hang_rate), ("error", cfg.error_rate),
                               ("malformed", cfg.malformed_rate), ("empty", cfg.empty_choices_rate),
                               ("reset", cfg.reset_rate)):
                edge += rate
                if rate > 0 and u < edge:
                    outcome = name
                    break
            if outcome == "error":
                status = rng.choice(list(cfg.error_statuses))
        latency = cfg.latency_s
        if cfg.latency_dist == "uniform" and cfg.latency_jitter_s:
            latency += rng.uniform(-cfg.latency_jitter_s, cfg.latency_jitter_s)
        elif cfg.latency_dist == "exponential" and cfg.latency_s > 0:
            latency = rng.expovariate(1.0 / cfg.latency_s)
        return outcome, status, max(0.0, latency)

    def _rate_limited(self, kind: str, cfg: FakeServerConfig, wait: float,
                      limit_headers: dict[str, str] | None = None) -> web.Response:
        advise = cfg.retry_after_s if cfg.retry_after_s is not None else wait
        headers = {**(limit_headers or {}), **retry_after_headers(advise, cfg)}
        msg = f"fake server: rate limit reached; retry after {advise:.3f}s"
        return web.json_response(_error_body(kind, 429, msg), status=429, headers=headers)

    def _limit_headers(self, kind: str, cfg: FakeServerConfig) -> dict[str, str]:
        if not cfg.rate_limit_headers:
            return {}
        with self._lock:
            now = time.monotonic()
            parts = [(dim, lim, adv) for dim, lim, adv in (("requests", self._rpm, cfg.advertised_rpm or cfg.rpm),
                                                          ("tokens", self._tpm, cfg.advertised_tpm or cfg.tpm))
                     if lim is not None and adv]
            state = [(dim, adv, lim.remaining_per_minute(now), lim.reset_s(now)) for dim, lim, adv in parts]
        return rate_limit_headers(kind, state)

    @staticmethod
    def _reset_connection(request: web.Request) -> web.Response:
        """Close the connection without an answer (the client sees a connection error)."""
        transport = request.transport
        if transport is not None:
            transport.abort()
        return web.Response(status=500)  # never reaches the client

    async def _trickle(self, request: web.Request, payload: dict, headers: dict[str, str],
                       seconds: float) -> web.StreamResponse:
        """Send the body in ten chunks spread over ``seconds`` (a slow, trickling answer)."""
        body = json.dumps(payload).encode()
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_type = "application/json"
        resp.content_length = len(body)
        await resp.prepare(request)
        # counted before the first byte: with a Content-Length the client is done at the last chunk,
        # possibly before this coroutine runs again
        self._count("trickled")
        step = max(1, len(body) // 10)
        for i in range(0, len(body), step):
            await resp.write(body[i:i + step])
            if i + step < len(body):
                assert self._stopping is not None
                try:
                    await asyncio.wait_for(self._stopping.wait(), timeout=seconds / 10)
                except asyncio.TimeoutError:
                    pass
        await resp.write_eof()
        return resp

    @staticmethod
    def _openai_body(n: int, model: str, text: str, prompt: int, completion: int, empty: bool) -> dict:
        choices = [] if empty else [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }]
        return {
            "id": f"chatcmpl-fake-{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
            "system_fingerprint": "fake",
        }

    @staticmethod
    def _anthropic_body(n: int, model: str, text: str, prompt: int, completion: int, empty: bool,
                        tool_name: str | None) -> dict:
        if empty:
            content: list[dict] = []
            stop = "end_turn"
        elif tool_name is not None:
            try:
                tool_input = json.loads(text)
            except ValueError:
                tool_input = {"text": text}
            content = [{"type": "tool_use", "id": f"toolu_fake_{n}", "name": tool_name, "input": tool_input}]
            stop = "tool_use"
        else:
            content = [{"type": "text", "text": text}]
            stop = "end_turn"
        return {
            "id": f"msg_fake_{n}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": prompt, "output_tokens": completion},
        }


# ---------------------------------------------------------------------------------------------
# Server profiles: what a real OpenAI-compatible server accepts, and how it says no
# ---------------------------------------------------------------------------------------------

# llama-cpp-python's server (0.3.x) validates the body with pydantic, and its route handler turns the
# validation exception into HTTP 500 with the message below (seen from `python -m llama_cpp.server`)
_LCP_VALIDATION = ("1 validation error:\n  {{'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
                   "'msg': \"Input should be 'text' or 'json_object'\", 'input': '{got}', 'ctx': {{'expected': "
                   "\"'text' or 'json_object'\"}}}}\n\n  File \".../llama_cpp/server/app.py\", line 376, in "
                   "create_chat_completion\n    POST /v1/chat/completions")


def _openai_error(status: int, message: str, etype: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


@dataclass(frozen=True)
class ServerProfile:
    """What one real server accepts on ``/v1/chat/completions``, for a strict fake.

    ``formats``: the ``response_format`` types it accepts; ``json_object_schema``: it constrains a
    ``json_object`` reply to a ``schema`` given beside it (llama.cpp's grammar) rather than to any
    JSON object; ``reject``: ``(status, body)`` for a response_format type it does not accept, built
    from the type; ``fields``: request field -> ``(status, body)`` when that field is refused.
    """

    name: str
    formats: frozenset[str]
    json_object_schema: bool
    reject: Callable[[str], tuple[int, dict]]
    fields: dict[str, tuple[int, dict]] = dataclasses.field(default_factory=dict)
    source: str = ""

    def check(self, body: dict) -> tuple[int, dict] | None:
        for name, answer in self.fields.items():
            if name in body:
                return answer
        rf = body.get("response_format")
        if isinstance(rf, dict):
            t = str(rf.get("type") or "")
            if t and t not in self.formats:
                return self.reject(t)
        return None

    def wants_json(self, body: dict) -> bool | dict:
        rf = body.get("response_format")
        if not isinstance(rf, dict):
            return False
        if rf.get("type") == "json_schema":
            return (rf.get("json_schema") or {}).get("schema") or True
        if rf.get("type") == "json_object":
            schema = rf.get("schema")
            return schema if self.json_object_schema and isinstance(schema, dict) and schema else True
        return False


def _llama_cpp_reject(status: int):
    def reject(t: str) -> tuple[int, dict]:
        msg = f'response_format type must be one of "text" or "json_object", but got: {t}'
        etype = "invalid_request_error" if status == 400 else "server_error"
        return status, {"error": {"code": status, "message": msg, "type": etype}}
    return reject


#: Profiles from the servers' sources (2025-2026): llama-cpp-python ``llama_cpp/server`` (types.py,
#: errors.py), llama.cpp ``tools/server`` (``oaicompat_chat_params_parse``), vLLM's OpenAI entrypoint,
#: Ollama ``openai/openai.go`` and OpenAI's reasoning models.
PROFILES: dict[str, ServerProfile] = {p.name: p for p in (
    ServerProfile(
        "llama_cpp_python", frozenset({"text", "json_object"}), True,
        lambda t: (500, _openai_error(500, _LCP_VALIDATION.format(got=t), "internal_server_error")),
        source="llama-cpp-python 0.3: response_format type is Literal['text', 'json_object'] (+ optional schema); "
               "a failed validation is answered 500 internal_server_error"),
    ServerProfile(
        "llama_cpp", frozenset({"text", "json_object", "json_schema"}), True, _llama_cpp_reject(400),
        source="llama.cpp llama-server: json_object (+schema) and json_schema (json_schema.schema); "
               "std::invalid_argument -> 400 invalid_request_error"),
    ServerProfile(
        "llama_cpp_2024", frozenset({"text", "json_object"}), True, _llama_cpp_reject(500),
        source="llama.cpp llama-server before json_schema support (PR 9527, 2024-09): runtime_error -> 500"),
    ServerProfile(
        "vllm", frozenset({"text", "json_object", "json_schema", "structural_tag"}), False,
        lambda t: (400, {"object": "error", "message": f"Unsupported response_format type: {t}",
                         "type": "BadRequestError", "param": None, "code": 400}),
        source="vLLM: json_schema via guided decoding; bad requests answered 400 BadRequestError"),
    ServerProfile(
        "ollama", frozenset({"text", "json_object", "json_schema"}), False,
        lambda t: (400, _openai_error(400, f"invalid response_format type: {t}", "invalid_request_error")),
        source="Ollama /v1: json_object -> format 'json' (schema ignored), json_schema -> the schema; "
               "max_completion_tokens is not read"),
    ServerProfile(
        "openai_reasoning", frozenset({"text", "json_object", "json_schema"}), False,
        lambda t: (400, _openai_error(400, f"Invalid value: '{t}'.", "invalid_request_error", "response_format.type")),
        fields={"max_tokens": (400, _openai_error(
            400, "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' "
                 "instead.", "invalid_request_error", "max_tokens", "unsupported_parameter"))},
        source="OpenAI o-series / gpt-5 models: max_tokens refused in favour of max_completion_tokens"),
)}


def unused_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on (bound once to find it, then released): connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class DeadEndServer:
    """A TCP listener on 127.0.0.1 that never sends an HTTP answer, for transport-failure tests.

    ``mode="reset"``: read the request, then reset the connection (RST); ``mode="silent"``: read it
    and say nothing until stopped (the client times out). ``url`` works as a ``base_url``.
    """

    def __init__(self, mode: str = "reset"):
        if mode not in ("reset", "silent"):
            raise ValueError(f"DeadEndServer mode must be 'reset' or 'silent', got {mode!r}")
        self.mode = mode
        self.connections = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._held: list[socket.socket] = []
        self._stop = threading.Event()

    @property
    def url(self) -> str:
        assert self._sock is not None, "DeadEndServer is not started"
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"

    def start(self) -> "DeadEndServer":
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._serve, name="dead-end-server", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        import struct

        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            conn.settimeout(1.0)
            try:
                conn.recv(65536)
            except OSError:
                pass
            if self.mode == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
            else:
                self._held.append(conn)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for c in self._held:
            c.close()
        if self._sock is not None:
            self._sock.close()

    def __enter__(self) -> "DeadEndServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def fetch_stats(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """``GET {url}/stats`` from any process (a Ray actor, a benchmark driver)."""
    with urllib.request.urlopen(url.rstrip("/") + "/stats", timeout=timeout) as resp:
        return json.loads(resp.read())
