"""Evol-Instruct and Auto Evol-Instruct, the Ray-free core.

* :mod:`.methods` - evolving methods as data (:class:`Method`, built-ins, :func:`load_method`);
* :mod:`.extract` - the evolved instruction from a reply, a method from an optimizer reply;
* :mod:`.rules` - named, switchable failure rules and the ``paper`` / ``strict`` rule sets;
* :mod:`.evolver` - :class:`Evolver`: rounds of evolution + answer, one output row per input row;
* :mod:`.optimizer` - :class:`Optimizer`: the Auto Evol-Instruct loop with injectable evaluation.

The Ray wrappers (evolver pool, candidate actors) live in the ``actors`` package.
"""

from .evolver import Evolver
from .extract import extract_instruction, extract_method
from .methods import BUILTINS, Method, load_method, render
from .optimizer import (EvalResult, Optimizer, OptimizeResult, Proposal, evaluate_method, evaluate_methods,
                        failure_rate, propose_candidates, rank_candidates, write_outputs)
from .rules import NO_FINAL_INSTRUCTION, PAPER_RULES, RULE_SETS, RULES, STRICT_RULES, Rule, acheck, check

__all__ = [
    "BUILTINS", "EvalResult", "Evolver", "Method", "NO_FINAL_INSTRUCTION", "OptimizeResult", "Optimizer",
    "PAPER_RULES", "Proposal", "RULES", "RULE_SETS", "Rule", "STRICT_RULES", "acheck", "check", "evaluate_method", "evaluate_methods", "extract_instruction",
    "extract_method", "failure_rate", "load_method", "propose_candidates", "rank_candidates", "render",
    "write_outputs",
]
