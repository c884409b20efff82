"""The optimize stage: Auto Evol-Instruct's loop over a sample of the rows (driver-only: the
candidate methods are evaluated by plain actors, not a Ray Data pool)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..estimate import estimate_optimize
from ..jobs import JobContext, StageResult, count_rows
from ..stage import Command, ReportSection, StageDef, register
from .common import _begin, _finish, _providers_fp, _say


def stage_optimize(ctx: JobContext, input_src: str | None, outdir: Path) -> StageResult:
    from actors.candidates import CandidatePool
    from actors.pools import worker_context
    from ..evolution.methods import load_method
    from ..evolution.optimizer import Optimizer, write_history, write_outputs

    cfg = ctx.config
    initial = load_method(cfg.evolve.method)
    input_path, fp, done = _begin(ctx, "optimize", input_src, outdir, cfg.optimize.model_dump(), cfg.evolve.model_dump(),
                                  initial.id, _providers_fp(cfg, "evol"), _providers_fp(cfg, "optimizer"))
    if done is not None:
        return done
    session = ctx.session()
    rows = _sample_rows(input_path, cfg.optimize.sample_size, cfg.optimize.seed)
    pool = CandidatePool(session, STAGE.pool_size(cfg))
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


def summary_line(c: dict) -> str:
    """The optimize stage's part of the final line."""
    if "best_method_id" not in c:
        return f"optimize {c.get('steps', 0)} step(s)"
    return (f"optimize best method {c['best_method_id']} (failure rate {c.get('best_failure_rate', 0):.3f}, "
            f"initial {c.get('initial_failure_rate', 0):.3f}) after {c.get('steps', 0)} step(s)")


def _best_method(result: StageResult, outdir: Path) -> dict:
    """The evolve stage after it uses the best method found."""
    return {"method_spec": result.outputs.get("best_method") or str(outdir / "best_method.txt")}


def _report(ctx) -> str:
    from ..report import _section_optimization

    return _section_optimization(ctx)


STAGE = register(StageDef(
    name="optimize", roles=("evol", "optimizer"), driver=stage_optimize, estimator=estimate_optimize,
    markers=("history.json", "best_method.txt"), pool_key="candidate_actors", pool_label="optimizer candidate",
    pool_sizer=lambda config: min(config.ray.candidate_actors, config.optimize.candidates + 1), ray_data=False,
    hand_on_fn=_best_method, reads_rows=True, summary_fn=summary_line,
    report=ReportSection("optimization", "Optimization (Auto Evol-Instruct)", _report, rank=20),
    command=Command("Auto Evol-Instruct loop", rank=40)))
