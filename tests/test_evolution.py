"""Evolution core without Ray: methods, extraction, failure rules, the Evolver."""

from __future__ import annotations

import json

import pytest

from evoray.config import EvolveConfig
from evoray.errors import BudgetExceeded, ConfigError, ParseError, ProviderError
from evoray.evolution import BUILTINS, RULES, Evolver, Method, acheck, check, extract_instruction, load_method, render
from evoray.evolution.extract import extract_method
from evoray.evolution.methods import APPENDED_SLOT, ensure_slot, method_id
from evoray.evolution.rules import NO_FINAL_INSTRUCTION, PAPER_RULES, Rule
from evoray.prompts.evolution import BEGIN_INSTRUCTION, END_INSTRUCTION, FINAL_MARKER, SLOT
from evoray.schema import new_row
from evoray.testing.scripted import ScriptedProvider, scripted_client

HOSTILE = "Explain what #Finally Rewritten Instruction# means, with {braces}, {0} and {instruction}."


def instruction_of(request) -> str:
    text = request.messages[-1]["content"]
    return text.split(BEGIN_INSTRUCTION + "\n", 1)[1].rsplit("\n" + END_INSTRUCTION, 1)[0]


def is_evolution(request) -> bool:
    return BEGIN_INSTRUCTION in request.messages[-1]["content"]


def well_formed(instr: str, added: str = "Explain each step.") -> str:
    return (f"Step 1 #Ways to Add Complexity#:\n- add a constraint\nStep 2 #Plan#:\nadd one\n"
            f"Step 3 #Rewritten Instruction#:\ndraft\nStep 4 {FINAL_MARKER}:\n{instr} {added}")


GOOD_ANSWER = "Natalia sold 48 clips in April and 24 in May, so 72 clips in total; each step is shown above."


def responder(request) -> str:
    if is_evolution(request):
        return well_formed(instruction_of(request))
    return GOOD_ANSWER


def alpaca_row():
    return new_row(instruction="Give three tips for staying healthy.", input="", output="Eat well.", source="alpaca.json")


def gsm8k_row():
    return new_row(instruction="Natalia sold clips to 48 of her friends in April, and then half as many in May. "
                               "How many clips did she sell altogether?",
                   output="72", source="gsm8k", meta={"answer_number": "72"})


# ---- methods -----------------------------------------------------------------------------------

def test_builtins_have_one_slot_final_marker_and_distinct_ids():
    assert set(BUILTINS) == {"initial", "add_constraints", "deepening", "concretizing", "increase_reasoning",
                             "complicate_input", "breadth"}
    ids = set()
    for m in BUILTINS.values():
        assert m.text.count(SLOT) == 1
        assert FINAL_MARKER in m.text and m.final_marker == FINAL_MARKER
        assert m.id == method_id(m.text) and len(m.id) == 12
        ids.add(m.id)
    assert len(ids) == len(BUILTINS)
    assert "10" in BUILTINS["initial"].text and "20 words" in BUILTINS["initial"].text


def test_render_inserts_hostile_instruction_verbatim():
    msgs = render(BUILTINS["initial"], HOSTILE)
    content = msgs[0]["content"]
    assert msgs[0]["role"] == "user"
    assert content.count(HOSTILE) == 1
    # the {instruction} inside the data was not replaced again
    assert content.replace(HOSTILE, "").count(SLOT) == 0
    assert instruction_of(type("R", (), {"messages": msgs})()) == HOSTILE


def test_method_id_checked_and_slot_required():
    m = Method("x", f"do it\n{SLOT}\n")
    assert Method("x", m.text, m.id) == m
    with pytest.raises(ValueError):
        Method("x", m.text, "000000000000")
    with pytest.raises(ValueError):
        Method("x", "no slot here")


def test_load_method_builtin_file_and_unknown(tmp_path):
    assert load_method("deepening") is BUILTINS["deepening"]
    with_slot = tmp_path / "best_method.txt"
    with_slot.write_text(BUILTINS["initial"].text, encoding="utf-8")
    m = load_method(with_slot)
    assert m.id == BUILTINS["initial"].id and m.name == "best_method"
    bare = tmp_path / "mine.txt"
    bare.write_text("Make the instruction harder. End with #Finally Rewritten Instruction#.", encoding="utf-8")
    m2 = load_method(str(bare))
    assert m2.text.endswith(APPENDED_SLOT) and m2.text.count(SLOT) == 1
    assert render(m2, "Say hi.")[0]["content"].endswith("#Instruction#:\nSay hi.\n")
    with pytest.raises(ConfigError) as e:
        load_method("no_such_method")
    for name in BUILTINS:
        assert name in str(e.value)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(ConfigError):
        load_method(empty)


def test_ensure_slot_normalizes_variants():
    assert ensure_slot("A {Instruction} B") == f"A {SLOT} B"
    assert ensure_slot("A {{ instruction }} B") == f"A {SLOT} B"


# ---- extraction --------------------------------------------------------------------------------

def test_extract_well_formed():
    assert extract_instruction(well_formed("Give three tips."), BUILTINS["initial"]) == "Give three tips. Explain each step."


@pytest.mark.parametrize("reply", [
    "#Finally Rewritten Instruction#\nWrite a haiku about rain in May.",
    "#Finally Rewritten Instruction#:\nWrite a haiku about rain in May.",
    "#Finally Rewritten Instruction#: Write a haiku about rain in May.",
    "Step 4 #Finally Rewritten Instruction#: Write a haiku about rain in May.",
    "**Finally Rewritten Instruction:**\nWrite a haiku about rain in May.",
    "**#Finally Rewritten Instruction#**\n\n**Write a haiku about rain in May.**",
    "### Final Rewritten Instruction\nWrite a haiku about rain in May.\n",
    "finally rewritten instruction: \"Write a haiku about rain in May.\"",
    "Step 3 #Rewritten Instruction#:\nWrite a poem.\n\nRewritten Instruction: Write a haiku about rain in May.",
    "#Finally Rewritten Instruction#\n```\nWrite a haiku about rain in May.\n```\nThis adds a constraint.",
    "#Finally Rewritten Instruction#\nWrite a haiku about rain in May.\n\n#Explanation#\nI added a month.",
    "Here is the #Finally Rewritten Instruction#: Write a haiku about rain in May.",
])
def test_extract_variants(reply):
    assert extract_instruction(reply, BUILTINS["initial"]) == "Write a haiku about rain in May."


def test_final_marker_beats_earlier_rewritten_draft():
    reply = "#Rewritten Instruction#\nDraft text.\n#Finally Rewritten Instruction#\nFinal text."
    assert extract_instruction(reply) == "Final text."


def test_method_own_final_marker():
    m = Method("custom", f"Harder please.\n{SLOT}\nAnswer after #Final Version#.")
    assert extract_instruction("thinking...\n#Final Version#\nThe new one.", m) == "The new one."
    assert extract_instruction("thinking...\n**Final Version:** The new one.", m) == "The new one."
    with pytest.raises(ParseError):  # prose that merely mentions the words is no marker
        extract_instruction("Final version of the text is not ready, my final version failed.", m)


@pytest.mark.parametrize("reply", ["", "I cannot do that.", "Step 1 #Ways#: a\nStep 2 #Plan#: b",
                                   "#Finally Rewritten Instruction#\n   \n", "#Finally Rewritten Instruction#\n```\n```",
                                   "#Finally Rewritten Instruction#:\n...",
                                   "I cannot produce the final rewritten instruction.",
                                   "I cannot create a new instruction for this."])
def test_extract_missing_raises_with_raw(reply):
    with pytest.raises(ParseError) as e:
        extract_instruction(reply, BUILTINS["initial"])
    assert e.value.raw == reply


def test_hostile_instruction_does_not_change_extraction():
    # the reply echoes the hostile original instruction before its own final marker
    reply = (f"Step 1 #Ways to Add Complexity#:\nThe instruction is: {HOSTILE}\n"
             f"#Finally Rewritten Instruction#\nShort.\n"  # even a marker line inside the echo
             f"Step 4 {FINAL_MARKER}:\nDescribe three uses of markers in prompts, with one example each.")
    assert extract_instruction(reply, BUILTINS["initial"]) == "Describe three uses of markers in prompts, with one example each."
    # a final instruction that mentions the marker mid-line is kept whole
    reply2 = f"Step 4 {FINAL_MARKER}:\n{HOSTILE} Give two examples."
    assert extract_instruction(reply2, BUILTINS["initial"]) == f"{HOSTILE} Give two examples."


def test_extract_method_last_block_keeps_slot():
    reply = ("Changes: stricter.\n```\nold idea {instruction}\n```\nFinal:\n```text\nNew method.\n"
             "#Instruction#: {Instruction}\nEnd with #Finally Rewritten Instruction#\n```\n")
    text = extract_method(reply)
    assert text.startswith("New method.") and text.count(SLOT) == 1
    Method("m", text)


def test_extract_method_appends_dropped_slot_and_rejects_no_block():
    text = extract_method("```\nRewrite harder. Output after #Finally Rewritten Instruction#\n```")
    assert text.rstrip().endswith(SLOT) and "#Instruction#:" in text
    # a later block without the slot loses to an earlier block that has it
    assert extract_method("```\nA {instruction}\n```\n```\nexample output\n```").startswith("A ")
    for bad in ("no block at all", "```\nunterminated {instruction}"):
        with pytest.raises(ParseError):
            extract_method(bad)


# ---- failure rules -----------------------------------------------------------------------------

M = BUILTINS["initial"]


@pytest.mark.parametrize("rule,answer,fires", [
    ("understood_question", "Understood. Which language should the program use?", True),
    ("understood_question", "Thank you! Could you share the data?", True),
    ("understood_question", "What exactly do you mean by healthy?", True),
    ("understood_question", "That is correct. Shall I go on?", True),
    ("understood_question", "Great question. Do you want details?", True),
    ("understood_question", "Understood. Here are three tips: sleep, eat, move.", False),
    ("understood_question", "Can you tell me what you mean?", False),
    ("sure_question", "Sure, could you tell me which city?", True),
    ("sure_question", "**Sure!** Which one do you mean?", True),
    ("sure_question", "Sure. The answer is 72.", False),
    ("sure_question", "Is it 72? Sure.", False),
    ("please_provide", "To answer, PLEASE PROVIDE the table.", True),
    ("please_provide", "Here is the table you asked for.", False),
    ("sorry_short", "Sorry, I cannot help with that.", True),
    ("sorry_short", "I am sorry to hear that. " + "Here is a long answer word " * 20, False),
    ("sorry_short", "The answer is 72 clips.", False),
    ("punctuation_only", "...!?", True),
    ("punctuation_only", "", True),
    ("punctuation_only", "Ok, and the... yes!", True),
    ("punctuation_only", "72.", False),
    ("punctuation_only", "Eat vegetables.", False),
])
def test_answer_rules(rule, answer, fires):
    assert (check([rule], "orig", "evolved", answer, M) == rule) is fires


@pytest.mark.parametrize("evolved,fires", [
    ("#Rewritten Prompt#: give three tips", True),
    ("Rewrite the given prompt so that it covers sleep.", True),
    ("#Finally Rewritten Instruction# Give three tips.", True),
    ("This rewritten instruction asks for three tips.", True),
    ("Give tips following the #Plan#.", True),  # a marker of the method's own text
    (f"Tips for {BEGIN_INSTRUCTION}", True),
    ("Give three tips for staying healthy while working night shifts.", False),
])
def test_copied_method(evolved, fires):
    assert (check(["copied_method"], "Give three tips for staying healthy.", evolved, None, M) == "copied_method") is fires


def test_copied_method_ignores_phrases_the_original_had():
    assert check(["copied_method"], HOSTILE, HOSTILE + " Give two examples.", None, M) is None


def test_check_order_and_answer_rules_skipped_without_answer():
    ans = "Sure, could you please provide more details?"
    assert check(["please_provide", "sure_question"], "a", "b", ans, M) == "please_provide"
    assert check(["sure_question", "please_provide"], "a", "b", ans, M) == "sure_question"
    assert check(list(PAPER_RULES), "a", "b", None, M) is None
    assert check([], "a", "b", ans, M) is None


def test_registry_unknown_and_duplicate():
    with pytest.raises(ConfigError) as e:
        check(["sure_question", "no_such_rule"], "a", "b", "c")
    assert "no_such_rule" in str(e.value) and "please_provide" in str(e.value)
    with pytest.raises(ValueError):
        RULES.register(Rule("sure_question", "answer", "dup", test=lambda c: False))
    assert {r.target for r in RULES.values()} == {"answer", "instruction"}


async def test_no_information_gain_llm_rule():
    prov = ScriptedProvider().enqueue("Equal", "Not Equal", "no idea")
    client = scripted_client(prov)
    assert await acheck(["no_information_gain"], "a", "a again", None, M, client) == "no_information_gain"
    assert await acheck(["no_information_gain"], "a", "a harder", None, M, client) is None
    assert await acheck(["no_information_gain"], "a", "a harder", None, M, client) is None
    assert "Equal" in prov.history[0].messages[0]["content"] and prov.history[0].temperature == 0
    # sync check skips the LLM rule; acheck needs a client
    assert check(["no_information_gain"], "a", "a", None) is None
    with pytest.raises(ValueError):
        await acheck(["no_information_gain"], "a", "a", None, M)


# ---- the evolver -------------------------------------------------------------------------------

async def test_evolve_row_two_rounds_lineage_and_answer():
    prov = ScriptedProvider(responder=responder)
    ev = Evolver(scripted_client(prov), BUILTINS["initial"], EvolveConfig(rounds=2, equality_check=False))
    seed = alpaca_row()
    out = await ev.evolve_row(seed)
    assert out["status"] == "evolved" and out["rule"] is None
    assert out["parent_id"] == seed["id"] and out["round"] == 2 and out["method_id"] == BUILTINS["initial"].id
    assert out["source"] == "alpaca.json"
    meta = json.loads(out["meta"])
    assert meta["trajectory"] == ["Give three tips for staying healthy. Explain each step.",
                                  "Give three tips for staying healthy. Explain each step. Explain each step."]
    assert out["instruction"] == meta["trajectory"][-1]
    assert out["output"] == GOOD_ANSWER
    assert out["id"] != seed["id"] and out["provider"] == "scripted" and out["attempts"] == 3
    # two evolutions then one answer at temperature 0 with the final instruction
    assert len(prov.history) == 3
    assert prov.history[2].temperature == 0 and prov.history[2].messages[0]["content"] == out["instruction"]
    assert instruction_of(prov.history[1]) == meta["trajectory"][0]


async def test_evolve_row_gsm8k_keeps_source_and_meta():
    ev = Evolver(scripted_client(ScriptedProvider(responder=responder)), BUILTINS["add_constraints"], EvolveConfig())
    seed = gsm8k_row()
    out = await ev.evolve_row(seed)
    assert out["status"] == "evolved" and out["source"] == "gsm8k" and out["round"] == 1
    meta = json.loads(out["meta"])
    assert meta["answer_number"] == "72" and len(meta["trajectory"]) == 1


async def test_evolve_row_extraction_failure_keeps_last_instruction():
    prov = ScriptedProvider().enqueue(well_formed("Give three tips for staying healthy."), "I refuse to rewrite this.")
    ev = Evolver(scripted_client(prov), BUILTINS["initial"], EvolveConfig(rounds=3, equality_check=False))
    out = await ev.evolve_row(alpaca_row())
    assert out["status"] == "failed" and out["rule"] == NO_FINAL_INSTRUCTION
    assert out["instruction"] == "Give three tips for staying healthy. Explain each step."
    assert out["round"] == 1 and "round 2" in out["reason"] and out["raw"] == "I refuse to rewrite this."
    assert len(prov.history) == 2  # no third round, no answer


async def test_evolve_row_answer_rule_fails_row():
    prov = ScriptedProvider().enqueue(well_formed("Give tips."), "Sure, could you please provide more details?")
    out = await Evolver(scripted_client(prov), BUILTINS["initial"],
                        EvolveConfig(equality_check=False)).evolve_row(alpaca_row())
    assert out["status"] == "failed" and out["rule"] == "sure_question"
    assert out["instruction"] == "Give tips. Explain each step." and out["output"].startswith("Sure")


async def test_evolve_row_copied_method_stops_before_answer():
    prov = ScriptedProvider().enqueue(f"{FINAL_MARKER}\nRewrite the given prompt to be harder.")
    out = await Evolver(scripted_client(prov), BUILTINS["initial"], EvolveConfig(rounds=2)).evolve_row(alpaca_row())
    assert out["status"] == "failed" and out["rule"] == "copied_method" and out["round"] == 1
    assert len(prov.history) == 1


async def test_evolve_row_rules_switchable():
    prov = ScriptedProvider().enqueue(well_formed("Give tips."), "Sure, could you please provide more details?")
    ev = Evolver(scripted_client(prov), BUILTINS["initial"], EvolveConfig(), rules=["sorry_short"])
    assert (await ev.evolve_row(alpaca_row()))["status"] == "evolved"


async def test_evolve_row_equality_check_from_config():
    prov = ScriptedProvider().enqueue(well_formed("Give tips."), "Equal")
    ev = Evolver(scripted_client(prov), BUILTINS["initial"], EvolveConfig(equality_check=True, answer=False))
    out = await ev.evolve_row(alpaca_row())
    assert out["rule"] == "no_information_gain" and out["output"] == ""


async def test_evolve_row_provider_error_is_failed_row_and_budget_propagates():
    prov = ScriptedProvider().enqueue(ProviderError("bad request", provider="scripted", model="m", status=400))
    out = await Evolver(scripted_client(prov), BUILTINS["initial"], EvolveConfig()).evolve_row(alpaca_row())
    assert out["status"] == "failed" and out["rule"] is None and "bad request" in out["reason"]
    assert out["instruction"] == alpaca_row()["instruction"] and out["round"] == 0
    prov2 = ScriptedProvider().enqueue(BudgetExceeded("budget reached"))
    with pytest.raises(BudgetExceeded):
        await Evolver(scripted_client(prov2), BUILTINS["initial"], EvolveConfig()).evolve_row(alpaca_row())


async def test_evolve_rows_one_output_per_input():
    def mixed(request):
        if is_evolution(request):
            instr = instruction_of(request)
            return "no marker" if "3" in instr else well_formed(instr)
        return GOOD_ANSWER
    rows = [new_row(instruction=f"Question {i}?", source="s") for i in range(8)]
    out = await Evolver(scripted_client(ScriptedProvider(responder=mixed)), BUILTINS["initial"],
                        EvolveConfig(rounds=2)).evolve_rows(rows)
    assert len(out) == len(rows)
    assert [o["parent_id"] for o in out] == [r["id"] for r in rows]
    assert {o["status"] for o in out} == {"evolved", "failed"}
    assert sum(o["status"] == "failed" for o in out) == 1


async def test_evolve_trajectory_reports_every_step():
    answers = iter(["Fine answer with real content about apples.", "Sure, could you please provide more details?",
                    "Another real answer about pears."])

    def resp(request):
        return well_formed(instruction_of(request)) if is_evolution(request) else next(answers)
    steps = await Evolver(scripted_client(ScriptedProvider(responder=resp)), BUILTINS["initial"],
                          EvolveConfig(equality_check=False)).evolve_trajectory(alpaca_row(), 3)
    assert [s["round"] for s in steps] == [1, 2, 3]
    assert [s["failed"] for s in steps] == [None, "sure_question", None]
    assert steps[1]["instruction"] == steps[0]["evolved"] and steps[2]["instruction"] == steps[1]["evolved"]
    assert all(s["reply"] and s["answer"] for s in steps)


async def test_evolve_trajectory_stops_at_missing_instruction():
    prov = ScriptedProvider().enqueue(well_formed("X"), GOOD_ANSWER, "nothing useful")
    steps = await Evolver(scripted_client(prov), BUILTINS["initial"], EvolveConfig()).evolve_trajectory(alpaca_row(), 3)
    assert len(steps) == 2 and steps[1]["failed"] == NO_FINAL_INSTRUCTION and steps[1]["evolved"] is None
