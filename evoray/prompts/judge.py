"""AlpaGasus evaluation: a judge LLM compares two assistants' answers to one question.

Structure (after the paper's evaluation): the question, then the answer of Assistant 1 and the
answer of Assistant 2; the judge scores each answer from 1 to 10 (higher is better), writes both
scores on the first line separated by a space (Assistant 1 first), then explains. Every question is
judged twice with the answer positions swapped (see :mod:`evoray.judge`), so the prompt itself only
knows "Assistant 1" and "Assistant 2".

The prose is ours. Question and answers are fenced (see :mod:`evoray.prompts`).

With ``judge.json_output`` the closing instruction asks for one JSON object ``{score_1, score_2,
explanation}`` instead and the request carries :data:`JUDGE_SCHEMA` (schema-constrained where the
provider takes one): small models that never write the two scores on the first line still give a
readable verdict.
"""

from __future__ import annotations

from typing import Any

from ..providers.base import Request
from . import block, choose_fence, fence_rule

PAIR_MIN = 1.0
PAIR_MAX = 10.0

SYSTEM = (
    "You are an impartial judge of answers written by AI assistants. You compare the answers of two "
    "assistants to the same question and score each one."
)

USER = """{fence_rule}

[Question]
{question}

[Answer of Assistant 1]
{answer_1}

[Answer of Assistant 2]
{answer_2}

Judge how well each assistant answered the question above, weighing how helpful, relevant, accurate and detailed its answer is. Give each assistant a score from 1 to 10, where a higher score means a better answer.
{reply_format}
Be fair: which answer comes first must not influence you, and neither must how long the answers are."""

TEXT_REPLY = (
    "Reply in this form: the first line holds only the two scores separated by a space, the score of Assistant 1 "
    "first and then the score of Assistant 2 (for example: 7 9). From the second line on, explain your judgment."
)

JSON_REPLY = (
    'Reply with one JSON object with three fields: "score_1", the score of Assistant 1 (a number from 1 to 10), '
    '"score_2", the score of Assistant 2, and "explanation", a short text giving the reasons.'
)

JUDGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "score_1": {"type": "number", "minimum": 1, "maximum": 10},
        "score_2": {"type": "number", "minimum": 1, "maximum": 10},
        "explanation": {"type": "string"},
    },
    "required": ["score_1", "score_2", "explanation"],
    "additionalProperties": False,
}

REPAIR_TEXT = (
    "Your reply above cannot be used: {problem}. Reply again. The first line must hold only the two scores, each "
    "a number from 1 to 10, separated by a space: the score of Assistant 1 first, then the score of Assistant 2 "
    "(for example: 7 9). From the second line on, explain your judgment."
)

REPAIR_JSON = (
    'Your reply above cannot be used: {problem}. Reply again with only one JSON object: {{"score_1": a number from '
    '1 to 10, "score_2": a number from 1 to 10, "explanation": a short text}}.'
)


def render_judge_prompt(question: str, answer_1: str, answer_2: str, json_output: bool = False) -> tuple[str, str]:
    """(system, user) texts for one ordering of one question."""
    tag = choose_fence([question or "", answer_1 or "", answer_2 or ""])
    user = USER.format(
        fence_rule=fence_rule(tag),
        question=block(tag, question or ""),
        answer_1=block(tag, answer_1 or ""),
        answer_2=block(tag, answer_2 or ""),
        reply_format=JSON_REPLY if json_output else TEXT_REPLY,
    )
    return SYSTEM, user


def build_judge_request(question: str, answer_1: str, answer_2: str, max_tokens: int = 256,
                        sample_index: int = 0, json_output: bool = False) -> Request:
    """The judge request for one ordering: temperature 0, answer_1 shown as Assistant 1; with
    ``json_output`` the reply is the JSON object of :data:`JUDGE_SCHEMA`."""
    system, user = render_judge_prompt(question, answer_1, answer_2, json_output)
    return Request(
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
        temperature=0.0,
        max_tokens=max_tokens,
        json_schema=JUDGE_SCHEMA if json_output else None,
        sample_index=sample_index,
    )


def build_judge_repair_request(question: str, answer_1: str, answer_2: str, max_tokens: int, previous_reply: str,
                               problem: str, sample_index: int = 1, json_output: bool = False) -> Request:
    """Ask again after an unusable verdict: the conversation, the reply (its first 1500 characters)
    and a turn naming what was wrong and the form wanted (temperature 0, a new conversation)."""
    system, user = render_judge_prompt(question, answer_1, answer_2, json_output)
    reply = (previous_reply or "").strip()[:1500] or "(an empty reply)"
    fix = (REPAIR_JSON if json_output else REPAIR_TEXT).format(problem=problem.rstrip("."))
    return Request(
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user},
                  {"role": "assistant", "content": reply}, {"role": "user", "content": fix}],
        temperature=0.0,
        max_tokens=max_tokens,
        json_schema=JUDGE_SCHEMA if json_output else None,
        sample_index=sample_index,
    )


def question_text(row: dict[str, Any]) -> str:
    """The question shown to the judge: the instruction, and the input after it when there is one."""
    instruction = (row.get("instruction") or "").strip()
    input_ = (row.get("input") or "").strip()
    return f"{instruction}\n\n{input_}" if input_ else instruction


__all__ = ["JSON_REPLY", "JUDGE_SCHEMA", "PAIR_MAX", "PAIR_MIN", "SYSTEM", "TEXT_REPLY", "USER", "build_judge_repair_request",
           "build_judge_request", "question_text", "render_judge_prompt"]
