"""Answering instructions with a provider (``evoray answer``): the model's output becomes ``output``."""

from __future__ import annotations

from .client import LLMClient
from .config import AnswerConfig
from .errors import StopJob, EvorayError
from .providers.base import Request
from .schema import result_row


def answer_request(row: dict, config: AnswerConfig) -> Request:
    content = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
    return Request(messages=[{"role": "user", "content": content}], temperature=config.temperature,
                   max_tokens=config.max_tokens)


class Answerer:
    def __init__(self, client: LLMClient, config: AnswerConfig):
        self.client = client
        self.config = config

    async def answer(self, row: dict) -> dict:
        try:
            comp = await self.client.complete(answer_request(row, self.config))
        except StopJob:  # the budget, or a halted provider: the job stops
            raise
        except EvorayError as e:
            return result_row(row, status="failed", reason=str(e), attempts=getattr(e, "attempts", None))
        if not comp.text.strip():
            return result_row(row, status="failed", reason="empty answer", raw=comp.text, provider=comp.provider,
                              model=comp.model, attempts=comp.attempts)
        out = dict(row, output=comp.text.strip())
        return result_row(out, status="answered", provider=comp.provider, model=comp.model, attempts=comp.attempts)
