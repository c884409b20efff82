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

Rule sets (``evolve.rules``): ``paper`` (:data:`PAPER_RULES`) is exactly the rules above, the LLM
check included; ``strict`` (:data:`STRICT_RULES`, the default) adds evoray's cheap checks for the
garbage the paper rules let through (a small model "evolving" a GSM8K problem into ``{``,
``albert`` or ``,3 pages``, or echoing the method's markers with a space inside):

* ``information_loss`` (instruction) - the evolved instruction has fewer than
  :data:`MIN_LENGTH_RATIO` of the original's words, or keeps fewer than :data:`MIN_CONTENT_OVERLAP`
  of its content words (originals of at least :data:`MIN_CONTENT_WORDS` content words; skipped for
  in-breadth methods, whose new instruction is meant to differ);
* ``degenerate_instruction`` (instruction) - only punctuation and stop words, or fewer than
  :data:`MIN_EVOLVED_WORDS` words;
* ``echoed_markers`` (instruction) - the method's ``#...#`` markers, its ``<<<...>>>`` delimiters,
  the slot or the stock phrases, matched loosely (any case, any spacing, ``#``/``<``/``>``/``*``
  dropped), or the bare ``<<<``/``>>>`` fences, that the original did not contain;
* ``unchanged`` (instruction) - the evolved instruction has exactly the original's words in the
  same order (case, spacing and punctuation aside): the plainest no-information-gain case, which a
  weak evol LLM's own Equal verdict was seen to miss (the 135M model returned GSM8K problems as
  they were and judged them not Equal);
* ``not_a_request`` (instruction) - the original asks for something (a ``?`` or one of
  :data:`REQUEST_WORDS`) and the evolved instruction does not: a statement such as "The movie is
  a must for a family ..." or a list of the problem's facts without its question;
* ``asks_back`` (answer) - a short answer (under 80 words) that asks for the task, its details
  or its input, whatever its first word.
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

#: strict thresholds (see the module and the README's failure-rule table)
MIN_LENGTH_RATIO = 0.5
MIN_CONTENT_OVERLAP = 0.3
MIN_CONTENT_WORDS = 3
MIN_EVOLVED_WORDS = 3
ASK_BACK_MAX_WORDS = 80
_ASKS_FOR = re.compile(
    r"\b(?:(?:could|can|would|will) you(?: please)?|please|kindly|i(?:'d| would)? need you to|you need to)\s+"
    r"(?:provide|share|give|clarify|specify|send|paste|supply|tell me|let me know|include)\b"
    r"|\b(?:i|we)(?:'d| would)? need (?:more|some|the|additional|further) (?:information|details|context|input)\b"
    r"|\bwhat (?:is|are|was) the (?:instruction|task|question|problem|prompt|text|input|details?)\b"
    r"|\bwhich (?:instruction|task|question|problem|prompt|text|input)\b[^.?!]*\?"
    r"|\bno (?:instruction|task|question|problem|prompt|text|input) (?:was|has been|is) (?:given|provided)\b",
    re.IGNORECASE)


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


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _content(text: str) -> set[str]:
    return {w for w in _words(text) if w not in STOP_WORDS}


def _is_breadth(method: Method | None) -> bool:
    return method is not None and "breadth" in method.name.lower()


def _information_loss(case: Case) -> bool:
    orig, evolved = _words(case.original), _words(case.evolved)
    if len(orig) >= 2 * MIN_EVOLVED_WORDS and len(evolved) < MIN_LENGTH_RATIO * len(orig):
        return True
    if _is_breadth(case.method):
        return False
    content = _content(case.original)
    if len(content) < MIN_CONTENT_WORDS:
        return False
    kept = len(content & _content(case.evolved))
    return kept < MIN_CONTENT_OVERLAP * len(content)


def _unchanged(case: Case) -> bool:
    return _words(case.evolved) == _words(case.original)


def _degenerate_instruction(case: Case) -> bool:
    words = _words(case.evolved)
    return len(words) < MIN_EVOLVED_WORDS or all(w in STOP_WORDS for w in words)


def _loose(text: str) -> str:
    """Lower case, ``#``/``<``/``>``/``*``/``:``/``_`` and digits dropped, any spacing made one space."""
    return " ".join(re.sub(r"[#<>*:_\[\]{}()\d]+", " ", text.lower()).split())


def loose_markers(method: Method | None) -> list[str]:
    """The method's markers, delimiters, slot and stock phrases in :func:`_loose` form."""
    phrases = [_loose(p) for p in method_phrases(method)]
    phrases += ["begin instruction", "end instruction", "finally rewritten instruction", "instruction", "slot"]
    # a bare "instruction" would hit most instructions: keep only phrases of two words or more
    return [p for p in dict.fromkeys(phrases) if len(p.split()) >= 2]


#: words that make a text a request (imperatives and question words); ``not_a_request`` needs one, or a "?"
REQUEST_WORDS = frozenset(
    """what how which who whom whose when where why whether calculate compute find determine solve explain
    describe write list give name suggest create generate compare contrast identify provide show prove
    estimate tell summarize summarise rewrite translate classify analyze analyse discuss evaluate design
    develop propose recommend outline draft compose convert rank predict choose select decide make build
    construct add remove edit correct fix complete fill paraphrase rephrase simplify expand elaborate
    illustrate demonstrate justify argue state define derive plan brainstorm imagine invent count sort
    order arrange organize organise categorize categorise detect extract insert replace change transform
    format produce prepare develop implement code program debug optimize optimise test check verify assess
    review critique rate score draw sketch map visualize visualise answer respond reply use apply consider
    imagine pretend act assume let suppose please""".split())


def _is_request(text: str) -> bool:
    return "?" in text or any(w in REQUEST_WORDS for w in _words(text))


def _not_a_request(case: Case) -> bool:
    return _is_request(case.original) and not _is_request(case.evolved)


_FENCE = re.compile(r"<<<|>>>")
_SLOT_LOOSE = re.compile(r"\{\s*instruction\s*\}", re.IGNORECASE)


def _echoed_markers(case: Case) -> bool:
    if _FENCE.search(case.evolved) and not _FENCE.search(case.original):
        return True
    if _SLOT_LOOSE.search(case.evolved) and not _SLOT_LOOSE.search(case.original):
        return True
    evolved, original = f" {_loose(case.evolved)} ", f" {_loose(case.original)} "
    return any(f" {p} " in evolved and f" {p} " not in original for p in loose_markers(case.method))


def _asks_back(case: Case) -> bool:
    a = _answer(case)
    return len(a.split()) < ASK_BACK_MAX_WORDS and bool(_ASKS_FOR.search(a))


async def _no_information_gain(case: Case, client: Any, temperature: float = 0.0) -> bool:
    comp = await client.complete(Request(messages=equality_messages(case.original, case.evolved),
                                         temperature=temperature, max_tokens=8))
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

RULES.register(Rule("information_loss", "instruction",
                    f"evolved instruction has under {MIN_LENGTH_RATIO:.0%} of the original's words, or keeps under "
                    f"{MIN_CONTENT_OVERLAP:.0%} of its content words (not for in-breadth methods)",
                    test=_information_loss))
RULES.register(Rule("degenerate_instruction", "instruction",
                    f"evolved instruction is only punctuation and stop words, or under {MIN_EVOLVED_WORDS} words",
                    test=_degenerate_instruction))
RULES.register(Rule("echoed_markers", "instruction",
                    "evolved instruction echoes the method's markers, delimiters or slot (any case, spacing or #)",
                    test=_echoed_markers))
RULES.register(Rule("unchanged", "instruction",
                    "evolved instruction has the original's words, in order (case, spacing and punctuation aside)",
                    test=_unchanged))
RULES.register(Rule("not_a_request", "instruction",
                    "the original asks for something (a ? or a request word) and the evolved instruction does not",
                    test=_not_a_request))
RULES.register(Rule("asks_back", "answer",
                    f"answer under {ASK_BACK_MAX_WORDS} words asks for the task, its details or its input",
                    test=_asks_back))

#: Auto Evol-Instruct's failure detector + Evol-Instruct's elimination rules, as the papers state them
PAPER_RULES = ("understood_question", "sure_question", "please_provide", "sorry_short", "punctuation_only",
               "copied_method", "no_information_gain")
#: the paper rules plus evoray's cheap checks (the default)
STRICT_RULES = PAPER_RULES[:-1] + ("echoed_markers", "degenerate_instruction", "unchanged", "information_loss",
                                   "not_a_request", "asks_back", "no_information_gain")
RULE_SETS = {"paper": PAPER_RULES, "strict": STRICT_RULES}
DEFAULT_RULES = STRICT_RULES


def rule_names(rules: str | Iterable[str]) -> list[str]:
    """Rule names of a rule set's name (``paper``, ``strict``) or of a list of names."""
    if isinstance(rules, str):
        if rules not in RULE_SETS:
            raise ConfigError(f"unknown rule set '{rules}' (rule sets: {', '.join(RULE_SETS)}; or list rule names)")
        return list(RULE_SETS[rules])
    return list(rules)


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
                 method: Method | None = None, client: Any = None, temperature: float = 0.0) -> str | None:
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
            if await rule.llm_test(case, client, temperature):
                return rule.name
    return None
