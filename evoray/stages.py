"""The stages behind the commands: rate, evolve, answer, judge, optimize, and the pipeline.

Every stage follows the contract in :mod:`evoray.jobs`: canonical input, a Ray pool, every input
row in exactly one output table, ``ledger.json``, and ``_SUCCESS.json`` last (so a re-run skips a
finished stage). The per-row work is the plain core code registered in :mod:`evoray.workers`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .batch_stage import stage_runner
from .config import JobConfig
from .errors import BudgetExceeded, StageFailed, UsageError
from .jobs import (STOPPED, JobContext, StageResult, _hash_file, clear_marker, count_rows, done_marker, fingerprint,
                   format_reasons, prepare_input, reason_key, run_pool_stage, stop_for_budget, write_canonical, write_ledger,
                   write_marker)
from .schema import RESULT_SCHEMA
from .io import parquet_stream, read_table, write_text_atomic
from .sinks import TableSink, find_table

log = logging.getLogger("evoray")


def _providers_fp(config: JobConfig, role: str) -> list:
    """What identifies a role's answers: kind, model and where they come from (base_url or
    cache_namespace), so a finished stage is not taken as done for another server."""
    from .providers import provider_class

    return [(p.kind, p.model, provider_class(p.kind).source_of(p)) for p in config.providers_for(role)]


def _say(ctx: JobContext, msg: str) -> None:
    if not ctx.quiet:
        print(msg, flush=True)


def _finish(ctx: JobContext, stage: str, outdir: Path, fp: str, counts: dict, outputs: dict) -> StageResult:
    write_ledger(ctx, outdir)
    result = StageResult(stage, outdir, counts, outputs)
    ctx.results.append(result)
    if counts.get("budget_stopped"):
        stop_for_budget(ctx, outdir, stage, counts)
    check_failed_share(ctx, result)
    write_marker(outdir, fp, counts, outputs)
    return result


def failed_share(counts: dict) -> tuple[int, int]:
    """(failed rows, rows the stage finished) from a stage's counts."""
    failed = int(counts.get("failed", 0) or 0)
    done = int(counts.get("input", 0) or 0) - int(counts.get("budget_stopped", 0) or 0)
    return failed, max(done, 0)


def check_failed_share(ctx: JobContext, result: StageResult) -> None:
    """More failed rows than ``max_failed_fraction`` allows: the tables stay, ``_STOPPED.json`` says
    why, no ``_SUCCESS.json`` (a re-run redoes the stage), and :class:`StageFailed` (exit 1)."""
    failed, done = failed_share(result.counts)
    limit = ctx.config.max_failed_fraction
    if not done or failed / done <= limit:
        return
    reasons = format_reasons(result.counts.get("failure_reasons") or {})
    write_text_atomic(result.outdir / STOPPED, json.dumps({"stage": result.stage, "reason": "too_many_failed",
                                                           "counts": result.counts}, indent=2))
    where = next((str(p) for p in (result.outdir / "failed.parquet", result.outdir / "failed.jsonl") if p.exists()),
                 str(result.outdir))
    result.failed_job = True
    raise StageFailed(
        f"{result.stage}: {failed} of {done} row(s) failed ({failed / done:.0%}, more than max_failed_fraction "
        f"{limit:g}); most common reasons: {reasons or 'none recorded'}; the failed rows are in {where}. The "
        f"tables are written but the stage is not marked complete: fix the cause and run again (answered "
        f"requests come from the cache), or raise max_failed_fraction")


def _skip(ctx: JobContext, stage: str, outdir: Path, fp: str) -> StageResult | None:
    m = done_marker(outdir, fp)
    if m is None:
        return None
    _say(ctx, f"[{stage}] already complete in {outdir} (skipped; delete {outdir}/_SUCCESS.json to redo)")
    result = StageResult(stage, outdir, m.get("counts", {}), m.get("outputs", {}), skipped=True)
    ctx.results.append(result)
    return result


def _begin(ctx: JobContext, stage: str, input_src: str | None, outdir: Path,
           *fp_parts) -> tuple[Path, str, StageResult | None]:
    """The common start of a stage: ``(input_path, fingerprint, done)``.

    Ingests the input, fingerprints the stage from its name, the input's hash and ``fp_parts``;
    ``done`` is the earlier result when the folder holds a finished run with that fingerprint,
    otherwise None and the folder's marker is cleared for a new run.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    input_path = prepare_input(ctx.config, input_src, outdir)
    fp = fingerprint(stage, _hash_file(input_path), *fp_parts)
    done = _skip(ctx, stage, outdir, fp)
    if done is None:
        clear_marker(outdir)
    return input_path, fp, done


# ---- rate -----------------------------------------------------------------------------------------

def _rate_threshold(ctx: JobContext, input_path: Path, outdir: Path, count_buckets, observe=None) -> dict[str, int]:
    """Rate with the threshold rule, applied to rows as they arrive: one pass, no intermediate file.

    Each landed batch's ``scored`` rows become ``kept`` (``score >= threshold``) or ``rejected``
    and go straight to their tables. (The two-pass path held about 50 MiB more in the driver at
    the end of a 1,000,000-row run: B5 in BENCHMARKS.md.)
    """
    from .selection import Rule

    cfg = ctx.config
    rule = Rule(threshold=cfg.rate.threshold)

    def route(batch: pa.Table) -> pa.Table:
        status = batch.column("status")
        scored = pc.equal(status, "scored")
        scores = batch.column("score")
        count_buckets(scores.filter(scored))
        if observe is not None:
            observe(batch.filter(scored))
        verdict = pc.if_else(rule.mask(scores, batch.column("id")), "kept", "rejected")
        return batch.set_column(batch.schema.get_field_index("status"), "status",
                                pc.if_else(scored, verdict, status).cast(pa.string()))

    return stage_runner(ctx, "rate")(ctx, "rate", "rate", input_path, outdir,
                          {"kept": "kept", "rejected": "rejected", "failed": "failed"},
                          cfg.ray.rater_actors, route=route)


def _rate_budget(ctx: JobContext, input_path: Path, outdir: Path, count_buckets, observe=None) -> dict[str, int]:
    """Rate with a ``top_k`` budget or a target size (``target_rows`` / ``target_fraction``, which
    become ``k`` once the scored rows are counted): the scored rows go to an intermediate Parquet file, and the
    selection streams it (memory flat in the number of rows) after reading the score column
    (8 bytes a row) for the cut and the ids on the cut for its ties."""
    from .selection import chosen_threshold, finish, plan, target_k

    cfg = ctx.config
    fmt = cfg.output.format
    counts = stage_runner(ctx, "rate")(ctx, "rate", "rate", input_path, outdir, {"scored": "_scored", "failed": "failed"},
                            cfg.ray.rater_actors, formats={"_scored": "parquet"})
    scored_path = outdir / "_scored.parquet"
    scored_file = parquet_stream(scored_path) if scored_path.exists() else None

    def scored_batches(columns=None):
        if scored_file is not None:
            for b in scored_file.iter_batches(batch_size=10_000, columns=columns):
                yield pa.Table.from_batches([b])

    scores_col = (pq.read_table(scored_path, columns=["score"]).column("score").to_numpy()
                  if scored_file is not None else [])
    r = cfg.rate
    k = r.top_k if r.top_k is not None else target_k(len(scores_col), r.target_rows, r.target_fraction)
    rule, take = plan(scores_col, threshold=r.threshold, top_k=k)
    chosen = chosen_threshold(rule, scores_col) if r.top_k is None else None
    on_cut = int((scores_col == rule.cut).sum()) if rule.cut is not None else 0
    del scores_col
    if take:
        ties = [t.filter(pc.equal(t.column("score"), rule.cut)).column("id") for t in scored_batches(["id", "score"])]
        rule = finish(rule, take, pa.chunked_array(ties, pa.string()).to_pylist())
        del ties
    sinks = {name: TableSink(outdir, name, fmt, RESULT_SCHEMA) for name in ("kept", "rejected")}
    for t in scored_batches():
        mask = rule.mask(t.column("score"), t.column("id"))
        for name, m in (("kept", mask), ("rejected", pc.invert(mask))):
            part = t.filter(m)
            part = part.set_column(part.schema.get_field_index("status"), "status",
                                   pa.array([name] * part.num_rows, pa.string()))
            sinks[name].write(part)
        count_buckets(t.column("score"))
        if observe is not None:
            observe(t)
    del scored_file
    for sink in sinks.values():
        sink.close()
    scored_path.unlink(missing_ok=True)
    counts.pop("_scored", None)
    counts["kept"], counts["rejected"] = sinks["kept"].rows, sinks["rejected"].rows
    if cfg.rate.top_k is None:  # a target size: the threshold it amounts to, and how the ties on it were split
        counts["threshold_chosen"] = chosen
        counts["rows_on_threshold"] = on_cut
        counts["rows_on_threshold_kept"] = take if rule.cut is not None and take else on_cut
    return counts


#: rate keys added after stage folders were first fingerprinted: left out of the fingerprint at their
#: defaults, so a finished rate stage of an earlier version is still recognised as done
_LATER_RATE_KEYS = {"target_rows": None, "target_fraction": None, "ensemble": "one", "ensemble_rule": "mean"}


def rate_fingerprint(rate) -> dict:
    d = rate.model_dump()
    return {k: v for k, v in d.items() if not (k in _LATER_RATE_KEYS and v == _LATER_RATE_KEYS[k])}


def _target_fields(rate, counts: dict) -> dict:
    """scores.json's record of a target size: the target and the threshold chosen for it."""
    if rate.target_rows is None and rate.target_fraction is None:
        return {}
    return {"target_rows": rate.target_rows, "target_fraction": rate.target_fraction,
            "threshold_chosen": counts.get("threshold_chosen"), "rows_on_threshold": counts.get("rows_on_threshold"),
            "rows_on_threshold_kept": counts.get("rows_on_threshold_kept")}


def threshold_note(counts: dict) -> str:
    """`` (threshold 4.5 chosen for the target; 37 of 120 rows on it kept, by id)`` for a target size."""
    if "threshold_chosen" not in counts:
        return ""
    t = counts["threshold_chosen"]
    if t is None:
        return " (target size 0: no threshold, nothing kept)"
    text = f" (threshold {t:g} chosen for the target"
    on, kept = counts.get("rows_on_threshold") or 0, counts.get("rows_on_threshold_kept") or 0
    if on and kept < on:
        text += f"; {kept} of {on} rows on it kept, by ascending id"
    return text + ")"


def stage_rate(ctx: JobContext, input_src: str | None, outdir: Path) -> StageResult:
    from .plots import score_histogram
    from .selection import BUCKETS, bucket_counts, random_positions

    cfg = ctx.config
    input_path, fp, done = _begin(ctx, "rate", input_src, outdir, rate_fingerprint(cfg.rate), _providers_fp(cfg, "rater"),
                                  cfg.output.format)
    if done is not None:
        return done
    fmt = cfg.output.format
    buckets = dict.fromkeys(BUCKETS, 0)

    def count_buckets(scores: pa.ChunkedArray | pa.Array) -> None:
        for b, c in bucket_counts(scores.drop_null().to_pylist()).items():
            buckets[b] += c

    ensemble = None
    if cfg.rate.ensemble == "all":
        from .ensemble import EnsembleStats

        if cfg.stage_mode("rate") == "batch":
            raise UsageError("rate.ensemble all runs online only: set rate.mode online")
        ensemble = EnsembleStats([p.name for p in cfg.providers_for("rater")], cfg.rate.ensemble_rule)
    observe = ensemble.add_table if ensemble is not None else None
    if not cfg.rate.sized:
        counts = _rate_threshold(ctx, input_path, outdir, count_buckets, observe)
    else:
        counts = _rate_budget(ctx, input_path, outdir, count_buckets, observe)
    buckets["unparsed"] += counts.get("failed", 0)
    # the random baseline: a seeded subset of all input rows, the size of the kept set (ids kept as Arrow)
    if cfg.rate.random_baseline:
        all_ids = pq.read_table(input_path, columns=["id"]).column("id").combine_chunks()
        order = pc.sort_indices(all_ids)
        base = pc.take(all_ids, pc.take(order, pa.array(random_positions(len(all_ids), counts["kept"],
                                                                          seed=cfg.rate.seed), pa.int64())))
        del all_ids, order
        sink = TableSink(outdir, "random_baseline", fmt, RESULT_SCHEMA)
        for batch in parquet_stream(input_path).iter_batches(batch_size=10_000):
            t = pa.Table.from_batches([batch])
            sink.write(t.filter(pc.is_in(t.column("id"), value_set=base)).to_pylist())
        sink.close()
        counts["random_baseline"] = sink.rows
    write_text_atomic(outdir / "scores.json", json.dumps({
        "buckets": buckets, "kept": counts["kept"], "rejected": counts["rejected"], "failed": counts.get("failed", 0),
        "threshold": cfg.rate.threshold, "top_k": cfg.rate.top_k, "dimension": cfg.rate.dimension,
        "input": counts["input"], **_target_fields(cfg.rate, counts),
        **({"ensemble": ensemble.to_dict()} if ensemble is not None else {})}, indent=2) + "\n")
    score_histogram(buckets, outdir / "score_histogram.png")
    total_out = counts["kept"] + counts["rejected"] + counts.get("failed", 0) + counts.get("budget_stopped", 0)
    if total_out != counts["input"]:
        raise RuntimeError(f"rate: {counts['input']} rows in but {total_out} accounted for: {counts}")
    _say(ctx, f"[rate] kept {counts['kept']}, rejected {counts['rejected']}, failed {counts.get('failed', 0)} "
              f"of {counts['input']}{threshold_note(counts)} -> {outdir}")
    return _finish(ctx, "rate", outdir, fp, counts,
                   {"kept": str(outdir / f"kept.{fmt}"), "rejected": str(outdir / f"rejected.{fmt}")})


# ---- evolve / answer --------------------------------------------------------------------------------

def resolve_method(spec: str | None, config: JobConfig):
    from .evolution.methods import load_method

    return load_method(spec or config.evolve.method)


def stage_evolve(ctx: JobContext, input_src: str | None, outdir: Path, method_spec: str | None = None) -> StageResult:
    cfg = ctx.config
    method = resolve_method(method_spec, cfg)
    input_path, fp, done = _begin(ctx, "evolve", input_src, outdir, method.id, cfg.evolve.model_dump(),
                                  _providers_fp(cfg, "evol"), cfg.output.format)
    if done is not None:
        return done
    write_text_atomic(outdir / "method.txt", method.text)
    counts = run_pool_stage(ctx, "evolve", "evolve", input_path, outdir, {"evolved": "evolved", "failed": "failed"},
                            cfg.ray.evolver_actors, extra={"method": method.to_dict()})
    _check_accounted("evolve", counts, ["evolved", "failed"])
    fmt = cfg.output.format
    from .measures import write_evolve_measures

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


def stage_answer(ctx: JobContext, input_src: str | None, outdir: Path) -> StageResult:
    cfg = ctx.config
    input_path, fp, done = _begin(ctx, "answer", input_src, outdir, cfg.answer.model_dump(),
                                  _providers_fp(cfg, "answer"), cfg.output.format)
    if done is not None:
        return done
    counts = stage_runner(ctx, "answer")(ctx, "answer", "answer", input_path, outdir, {"answered": "answered", "failed": "failed"},
                            cfg.ray.evolver_actors)
    _check_accounted("answer", counts, ["answered", "failed"])
    _say(ctx, f"[answer] answered {counts.get('answered', 0)}, failed {counts.get('failed', 0)} -> {outdir}")
    fmt = cfg.output.format
    return _finish(ctx, "answer", outdir, fp, counts, {"answered": str(outdir / f"answered.{fmt}")})


def _measures_note(rounds: list[dict]) -> str:
    """``; mean words 12.0 -> 31.5, grew 0.93`` from measures.json's rounds (seeds -> last round)."""
    if len(rounds) < 2 or rounds[0].get("mean_words") is None or rounds[-1].get("mean_words") is None:
        return ""
    grew = rounds[-1].get("grew")
    return (f"; mean words {rounds[0]['mean_words']:.1f} -> {rounds[-1]['mean_words']:.1f}"
            + (f", grew {grew:.2f}" if grew is not None else ""))


def _check_accounted(stage: str, counts: dict, tables: list[str]) -> None:
    total = sum(counts.get(t, 0) for t in tables) + counts.get("budget_stopped", 0)
    if total != counts["input"]:
        raise RuntimeError(f"{stage}: {counts['input']} rows in but {total} accounted for: {counts}")


# ---- judge ----------------------------------------------------------------------------------------------

def stage_judge(ctx: JobContext, outdir: Path) -> StageResult:
    from .io import iter_rows
    from .judge import JUDGMENT_FIELDS, JUDGMENT_SCHEMA, pair_answers, summarize
    from .plots import wtl_bar_chart

    cfg = ctx.config
    j = cfg.judge
    if not j.answers_a or not j.answers_b:
        raise UsageError("judge needs judge.answers_a and judge.answers_b (answer files of the two models)")
    outdir.mkdir(parents=True, exist_ok=True)
    rows_a = list(iter_rows([j.answers_a], fmt="auto"))
    rows_b = list(iter_rows([j.answers_b], fmt="auto"))
    pairs, only_a, only_b = pair_answers(rows_a, rows_b)
    fp = fingerprint("judge", [(r["instruction"], r.get("answer_a"), r.get("answer_b")) for r in pairs], j.model_dump(),
                     _providers_fp(cfg, "judge"), cfg.output.format)
    if (r := _skip(ctx, "judge", outdir, fp)) is not None:
        return r
    clear_marker(outdir)
    schema = JUDGMENT_SCHEMA.append(pa.field("status", pa.string()))
    pairs_path = outdir / "_pairs.parquet"
    pq.write_table(pa.Table.from_pylist(pairs), pairs_path, row_group_size=64)
    fmt = cfg.output.format
    counts = stage_runner(ctx, "judge")(ctx, "judge", "judge", pairs_path, outdir, {"judged": "judgments", "failed": "judgments"},
                            cfg.ray.judge_actors, schema=schema) if pairs else {"judgments": 0, "input": 0}
    pairs_path.unlink(missing_ok=True)
    # prompts only one side answered are reported as failed judgments, never dropped
    unmatched = []
    for side, rows in (("B", only_a), ("A", only_b)):
        for r in rows:
            row = {k: None for k in JUDGMENT_FIELDS}
            row.update(id=r["id"], test_set=None, instruction=r["instruction"], input=r.get("input") or "",
                       result="failed", reason=f"no answer from model {side} for this prompt", status="failed")
            unmatched.append(row)
    judgments = read_table(outdir / f"judgments.{fmt}").to_pylist() if counts.get("judgments") else []
    if unmatched:
        sink = TableSink(outdir, "judgments", fmt, schema)
        sink.write(judgments + unmatched)
        sink.close()
        judgments += unmatched
    summary = summarize(judgments, test_sets=j.test_sets or None)
    write_text_atomic(outdir / "summary.json", json.dumps(summary, indent=2) + "\n")
    wtl_bar_chart(summary, outdir / "wtl.png")
    counts["judgments"] = len(judgments)
    counts["unmatched"] = len(unmatched)
    counts["input"] = len(judgments)
    counts["failed"] = sum(1 for r in judgments if r.get("status") == "failed")
    counts["judged"] = counts["judgments"] - counts["failed"]
    reasons = dict(counts.get("failure_reasons") or {})
    for r in unmatched:
        key = reason_key(r["reason"])
        reasons[key] = reasons.get(key, 0) + 1
    counts["failure_reasons"] = reasons
    ov = summary.get("overall", {})
    _say(ctx, f"[judge] Win {ov.get('win')} / Tie {ov.get('tie')} / Lose {ov.get('lose')} (failed {ov.get('failed')}), "
              f"winning score {ov.get('winning_score')} (paper: over the test-set size; judged only "
              f"{ov.get('winning_score_judged_only')}) -> {outdir}")
    return _finish(ctx, "judge", outdir, fp, counts, {"judgments": str(outdir / f"judgments.{fmt}")})


# ---- optimize -------------------------------------------------------------------------------------------

def stage_optimize(ctx: JobContext, input_src: str | None, outdir: Path) -> StageResult:
    from actors.candidates import CandidatePool
    from actors.pools import worker_context
    from .evolution.methods import load_method
    from .evolution.optimizer import Optimizer, write_history, write_outputs

    cfg = ctx.config
    initial = load_method(cfg.evolve.method)
    input_path, fp, done = _begin(ctx, "optimize", input_src, outdir, cfg.optimize.model_dump(), cfg.evolve.model_dump(),
                                  initial.id, _providers_fp(cfg, "evol"), _providers_fp(cfg, "optimizer"))
    if done is not None:
        return done
    session = ctx.session()
    rows = _sample_rows(input_path, cfg.optimize.sample_size, cfg.optimize.seed)
    pool = CandidatePool(session, min(cfg.ray.candidate_actors, cfg.optimize.candidates + 1))
    _say(ctx, f"[optimize] {len(rows)} sampled rows, up to {cfg.optimize.steps} step(s), m={cfg.optimize.candidates}, "
              f"dev {cfg.optimize.dev_size}, {len(pool.actors)} candidate actor(s)")

    async def go():
        _, clients = worker_context(session._config_json, session.job_id, ["evol", "optimizer"])
        # history.json after every step: a crash or a budget stop keeps the steps done
        opt = Optimizer(clients["evol"], clients["optimizer"], cfg.optimize, cfg.evolve, evaluate=pool.evaluate,
                        initial_method=initial,
                        on_step=lambda res: write_history(res, outdir, {"candidate_nodes": sorted(pool.nodes)}))
        try:
            return await opt.run(rows)
        finally:
            for c in clients.values():
                await c.aclose()

    try:
        result = asyncio.run(go())
    finally:
        pool.close()
    paths = write_outputs(result, outdir, {"candidate_nodes": sorted(pool.nodes)})
    counts = {"input": count_rows(input_path), "sampled": len(rows), "steps": len(result.history),
              "best_method_id": result.best_method.id, "best_failure_rate": result.best_failure_rate,
              "initial_failure_rate": result.baseline_failure_rate}
    _say(ctx, f"[optimize] best method {result.best_method.id}: failure rate {result.best_failure_rate:.3f} "
              f"(initial {result.baseline_failure_rate:.3f}) -> {outdir}")
    ctx.check_budget()
    return _finish(ctx, "optimize", outdir, fp, counts, {k: str(v) for k, v in paths.items()})


def _sample_rows(path: Path, n: int, seed: int) -> list[dict]:
    import random

    table = pq.read_table(path)
    total = table.num_rows
    if total <= n:
        return table.to_pylist()
    idx = sorted(random.Random(seed).sample(range(total), n))
    return table.take(pa.array(idx)).to_pylist()


# ---- the pipeline ----------------------------------------------------------------------------------------

def run_pipeline(ctx: JobContext, outdir: Path, input_src: str | None = None) -> dict[str, StageResult]:
    """Run ``pipeline:`` in order; each stage's output feeds the next (see README, "Pipelines")."""
    cfg = ctx.config
    results: dict[str, StageResult] = {}
    current = input_src or cfg.input.path
    method_spec = None
    fmt = cfg.output.format
    for stage in cfg.pipeline:
        sd = outdir / stage
        if stage == "ingest":
            from .io import ingest

            sd.mkdir(parents=True, exist_ok=True)
            target = sd / "rows.parquet"
            if not (sd / "_SUCCESS.json").exists():
                s = ingest([x for x in str(current).split(",")], str(target), fmt=cfg.input.format,
                           mapping=cfg.input.map or None, skip_invalid=cfg.input.skip_invalid, limit=cfg.input.limit)
                write_marker(sd, "ingest", {"rows": s.rows, "quarantined": s.quarantined}, {"rows": str(target)})
            current = str(target)
        elif stage == "optimize":
            r = stage_optimize(ctx, current, sd)
            method_spec = r.outputs.get("best_method") or str(sd / "best_method.txt")
        elif stage == "evolve":
            r = stage_evolve(ctx, current, sd, method_spec)
            current = _canonical_from(sd, "evolved", fmt)
        elif stage == "answer":
            r = stage_answer(ctx, current, sd)
            current = _canonical_from(sd, "answered", fmt)
        elif stage == "rate":
            r = stage_rate(ctx, current, sd)
            current = _canonical_from(sd, "kept", fmt)
        elif stage == "judge":
            r = stage_judge(ctx, sd)
        else:  # pragma: no cover - the config validates stage names
            raise UsageError(f"unknown stage '{stage}'")
        if stage != "ingest":
            results[stage] = r
    return results


def _canonical_from(stage_dir: Path, table: str, fmt: str) -> str:
    """The next stage's input: a stage's table as canonical Parquet (stable ids and lineage)."""
    src = find_table(stage_dir, table)
    target = stage_dir / f"_{table}_canonical.parquet"
    if src is None:
        raise RuntimeError(f"{stage_dir}: no {table} table to feed the next stage")
    if not target.exists() or target.stat().st_mtime < src.stat().st_mtime:
        write_canonical(read_table(src), target)
    return str(target)
