"""``estimate`` against a scripted run: the requests a stage's estimate predicts are the requests
its real per-row worker sends (issue 18).

For every stage that sends requests (rate, answer, evolve, judge, optimize) the stage's real
worker - looked up through the stage registry (:func:`evoray.workers.lookup`), or for optimize the
:class:`~evoray.evolution.optimizer.Optimizer` with its in-process dev-set evaluation (the same
:func:`~evoray.evolution.optimizer.evaluate_method` the Ray candidate actors run) - runs without Ray
on a handful of real rows from ``../shared/data`` through :func:`evoray.testing.scripted.scripted_client`
clients over scripted providers built from the job's provider configs. The requests the providers
received (and the requests in the job's ledger after the clients flush) must equal
``estimate(config).requests`` for the same config and the same rows.

The nominal case, which is what the estimate counts: every reply succeeds on the first try (scores
parse, evolutions carry a final instruction that passes the cheap failure rules, the equality check
says "Not Equal", answers are real answers, the optimizer proposes a new usable method each time).
Any drift on either side fails a case: a worker that gains or loses a call per row, or an estimate
formula that changes.

Where the estimate is by design a bound, the exact relation is asserted instead:

* rate and judge assume no parse retries (a lower bound): with replies that never parse, every
  rating and every judge order is asked ``parse_retries + 1`` times, so the run sends exactly
  ``(parse_retries + 1) * estimate``;
* optimize assumes every one of ``steps`` steps runs (an upper bound): when ``patience`` stops the
  loop after ``k`` steps, the run sends exactly the estimate for ``steps = k``.

Skipped with a clear reason when ``../shared/data`` is absent (the ``shared_data`` fixture).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import pytest

from evoray import estimate as est
from evoray.config import JobConfig
from evoray.evolution.methods import load_method
from evoray.evolution.optimizer import Optimizer
from evoray.prompts.evolution import BEGIN_INSTRUCTION, END_INSTRUCTION, FINAL_MARKER, SLOT
from evoray.testing.scripted import ScriptedProvider, scripted_client
from evoray.workers import lookup

ALPACA = "alpagasus/random_9k.json"  # {instruction, input, output}
GSM8K = "gsm8k/train.jsonl"  # {question, answer}: the Auto Evol-Instruct seed set
N_ROWS = 5

# ---- scripted replies (all succeed on the first try) ------------------------------------------------

GOOD_ANSWER = ("Here is a complete answer: the main facts are laid out first, then each step is worked "
               "through in order, and the result is stated at the end with a short check.")
EQUALITY_MARK = "<<<FIRST INSTRUCTION>>>"


def _content(request) -> str:
    return request.messages[-1]["content"]


def rating_reply(request) -> str:
    return json.dumps({"score": 4.5, "explanation": "accurate and complete"})


def judge_reply(request) -> str:
    return "8 6\nAssistant 1 is more complete; Assistant 2 leaves out a step."


def answer_reply(request) -> str:
    return GOOD_ANSWER


def evol_reply(request) -> str:
    """Evolutions: the instruction plus a few words after the final marker (passes the strict cheap
    rules); the equality check: Not Equal; anything else is an answer."""
    text = _content(request)
    if BEGIN_INSTRUCTION in text:
        instruction = text.split(BEGIN_INSTRUCTION + "\n", 1)[1].rsplit("\n" + END_INSTRUCTION, 1)[0]
        return (f"Step 1 #Ways to Add Complexity#:\n- ask for the steps\nStep 2 #Plan#:\nask for them\n"
                f"Step 3 #Rewritten Instruction#:\ndraft\nStep 4 {FINAL_MARKER}:\n"
                f"{instruction} Explain each step of your reasoning.")
    if EQUALITY_MARK in text:
        return "Not Equal"
    return GOOD_ANSWER


def optimizer_reply():
    """Feedback for analysis prompts; for rewrites a new usable method every time (numbered steps,
    the final marker, the fenced instruction slot), so no two candidates share a method id."""
    words = itertools.count(1)

    def reply(request) -> str:
        text = _content(request)
        if "Find the rounds where evolution failed" in text:
            return "The evolutions lose no information; ask for one more concrete constraint."
        assert "Write an improved method" in text, text[:200]
        method = (f"Step 1: List ways to make the instruction harder (variant {next(words)}).\n"
                  f"Step 2: Rewrite it with one more concrete constraint.\n"
                  f"Step 3: Reply with {FINAL_MARKER} and the rewritten instruction only.\n"
                  f"{BEGIN_INSTRUCTION}\n{SLOT}\n{END_INSTRUCTION}\n")
        return f"Here is the improved method.\n```\n{method}```\n"

    return reply


def unparseable(request) -> str:
    return "I would rather describe the response in words than give it a number."


# ---- wiring ---------------------------------------------------------------------------------------------

class Wiring:
    """Clients over scripted providers, one client per name (a role, or ``rater:<name>`` for the
    ensemble), each provider built from the job's provider config; counts what they received."""

    def __init__(self):
        self.providers: list[ScriptedProvider] = []
        self.clients: dict = {}

    def add(self, name: str, provider_configs, responder) -> None:
        provs = [ScriptedProvider(pc, responder=responder) for pc in provider_configs]
        self.providers += provs
        self.clients[name] = scripted_client(*provs)

    def sent(self) -> int:
        return sum(len(p.history) for p in self.providers)

    async def ledger_requests(self) -> int:
        """Requests in the ledgers once every client has flushed to its gate (the job's ledger)."""
        total = 0
        for c in self.clients.values():
            await c.aclose()
            total += c.gate.keeper.ledger.totals().requests + c.ledger.totals().requests
        return total


def _config(tmp_path: Path, data: Path, n: int = N_ROWS, **kw) -> JobConfig:
    d = {
        "providers": [{"name": "main", "kind": "anthropic", "model": "claude-x",
                       "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}],
        "input": {"path": str(data), "limit": n},
    }
    for key, value in kw.items():
        if isinstance(value, dict) and isinstance(d.get(key), dict):
            d[key] = {**d[key], **value}
        else:
            d[key] = value
    return JobConfig.from_dict(d)


def _rows(cfg: JobConfig) -> list[dict]:
    """The rows the stage reads: the same reader and limit as the estimate (and ingest)."""
    from evoray.io import iter_rows

    rows = list(iter_rows([cfg.input.path], fmt=cfg.input.format, mapping=cfg.input.map, limit=cfg.input.limit))
    assert len(rows) == cfg.input.limit, "the shared data set has fewer rows than the test asks for"
    return rows


def _estimated(cfg: JobConfig, stage: str) -> est.StageEstimate:
    (st,) = est.estimate(cfg, None, stages=[stage])
    return st


async def _run_rows(stage: str, cfg: JobConfig, wiring: Wiring, rows: list[dict], extra: dict | None = None):
    roles, factory = lookup(stage)
    assert all(r in wiring.clients for r in roles), (roles, list(wiring.clients))
    work = factory(cfg, wiring.clients, extra or {})
    return await asyncio.gather(*(work(r) for r in rows))


# ---- one scripted run per stage ----------------------------------------------------------------------------

async def run_rate(data: Path, tmp_path: Path, *, ensemble: bool = False, responder=rating_reply, **rate):
    if ensemble:
        cfg = _config(tmp_path, data / ALPACA, providers=[
            {"name": "a", "kind": "openai", "model": "m1"}, {"name": "b", "kind": "anthropic", "model": "m2"}],
            roles={"rater": ["a", "b"]}, rate={"ensemble": "all", **rate})
    else:
        cfg = _config(tmp_path, data / ALPACA, rate=rate)
    w = Wiring()
    w.add("rater", cfg.providers_for("rater"), responder)
    if ensemble:
        from evoray.runtime import ensemble_client_name

        for p in cfg.providers_for("rater"):
            w.add(ensemble_client_name(p.name), [p], responder)
    rows = _rows(cfg)
    out = await _run_rows("rate", cfg, w, rows)
    return cfg, w, out, _estimated(cfg, "rate")


async def run_answer(data: Path, tmp_path: Path):
    cfg = _config(tmp_path, data / ALPACA)
    w = Wiring()
    w.add("answer", cfg.providers_for("answer"), answer_reply)
    out = await _run_rows("answer", cfg, w, _rows(cfg))
    return cfg, w, out, _estimated(cfg, "answer")


async def run_evolve(data: Path, tmp_path: Path, *, source: str = GSM8K, **evolve):
    from evoray.stagedefs.evolve import resolve_method

    cfg = _config(tmp_path, data / source, evolve=evolve)
    w = Wiring()
    w.add("evol", cfg.providers_for("evol"), evol_reply)
    method = resolve_method(None, cfg)  # as stage_evolve hands it to the pool
    out = await _run_rows("evolve", cfg, w, _rows(cfg), extra={"method": method.to_dict()})
    return cfg, w, out, _estimated(cfg, "evolve")


def _answer_files(data: Path, tmp_path: Path, n: int) -> tuple[Path, Path]:
    """Model A: the real Alpaca answers; model B: another real answer (the next row's first line)
    to the same prompts."""
    from evoray.io import iter_rows

    rows = list(iter_rows([data / ALPACA], limit=n + 1))
    a, b = tmp_path / "answers_a.jsonl", tmp_path / "answers_b.jsonl"
    with open(a, "w", encoding="utf-8") as fa, open(b, "w", encoding="utf-8") as fb:
        for r, nxt in zip(rows, rows[1:]):
            prompt = {"instruction": r["instruction"], "input": r["input"]}
            fa.write(json.dumps({**prompt, "output": r["output"]}) + "\n")
            fb.write(json.dumps({**prompt, "output": nxt["output"].splitlines()[0]}) + "\n")
    return a, b


async def run_judge(data: Path, tmp_path: Path, *, responder=judge_reply):
    from evoray.io import iter_rows
    from evoray.judge import pair_answers

    a, b = _answer_files(data, tmp_path, N_ROWS)
    cfg = _config(tmp_path, data / ALPACA, judge={"answers_a": str(a), "answers_b": str(b)})
    w = Wiring()
    w.add("judge", cfg.providers_for("judge"), responder)
    # the pairs stage_judge hands the pool
    pairs, only_a, only_b = pair_answers(list(iter_rows([a], fmt="auto")), list(iter_rows([b], fmt="auto")))
    assert len(pairs) == N_ROWS and not only_a and not only_b
    out = await _run_rows("judge", cfg, w, pairs)
    return cfg, w, out, _estimated(cfg, "judge")


OPTIMIZE = {"sample_size": 50, "steps": 2, "candidates": 2, "dev_size": 3, "batch_size": 2, "trajectory_length": 2}


async def run_optimize(data: Path, tmp_path: Path, *, n: int = 8, evolve: dict | None = None, **optimize):
    cfg = _config(tmp_path, data / GSM8K, n=n, optimize={**OPTIMIZE, **optimize}, evolve=evolve or {})
    w = Wiring()
    w.add("evol", cfg.providers_for("evol"), evol_reply)
    w.add("optimizer", cfg.providers_for("optimizer"), optimizer_reply())
    # as stage_optimize: the sampled rows (all of them: fewer than sample_size), the initial method
    # from evolve.method; the dev set is evaluated in this loop (the Ray candidate actors run the same
    # evaluate_method per candidate)
    opt = Optimizer(w.clients["evol"], w.clients["optimizer"], cfg.optimize, cfg.evolve,
                    initial_method=load_method(cfg.evolve.method))
    result = await opt.run(_rows(cfg))
    return cfg, w, result, _estimated(cfg, "optimize")


# ---- the nominal case: the run sends exactly what the estimate says ------------------------------------------

NOMINAL = {
    "rate": lambda d, t: run_rate(d, t),
    "rate-ensemble-all": lambda d, t: run_rate(d, t, ensemble=True),
    "answer": run_answer,
    "evolve-strict-gsm8k": lambda d, t: run_evolve(d, t),
    "evolve-strict-alpaca": lambda d, t: run_evolve(d, t, source=ALPACA),
    "evolve-two-rounds": lambda d, t: run_evolve(d, t, rounds=2),
    "evolve-paper-no-equality-check": lambda d, t: run_evolve(d, t, rules="paper", equality_check=False),
    "evolve-no-answer": lambda d, t: run_evolve(d, t, answer=False),
    "judge": lambda d, t: run_judge(d, t),
    # patience above steps: every step runs, as the estimate counts
    "optimize": lambda d, t: run_optimize(d, t, patience=3),
    # 4 rows < dev_size + batch_size: the dev set and the mini-batches overlap; no trajectory answers
    # (the dev-set evaluation answers anyway)
    "optimize-no-answer-overlapping-dev": lambda d, t: run_optimize(d, t, n=4, patience=3,
                                                                    evolve={"answer": False}),
}


def _check_nominal(case: str, cfg: JobConfig, out) -> None:
    """Every reply was used on the first try: no row failed, nothing was asked twice."""
    if case.startswith("optimize"):
        assert len(out.history) == cfg.optimize.steps and out.stopped == "steps"
        for step in out.history:
            assert not step["failed_proposals"] and not step["proposals_retried"]
            assert len(step["candidates"]) == cfg.optimize.candidates
            # candidates + the current method, all distinct: nothing is left out of the evaluation
            methods = {c["method_id"] for c in step["candidates"]} | {step["method_id"]}
            assert len(methods) == cfg.optimize.candidates + 1
            assert all(s["failed"] is None for t in step["trajectories"] for s in t["steps"])
            assert all(c["failure_rate"] == 0.0 for c in step["candidates"])
        return
    want = {"rate": "scored", "answer": "answered", "evolve": "evolved", "judge": "judged"}[case.split("-")[0]]
    assert [r["status"] for r in out] == [want] * len(out), [(r["status"], r.get("reason")) for r in out]


@pytest.mark.parametrize("case", list(NOMINAL))
async def test_estimate_equals_requests_sent(case, shared_data, tmp_path):
    """Replies that all succeed on the first try: the requests the providers received, and the ledger's
    requests, equal the stage's estimate for the same config and rows."""
    cfg, wiring, out, st = await NOMINAL[case](shared_data, tmp_path)
    _check_nominal(case, cfg, out)
    sent = wiring.sent()
    assert sent > 0
    assert st.requests == sent, (f"{case}: estimate says {st.requests} requests "
                                 f"({[(c.kind, c.requests) for c in st.calls]}), the run sent {sent}")
    assert await wiring.ledger_requests() == sent


# ---- each kind of call, by what the providers received ---------------------------------------------------------

def _kinds(wiring: Wiring) -> dict[str, int]:
    """Requests received by kind, told apart by their prompts."""
    counts: dict[str, int] = {}
    for p in wiring.providers:
        for r in p.history:
            text = _content(r)
            kind = ("analysis" if "Find the rounds where evolution failed" in text
                    else "optimization" if "Write an improved method" in text
                    else "evolution" if BEGIN_INSTRUCTION in text
                    else "equality check" if EQUALITY_MARK in text else "answer")
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def _estimated_kinds(st: est.StageEstimate) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in st.calls:
        kind = c.kind.removeprefix("trajectory ").removeprefix("dev ")
        counts[kind] = counts.get(kind, 0) + c.requests
    return {k: v for k, v in counts.items() if v}


@pytest.mark.parametrize("case", ["evolve-strict-gsm8k", "evolve-two-rounds", "evolve-no-answer", "optimize"])
async def test_each_kind_of_call_matches(case, shared_data, tmp_path):
    """Not only the total: evolutions, answers, equality checks and optimizer calls each match the
    estimate's line for them (a call moved from one kind to another would cancel out in the total)."""
    cfg, wiring, out, st = await NOMINAL[case](shared_data, tmp_path)
    assert _kinds(wiring) == _estimated_kinds(st)
    await wiring.ledger_requests()


# ---- where the estimate is a bound: the exact relation ------------------------------------------------------------

@pytest.mark.parametrize("stage", ["rate", "rate-ensemble-all", "judge"])
async def test_parse_retries_multiply_the_estimate(stage, shared_data, tmp_path):
    """rate and judge assume no parse retries (a lower bound). With replies that never parse, each
    rating and each judge order is asked parse_retries + 1 times: the run sends exactly that multiple."""
    if stage == "judge":
        cfg, wiring, out, st = await run_judge(shared_data, tmp_path, responder=unparseable)
        retries = 2  # the judge worker's Judge() keeps its default parse_retries
    else:
        cfg, wiring, out, st = await run_rate(shared_data, tmp_path, ensemble=stage.endswith("all"),
                                              responder=unparseable)
        retries = cfg.rate.parse_retries
    assert all(r["status"] == "failed" for r in out)
    assert wiring.sent() == (retries + 1) * st.requests
    await wiring.ledger_requests()


async def test_rate_parse_retries_setting_is_followed(shared_data, tmp_path):
    cfg, wiring, out, st = await run_rate(shared_data, tmp_path, responder=unparseable, parse_retries=0)
    assert wiring.sent() == st.requests == N_ROWS
    await wiring.ledger_requests()


async def test_optimize_patience_stop_sends_the_estimate_of_the_steps_run(shared_data, tmp_path):
    """optimize counts every one of ``steps`` steps (an upper bound). With patience 1 and no candidate
    better than the current method the loop stops after step 1: the run sends exactly the estimate
    for steps = 1, less than the estimate for the configured steps."""
    cfg, wiring, result, st = await run_optimize(shared_data, tmp_path, steps=3, patience=1)
    assert len(result.history) == 1 and result.stopped == "no_improvement"
    one_step = _estimated(cfg.model_copy(update={"optimize": cfg.optimize.model_copy(update={"steps": 1})}),
                          "optimize")
    assert wiring.sent() == one_step.requests < st.requests
    assert st.requests == 3 * one_step.requests
    await wiring.ledger_requests()
