"""evolve.json_output / optimize.json_output: schema-constrained replies for small models."""

import asyncio
import json

from evoray.config import EvolveConfig
from evoray.evolution.evolver import FINAL_INSTRUCTION_SCHEMA, Evolver
from evoray.evolution.methods import SLOT, load_method
from evoray.evolution.optimizer import METHOD_SCHEMA, propose_candidates
from evoray.schema import new_row
from evoray.testing.scripted import ScriptedProvider, scripted_client

ROW = new_row("What is 12 times 7?", source="gsm8k")


def test_evolver_reads_the_final_instruction_from_json():
    prov = ScriptedProvider(responder=lambda r: (
        json.dumps({"final_instruction": "What is 12 times 7, and what is that number squared?"})
        if r.json_schema else "The answer is 84, and 84 squared is 7056."))
    ev = Evolver(scripted_client(prov), load_method("initial"), EvolveConfig(json_output=True, rules=[]))
    out = asyncio.run(ev.evolve_row(ROW))
    assert out["status"] == "evolved"
    assert out["instruction"] == "What is 12 times 7, and what is that number squared?"
    assert prov.history[0].json_schema == FINAL_INSTRUCTION_SCHEMA
    assert prov.history[1].json_schema is None  # the answer is plain text


def test_evolver_without_json_output_sends_no_schema_and_falls_back_to_the_marker():
    prov = ScriptedProvider(responder=lambda r: "#Finally Rewritten Instruction#\nWhat is 12 times 7 plus 3?"
                            if "rewrit" in r.messages[-1]["content"].lower() else "87")
    ev = Evolver(scripted_client(prov), load_method("initial"), EvolveConfig(rules=[]))
    out = asyncio.run(ev.evolve_row(ROW))
    assert out["status"] == "evolved" and out["instruction"] == "What is 12 times 7 plus 3?"
    assert prov.history[0].json_schema is None


def test_empty_json_field_is_a_failed_row():
    prov = ScriptedProvider(responder=lambda r: json.dumps({"final_instruction": "  "}))
    ev = Evolver(scripted_client(prov), load_method("initial"), EvolveConfig(json_output=True, rules=[]))
    out = asyncio.run(ev.evolve_row(ROW))
    assert out["status"] == "failed" and out["rule"] == "no_final_instruction"


def test_optimizer_json_proposals_keep_the_slot():
    def respond(r):
        if r.json_schema == METHOD_SCHEMA:
            return json.dumps({"method": "Step 1: Rewrite the instruction so it needs two more reasoning steps.\n"
                                         "Step 2: Write the #Finally Rewritten Instruction#."})
        return "Feedback: case 1 failed because the rewrite asked a question back."

    prov = ScriptedProvider(responder=respond)
    props = asyncio.run(propose_candidates(scripted_client(prov), load_method("initial"), [], 2, 0.6, 0.95,
                                           json_output=True))
    assert all(p.method is not None and SLOT in p.method.text for p in props)
    assert len({p.method.id for p in props}) == 1  # same text -> same id; the sample indexes differ
    assert sorted(r.sample_index for r in prov.history if r.json_schema) == [0, 1]


def test_optimizer_json_proposal_that_is_not_a_method_is_rejected():
    def respond(r):
        if r.json_schema == METHOD_SCHEMA:
            return json.dumps({"method": "Rewrite the instruction so it needs two more reasoning steps."})
        return "Feedback."

    props = asyncio.run(propose_candidates(scripted_client(ScriptedProvider(responder=respond)), load_method("initial"),
                                           [], 1, 0.6, 0.95, json_output=True))
    assert props[0].method is None and props[0].error == "rejected: no final rewritten-instruction marker"
    assert SLOT in props[0].text
