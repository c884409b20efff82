"""Failure rules: when an evolution counts as failed.

Each rule is named, can be switched on or off by name (``evolve.rules`` in the config) and has a
target: ``answer`` rules look at the evol LLM's answer to the evolved instruction (they are skipped
when there is no answer), ``instruction`` rules look at the evolved instruction (and the original).

From Auto Evol-Instruct (appendix), on the answer:

* ``understood_question`` - starts with "Understood", "Thank you", "What", "That is correct" or
  "Great" and ends with "?" (the model asks back instead of answering);
* ``sure_question`` - starts with "Sure" and ends with "?";
* ``please_provide`` - contains "please provide" (any case).

From Evol-Instruct's elimination rules:

* ``sorry_short`` (answer) - contains "sorry" and is shorter than 80 words;
* ``punctuation_only`` (answer) - only punctuation and stop words (an empty answer too);
* ``copied_method`` (instruction) - the evolved instruction copies the method's own words
  ("#Rewritten Prompt#", "given prompt", "rewritten instruction", the method's ``#...#`` and
  ``<<<...>>>`` markers, the slot) that the original instruction did not already contain;
* ``no_information_gain`` (instruction, LLM) - the evol LLM judges the two instructions Equal.
  It needs a client, so only :func:`acheck` runs it; an unclear verdict does not fail the row.

Besides these, an evolution whose reply has no final instruction fails with
:data:`NO_FINAL_INSTRUCTION` (see :mod:`evoray.evolution.extract`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Literal

from ..errors import ConfigError
from ..prompts.evolution import SLOT, equality_messages
from ..providers.base import Request
from .methods import Method

NO_FINAL_INSTRUCTION = "no_final_instruction"

STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just let me more
    most my myself no nor not now of off on once only or other our ours ourselves out over own same she
    should so some such than that the their theirs them themselves then there these they this those
    through to too under until up very was we were what when where which while who whom why will with
    would you your yours yourself yourselves ok okay yes""".split()
)

COPIED_PHRASES = (
    "#rewritten prompt#",
    "#the given prompt#",
    "#given prompt#",
    "given prompt",
    "#finally rewritten instruction#",
    "finally rewritten instruction",
    "rewritten instruction",
    "rewritten prompt",
    "given instruction",
    SLOT,
)

_ASK_BACK = re.compile(r"^(?:understood|thank you|what|that is correct|great)\b", re.IGNORECASE)
_SURE = re.compile(r"^sure\b", re.IGNORECASE)
_LEAD = " \t\r\n\"'*_`>"
_DELIMITER = re.compile(r"<<<[^<>\n]{1,60}>>>")


@dataclass(frozen=True)
class Case:
    """What a rule looks at."""

    original: str
    evolved: str
    answer: str | None = None
    method: Method | None = None


@dataclass(frozen=True)
class Rule:
    """A named failure rule. ``test`` returns True when the evolution failed.

    ``llm_test`` (async, takes the case and a client) is set instead of ``test`` for rules that ask
    the evol LLM.
    """

    name: str
    target: Literal["answer", "instruction"]
    description: str
    test: Callable[[Case], bool] | None = None
    llm_test: Callable[[Case, Any], Awaitable[bool]] | None = None

    @property
    def needs_llm(self) -> bool:
        return self.llm_test is not None

    def applies(self, case: Case) -> bool:
        return self.target != "answer" or case.answer is not None


class RuleRegistry(dict):
    """name -> :class:`Rule`. Registering a name twice is an error; looking up an unknown name is a
    :class:`~evoray.errors.ConfigError` that lists the rules there are."""

    def register(self, rule: Rule) -> Rule:
        if rule.name in self:
            raise ValueError(f"failure rule '{rule.name}' is already registered")
        self[rule.name] = rule
        return rule

    def __missing__(self, name: str) -> Rule:
        raise ConfigError(f"unknown failure rule '{name}' (rules: {', '.join(self)})")

    def resolve(self, rules: Iterable[str | Rule]) -> list[Rule]:
        """Rules from names (or Rule objects, passed through), in the order given."""
        return [r if isinstance(r, Rule) else self[r] for r in rules]


# ---- the rules ---------------------------------------------------------------------------------

def _answer(case: Case) -> str:
    return (case.answer or "").strip(_LEAD)


def _understood_question(case: Case) -> bool:
    a = _answer(case)
    return bool(_ASK_BACK.match(a)) and a.endswith("?")


def _sure_question(case: Case) -> bool:
    a = _answer(case)
    return bool(_SURE.match(a)) and a.endswith("?")


def _please_provide(case: Case) -> bool:
    return "please provide" in (case.answer or "").lower()


def _sorry_short(case: Case) -> bool:
    a = case.answer or ""
    return "sorry" in a.lower() and len(a.split()) < 80


def _punctuation_only(case: Case) -> bool:
    words = re.findall(r"\w+", (case.answer or "").lower())
    return all(w in STOP_WORDS for w in words)


def method_phrases(method: Method | None) -> list[str]:
    """Lower-cased phrases whose presence in an evolved instruction means it copied the method."""
    phrases = list(COPIED_PHRASES)
    if method is not None:
        phrases += [m.lower() for m in method.markers]
        phrases += [d.lower() for d in _DELIMITER.findall(method.text)]
    return list(dict.fromkeys(phrases))


def _copied_method(case: Case) -> bool:
    evolved, original = case.evolved.lower(), case.original.lower()
    return any(p in evolved and p not in original for p in method_phrases(case.method))


async def _no_information_gain(case: Case, client: Any) -> bool:
    comp = await client.complete(Request(messages=equality_messages(case.original, case.evolved),
                                         temperature=0.0, max_tokens=8))
    verdict = comp.text.strip().lower()
    if "not equal" in verdict:
        return False
    return bool(re.search(r"\bequal\b", verdict))


RULES = RuleRegistry()
RULES.register(Rule("understood_question", "answer",
                    'answer starts with "Understood"/"Thank you"/"What"/"That is correct"/"Great" and ends with "?"',
                    test=_understood_question))
RULES.register(Rule("sure_question", "answer", 'answer starts with "Sure" and ends with "?"', test=_sure_question))
RULES.register(Rule("please_provide", "answer", 'answer contains "please provide"', test=_please_provide))
RULES.register(Rule("sorry_short", "answer", 'answer contains "sorry" and is shorter than 80 words', test=_sorry_short))
RULES.register(Rule("punctuation_only", "answer", "answer is only punctuation and stop words", test=_punctuation_only))
RULES.register(Rule("copied_method", "instruction", "evolved instruction copies the method's own words",
                    test=_copied_method))
RULES.register(Rule("no_information_gain", "instruction",
                    "the evol LLM judges the evolved instruction Equal to the original", llm_test=_no_information_gain))

DEFAULT_RULES = ("understood_question", "sure_question", "please_provide", "sorry_short", "punctuation_only",
                 "copied_method")


def check(rules: Iterable[str | Rule], original: str, evolved: str, answer: str | None,
          method: Method | None = None) -> str | None:
    """The name of the first rule (in the order given) that fails this evolution, or None.

    Only rules without an LLM call run here; use :func:`acheck` to include ``no_information_gain``.
    Answer rules are skipped when ``answer`` is None.
    """
    case = Case(original, evolved, answer, method)
    for rule in RULES.resolve(rules):
        if rule.test is not None and rule.applies(case) and rule.test(case):
            return rule.name
    return None


async def acheck(rules: Iterable[str | Rule], original: str, evolved: str, answer: str | None,
                 method: Method | None = None, client: Any = None) -> str | None:
    """Like :func:`check`, then the LLM rules (only if every cheap rule passed); needs ``client``
    when an LLM rule is listed. Provider errors of the LLM call propagate."""
    resolved = RULES.resolve(rules)
    name = check(resolved, original, evolved, answer, method)
    if name is not None:
        return name
    case = Case(original, evolved, answer, method)
    for rule in resolved:
        if rule.llm_test is not None and rule.applies(case):
            if client is None:
                raise ValueError(f"failure rule '{rule.name}' asks the evol LLM: pass a client")
            if await rule.llm_test(case, client):
                return rule.name
    return None
