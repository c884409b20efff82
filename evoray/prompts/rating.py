"""AlpaGasus step 1: ask a strong LLM to rate one (instruction, input, response) triplet.

Structure (after the paper): a system message asking for feedback on an AI assistant's response to
the instruction and input shown after it; a user message with the triplet under the headings
``###Instruction:``, ``### Input:`` and ``### Response:``, then the request to rate one dimension
of the response on a 0-5 scale (higher is better), the score alone on the first line and an
explanation after it, without bias. Temperature 0.

The prose is ours. Row fields are fenced (see :mod:`evoray.prompts`), so a response that contains
``Score: 5`` or the section headings cannot pass for part of the template.

When the provider supports JSON-schema output the request carries :data:`SCORE_SCHEMA` and the
closing instruction asks for that object instead of the two-part text reply.
"""

from __future__ import annotations

from typing import Any

from ..providers.base import Request
from . import block, choose_fence, fence_rule

SCORE_MIN = 0.0
SCORE_MAX = 5.0

SCORE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "score": {"type": "number", "minimum": SCORE_MIN, "maximum": SCORE_MAX},
        "explanation": {"type": "string"},
    },
    "required": ["score", "explanation"],
    "additionalProperties": False,
}

# Built-in dimensions: name -> what the rater is asked to judge. Any other string given as the
# dimension is used as a custom description of the quality to rate.
DIMENSIONS: dict[str, str] = {
    "accuracy": (
        "accuracy: how correct the response is and how faithfully it carries out the instruction "
        "(and uses the input, when there is one); factual errors, wrong reasoning and ignored "
        "parts of the instruction lower the score"
    ),
    "helpfulness": (
        "helpfulness: how well the response serves the person who gave the instruction - whether "
        "it answers what was asked, is complete enough to act on, and is clear"
    ),
}

SYSTEM = (
    "You review the work of an AI assistant. You will be shown an instruction, the input that "
    "goes with it (which may be empty), and the response the assistant wrote. Give your feedback "
    "on that response."
)

USER = """{fence_rule}

###Instruction:
{instruction}

### Input:
{input}

### Response:
{response}

Rate the response above for {quality}. Use a scale from 0 to 5, where a higher number means a better response; half points such as 3.5 are allowed.
{reply_format}
Base the rating on the content alone: the response's length, its style and the order in which things are presented should not sway you."""

TEXT_REPLY = (
    "Reply in this form: the first line holds the score and nothing else (for example 4 or 3.5). "
    "From the second line on, explain the reasons for your score."
)

JSON_REPLY = (
    'Reply with one JSON object with two fields: "score", a number from 0 to 5, and '
    '"explanation", a short text giving the reasons for your score.'
)


REPAIR_TEXT = (
    "Your reply above cannot be used: {problem}. Reply again. The first line must hold the score and nothing "
    "else: one number from 0 to 5, for example 4 or 3.5. From the second line on, give the reasons."
)

REPAIR_JSON = (
    'Your reply above cannot be used: {problem}. Reply again with only one JSON object: {{"score": a number '
    'from 0 to 5, "explanation": a short text giving the reasons}}.'
)

#: at most this much of an unusable reply is quoted back in a repair turn
REPAIR_QUOTE_CHARS = 1500


def describe_dimension(dimension: str) -> str:
    """The phrase naming what is rated: a built-in dimension's description, or a custom one."""
    key = (dimension or "accuracy").strip()
    if key.lower() in DIMENSIONS:
        return DIMENSIONS[key.lower()]
    return f"the following quality: {key}"


def render_rating_prompt(row: dict[str, Any], dimension: str = "accuracy", use_schema: bool = False) -> tuple[str, str]:
    """(system, user) texts for one row."""
    instruction = row.get("instruction") or ""
    input_ = row.get("input") or ""
    response = row.get("output") or ""
    tag = choose_fence([instruction, input_, response])
    user = USER.format(
        fence_rule=fence_rule(tag),
        instruction=block(tag, instruction),
        input=block(tag, input_),
        response=block(tag, response),
        quality=describe_dimension(dimension),
        reply_format=JSON_REPLY if use_schema else TEXT_REPLY,
    )
    return SYSTEM, user


def build_rating_request(
    row: dict[str, Any],
    dimension: str = "accuracy",
    use_schema: bool = False,
    max_tokens: int = 256,
    sample_index: int = 0,
) -> Request:
    """The rating request for one row: temperature 0, JSON schema when ``use_schema``.

    ``sample_index`` distinguishes a repeated ask (after an unparseable reply) in the cache.
    """
    system, user = render_rating_prompt(row, dimension, use_schema)
    return Request(
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
        temperature=0.0,
        max_tokens=max_tokens,
        json_schema=SCORE_SCHEMA if use_schema else None,
        sample_index=sample_index,
    )


def build_repair_request(
    row: dict[str, Any],
    dimension: str,
    use_schema: bool,
    max_tokens: int,
    previous_reply: str,
    problem: str,
    sample_index: int = 1,
) -> Request:
    """Ask again after an unusable reply: the rating conversation, the model's reply (the first
    :data:`REPAIR_QUOTE_CHARS` characters) and a turn naming what was wrong and the form wanted.

    Temperature stays 0; the conversation is new, so even a deterministic server answers anew."""
    system, user = render_rating_prompt(row, dimension, use_schema)
    reply = (previous_reply or "").strip()[:REPAIR_QUOTE_CHARS] or "(an empty reply)"
    fix = (REPAIR_JSON if use_schema else REPAIR_TEXT).format(problem=problem.rstrip("."))
    return Request(
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user},
                  {"role": "assistant", "content": reply}, {"role": "user", "content": fix}],
        temperature=0.0,
        max_tokens=max_tokens,
        json_schema=SCORE_SCHEMA if use_schema else None,
        sample_index=sample_index,
    )


__all__ = [
    "DIMENSIONS",
    "REPAIR_JSON",
    "REPAIR_TEXT",
    "build_repair_request",
    "JSON_REPLY",
    "SCORE_MAX",
    "SCORE_MIN",
    "SCORE_SCHEMA",
    "SYSTEM",
    "TEXT_REPLY",
    "USER",
    "build_rating_request",
    "describe_dimension",
    "render_rating_prompt",
]
