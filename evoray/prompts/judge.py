"""AlpaGasus evaluation: a judge LLM compares two assistants' answers to one question.

Structure (after the paper's evaluation): the question, then the answer of Assistant 1 and the
answer of Assistant 2; the judge scores each answer from 1 to 10 (higher is better), writes both
scores on the first line separated by a space (Assistant 1 first), then explains. Every question is
judged twice with the answer positions swapped (see :mod:`evoray.judge`), so the prompt itself only
knows "Assistant 1" and "Assistant 2".

The prose is ours. Question and answers are fenced (see :mod:`evoray.prompts`).
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
Reply in this form: the first line holds only the two scores separated by a space, the score of Assistant 1 first and then the score of Assistant 2 (for example: 7 9). From the second line on, explain your judgment.
Be fair: which answer comes first must not influence you, and neither must how long the answers are."""


def render_judge_prompt(question: str, answer_1: str, answer_2: str) -> tuple[str, str]:
    """(system, user) texts for one ordering of one question."""
    tag = choose_fence([question or "", answer_1 or "", answer_2 or ""])
    user = USER.format(
        fence_rule=fence_rule(tag),
        question=block(tag, question or ""),
        answer_1=block(tag, answer_1 or ""),
        answer_2=block(tag, answer_2 or ""),
    )
    return SYSTEM, user


def build_judge_request(question: str, answer_1: str, answer_2: str, max_tokens: int = 256,
                        sample_index: int = 0) -> Request:
    """The judge request for one ordering: temperature 0, answer_1 shown as Assistant 1."""
    system, user = render_judge_prompt(question, answer_1, answer_2)
    return Request(
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
        temperature=0.0,
        max_tokens=max_tokens,
        sample_index=sample_index,
    )


def question_text(row: dict[str, Any]) -> str:
    """The question shown to the judge: the instruction, and the input after it when there is one."""
    instruction = (row.get("instruction") or "").strip()
    input_ = (row.get("input") or "").strip()
    return f"{instruction}\n\n{input_}" if input_ else instruction


__all__ = ["PAIR_MAX", "PAIR_MIN", "SYSTEM", "USER", "build_judge_request", "question_text", "render_judge_prompt"]
