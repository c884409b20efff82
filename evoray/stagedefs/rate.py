"""The rate stage: AlpaGasus rating and selection (threshold, ``top_k`` budget or target size).

Rows are scored by the pool's raters (:func:`evoray.workers.rate_worker`); scored rows become
``kept`` or ``rejected`` and unparsed ones ``failed``, each in its own table; ``scores.json`` and
the score histogram record the run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..batch_stage import stage_runner
from ..errors import UsageError
from ..estimate import estimate_rate
from ..io import parquet_stream, write_text_atomic
from ..jobs import JobContext, StageResult
from ..schema import RESULT_SCHEMA
from ..sinks import TableSink
from ..stage import Command, ReportSection, StageDef, register
from ..workers import rate_worker
from .common import _begin, _finish, _providers_fp, _say, feed

#: row status -> the table it goes to
ROUTES = {"kept": "kept", "rejected": "rejected", "failed": "failed"}


def _rate_threshold(ctx: JobContext, input_path: Path, outdir: Path, count_buckets, observe=None) -> dict[str, int]:
    """Rate with the threshold rule, applied to rows as they arrive: one pass, no intermediate file.

    Each landed batch's ``scored`` rows become ``kept`` (``score >= threshold``) or ``rejected``
    and go straight to their tables. (The two-pass path held about 50 MiB more in the driver at
    the end of a 1,000,000-row run: B5 in BENCHMARKS.md.)
    """
    from ..selection import Rule

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

    return stage_runner(ctx, "rate")(ctx, "rate", "rate", input_path, outdir, ROUTES, STAGE.pool_size(cfg),
                                     route=route)


def _rate_budget(ctx: JobContext, input_path: Path, outdir: Path, count_buckets, observe=None) -> dict[str, int]:
    """Rate with a ``top_k`` budget or a target size (``target_rows`` / ``target_fraction``, which
    become ``k`` once the scored rows are counted): the scored rows go to an intermediate Parquet file, and the
    selection streams it (memory flat in the number of rows) after reading the score column
    (8 bytes a row) for the cut and the ids on the cut for its ties."""
    from ..selection import chosen_threshold, finish, plan, target_k

    cfg = ctx.config
    fmt = cfg.output.format
    counts = stage_runner(ctx, "rate")(ctx, "rate", "rate", input_path, outdir, {"scored": "_scored", "failed": "failed"},
                            STAGE.pool_size(cfg), formats={"_scored": "parquet"})
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
    from ..plots import score_histogram
    from ..selection import BUCKETS, bucket_counts, random_positions

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
        from ..ensemble import EnsembleStats

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


def _report(ctx) -> str:
    from ..report import _section_scores

    return _section_scores(ctx)


STAGE = register(StageDef(
    name="rate", roles=("rater",), driver=stage_rate, estimator=estimate_rate,
    routes=ROUTES,
    tables=("kept", "rejected", "failed", "random_baseline"), markers=("scores.json", "kept.parquet", "kept.jsonl"),
    worker=rate_worker, pool_key="rater_actors", pool_label="rater", next_input_fn=feed("kept"), reads_rows=True,
    report=ReportSection("scores", "Rating scores", _report, rank=10),
    command=Command("AlpaGasus rating and filtering", rank=10), outcomes=("kept", "rejected"),
    note_fn=threshold_note))
