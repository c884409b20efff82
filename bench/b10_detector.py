"""B10 failure detector: precision and recall of the ``paper`` and ``strict`` rule sets.

Runs both rule sets over the labelled detector set (``tests/data/detector_set.jsonl``, see
:mod:`evoray.testing.detector_set` and the README's "Failure rules" section): 360 evolutions of 24
real seeds (12 GSM8K train, 12 Alpaca rows of AlpaGasus's 9k subset from ``../shared/data``) built
from the fake server's replies, 240 labelled failed and 120 ok, and 18 evolutions by the embedded
SmolLM2-135M model, all labelled failed by hand. "Positive" = failed: precision is the share of the rows a rule set
failed that are labelled failed, recall the share of the labelled failed rows it failed. The LLM
no-information-gain rule is answered by the fake server's equality reply (Equal when the evolved
instruction adds no word).
No timing, no Ray; the figures are the same on every machine. Without ``../shared/data`` the figures
are n/a.
"""

from __future__ import annotations

import asyncio
import json

import common
from common import ROOT, figure, say

SET = ROOT / "tests" / "data" / "detector_set.jsonl"
DATA = ROOT.parent / "shared" / "data"


def run():
    from evoray.testing.detector_set import load, score

    if not (DATA / "gsm8k").is_dir() or not (DATA / "alpagasus").is_dir():
        say(f"  B10: {DATA} absent: no figures")
        nan = float("nan")
        return [figure("B10", f"{name} {what}", [nan]) for name in ("paper", "strict") for what in ("precision", "recall")]
    rows = list(load(SET, DATA))
    n_failed = sum(r["label"] == "failed" for r in rows)
    figs = []
    for name in ("paper", "strict"):
        s = asyncio.run(score(rows, name))
        say(f"  B10 {name}: {s['tp']} of {n_failed} failed rows caught, {s['fp']} of {len(rows) - n_failed} ok rows "
            f"failed; missed: {sorted({r['reason'] for r in s['wrong'] if r['label'] == 'failed'})}")
        note = f"{len(rows)} evolutions ({n_failed} labelled failed) of real GSM8K/Alpaca seeds"
        figs.append(figure("B10", f"{name} precision", [s["precision"]], note=note if name == "paper" else ""))
        if name == "strict":
            figs.append(figure("B10", f"{name} recall", [s["recall"]], goal="= 1", check=lambda v: v == 1.0))
        else:
            figs.append(figure("B10", f"{name} recall", [s["recall"]]))
    return figs


if __name__ == "__main__":
    print(json.dumps([f.to_dict() for f in run()], indent=1))
