"""The evolve stage: one evolution method over every row, the failure rules on each result.

Rows go through the pool's evolvers (:func:`evoray.workers.evolve_worker`) into ``evolved`` or
``failed``; ``method.txt`` and ``measures.json`` record the method and how the texts changed.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import JobConfig
from ..estimate import estimate_evolve
from ..io import read_table, write_text_atomic
from ..jobs import JobContext, StageResult, run_pool_stage
from ..sinks import find_table
from ..stage import Command, ReportSection, StageDef, register
from ..workers import evolve_worker
from .common import _begin, _check_accounted, _finish, _providers_fp, _say, feed

#: row status -> the table it goes to
ROUTES = {"evolved": "evolved", "failed": "failed"}


def resolve_method(spec: str | None, config: JobConfig):
    from ..evolution.methods import load_method

    return load_method(spec or config.evolve.method)


def stage_evolve(ctx: JobContext, input_src: str | None, outdir: Path, method_spec: str | None = None) -> StageResult:
    cfg = ctx.config
    method = resolve_method(method_spec, cfg)
    input_path, fp, done = _begin(ctx, "evolve", input_src, outdir, method.id, cfg.evolve.model_dump(),
                                  _providers_fp(cfg, "evol"), cfg.output.format)
    if done is not None:
        return done
    write_text_atomic(outdir / "method.txt", method.text)
    counts = run_pool_stage(ctx, "evolve", "evolve", input_path, outdir, ROUTES,
                            STAGE.pool_size(cfg), extra={"method": method.to_dict()})
    _check_accounted("evolve", counts, ["evolved", "failed"])
    fmt = cfg.output.format
    from ..measures import write_evolve_measures

    mpath = write_evolve_measures(input_path, outdir / f"evolved.{fmt}", outdir)
    rounds = json.loads(mpath.read_text())["rounds"]
    _say(ctx, f"[evolve] evolved {counts.get('evolved', 0)}, failed {counts.get('failed', 0)} of {counts['input']} "
              f"with method {method.name} ({method.id}), rules {_rules_label(cfg)}{_measures_note(rounds)} -> {outdir}")
    for line in failed_rows_lines(outdir, "evolve"):
        _say(ctx, line)
    return _finish(ctx, "evolve", outdir, fp, counts, {"evolved": str(outdir / f"evolved.{fmt}")})


def _rules_label(cfg: JobConfig) -> str:
    rules = cfg.evolve.rules
    return rules if isinstance(rules, str) else "[" + ", ".join(rules) + "]"


#: failed rows the evolve stage lists one by one (the rest are counted)
SHOW_FAILED = 10


def failed_rows_lines(outdir: Path, stage: str, limit: int = SHOW_FAILED) -> list[str]:
    """One line per failed row (its seed, the rule that fired or the reason, the text it reached),
    at most ``limit``, then how many more there are in the failed table."""
    path = find_table(outdir, "failed")
    if path is None:
        return []
    rows = read_table(path).to_pylist()
    lines = []
    for r in rows[:limit]:
        text = " ".join(str(r.get("instruction") or "").split())
        text = text if len(text) <= 70 else text[:67] + "..."
        why = f"rule {r['rule']}" if r.get("rule") else (r.get("reason") or "?")
        lines.append(f"[{stage}]   failed: seed {r.get('parent_id') or r.get('id')}: {why}; reached {text!r}")
    if len(rows) > limit:
        lines.append(f"[{stage}]   ... and {len(rows) - limit} more failed row(s) in {path}")
    return lines


def _measures_note(rounds: list[dict]) -> str:
    """``; mean words 12.0 -> 31.5, grew 0.93`` from measures.json's rounds (seeds -> last round)."""
    if len(rounds) < 2 or rounds[0].get("mean_words") is None or rounds[-1].get("mean_words") is None:
        return ""
    grew = rounds[-1].get("grew")
    return (f"; mean words {rounds[0]['mean_words']:.1f} -> {rounds[-1]['mean_words']:.1f}"
            + (f", grew {grew:.2f}" if grew is not None else ""))


def _report(ctx) -> str:
    from ..report import _section_evolution

    return _section_evolution(ctx)


def _method_option(p) -> None:
    p.add_argument("--method", help="method file (e.g. best_method.txt) or built-in name")


STAGE = register(StageDef(
    name="evolve", roles=("evol",), driver=stage_evolve, estimator=estimate_evolve,
    routes=ROUTES, tables=("evolved", "failed"),
    markers=("evolved.parquet", "evolved.jsonl"), worker=evolve_worker, pool_key="evolver_actors",
    pool_label="evolver", next_input_fn=feed("evolved"), takes=("method_spec",), reads_rows=True,
    report=ReportSection("evolution", "Evolution", _report, rank=30),
    command=Command("evolve instructions with one method", add_arguments=_method_option,
                    options=lambda args: {"method_spec": getattr(args, "method", None)}, rank=30),
    outcomes=("evolved",)))
