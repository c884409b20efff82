"""The labelled failure-detector set (``tests/data/detector_set.jsonl``, benchmark B10).

Each line is one evolution - the original instruction, the evolved instruction, the evol LLM's
answer - labelled ``failed`` or ``ok`` with a reason. The seeds are real rows (GSM8K train and the
AlpaGasus 9k Alpaca subset in ``../shared/data``); the evolutions and answers are the fake
server's replies (:mod:`evoray.testing.fake_server`: its rewrite, answer, clarification and
refusal replies, the wrong-span rewrite its old prompt parser produced), the garbage the embedded
135M model produced in issue 17 (``{``, ``albert``, ``,3 pages``, marker echoes), and the failures
the rule sets are meant to catch (truncation, an unchanged instruction, asking back).

The shared data must not be copied into the repository, so a line stores a *recipe*, not the
texts: ``seed`` names the file and row index, and ``evolved`` / ``answer`` are templates whose
``[[ORIGINAL]]`` (the seed instruction), ``[[ORIGINAL_SPACED]]`` (the same with its spacing
collapsed), ``[[ORIGINAL_HEAD]]`` (its first 30 % of words), ``[[OUTPUT]]`` (the seed's own
answer) and ``[[ANSWER]]`` (the fake server's answer to the evolved instruction) are filled in by
:func:`load` from ``../shared/data``; an optional ``replace`` list of ``[old, new]`` pairs is then
applied to the evolved instruction.

``origin`` says where a line came from: ``fake_server`` lines are built by :func:`build`
(``python -m evoray.testing.detector_set OUT.jsonl`` writes them again, deterministically, and
keeps the file's other lines); ``embedded_model`` lines are what SmolLM2-135M (Q4_1, llama.cpp,
1 thread, method ``initial``, ``evolve.json_output``, temperature 0, 160 tokens) returned for 14
GSM8K and 14 Alpaca seeds drawn with ``random.Random(23)``, labelled by hand: the 18 that gave an
instruction, every one a failure (10 seeds gave no final instruction and are not in the set).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any, Iterator

from ..prompts.evolution import fill
from .fake_server import (ADDED_CONSTRAINT, answer_reply, clarification_reply, sorry_reply,
                          unchanged_rewrite_reply)

GSM8K = "gsm8k/train.jsonl"
ALPACA = "alpagasus/random_9k.json"
SEEDS_PER_SOURCE = 12
#: the old fake-server parser took this span of the method text as "the instruction" (issue 17)
WRONG_SPAN = "no explanation, no comment on the steps, no mention of this task."

OK = [  # (evolved, answer, reason)
    (f"[[ORIGINAL]] {ADDED_CONSTRAINT}", "[[OUTPUT]]", "constraint added (fake server rewrite); real answer"),
    ("[[ORIGINAL]] Explain your reasoning before you give the final answer.", "[[ANSWER]]",
     "reasoning step added; fake server answer"),
    ("[[ORIGINAL]] Answer in at most five sentences and name one assumption you make.", "[[OUTPUT]]",
     "format limit added; real answer"),
    ("[[ORIGINAL]] Include one short example that a beginner could follow.", "[[ANSWER]]",
     "example required; fake server answer"),
    ("[[ORIGINAL]] Make sure every number or claim you use is checked once more at the end.", "[[OUTPUT]]",
     "verification added; real answer"),
]
GARBAGE = ["{", "albert", ",3 pages", "?", "the", "Rewrite", "...", "2 3"]
ECHOES = ["BEGIN INSTRUCTION #1 #Ways to Add Complexity #", "[[ORIGINAL]] #Finally  Rewritten   Instruction #",
          "[[ORIGINAL]] <<< END INSTRUCTION >>>", "Step 1 #Ways to Add Complexity#: [[ORIGINAL]]",
          "[[ORIGINAL]] Use { instruction } as the input."]
ASK_BACK = ["Of course! Could you share the problem you want solved?", "Happy to help. What is the task, exactly?",
            "I would need more information to answer this.", "Certainly. Please specify which instruction you mean."]


def _failed(i: int) -> list[tuple[str, str, str]]:
    """The failed variants for the i-th seed: (evolved, answer, reason)."""
    return [
        (GARBAGE[i % len(GARBAGE)], "[[ANSWER]]", "degenerate: small-model garbage (issue 17, embedded model)"),
        (ECHOES[i % len(ECHOES)], "[[ANSWER]]", "echo of the method's markers, delimiters or slot"),
        ("[[ORIGINAL_HEAD]]", "[[ANSWER]]", "information loss: truncated to 30 % of the original's words"),
        (f"{WRONG_SPAN} {ADDED_CONSTRAINT}", "[[ANSWER]]",
         "information loss: a span of the method text instead of the instruction (fake server parser bug)"),
        (unchanged_rewrite_reply("[[ORIGINAL]]").split("\n", 1)[1], "[[OUTPUT]]",
         "no information gain: the instruction came back unchanged"),
        (f"[[ORIGINAL]] {ADDED_CONSTRAINT}", clarification_reply(), "asks back: Sure ... ? (paper rule)"),
        (f"[[ORIGINAL]] {ADDED_CONSTRAINT}", ASK_BACK[i % len(ASK_BACK)], "asks back for the task, other first word"),
        (f"[[ORIGINAL]] {ADDED_CONSTRAINT}", sorry_reply(), "short refusal with sorry (paper rule)"),
        ("[[ORIGINAL]] Keep the rewritten prompt short.", "[[OUTPUT]]", "copies the method's words (paper rule)"),
        (f"[[ORIGINAL]] {ADDED_CONSTRAINT}", "... !", "answer only punctuation (paper rule)"),
    ]


def _seed_rows(data_dir: Path) -> list[dict[str, Any]]:
    """The seeds: (file, index, instruction, output) for SEEDS_PER_SOURCE rows of each source."""
    rng = random.Random(17)
    with (data_dir / GSM8K).open(encoding="utf-8") as f:
        gsm = [json.loads(line) for line in f]
    alpaca = json.loads((data_dir / ALPACA).read_text(encoding="utf-8"))
    seeds = [{"file": GSM8K, "index": i, "instruction": gsm[i]["question"], "output": gsm[i]["answer"]}
             for i in sorted(rng.sample(range(len(gsm)), SEEDS_PER_SOURCE))]
    # plain Alpaca rows: no separate input, and an answer that is not itself a refusal
    usable = [i for i, r in enumerate(alpaca) if not r.get("input") and "sorry" not in r["output"].lower()
              and len(r["output"].split()) >= 5]
    seeds += [{"file": ALPACA, "index": i, "instruction": alpaca[i]["instruction"], "output": alpaca[i]["output"]}
              for i in sorted(rng.sample(usable, SEEDS_PER_SOURCE))]
    return seeds


def build(data_dir: str | Path) -> list[dict[str, Any]]:
    """The recipes (what the jsonl holds), in a fixed order."""
    out = []
    for i, seed in enumerate(_seed_rows(Path(data_dir))):
        variants = [(e, a, r, "ok") for e, a, r in OK] + [(e, a, r, "failed") for e, a, r in _failed(i)]
        for j, (evolved, answer, reason, label) in enumerate(variants):
            out.append({"id": f"{Path(seed['file']).parent.name}-{seed['index']}-{j}",
                        "seed": {"file": seed["file"], "index": seed["index"]},
                        "method": "initial", "evolved": evolved, "answer": answer, "label": label, "reason": reason,
                        "origin": "fake_server"})
    return out


def _seed(data_dir: Path, ref: dict[str, Any], cache: dict) -> tuple[str, str]:
    if ref["file"] not in cache:
        path = data_dir / ref["file"]
        if ref["file"].endswith(".jsonl"):
            with path.open(encoding="utf-8") as f:
                cache[ref["file"]] = [json.loads(line) for line in f]
        else:
            cache[ref["file"]] = json.loads(path.read_text(encoding="utf-8"))
    row = cache[ref["file"]][ref["index"]]
    return (row["question"], row["answer"]) if "question" in row else (row["instruction"], row["output"])


def load(path: str | Path, data_dir: str | Path) -> Iterator[dict[str, Any]]:
    """The set's evolutions with their texts filled in: ``{id, source, method, instruction, evolved,
    answer, label, reason, origin}``. Needs the seed files in ``data_dir``."""
    data_dir, cache = Path(data_dir), {}
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            original, output = _seed(data_dir, r["seed"], cache)
            words = original.split()
            values = {"ORIGINAL": original, "ORIGINAL_SPACED": " ".join(words),
                      "ORIGINAL_HEAD": " ".join(words[: max(1, int(len(words) * 0.3))]), "OUTPUT": output, "ANSWER": ""}
            evolved = fill(r["evolved"], **values)
            for old, new in r.get("replace") or []:
                evolved = evolved.replace(old, new)
            values["ANSWER"] = answer_reply(evolved)
            yield {"id": r["id"], "source": r["seed"]["file"].split("/")[0], "method": r["method"],
                   "instruction": original, "evolved": evolved, "answer": fill(r["answer"], **values),
                   "label": r["label"], "reason": r["reason"], "origin": r.get("origin", "fake_server")}


def equality_client():
    """A client for the LLM no-information-gain rule that answers like the fake server (Equal when
    the two instructions are the same text): an oracle for an unchanged instruction, not a model."""
    from .scripted import ScriptedProvider, scripted_client
    from .fake_server import default_reply

    return scripted_client(ScriptedProvider(responder=lambda r: default_reply(r.messages), name="fake-equality"))


async def score(rows: list[dict[str, Any]], rules: Any, client: Any = None) -> dict[str, Any]:
    """Run a rule set (``paper``, ``strict`` or a list of names) over the loaded rows: the
    confusion counts, precision and recall of ``failed``, and the rows it got wrong."""
    from ..evolution.methods import BUILTINS
    from ..evolution.rules import acheck, rule_names

    names = rule_names(rules)
    client = client or equality_client()
    tp = fp = fn = tn = 0
    wrong: list[dict[str, Any]] = []
    for r in rows:
        got = await acheck(names, r["instruction"], r["evolved"], r["answer"], BUILTINS[r["method"]], client)
        if r["label"] == "failed":
            tp, fn = tp + (got is not None), fn + (got is None)
        else:
            fp, tn = fp + (got is not None), tn + (got is None)
        if (got is not None) != (r["label"] == "failed"):
            wrong.append({**r, "rule": got})
    nan = float("nan")
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "wrong": wrong,
            "precision": tp / (tp + fp) if tp + fp else nan, "recall": tp / (tp + fn) if tp + fn else nan}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "tests/data/detector_set.jsonl")
    data_dir = Path(args[1]) if len(args) > 1 else Path(__file__).resolve().parents[3] / "shared" / "data"
    rows = build(data_dir)
    if out.exists():  # keep the recorded lines (the embedded model's)
        rows += [r for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())
                 if r.get("origin", "fake_server") != "fake_server"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} evolutions ({sum(r['label'] == 'failed' for r in rows)} failed) -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
