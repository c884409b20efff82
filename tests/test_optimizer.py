"""Auto Evol-Instruct optimizer core without Ray: proposals, evaluation, selection, stopping, outputs."""

from __future__ import annotations

import json
import re

import pytest

from evoray.config import EvolveConfig, OptimizeConfig
from evoray.errors import ProviderError
from evoray.evolution import BUILTINS, EvalResult, Method, Optimizer, load_method
from evoray.evolution.optimizer import (evaluate_methods, failure_rate, propose_candidates, rank_candidates,
                                        write_outputs)
from evoray.prompts.evolution import FINAL_MARKER, SLOT
from evoray.schema import new_row
from evoray.testing.scripted import ScriptedProvider, scripted_client

WORDS = ["ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO"]
GOOD_WORD = "BRAVO"  # the candidate whose evolutions get real answers
FAIL_ANSWER = "Sure, could you please provide more details?"
GOOD_ANSWER = "The answer is 42, because six times seven is forty-two."


def candidate_text(word: str) -> str:
    return (f"Step 1: Rewrite the instruction to be harder; work the word {word} into it.\n"
            f"Step 2: Then write {FINAL_MARKER} and the result.\n#Instruction#:\n{SLOT}\n")


def opt_responder(request) -> str:
    """The scripted optimizer: feedback for analysis prompts, candidate ``sample_index`` for rewrites."""
    text = request.messages[-1]["content"]
    if "Find the rounds where evolution failed" in text:
        return f"Feedback {request.sample_index}: the answers ask for more details; be concrete."
    assert "Write an improved method" in text
    return f"I made it concrete.\n```\n{candidate_text(WORDS[request.sample_index])}```\n"


def evol_responder(request) -> str:
    """The scripted evol LLM: echoes the candidate's marker word into the evolved instruction;
    answers properly only the evolutions made with the GOOD_WORD candidate."""
    text = request.messages[-1]["content"]
    if FINAL_MARKER in text:  # an evolution request (the method text holds the marker)
        word = next((w for w in WORDS if f"word {w} " in text), "")
        n = re.search(r"Question (\d+)", text)
        return f"{FINAL_MARKER}\nSolve question {n.group(1) if n else '?'} {word} with two extra constraints."
    return GOOD_ANSWER if GOOD_WORD in text else FAIL_ANSWER


def seed_rows(n: int = 30, source: str = "gsm8k"):
    return [new_row(instruction=f"Question {i}: what is {i} plus {i}?", output=str(2 * i), source=source)
            for i in range(n)]


def fake_eval(rates_by_word: dict[str, float], calls: list | None = None):
    """An injected evaluate(): failure rate from the marker word in the method text (0.5 otherwise)."""

    async def evaluate(methods, dev_rows):
        if calls is not None:
            calls.append([m.id for m in methods])
        out = []
        for m in methods:
            word = next((w for w in WORDS if f"word {w} " in m.text), None)
            out.append(EvalResult(m.id, rates_by_word.get(word, 0.5), len(dev_rows), {}, 0.0, 1.0))
        return list(reversed(out))  # order must not matter

    return evaluate


# ---- one step with the scripted providers, the default (concurrent) evaluation -----------------

async def test_one_step_best_candidate_chosen_and_evaluations_overlap(tmp_path):
    evol = ScriptedProvider(responder=evol_responder, delay=0.01, name="evol")
    opt = ScriptedProvider(responder=opt_responder, name="opt")
    cfg = OptimizeConfig(sample_size=30, batch_size=3, trajectory_length=2, candidates=3, dev_size=6, steps=1)
    optimizer = Optimizer(scripted_client(evol), scripted_client(opt), cfg, EvolveConfig())
    result = await optimizer.run(seed_rows(30))

    assert len(result.history) == 1
    step = result.history[0]
    cands = step["candidates"]
    assert [c["index"] for c in cands] == [0, 1, 2]
    assert [c["failure_rate"] for c in cands] == [1.0, 0.0, 1.0]
    assert cands[0]["failures_by_rule"] == {"sure_question": 6} and cands[1]["failures_by_rule"] == {}
    assert step["chosen"] == cands[1]["method_id"] and GOOD_WORD in result.best_method.text
    assert step["baseline_failure_rate"] == 1.0 and step["best_failure_rate"] == 0.0 and step["improved"]
    assert step["feedback"] == [f"Feedback {i}: the answers ask for more details; be concrete." for i in range(3)]
    assert result.best_failure_rate == 0.0 and result.baseline_failure_rate == 1.0
    assert result.stopped == "steps" and result.dev_disjoint

    # m distinct samples: each proposal's two requests carry its own sample_index, at the config's sampling
    assert sorted(r.sample_index for r in opt.history) == [0, 0, 1, 1, 2, 2]
    assert {(r.temperature, r.top_p) for r in opt.history} == {(0.6, 0.95)}

    # the three candidates and the baseline were evaluated at the same time
    evals = cands + [step["baseline"]]
    assert max(e["started_at"] for e in evals) < min(e["finished_at"] for e in evals)

    # dev rows are not in the mini-batch
    assert not set(result.dev_ids) & set(step["batch_ids"]) and len(result.dev_ids) == 6
    # trajectories: batch_size rows of trajectory_length steps with the initial method
    assert step["method_id"] == BUILTINS["initial"].id
    assert [len(t["steps"]) for t in step["trajectories"]] == [2, 2, 2]

    paths = write_outputs(result, tmp_path)
    hist = json.loads(paths["history"].read_text())
    assert [c["failure_rate"] for c in hist["steps"][0]["candidates"]] == [1.0, 0.0, 1.0]
    assert hist["best_method"]["id"] == result.best_method.id
    assert load_method(paths["best_method"]).id == result.best_method.id
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # measures of the instructions each step's trajectories evolved (evoray.measures)
    m = json.loads(paths["measures"].read_text())["steps"]
    assert [x["step"] for x in m] == [1] and m[0] == {"step": 1, "method_id": step["method_id"], **step["measures"]}
    evolved = sum(1 for t in step["trajectories"] for s in t["steps"] if s["evolved"] is not None)
    assert m[0]["rows"] == evolved and 0 <= m[0]["grew"] <= 1 and m[0]["mean_words"] > 0


async def test_failed_proposal_recorded_not_fatal():
    def opt(request):
        if request.sample_index == 1 and "Write an improved method" in request.messages[-1]["content"]:
            return "Sorry, I forgot the block."
        return opt_responder(request)
    prov = ScriptedProvider(responder=opt)
    props = await propose_candidates(scripted_client(prov), BUILTINS["initial"], [], 3, 0.6, 0.95)
    assert [p.index for p in props] == [0, 1, 2]
    assert props[1].method is None and "ParseError" in props[1].error and props[1].feedback.startswith("Feedback 1")
    assert props[0].method is not None and props[2].method is not None
    assert props[0].method.text.count(SLOT) == 1


async def test_proposal_provider_error_recorded():
    prov = ScriptedProvider(responder=opt_responder)
    prov.enqueue(ProviderError("denied", provider="opt", model="m", status=403))
    props = await propose_candidates(scripted_client(prov), BUILTINS["initial"], [], 2, 0.6, 0.95)
    assert sum(p.method is None for p in props) == 1 and "denied" in next(p.error for p in props if p.error)


# ---- selection and stopping with an injected evaluation ----------------------------------------

def test_rank_candidates_ties():
    a, b, c = (Method(n, candidate_text(w)) for n, w in (("a", "ALPHA"), ("b", "BRAVO"), ("c", "CHARLIE")))
    r = lambda m, rate: EvalResult(m.id, rate, 10)  # noqa: E731
    ranked = rank_candidates([(2, c, r(c, 0.2)), (1, b, r(b, 0.2)), (0, a, r(a, 0.3))])
    assert [i for i, _, _ in ranked] == [1, 2, 0]
    # same rate and index (e.g. candidates from different sources): lower method id
    lo, hi = sorted([a, b], key=lambda m: m.id)
    assert rank_candidates([(0, hi, r(hi, 0.1)), (0, lo, r(lo, 0.1))])[0][1] is lo


async def test_tie_goes_to_lower_candidate_index():
    opt = ScriptedProvider(responder=opt_responder)
    cfg = OptimizeConfig(sample_size=20, batch_size=2, trajectory_length=1, candidates=3, dev_size=5, steps=1)
    evolve = fake_eval({"ALPHA": 0.4, "BRAVO": 0.2, "CHARLIE": 0.2})
    optimizer = Optimizer(scripted_client(ScriptedProvider(responder=evol_responder)), scripted_client(opt), cfg,
                          evaluate=evolve)
    result = await optimizer.run(seed_rows(20))
    step = result.history[0]
    assert [c["failure_rate"] for c in step["candidates"]] == [0.4, 0.2, 0.2]
    assert step["chosen"] == step["candidates"][1]["method_id"]
    assert "BRAVO" in result.best_method.text


async def test_stops_when_failure_rate_does_not_fall():
    # step 1 proposes ALPHA/BRAVO (best 0.3 < baseline 0.5); step 2 proposes CHARLIE/DELTA (0.4): no improvement
    def opt(request):
        text = request.messages[-1]["content"]
        if "Find the rounds where evolution failed" in text:
            return "feedback"
        word = (["ALPHA", "BRAVO"] if "work the word" not in text else ["CHARLIE", "DELTA"])[request.sample_index]
        return f"```\n{candidate_text(word)}```"
    calls: list = []
    cfg = OptimizeConfig(sample_size=20, batch_size=2, trajectory_length=1, candidates=2, dev_size=5, steps=10,
                         patience=1)
    optimizer = Optimizer(scripted_client(ScriptedProvider(responder=evol_responder)),
                          scripted_client(ScriptedProvider(responder=opt)), cfg,
                          evaluate=fake_eval({"ALPHA": 0.35, "BRAVO": 0.3, "CHARLIE": 0.4, "DELTA": 0.45}, calls))
    result = await optimizer.run(seed_rows(20))
    assert result.stopped == "no_improvement" and len(result.history) == 2
    s1, s2 = result.history
    assert s1["baseline_failure_rate"] == 0.5 and s1["improved"] and s1["best_failure_rate"] == 0.3
    assert not s2["improved"] and s2["chosen_failure_rate"] == 0.4 and s2["best_failure_rate"] == 0.3
    assert s2["baseline_failure_rate"] == 0.3 and s2["method_id"] == s1["chosen"]
    assert "BRAVO" in result.best_method.text and result.best_failure_rate == 0.3
    # the current method is measured again every step beside the candidates (BRAVO in step 2)
    assert len(calls[0]) == 3 and len(calls[1]) == 3 and s1["chosen"] in calls[1]
    assert s2["current_remeasured"]["failure_rate"] == 0.3


async def test_patience_two_runs_until_steps():
    cfg = OptimizeConfig(sample_size=20, batch_size=2, trajectory_length=1, candidates=2, dev_size=5, steps=3,
                         patience=2)
    optimizer = Optimizer(scripted_client(ScriptedProvider(responder=evol_responder)),
                          scripted_client(ScriptedProvider(responder=opt_responder)), cfg,
                          evaluate=fake_eval({"ALPHA": 0.6, "BRAVO": 0.7}))
    result = await optimizer.run(seed_rows(20))
    # never better than the baseline 0.5: stops after 2 steps without improvement
    assert result.stopped == "no_improvement" and len(result.history) == 2
    assert result.best_method.id == BUILTINS["initial"].id and result.best_failure_rate == 0.5


async def test_sampling_is_seeded_and_dev_overlaps_only_when_too_few_rows():
    def make(n, seed=0):
        cfg = OptimizeConfig(sample_size=50, batch_size=4, trajectory_length=1, candidates=1, dev_size=6, steps=1,
                             seed=seed)
        return Optimizer(scripted_client(ScriptedProvider(responder=evol_responder)),
                         scripted_client(ScriptedProvider(responder=opt_responder)), cfg,
                         evaluate=fake_eval({})), seed_rows(n)
    o1, rows = make(40)
    r1 = await o1.run(rows)
    o2, rows = make(40)
    r2 = await o2.run(rows)
    assert r1.dev_ids == r2.dev_ids and r1.history[0]["batch_ids"] == r2.history[0]["batch_ids"]
    assert r1.dev_disjoint and not set(r1.dev_ids) & set(r1.history[0]["batch_ids"])
    o3, few = make(8)
    r3 = await o3.run(few)
    assert not r3.dev_disjoint and len(r3.dev_ids) == 6 and len(r3.history[0]["batch_ids"]) == 4


async def test_default_evaluation_counts_rules_and_excludes_provider_errors():
    def evol(request):
        text = request.messages[-1]["content"]
        if "Question 0:" in text and FINAL_MARKER in text:
            raise ProviderError("forbidden", provider="evol", model="m", status=403)
        if FINAL_MARKER in text:
            return "no marker here" if "Question 1:" in text else evol_responder(request)
        return FAIL_ANSWER if "question 2 " in text else GOOD_ANSWER
    rows = seed_rows(4)
    [res] = await evaluate_methods(scripted_client(ScriptedProvider(responder=evol)), [BUILTINS["initial"]], rows,
                                   EvolveConfig(answer=False, rounds=3))
    assert res.errors == 1 and res.n == 3
    assert res.failures_by_rule == {"no_final_instruction": 1, "sure_question": 1}
    assert res.failure_rate == pytest.approx(2 / 3)
    assert res.started_at <= res.finished_at


def test_failure_rate_of_rows():
    rows = [{"status": "evolved", "rule": None}, {"status": "failed", "rule": "please_provide"},
            {"status": "failed", "rule": None}, {"status": "evolved", "rule": None}]
    assert failure_rate(rows) == (pytest.approx(1 / 3), 3, {"please_provide": 1}, 1)
    assert failure_rate([])[0] == 1.0


# ---- honesty (issue 17) ------------------------------------------------------------------------

async def test_history_written_after_every_step_and_kept_on_a_budget_stop(tmp_path):
    from evoray.errors import BudgetExceeded
    from evoray.evolution.optimizer import write_history

    snapshots: list[dict] = []

    def on_step(res):
        write_history(res, tmp_path)
        snapshots.append(json.loads((tmp_path / "history.json").read_text()))

    evaluations = {"n": 0}

    async def evaluate(methods, dev_rows):
        evaluations["n"] += 1
        if evaluations["n"] == 2:
            raise BudgetExceeded("budget reached")
        return await fake_eval({"ALPHA": 0.3})(methods, dev_rows)

    cfg = OptimizeConfig(sample_size=20, batch_size=2, trajectory_length=1, candidates=2, dev_size=5, steps=5,
                         patience=5)
    optimizer = Optimizer(scripted_client(ScriptedProvider(responder=evol_responder)),
                          scripted_client(ScriptedProvider(responder=opt_responder)), cfg,
                          evaluate=evaluate, on_step=on_step)
    with pytest.raises(BudgetExceeded):
        await optimizer.run(seed_rows(20))
    assert [s["stopped"] for s in snapshots] == ["running", "stopped: budget reached"]
    assert snapshots[0]["best_failure_rate"] == 0.3 and snapshots[0]["baseline_failure_rate"] == 0.5
    hist = json.loads((tmp_path / "history.json").read_text())
    assert hist["steps_run"] == 1 and hist["steps"][0]["improved"] and "ALPHA" in hist["best_method"]["text"]
    assert load_method(tmp_path / "best_method.txt").id == hist["best_method"]["id"]
    assert hist["evol_temperature"] == 0.0 and hist["optimizer_temperature"] == 0.6
    assert hist["optimizer_top_p"] == 0.95 and hist["rule_set"] == "strict" and "echoed_markers" in hist["rules"]


async def test_a_stop_before_the_first_step_writes_null_rates(tmp_path):
    from evoray.errors import BudgetExceeded
    from evoray.evolution.optimizer import write_history

    async def evaluate(methods, dev_rows):
        raise BudgetExceeded("budget reached")

    cfg = OptimizeConfig(sample_size=20, batch_size=2, trajectory_length=1, candidates=1, dev_size=5, steps=2)
    optimizer = Optimizer(scripted_client(ScriptedProvider(responder=evol_responder)),
                          scripted_client(ScriptedProvider(responder=opt_responder)), cfg, evaluate=evaluate,
                          on_step=lambda res: write_history(res, tmp_path))
    with pytest.raises(BudgetExceeded):
        await optimizer.run(seed_rows(20))
    hist = json.loads((tmp_path / "history.json").read_text())  # strict JSON: no NaN
    assert hist["steps_run"] == 0 and hist["best_failure_rate"] is None and hist["stopped"] == "stopped: budget reached"


async def test_all_unusable_proposals_are_said_and_retried_once(caplog):
    def opt(request):
        text = request.messages[-1]["content"]
        if "Find the rounds where evolution failed" in text:
            return "feedback"
        if request.sample_index < 2:
            return "I cannot write a method."  # no fenced block
        return f"```\n{candidate_text(WORDS[request.sample_index])}```"
    prov = ScriptedProvider(responder=opt)
    cfg = OptimizeConfig(sample_size=20, batch_size=2, trajectory_length=1, candidates=2, dev_size=5, steps=1)
    optimizer = Optimizer(scripted_client(ScriptedProvider(responder=evol_responder)), scripted_client(prov), cfg,
                          evaluate=fake_eval({"CHARLIE": 0.2}))
    result = await optimizer.run(seed_rows(20))
    step = result.history[0]
    assert step["proposals_retried"] and not step["no_valid_proposals"]
    assert len(step["failed_proposals"]) == 2 and all("ParseError" in f["error"] for f in step["failed_proposals"])
    assert [c["index"] for c in step["candidates"]] == [2, 3] and step["improved"]
    assert sorted({r.sample_index for r in prov.history}) == [0, 1, 2, 3]  # new indexes: not the cached replies
    assert "none of the 2 proposals gave a usable method" in caplog.text


async def test_no_usable_proposal_after_the_retry_is_its_own_stop_reason():
    def opt(request):
        return "feedback" if "Find the rounds" in request.messages[-1]["content"] else "no block"
    cfg = OptimizeConfig(sample_size=20, batch_size=2, trajectory_length=1, candidates=2, dev_size=5, steps=3)
    optimizer = Optimizer(scripted_client(ScriptedProvider(responder=evol_responder)),
                          scripted_client(ScriptedProvider(responder=opt)), cfg, evaluate=fake_eval({}))
    result = await optimizer.run(seed_rows(20))
    assert result.stopped == "no_valid_proposals" and result.history[0]["no_valid_proposals"]
    assert len(result.history[0]["failed_proposals"]) == 4


@pytest.mark.parametrize("text,problem", [
    ("Make it harder.\n{instruction}", "no final rewritten-instruction marker"),
    ("asdf qwer zxcv {instruction} 1234", "no final rewritten-instruction marker"),
    ("Add one constraint.\n{instruction}\nThen write #Finally Rewritten Instruction#.", "no numbered steps"),
    ("Step 1: add a constraint.\nStep 2: write it.\n{instruction}", "no final rewritten-instruction marker"),
    (candidate_text("ALPHA"), None),
    ("1. List ways.\n2. Plan.\n3. Write the final rewritten instruction.\n{instruction}", None),
])
def test_gibberish_candidate_methods_are_rejected(text, problem):
    from evoray.evolution.optimizer import method_problem

    assert method_problem(Method("c", text), BUILTINS["initial"]) == problem
    # a rewrite of a single-operation method (no steps) needs no steps, only the final marker
    single = BUILTINS["add_constraints"]
    assert method_problem(single, single) is None and method_problem(single, BUILTINS["initial"]) == "no numbered steps"
    assert method_problem(BUILTINS["initial"]) is None


async def test_gibberish_candidate_is_not_evaluated():
    def opt(request):
        text = request.messages[-1]["content"]
        if "Find the rounds where evolution failed" in text:
            return "feedback"
        if request.sample_index == 0:
            return "```\nasdf #Finally Rewritten Instruction# qwer {instruction}\n```"
        return f"```\n{candidate_text('BRAVO')}```"
    calls: list = []
    cfg = OptimizeConfig(sample_size=20, batch_size=2, trajectory_length=1, candidates=2, dev_size=5, steps=1)
    optimizer = Optimizer(scripted_client(ScriptedProvider(responder=evol_responder)),
                          scripted_client(ScriptedProvider(responder=opt)), cfg,
                          evaluate=fake_eval({"BRAVO": 0.1}, calls))
    result = await optimizer.run(seed_rows(20))
    step = result.history[0]
    assert step["failed_proposals"][0]["error"] == "rejected: no numbered steps"
    assert step["failed_proposals"][0]["text"].startswith("asdf") and not step["proposals_retried"]
    assert len(calls[0]) == 2 and [c["index"] for c in step["candidates"]] == [1]
