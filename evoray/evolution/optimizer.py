"""Auto Evol-Instruct: optimizing the evolving method by failure rate (the Ray-free core).

One optimization step t, with the method e(t-1):

1. sample a mini-batch (``batch_size``) from the sampled rows and evolve each row
   ``trajectory_length`` times in a row with e(t-1) (trajectories);
2. :func:`propose_candidates`: ``candidates`` (m) independent samples of analysis (the optimizer
   LLM reads the trajectories and writes feedback) followed by optimization (it rewrites the
   method from that feedback), each sample with its own ``Request.sample_index`` so the response
   cache keeps them apart; a proposal that fails (provider error, no fenced block) is recorded in
   the history, not fatal;
3. evaluate the candidates on the dev set (``dev_size``) - and e(t-1) itself on the first step, so
   there is a baseline: each method evolves every dev row once, the evol LLM answers at
   temperature 0, and a row fails when a failure rule fires or no instruction could be extracted.
   failure rate = failed rows / dev rows (rows lost to provider errors are left out of both and
   counted in ``errors``);
4. the candidate with the lowest failure rate wins the step; ties go to the lower candidate index,
   then the lower method id. If it beats the best rate so far it becomes the method of the next
   step, otherwise e(t-1) stays.

The loop stops after ``patience`` steps in a row without a lower failure rate, or after ``steps``
steps.

Evaluation is injectable: ``Optimizer(..., evaluate=fn)`` with ``async fn(methods, dev_rows) ->
list[EvalResult]`` (one per method, in any order). The default, :func:`evaluate_methods`, runs all
candidates concurrently in this event loop with ``asyncio.gather``; the Ray version plugs in
candidate actors, each running :func:`evaluate_method`.

Sampling: ``sample_size`` rows are drawn with ``random.Random(seed)``; the dev set is the first
``dev_size`` of them and the mini-batches come from the rest, so the two are disjoint, when there
are at least ``dev_size + batch_size`` sampled rows; otherwise the dev set is the first
``min(dev_size, n)`` rows and mini-batches are drawn from all of them (``dev_disjoint`` False).
"""

from __future__ import annotations

import asyncio
import logging
import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, NamedTuple, Sequence

from ..config import EvolveConfig, OptimizeConfig
from ..errors import StopJob, InputError, ParseError, ProviderError, RetriesExhausted
from ..io import write_text_atomic
from ..measures import trajectory_measures
from ..prompts.optimizer import analysis_messages, format_trajectories, optimization_messages
from ..providers.base import Request
from .evolver import Evolver, rules_from_config
from .extract import extract_method
from ..prompts.evolution import SLOT
from .methods import Method, ensure_slot, load_method
from .rules import Rule

PROVIDER_ERROR = "provider_error"


log = logging.getLogger("evoray")

# ---- evaluation --------------------------------------------------------------------------------

@dataclass
class EvalResult:
    """How one method did on the dev set. Times are ``time.time()`` seconds."""

    method_id: str
    failure_rate: float
    n: int
    failures_by_rule: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0
    finished_at: float = 0.0
    errors: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def failure_rate(results: Iterable[dict[str, Any]]) -> tuple[float, int, dict[str, int], int]:
    """``(rate, n, failures_by_rule, errors)`` of evolved/failed rows from ``Evolver.evolve_row``.

    A row fails when it has a rule (a failure rule or ``no_final_instruction``). Rows failed by a
    provider error (no rule) say nothing about the method: they are counted in ``errors`` and
    left out of ``n``. With no judged row at all the rate is 1.0 (such a method never wins).
    """
    n = errors = 0
    by_rule: dict[str, int] = {}
    for row in results:
        if row.get("status") == "failed" and not row.get("rule"):
            errors += 1
            continue
        n += 1
        if row.get("status") == "failed":
            by_rule[row["rule"]] = by_rule.get(row["rule"], 0) + 1
    failed = sum(by_rule.values())
    return (failed / n if n else 1.0), n, dict(sorted(by_rule.items())), errors


async def evaluate_method(evol_client: Any, method: Method, dev_rows: Sequence[dict[str, Any]],
                          evolve_config: EvolveConfig | None = None,
                          rules: Iterable[str | Rule] | None = None) -> EvalResult:
    """Evolve every dev row once with ``method``, let the evol LLM answer, count failures."""
    cfg = (evolve_config or EvolveConfig()).model_copy(update={"rounds": 1, "answer": True})
    started = time.time()
    rows = await Evolver(evol_client, method, cfg, rules).evolve_rows(dev_rows)
    finished = time.time()
    rate, n, by_rule, errors = failure_rate(rows)
    return EvalResult(method.id, rate, n, by_rule, started, finished, errors)


async def evaluate_methods(evol_client: Any, methods: Sequence[Method], dev_rows: Sequence[dict[str, Any]],
                           evolve_config: EvolveConfig | None = None,
                           rules: Iterable[str | Rule] | None = None) -> list[EvalResult]:
    """All methods evaluated concurrently (``asyncio.gather``); results in the order of ``methods``."""
    rules = list(rules) if rules is not None else None
    return list(await asyncio.gather(*(evaluate_method(evol_client, m, dev_rows, evolve_config, rules)
                                       for m in methods)))


Evaluate = Callable[[list[Method], list[dict[str, Any]]], Awaitable[list[EvalResult]]]


# ---- proposals ---------------------------------------------------------------------------------

class Proposal(NamedTuple):
    """One analysis + optimization sample. ``method`` is None when the proposal failed (``error``);
    ``text`` keeps a rejected candidate's method text."""

    feedback: str
    method: Method | None
    index: int
    error: str | None = None
    text: str | None = None


_NUMBERED_STEP = re.compile(r"(?im)^[ \t>*#-]*(?:step\s*\d+\b|\d+[.)]\s)")


def method_problem(method: Method, parent: Method | None = None) -> str | None:
    """Why a candidate method is gibberish and is not worth evaluating, or None.

    A method must name its final result: a ``#...#`` marker naming a final result, or the words
    "final(ly) rewritten instruction/prompt" (without it no evolved instruction can be extracted).
    An Auto Evol-Instruct method is numbered steps that end with the final rewritten instruction:
    a candidate rewrite of a ``parent`` that has numbered steps (``Step 1``, ``1.``) must keep
    numbered steps (Evol-Instruct's single-operation methods have none, and their rewrites need
    none). Checked before a candidate costs a dev-set evaluation.
    """
    body = method.text.replace(SLOT, "")
    low = body.lower()
    if method.final_marker is None and not re.search(r"final(?:ly)?\W+rewritten\W+(?:instruction|prompt)", low):
        return "no final rewritten-instruction marker"
    if (parent is None or _NUMBERED_STEP.search(parent.text)) and not _NUMBERED_STEP.search(body):
        return "no numbered steps"
    return None


METHOD_SCHEMA = {
    "type": "object",
    "properties": {"method": {"type": "string"}},
    "required": ["method"],
    "additionalProperties": False,
}


def _method_text(reply: Any, json_output: bool) -> str:
    """The proposed method: the JSON field (slot ensured) when asked and given, else the fenced block."""
    if json_output and isinstance(reply.parsed, dict) and isinstance(reply.parsed.get("method"), str):
        text = reply.parsed["method"].strip()
        if text:
            return ensure_slot(text)
    return extract_method(reply.text)


async def propose_candidates(opt_client: Any, method: Method, trajectories: Sequence[Any], m: int,
                             temperature: float, top_p: float, *, max_tokens: int = 1024,
                             name_prefix: str = "candidate", json_output: bool = False,
                             first_index: int = 0) -> list[Proposal]:
    """m independent analyse-then-rewrite samples, run concurrently, in index order.

    Sample i (``first_index`` .. ``first_index + m - 1``) sends both its requests with
    ``sample_index=i`` (a retry passes a new ``first_index`` so the cache does not hand back the
    same replies). A provider error, a reply
    without a fenced method, or a gibberish method (:func:`method_problem`) gives a Proposal with
    ``method=None`` and the error; StopJob (budget, halted provider) propagates.
    """
    traj_text = format_trajectories(list(trajectories))

    async def one(i: int) -> Proposal:
        feedback = ""
        try:
            a = await opt_client.complete(Request(messages=analysis_messages(method.text, traj_text),
                                                  temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                                  sample_index=i))
            feedback = a.text.strip()
            o = await opt_client.complete(Request(messages=optimization_messages(method.text, feedback),
                                                  temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                                  sample_index=i,
                                                  json_schema=METHOD_SCHEMA if json_output else None))
            meth = Method(f"{name_prefix}-{i}", _method_text(o, json_output))
            problem = method_problem(meth, method)
            if problem is not None:
                return Proposal(feedback, None, i, f"rejected: {problem}", meth.text)
            return Proposal(feedback, meth, i)
        except StopJob:  # the budget, or a halted provider: the job stops
            raise
        except (ProviderError, RetriesExhausted, ParseError) as e:
            return Proposal(feedback, None, i, f"{type(e).__name__}: {e}")

    return list(await asyncio.gather(*(one(i) for i in range(first_index, first_index + m))))


def rank_candidates(scored: Iterable[tuple[int, Method, EvalResult]]) -> list[tuple[int, Method, EvalResult]]:
    """Best first: lower failure rate, then lower candidate index, then lower method id."""
    return sorted(scored, key=lambda c: (c[2].failure_rate, c[0], c[1].id))


# ---- the loop ----------------------------------------------------------------------------------

@dataclass
class OptimizeResult:
    best_method: Method
    best_failure_rate: float
    baseline_failure_rate: float
    initial_method: Method
    history: list[dict[str, Any]]
    stopped: str  # "no_improvement" | "steps" | "no_valid_proposals" | "running" | "stopped: <why>"
    dev_ids: list[str]
    dev_disjoint: bool
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        def rate(x: float) -> float | None:  # None before the first step measured anything
            return None if x != x else x

        return {
            "initial_method": self.initial_method.to_dict(),
            "baseline_failure_rate": rate(self.baseline_failure_rate),
            "best_method": self.best_method.to_dict(),
            "best_failure_rate": rate(self.best_failure_rate),
            "stopped": self.stopped,
            "steps_run": len(self.history),
            "dev_size": len(self.dev_ids),
            "dev_ids": self.dev_ids,
            "dev_disjoint": self.dev_disjoint,
            **self.settings,
            "steps": self.history,
        }


OnStep = Callable[[OptimizeResult], None]


class Optimizer:
    """The Auto Evol-Instruct loop (see the module). ``evaluate`` replaces the dev-set evaluation;
    ``on_step(result)`` is called after every step with the result so far (``stopped`` is
    ``running``), and once more when the loop ends, also when a StopJob ends it (``stopped`` is
    ``stopped: <reason>``): :func:`write_history` there keeps the steps done on disk."""

    def __init__(self, evol_client: Any, opt_client: Any, config: OptimizeConfig | None = None,
                 evolve_config: EvolveConfig | None = None, evaluate: Evaluate | None = None, *,
                 initial_method: Method | None = None, rules: Iterable[str | Rule] | None = None,
                 on_step: OnStep | None = None):
        self.evol_client = evol_client
        self.opt_client = opt_client
        self.config = config or OptimizeConfig()
        self.evolve_config = evolve_config or EvolveConfig()
        self.initial_method = initial_method or load_method(self.evolve_config.method)
        self.rules = list(rules) if rules is not None else None
        self._evaluate = evaluate
        self.on_step = on_step

    def settings(self) -> dict[str, Any]:
        """The sampling and the rules the run used (recorded in history.json)."""
        e, c = self.evolve_config, self.config
        rules = ([getattr(r, "name", r) for r in self.rules] if self.rules is not None
                 else [r.name for r in rules_from_config(e)])
        return {"evol_temperature": e.temperature, "answer_temperature": e.answer_temperature,
                "optimizer_temperature": c.temperature, "optimizer_top_p": c.top_p,
                "rule_set": e.rules if isinstance(e.rules, str) and self.rules is None else "custom",
                "rules": rules}

    async def evaluate(self, methods: list[Method], dev_rows: list[dict[str, Any]]) -> list[EvalResult]:
        if self._evaluate is not None:
            return list(await self._evaluate(methods, dev_rows))
        return await evaluate_methods(self.evol_client, methods, dev_rows, self.evolve_config, self.rules)

    def split(self, rows: Sequence[dict[str, Any]], rng: random.Random) -> tuple[list, list, bool]:
        """(dev rows, rows mini-batches come from, disjoint?) - see the module."""
        c = self.config
        pool = rng.sample(list(rows), min(c.sample_size, len(rows)))
        if len(pool) >= c.dev_size + c.batch_size:
            return pool[: c.dev_size], pool[c.dev_size:], True
        return pool[: c.dev_size], pool, False

    async def _trajectories(self, method: Method, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        evolver = Evolver(self.evol_client, method, self.evolve_config, self.rules)
        steps = await asyncio.gather(*(evolver.evolve_trajectory(r, self.config.trajectory_length) for r in batch))
        return [{"seed_id": r["id"], "seed": r["instruction"], "steps": s} for r, s in zip(batch, steps)]

    async def _propose(self, t: int, current: Method, trajectories: list) -> tuple[list[Proposal], bool]:
        """The step's proposals; when none of them gives a usable method, says so and asks once
        more with new sample indexes. Returns (every proposal made, retried?)."""
        c = self.config
        kw = dict(max_tokens=c.max_tokens, name_prefix=f"step{t}-candidate", json_output=c.json_output)
        proposals = await propose_candidates(self.opt_client, current, trajectories, c.candidates,
                                             c.temperature, c.top_p, **kw)
        if any(p.method is not None for p in proposals):
            return proposals, False
        reasons = sorted({(p.error or "?").split(":")[0] for p in proposals})
        log.warning("[optimize] step %d: none of the %d proposals gave a usable method (%s); asking once more",
                    t, len(proposals), ", ".join(reasons))
        again = await propose_candidates(self.opt_client, current, trajectories, c.candidates,
                                         c.temperature, c.top_p, first_index=c.candidates, **kw)
        return proposals + again, True

    async def run(self, rows: Sequence[dict[str, Any]]) -> OptimizeResult:
        c = self.config
        rows = list(rows)
        if not rows:
            raise InputError("the optimizer needs at least one input row")
        rng = random.Random(c.seed)
        dev, train, disjoint = self.split(rows, rng)
        st = {"current": self.initial_method, "best": self.initial_method, "rate": None, "baseline": None}
        history: list[dict[str, Any]] = []
        settings = self.settings()

        def report(stopped: str) -> OptimizeResult:
            nan = float("nan")
            res = OptimizeResult(st["best"], nan if st["rate"] is None else st["rate"],
                                 nan if st["baseline"] is None else st["baseline"], self.initial_method, history,
                                 stopped, [r["id"] for r in dev], disjoint, settings)
            if self.on_step is not None:
                self.on_step(res)
            return res

        try:
            stopped = await self._steps(dev, train, rng, st, history, report)
        except StopJob as e:  # the budget, or a halted provider: keep the steps done, then stop
            report(f"stopped: {e}")
            raise
        return report(stopped)

    async def _steps(self, dev: list, train: list, rng: random.Random, st: dict, history: list, report) -> str:
        c = self.config
        stale = 0
        for t in range(1, c.steps + 1):
            current = st["current"]
            batch = rng.sample(train, min(c.batch_size, len(train)))
            log.info("[optimize] step %d: evolving %d trajectories of length %d", t, len(batch), c.trajectory_length)
            trajectories = await self._trajectories(current, batch)
            step_measures = trajectory_measures(trajectories, seed=c.seed)
            log.info("[optimize] step %d: analysing them and proposing %d candidate methods", t, c.candidates)
            proposals, retried = await self._propose(t, current, trajectories)
            cands = [(p.index, p.method) for p in proposals if p.method is not None]
            # the current method is measured again every step, on the same dev set, beside the candidates
            to_eval: dict[str, Method] = {current.id: current}
            for _, meth in cands:
                to_eval.setdefault(meth.id, meth)
            log.info("[optimize] step %d: evaluating %d method(s) on %d dev rows, concurrently", t, len(to_eval), len(dev))
            results = await self.evaluate(list(to_eval.values()), dev)
            by_id = {r.method_id: r for r in results}
            missing = [mid for mid in to_eval if mid not in by_id]
            if missing:
                raise RuntimeError(f"evaluate() returned no result for method(s) {', '.join(missing)}")
            remeasured = by_id[current.id].failure_rate
            baseline_eval = None
            if st["rate"] is None:
                baseline_eval = by_id[current.id].to_dict()
                st["rate"] = st["baseline"] = remeasured
            recorded = st["rate"]
            ranked = rank_candidates((i, meth, by_id[meth.id]) for i, meth in cands)
            chosen = ranked[0] if ranked else None
            # a candidate wins against the current method as measured in this step (same dev set, same time)
            improved = chosen is not None and chosen[2].failure_rate < remeasured
            if improved:
                st["current"], st["rate"], st["best"] = chosen[1], chosen[2].failure_rate, chosen[1]
                stale = 0
            else:
                st["rate"] = remeasured
                stale += 1
            history.append({
                "step": t,
                "method_id": current.id,
                "batch_ids": [r["id"] for r in batch],
                "trajectories": [{"seed_id": tr["seed_id"],
                                  "steps": [{"round": s["round"], "evolved": s["evolved"], "failed": s["failed"]}
                                            for s in tr["steps"]]} for tr in trajectories],
                "feedback": [p.feedback for p in proposals if p.method is not None],
                "failed_proposals": [{"index": p.index, "feedback": p.feedback, "error": p.error, "text": p.text}
                                     for p in proposals if p.method is None],
                "proposals_retried": retried,
                "no_valid_proposals": not cands,
                "candidates": [{"index": i, "method_id": meth.id, "name": meth.name, "text": meth.text,
                                "failure_rate": by_id[meth.id].failure_rate,
                                "failures_by_rule": by_id[meth.id].failures_by_rule, "n": by_id[meth.id].n,
                                "errors": by_id[meth.id].errors, "started_at": by_id[meth.id].started_at,
                                "finished_at": by_id[meth.id].finished_at} for i, meth in cands],
                "chosen": chosen[1].id if chosen else None,
                "chosen_failure_rate": chosen[2].failure_rate if chosen else None,
                "improved": improved,
                "adopted": st["current"].id,
                "best_failure_rate": st["rate"],
                # the current method's rate as recorded when it was adopted, and as measured again this step
                "baseline_failure_rate": recorded,
                "current_remeasured": by_id[current.id].to_dict(),
                "baseline": baseline_eval,
                "measures": step_measures,
            })
            if not cands:
                log.warning("[optimize] step %d: no usable candidate method, also after asking again; see "
                            "failed_proposals in history.json", t)
            log.info("[optimize] step %d: failure rates %s; current method re-measured %.3f; best so far %.3f", t,
                     ", ".join(f"{by_id[m.id].failure_rate:.3f}" for _, m in cands) or "none", remeasured, st["rate"])
            report("running")
            if stale >= c.patience:
                return "no_valid_proposals" if not cands else "no_improvement"
        return "steps"


# ---- outputs -----------------------------------------------------------------------------------

def plot_failure_rate(result: OptimizeResult, path: str | Path) -> Path:
    """failure_rate.png: the chart of :func:`evoray.plots.optimize_failure_rate_plot` (the one the
    report draws too) of this result's history; step 0 is the initial method."""
    from ..plots import optimize_failure_rate_plot

    return optimize_failure_rate_plot(result.summary(), path)


def write_history(result: OptimizeResult, outdir: str | Path, extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """history.json and best_method.txt in ``outdir``, each replaced atomically (a crash while
    writing leaves the previous step's files). The optimizer's ``on_step`` calls this after every
    step, so a crash or a budget stop keeps the steps done."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"history": out / "history.json", "best_method": out / "best_method.txt", "measures": out / "measures.json"}
    summary = {**result.summary(), **(extra or {})}
    steps = [{"step": s["step"], "method_id": s.get("method_id"), **s["measures"]}
             for s in result.history if s.get("measures")]
    write_text_atomic(paths["history"], json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(paths["best_method"], result.best_method.text)
    write_text_atomic(paths["measures"], json.dumps({"steps": steps}, indent=2) + "\n")
    return paths


def write_outputs(result: OptimizeResult, outdir: str | Path, extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """history.json, best_method.txt (what ``load_method`` / ``evoray evolve --method`` accept),
    measures.json and failure_rate.png in ``outdir``."""
    paths = write_history(result, outdir, extra)
    paths["plot"] = Path(outdir) / "failure_rate.png"
    plot_failure_rate(result, paths["plot"])
    return paths
