"""Paper settings by default, and the ``paper`` / ``strict`` rule sets (issue 17).

Good cases are real rows (GSM8K train, AlpaGasus's Alpaca 9k) from ``../shared/data``, evolved the
way the fake server does (a constraint appended); the tests that need them skip when it is absent.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from evoray.client import LLMClient, LocalGate
from evoray.config import EvolveConfig, JobConfig, ProviderConfig
from evoray.errors import ConfigError, ProviderError
from evoray.evolution import BUILTINS, Evolver, check
from evoray.evolution.evolver import rules_from_config
from evoray.evolution.rules import PAPER_RULES, RULE_SETS, STRICT_RULES, rule_names
from evoray.gate import Gatekeeper
from evoray.providers import build_provider
from evoray.providers.base import Request
from evoray.schema import new_row
from evoray.testing.fake_server import ADDED_CONSTRAINT, FakeLLMServer, _normalise, default_reply
from evoray.testing.scripted import ScriptedProvider, scripted_client

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
M = BUILTINS["initial"]
GSM = ("Natalia sold clips to 48 of her friends in April, and then half as many clips in May. "
       "How many clips did Natalia sell altogether in April and May?")
GOOD_ANSWER = "She sold 48 in April and 24 in May, 72 clips in all: 48 + 48 / 2 = 72."


def real_rows(n: int = 20) -> list[str]:
    gsm, alpaca = DATA / "gsm8k" / "train.jsonl", DATA / "alpagasus" / "random_9k.json"
    if not gsm.exists() or not alpaca.exists():
        pytest.skip(f"real data absent: {gsm} or {alpaca} (see ../shared/data/README.md)")
    with gsm.open(encoding="utf-8") as f:
        qs = [json.loads(line)["question"] for _, line in zip(range(n), f)]
    rows = json.loads(alpaca.read_text(encoding="utf-8"))
    rng = random.Random(0)
    return qs + [r["instruction"] for r in rng.sample(rows, n)]


# ---- 1. paper settings -------------------------------------------------------------------------

def test_paper_sampling_defaults():
    cfg = JobConfig()
    assert cfg.evolve.temperature == 0 and cfg.evolve.answer_temperature == 0 and cfg.answer.temperature == 0
    assert (cfg.optimize.temperature, cfg.optimize.top_p) == (0.6, 0.95)
    for section, name in ((cfg.evolve, "temperature"), (cfg.optimize, "temperature"), (cfg.optimize, "top_p")):
        assert "Auto Evol-Instruct" in type(section).model_fields[name].description


def test_no_hard_coded_evolution_temperature():
    root = Path(__file__).resolve().parents[1]
    for path in list((root / "evoray").rglob("*.py")) + list((root / "actors").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert "temperature=0.7" not in text and "EVOLVE_TEMPERATURE" not in text, path


async def test_evolution_request_reaches_the_server_at_temperature_0_by_default(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    seen: list[dict] = []
    def responder(kind, body):
        seen.append(body)
        return default_reply(_normalise(kind, body))

    srv = FakeLLMServer(responder=responder).start()
    try:
        cfg = ProviderConfig(name="oa", kind="openai", model="fake", base_url=srv.openai_base_url)
        client = LLMClient([build_provider(cfg)], LocalGate(Gatekeeper([cfg])), cache=None, rng=random.Random(0))
        out = await Evolver(client, M, EvolveConfig()).evolve_row(new_row(instruction=GSM, source="gsm8k"))
        await client.aclose()
    finally:
        srv.stop()
    assert out["status"] == "evolved", out
    evolutions = [b for b in seen if "<<<BEGIN INSTRUCTION>>>" in b["messages"][-1]["content"]]
    assert evolutions and all(b["temperature"] == 0 for b in evolutions)
    assert all(b["temperature"] == 0 for b in seen)  # the equality check and the answer too


async def test_evolve_temperature_is_configurable():
    prov = ScriptedProvider(responder=lambda r: GOOD_ANSWER if "<<<BEGIN" not in r.messages[-1]["content"]
                            else f"#Finally Rewritten Instruction#\n{GSM} {ADDED_CONSTRAINT}")
    await Evolver(scripted_client(prov), M, EvolveConfig(temperature=0.9)).evolve_row(new_row(instruction=GSM))
    temps = {("evol" if "<<<BEGIN" in r.messages[-1]["content"] else "other"): r.temperature for r in prov.history}
    assert temps == {"evol": 0.9, "other": 0.0}


# ---- 2. rule sets ------------------------------------------------------------------------------

def test_rule_sets_by_name():
    assert rule_names("paper") == list(PAPER_RULES) and "no_information_gain" in PAPER_RULES
    assert set(PAPER_RULES) < set(STRICT_RULES)
    assert EvolveConfig().rules == "strict"
    names = [r.name for r in rules_from_config(EvolveConfig())]
    assert names == list(STRICT_RULES)
    assert "no_information_gain" not in [r.name for r in rules_from_config(EvolveConfig(equality_check=False))]
    listed = [r.name for r in rules_from_config(EvolveConfig(rules=["sorry_short"], equality_check=True))]
    assert listed == ["sorry_short", "no_information_gain"]
    with pytest.raises(ConfigError, match="unknown failure rule 'nope'"):
        rules_from_config(EvolveConfig(rules=["nope"]))
    with pytest.raises(ConfigError):
        JobConfig.from_dict({"evolve": {"rules": "lenient"}})
    assert set(RULE_SETS) == {"paper", "strict"}


@pytest.mark.parametrize("evolved", ["{", "albert", ",3 pages"])
def test_garbage_seen_from_the_embedded_model_fails_strict_not_paper(evolved):
    assert check(STRICT_RULES, GSM, evolved, GOOD_ANSWER, M) is not None
    assert check(PAPER_RULES, GSM, evolved, GOOD_ANSWER, M) is None  # what the issue found


@pytest.mark.parametrize("rule,original,evolved,answer", [
    ("echoed_markers", GSM, "BEGIN INSTRUCTION #1 #Ways to Add Complexity #", None),
    ("echoed_markers", GSM, GSM + " #ways  to add COMPLEXITY", None),
    ("echoed_markers", GSM, GSM + " Step 4 #Finally  Rewritten   Instruction #:", None),
    ("echoed_markers", GSM, GSM + " <<< end instruction >>>", None),
    ("echoed_markers", GSM, GSM + " Use { instruction } as input.", None),
    ("degenerate_instruction", "Name a color.", "The of and?", None),
    ("degenerate_instruction", "Name a color.", "albert", None),
    ("unchanged", GSM, GSM, None),
    ("unchanged", GSM, "  " + GSM.upper().replace(",", "") + "  ", None),
    ("information_loss", GSM, "How many clips did she sell?", None),
    ("information_loss", GSM, "Write a poem about the ocean at night, in the style of a sea shanty, with rhymes.",
     None),
    ("not_a_request", GSM, "Natalia sold 48 clips to her friends in April and half as many clips in May, 72 in all.",
     None),
    ("not_a_request", "Suggest a movie suitable for a family with children aged seven and twelve.",
     "The movie is a must for a family with children aged seven and twelve.", None),
    ("asks_back", GSM, GSM + " Show each step.", "Of course! Could you share the problem you would like me to solve?"),
    ("asks_back", GSM, GSM + " Show each step.", "Happy to help. What is the task, exactly?"),
    ("asks_back", GSM, GSM + " Show each step.", "I would need more information to answer this."),
])
def test_each_strict_rule_fires_on_its_case(rule, original, evolved, answer):
    assert check([rule], original, evolved, answer, M) == rule
    assert check(PAPER_RULES, original, evolved, answer, M) is None  # the paper rules let it through


def test_loose_echo_ignores_markers_the_original_had():
    original = "Explain what 'ways to add complexity' means in a style guide."
    assert check(["echoed_markers"], original, original + " Give two examples.", None, M) is None


def test_breadth_method_may_change_the_topic():
    new = "Write a short story about a lighthouse keeper who finds a message in a bottle, in 150 words."
    assert check(["information_loss"], GSM, new, None, BUILTINS["breadth"]) is None
    assert check(["information_loss"], GSM, new, None, M) == "information_loss"


@pytest.mark.parametrize("method", ["initial", "add_constraints", "deepening", "breadth"])
def test_strict_passes_good_evolutions_of_real_rows(method):
    m = BUILTINS[method]
    for original in real_rows():
        evolved = f"{original.rstrip()} {ADDED_CONSTRAINT}"
        answer = f"Here is the answer. {original[:200]} The result follows from the steps above."
        assert check(STRICT_RULES, original, evolved, answer, m) is None, original


# ---- Anthropic sampling ------------------------------------------------------------------------

async def test_anthropic_receives_temperature_and_top_p(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    seen: list[dict] = []

    def responder(kind, body):
        seen.append(body)
        return "ok"

    srv = FakeLLMServer(responder=responder).start()
    try:
        cfg = ProviderConfig(name="claude", kind="anthropic", model="claude-fake", base_url=srv.anthropic_base_url)
        client = LLMClient([build_provider(cfg)], LocalGate(Gatekeeper([cfg])), cache=None, rng=random.Random(0))
        await client.complete(Request(messages=[{"role": "user", "content": "evolve"}], temperature=0.0))
        await client.complete(Request(messages=[{"role": "user", "content": "optimize"}], temperature=0.6, top_p=0.95))
        await client.aclose()
    finally:
        srv.stop()
    assert seen[0]["temperature"] == 0.0 and "top_p" not in seen[0]  # top_p 1 is the API's default
    assert (seen[1]["temperature"], seen[1]["top_p"]) == (0.6, 0.95)


def test_anthropic_drops_top_p_once_when_the_pair_is_rejected_and_names_it_unhonoured(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    cfg = ProviderConfig(name="claude", kind="anthropic", model="claude-sonnet-4-5")
    prov = build_provider(cfg)
    req = Request(messages=[{"role": "user", "content": "x"}], temperature=0.6, top_p=0.95)
    assert prov.sampling_params(req) == {"temperature": 0.6, "top_p": 0.95} and prov.unhonoured(req) == []
    err = ProviderError("`temperature` and `top_p` cannot both be specified for this model. Please use only one.",
                        provider="claude", model=cfg.model, status=400, kind="client")
    message = prov.adapt(err, prov.wire_state(req), req)
    assert message and "unhonoured setting: top_p=0.95" in message
    assert prov.sampling_params(req) == {"temperature": 0.6} and prov.unhonoured(req) == ["top_p=0.95"]
    assert "sampling=temperature" in prov.cache_variant(req)
    assert prov.adapt(err, prov.wire_state(req), req) is None  # no second switch, no second warning
    assert prov.unhonoured(Request(messages=req.messages, temperature=0.0)) == []  # top_p 1: nothing dropped
    pinned = build_provider(cfg.model_copy(update={"sampling": "temperature"}))
    assert pinned.sampling_params(req) == {"temperature": 0.6}


async def test_unhonoured_top_p_is_counted_in_the_ledger(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    bodies: list[dict] = []

    def responder(kind, body):
        bodies.append(body)
        return "ok"

    srv = FakeLLMServer(responder=responder).start()
    try:
        cfg = ProviderConfig(name="claude", kind="anthropic", model="claude-fake", base_url=srv.anthropic_base_url,
                             sampling="temperature")
        client = LLMClient([build_provider(cfg)], LocalGate(Gatekeeper([cfg])), cache=None, rng=random.Random(0))
        for i in range(3):
            await client.complete(Request(messages=[{"role": "user", "content": f"q{i}"}], temperature=0.6, top_p=0.95))
        await client.complete(Request(messages=[{"role": "user", "content": "greedy"}], temperature=0.0))
        ledger = client.ledger.to_dict()
        await client.aclose()
    finally:
        srv.stop()
    assert all("top_p" not in b for b in bodies) and bodies[0]["temperature"] == 0.6
    assert ledger["providers"]["claude"]["unhonoured_sampling"] == 3


def test_anthropic_batch_line_carries_sampling_in_params(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    from evoray.providers.batch_api import batch_api

    prov = build_provider(ProviderConfig(name="claude", kind="anthropic", model="claude-fake"))
    line = batch_api(prov).line("r1", Request(messages=[{"role": "user", "content": "x"}], temperature=0.2,
                                                  top_p=0.9))
    assert line["params"]["temperature"] == 0.2 and line["params"]["top_p"] == 0.9 and "extra_body" not in line["params"]


# ---- the labelled detector set (B10) -----------------------------------------------------------

DETECTOR_SET = Path(__file__).resolve().parent / "data" / "detector_set.jsonl"


def test_detector_set_holds_recipes_not_shared_data():
    lines = [json.loads(line) for line in DETECTOR_SET.read_text(encoding="utf-8").splitlines()]
    assert len(lines) >= 200 and {r["label"] for r in lines} == {"failed", "ok"}
    assert {r["seed"]["file"] for r in lines} == {"gsm8k/train.jsonl", "alpagasus/random_9k.json"}
    assert all(r["reason"] for r in lines)
    assert "Natalia" not in DETECTOR_SET.read_text(encoding="utf-8")  # no seed text copied in


def test_detector_set_is_what_the_generator_writes():
    from evoray.testing.detector_set import build

    real_rows(1)  # skips without ../shared/data
    lines = [json.loads(line) for line in DETECTOR_SET.read_text(encoding="utf-8").splitlines()]
    assert [r for r in lines if r["origin"] == "fake_server"] == build(DATA)
    embedded = [r for r in lines if r["origin"] == "embedded_model"]
    assert len(embedded) == 18 and all(r["label"] == "failed" for r in embedded)


async def test_strict_catches_every_labelled_failure_and_fails_no_ok_row():
    from evoray.testing.detector_set import load, score

    real_rows(1)  # skips without ../shared/data
    rows = list(load(DETECTOR_SET, DATA))
    strict = await score(rows, "strict")
    assert strict["fn"] == 0, [(r["reason"], r["evolved"][:80]) for r in strict["wrong"] if r["label"] == "failed"]
    assert strict["fp"] == 0, [(r["rule"], r["evolved"][:80]) for r in strict["wrong"]]
    paper = await score(rows, "paper")
    assert paper["fp"] == 0 and 0 < paper["recall"] < 1  # the paper rules miss what strict adds
    missed = {r["reason"] for r in paper["wrong"]}
    assert "degenerate: small-model garbage (issue 17, embedded model)" in missed
    assert any(r["origin"] == "embedded_model" for r in paper["wrong"])  # real 135M output the paper rules keep


# ---- make run says which rows failed and why --------------------------------------------------

def test_evolve_stage_lists_failed_rows_and_their_rules(tmp_path):
    from evoray.stages import failed_rows_lines

    rows = [{"id": f"r{i}", "parent_id": f"seed{i}", "instruction": "{" if i % 2 else "albert " * 30,
             "rule": "degenerate_instruction" if i % 2 else None,
             "reason": None if i % 2 else "provider error: timeout"} for i in range(12)]
    (tmp_path / "failed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = failed_rows_lines(tmp_path, "evolve", limit=3)
    assert lines[0] == "[evolve]   failed: seed seed0: provider error: timeout; reached '" + ("albert " * 10)[:67] + "...'"
    assert lines[1] == "[evolve]   failed: seed seed1: rule degenerate_instruction; reached '{'"
    assert lines[3].startswith("[evolve]   ... and 9 more failed row(s)")
    assert failed_rows_lines(tmp_path / "none", "evolve") == []


async def test_fake_server_evolutions_pass_strict_over_rounds():
    """The fake server's rewrites add a new constraint each round, so multi-round runs through it
    (the Ray tests, the benchmarks) gain information every round and pass the strict rules."""
    prov = ScriptedProvider(responder=lambda r: default_reply(r.messages))
    ev = Evolver(scripted_client(prov), M, EvolveConfig(rounds=3))
    rows = [new_row(instruction=q, source="gsm8k") for q in real_rows(5)[:5]] + [new_row(instruction=GSM)]
    out = await ev.evolve_rows(rows)
    assert [r["status"] for r in out] == ["evolved"] * len(rows), [(r["rule"], r["reason"]) for r in out]
    assert all(r["round"] == 3 for r in out)
