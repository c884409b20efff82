"""Prompts of the Auto Evol-Instruct optimization step, written for evoray.

Two prompts, named after the paper's two stages of one optimization step:

* :data:`ANALYSIS_PROMPT` (evol trajectory analysis): the optimizer LLM reads the current method and
  the trajectories of a mini-batch and reports which cases failed to evolve and why (feedback);
* :data:`OPTIMIZATION_PROMPT` (evolving method optimization): from the method and that feedback it
  writes an improved method, in full, inside one fenced block.

Data (method text, trajectories, feedback) goes into fenced data blocks whose fence is chosen by
:func:`evoray.prompts.choose_fence` so that no data contains it, and is inserted with
:func:`evoray.prompts.evolution.fill` in one pass, so a method or an instruction that contains
``[[...]]`` tokens, braces or fence-like lines cannot be read as part of the template.
"""

from __future__ import annotations

from . import block, choose_fence, fence_rule
from .evolution import FINAL_MARKER, SLOT, fill

ANALYSIS_PROMPT = """\
You are reviewing an instruction-evolving method: a prompt that asks a language model to rewrite
an instruction into a more complex one. [[RULE]]

The method's text is in the first block; the place where each instruction is inserted is written
as {slot}.

[[METHOD]]

The method was applied several times in a row to each seed instruction of a small batch. Each
case below shows the seed, then every round's rewritten instruction and the answer the model gave
to it, plus any automatic check that flagged the round.

[[TRAJECTORIES]]

Find the rounds where evolution failed. A round failed when the rewrite:
- is not more complex than the instruction it came from, or only adds words without adding
  difficulty;
- drops information, changes the topic or the language, or becomes a different task;
- is not a self-contained instruction (it repeats the method's own wording, asks the user for
  more details, or is a question back to the user);
- cannot reasonably be answered, or the model answered it by asking for clarification or
  refusing;
- is missing, because the reply did not contain a final instruction.

For every failed round, name the case and round, say what went wrong and which part of the method
allowed it. Finish with a short numbered list of feedback points for improving the method. Do not
write a new method yet.""".replace("{slot}", SLOT)

OPTIMIZATION_PROMPT = """\
You are improving an instruction-evolving method: a prompt that asks a language model to rewrite
an instruction into a more complex one. [[RULE]]

The current method is in the first block:

[[METHOD]]

A review of its recent results (feedback) is in the second block:

[[FEEDBACK]]

Write an improved method that:
- fixes each problem named in the feedback;
- does not harm the cases that already evolve well;
- does not lower how much each rewrite increases the complexity of the instruction;
- keeps the placeholder {slot} exactly where the instruction is to be inserted;
- still asks for the final result after the line {final}, and for nothing after it.

You may first explain your changes in a few sentences. Then output the whole improved method,
from its first line to its last, inside a single fenced block that starts with ``` and ends with
```. Write nothing after the block.""".replace("{slot}", SLOT).replace("{final}", FINAL_MARKER)


def analysis_messages(method_text: str, trajectories_text: str) -> list[dict[str, str]]:
    tag = choose_fence([method_text, trajectories_text])
    content = fill(ANALYSIS_PROMPT, RULE=fence_rule(tag), METHOD=block(tag, method_text),
                   TRAJECTORIES=block(tag, trajectories_text))
    return [{"role": "user", "content": content}]


def optimization_messages(method_text: str, feedback: str) -> list[dict[str, str]]:
    tag = choose_fence([method_text, feedback])
    content = fill(OPTIMIZATION_PROMPT, RULE=fence_rule(tag), METHOD=block(tag, method_text),
                   FEEDBACK=block(tag, feedback))
    return [{"role": "user", "content": content}]


def format_trajectories(trajectories: list[dict], answer_chars: int = 600) -> str:
    """Text of a mini-batch's trajectories for :data:`ANALYSIS_PROMPT`.

    ``trajectories`` holds ``{"seed": str, "steps": [step, ...]}`` (or bare step lists, the seed
    then being the first step's instruction) with steps as produced by
    :meth:`evoray.evolution.evolver.Evolver.evolve_trajectory`. Long answers are cut to
    ``answer_chars`` characters.
    """
    parts = []
    for i, tr in enumerate(trajectories, 1):
        if not isinstance(tr, dict):
            tr = {"seed": tr[0]["instruction"] if tr else "", "steps": tr}
        lines = [f"=== Case {i} ===", "Seed instruction:", tr["seed"]]
        for st in tr["steps"]:
            lines.append(f"--- Round {st['round']} ---")
            if st.get("evolved") is None:
                lines.append("Rewritten instruction: (none; the reply had no final instruction)" if st.get("failed")
                             == "no_final_instruction" else f"Rewritten instruction: (none; {st.get('reason') or 'error'})")
            else:
                lines += ["Rewritten instruction:", st["evolved"]]
            if st.get("answer") is not None:
                ans = st["answer"]
                if len(ans) > answer_chars:
                    ans = ans[:answer_chars] + " [...]"
                lines += ["Answer:", ans]
            if st.get("failed"):
                lines.append(f"Automatic check: failed ({st['failed']})")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
