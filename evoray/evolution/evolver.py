"""Evolving rows with one method: the per-row logic the evolver pool (Ray actors) runs.

:class:`Evolver` is plain async code (no Ray). ``evolve_row(row)`` runs ``config.rounds`` rounds in
a row, each evolving the previous round's instruction, checks the instruction rules after every
round, then (if ``config.answer``) lets the evol LLM answer the final instruction (at
``config.answer_temperature``, 0 by default; evolutions run at ``config.temperature``, 0 by
default, the evol LLM's temperature in Auto Evol-Instruct),
checks the answer rules, and returns **exactly one** row:

* ``status="evolved"``: the final instruction, its answer in ``output``;
* ``status="failed"``: the last instruction reached (the one a rule rejected, or the last one
  extracted before a reply without a final instruction), with ``rule`` (``no_final_instruction``
  for an extraction failure, None for a provider error) and ``reason``; the raw last reply in
  ``raw``.

Lineage: ``parent_id`` = the seed's id, ``round`` = rounds whose reply gave an instruction,
``method_id`` = the method's id; ``meta`` keeps the seed's meta keys and adds ``trajectory`` (every
round's evolved instruction). Evolved rows keep the seed's ``source`` and ``input`` (Alpaca rows
and GSM8K rows, question as instruction, are the same canonical rows). The row's ``input`` is not
shown to the evolving method; it is appended to the instruction when the evol LLM answers.
:class:`~evoray.errors.StopJob` (the budget, a halted provider) propagates: the job stops, finished rows are kept.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Iterable

from ..config import EvolveConfig
from ..errors import StopJob, ParseError, ProviderError, RetriesExhausted
from ..prompts.evolution import answer_messages
from ..providers.base import Completion, Request
from ..schema import new_row, result_row
from .extract import extract_instruction
from .methods import Method, render
from .rules import NO_FINAL_INSTRUCTION, RULES, Rule, acheck, rule_names

CallError = (ProviderError, RetriesExhausted)


def rules_from_config(config: EvolveConfig) -> list[Rule]:
    """The rules of ``config.rules`` (a rule set's name or a list of names), with the LLM
    no-information-gain check added or dropped when ``config.equality_check`` says so."""
    names = rule_names(config.rules)
    if config.equality_check is True and "no_information_gain" not in names:
        names.append("no_information_gain")
    elif config.equality_check is False:
        names = [n for n in names if n != "no_information_gain"]
    return RULES.resolve(names)


def _seed_meta(row: dict[str, Any]) -> dict[str, Any]:
    meta = row.get("meta")
    if isinstance(meta, dict):
        return dict(meta)
    try:
        value = json.loads(meta) if meta else {}
    except (TypeError, ValueError):
        return {"seed_meta": meta}
    return value if isinstance(value, dict) else {"seed_meta": value}


# JSON output for the evolution (``evolve.json_output``): the final instruction as one field
FINAL_INSTRUCTION_SCHEMA = {
    "type": "object",
    "properties": {"final_instruction": {"type": "string"}},
    "required": ["final_instruction"],
    "additionalProperties": False,
}


class _Calls:
    """Tracks provider/model of the last call and the attempts of all calls for one row."""

    def __init__(self):
        self.attempts = 0
        self.provider: str | None = None
        self.model: str | None = None

    def add(self, comp: Completion) -> Completion:
        # a cached answer (attempts 0) still counts as one call, as in the rater: every row that
        # made a call reports attempts >= 1, also after a resume that served it from the cache
        self.attempts += max(1, comp.attempts or 0)
        self.provider, self.model = comp.provider or self.provider, comp.model or self.model
        return comp

    def add_error(self, err: BaseException) -> None:
        self.attempts += getattr(err, "attempts", 1)
        self.provider = getattr(err, "provider", None) or self.provider
        self.model = getattr(err, "model", None) or self.model


class Evolver:
    """Evolves rows with one method. ``rules`` (names or Rule objects) default to the config's."""

    def __init__(self, evol_client: Any, method: Method, config: EvolveConfig | None = None,
                 rules: Iterable[str | Rule] | None = None, *, temperature: float | None = None):
        self.client = evol_client
        self.method = method
        self.config = config or EvolveConfig()
        self.rules = RULES.resolve(rules) if rules is not None else rules_from_config(self.config)
        self.temperature = self.config.temperature if temperature is None else temperature

    # ---- single calls --------------------------------------------------------------------------
    async def _evolve_once(self, instruction: str, calls: _Calls) -> Completion:
        req = Request(messages=render(self.method, instruction), temperature=self.temperature,
                      max_tokens=self.config.max_tokens,
                      json_schema=FINAL_INSTRUCTION_SCHEMA if self.config.json_output else None)
        return calls.add(await self.client.complete(req))

    def _extract(self, comp: Completion, original: str) -> str:
        """The evolved instruction: the JSON field when JSON output was asked and given, else the marker."""
        if self.config.json_output and isinstance(comp.parsed, dict):
            value = comp.parsed.get("final_instruction")
            if isinstance(value, str) and value.strip():
                return value.strip()
        return extract_instruction(comp.text, self.method, original=original)

    async def _answer(self, instruction: str, input: str, calls: _Calls) -> str:
        req = Request(messages=answer_messages(instruction, input), temperature=self.config.answer_temperature,
                      max_tokens=self.config.answer_max_tokens)
        return calls.add(await self.client.complete(req)).text

    async def _rule(self, target: str, original: str, evolved: str, answer: str | None = None) -> str | None:
        rules = [r for r in self.rules if r.target == target]
        if not rules:
            return None
        return await acheck(rules, original, evolved, answer, self.method, self.client,
                            temperature=self.config.answer_temperature)

    # ---- one row -------------------------------------------------------------------------------
    async def evolve_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """Exactly one output row (evolved or failed) for one input row; see the module."""
        calls = _Calls()
        current = previous = row["instruction"]
        trajectory: list[str] = []
        answer: str | None = None
        rule: str | None = None
        reason: str | None = None
        raw: str | None = None
        try:
            for r in range(1, self.config.rounds + 1):
                comp = await self._evolve_once(current, calls)
                raw = comp.text
                try:
                    evolved = self._extract(comp, current)
                except ParseError as e:
                    rule, reason = NO_FINAL_INSTRUCTION, f"round {r}: {e.message}"
                    break
                trajectory.append(evolved)
                previous, current = current, evolved
                rule = await self._rule("instruction", previous, evolved)
                if rule is not None:
                    reason = f"round {r}: failure rule '{rule}' on the evolved instruction"
                    break
            if rule is None and self.config.answer:
                answer = await self._answer(current, row.get("input") or "", calls)
                raw = answer
                rule = await self._rule("answer", previous, current, answer)
                if rule is not None:
                    reason = f"failure rule '{rule}' on the answer"
        except StopJob:  # the budget, or a halted provider: the job stops
            raise
        except CallError as e:
            calls.add_error(e)
            reason = f"provider error: {e}"
        failed = rule is not None or reason is not None
        meta = {**_seed_meta(row), "trajectory": trajectory, "evol_rounds": self.config.rounds}
        out = new_row(instruction=current, input=row.get("input") or "", output=answer or "",
                      source=row.get("source") or "", meta=meta, parent_id=row["id"], round=len(trajectory),
                      method_id=self.method.id)
        return result_row(out, status="failed" if failed else "evolved", rule=rule, reason=reason,
                          provider=calls.provider, model=calls.model, attempts=calls.attempts,
                          raw=raw if failed else None)

    async def evolve_rows(self, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """``evolve_row`` over rows concurrently (the client's gate bounds the requests in flight);
        output order follows input order."""
        return list(await asyncio.gather(*(self.evolve_row(r) for r in rows)))

    # ---- trajectories for the optimizer --------------------------------------------------------
    async def evolve_trajectory(self, row: dict[str, Any], length: int) -> list[dict[str, Any]]:
        """Evolve one row ``length`` times in a row and report every step.

        Each step is ``{round, instruction, reply, evolved, answer, failed, reason}``: the input
        instruction of the round, the raw reply, the extracted instruction (None when missing), the
        evol LLM's answer to it (None when ``config.answer`` is off or nothing was extracted), the
        name of the failure rule that fired (or ``no_final_instruction`` / ``provider_error``) and
        a reason. A failed rule does not stop the trajectory (the optimizer should see what follows);
        a missing instruction or a provider error does, as there is nothing to evolve further.
        """
        steps: list[dict[str, Any]] = []
        current = row["instruction"]
        calls = _Calls()
        for r in range(1, length + 1):
            step: dict[str, Any] = {"round": r, "instruction": current, "reply": None, "evolved": None,
                                    "answer": None, "failed": None, "reason": None}
            steps.append(step)
            try:
                comp = await self._evolve_once(current, calls)
                step["reply"] = comp.text
                try:
                    evolved = self._extract(comp, current)
                except ParseError as e:
                    step["failed"], step["reason"] = NO_FINAL_INSTRUCTION, e.message
                    break
                step["evolved"] = evolved
                if self.config.answer:
                    step["answer"] = await self._answer(evolved, row.get("input") or "", calls)
                step["failed"] = await self._rule("instruction", current, evolved)
                if step["failed"] is None and step["answer"] is not None:
                    step["failed"] = await self._rule("answer", current, evolved, step["answer"])
                if step["failed"]:
                    step["reason"] = f"failure rule '{step['failed']}'"
            except StopJob:  # the budget, or a halted provider: the job stops
                raise
            except CallError as e:
                step["failed"], step["reason"] = "provider_error", str(e)
                break
            current = evolved
        return steps
