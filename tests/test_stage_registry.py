"""A stage is one object: the registry, the built-in stages, and a toy stage added in one place.

The toy stage ``shout`` upper-cases each instruction (no model). Registering it once is enough for
it to be listed, looked up as a pool worker, estimated, run by the pipeline loop and offered as a
subcommand; everything here runs without Ray (its driver calls the worker directly).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest

from evoray import stage as registry
from evoray.config import BATCH_STAGES, ROLES, JobConfig
from evoray.estimate import estimate
from evoray.io import read_table, write_table
from evoray.stage import Command, Stage, StageDef, get_stage, register, stage_names
from evoray.workers import lookup

BUILTIN = ("ingest", "optimize", "evolve", "answer", "rate", "judge")


# ---- the toy stage: everything it is, in one place ---------------------------------------------------------

def shout_worker(config, clients, extra):
    async def work(row: dict) -> dict:
        return {**row, "instruction": row["instruction"].upper(), "status": "shouted"}

    return work


def run_shout(ctx, input_src, outdir: Path):
    """The driver, without Ray: every input row through the worker, into the ``shouted`` table."""
    outdir.mkdir(parents=True, exist_ok=True)
    work = shout_worker(ctx.config, {}, {})
    rows = read_table(input_src).to_pylist()
    out = [asyncio.run(work(r)) for r in rows]
    write_table([{k: v for k, v in r.items() if k != "status"} for r in out], outdir / "shouted.parquet")
    result = SimpleNamespace(stage="shout", outdir=outdir, counts={"input": len(rows), "shouted": len(out)},
                             outputs={"shouted": str(outdir / "shouted.parquet")})
    ctx.results.append(result)
    return result


def estimate_shout(builder, st, rows, state):
    st.notes.append("upper-cases text: no model calls")
    return rows


SHOUT = StageDef(
    name="shout", roles=(), driver=run_shout, estimator=estimate_shout, routes={"shouted": "shouted"},
    tables=("shouted",), markers=("shouted.parquet",), worker=shout_worker, reads_rows=True,
    next_input_fn=lambda outdir, fmt, current: str(outdir / "shouted.parquet"),
    command=Command("upper-case every instruction", rank=99), outcomes=("shouted",))


@pytest.fixture
def shout():
    register(SHOUT)
    try:
        yield SHOUT
    finally:
        registry.unregister("shout")


def _data(path: Path, n: int = 3) -> Path:
    path.write_text("".join(json.dumps({"instruction": f"say hello {i}", "input": "", "output": "hi"}) + "\n"
                            for i in range(n)), encoding="utf-8")
    return path


def _config(data: Path, pipeline: list[str]) -> JobConfig:
    cfg = JobConfig.from_dict({"providers": [{"name": "main", "kind": "anthropic", "model": "claude-x"}],
                               "input": {"path": str(data)}, "pipeline": ["ingest"]})
    return cfg.model_copy(update={"pipeline": pipeline})  # a toy stage is not in the config's Literal


# ---- the built-in stages ------------------------------------------------------------------------------------

def test_every_builtin_stage_is_registered_in_pipeline_order():
    assert stage_names()[:len(BUILTIN)] == BUILTIN
    for name in BUILTIN:
        st = get_stage(name)
        assert isinstance(st, Stage) and st.name == name
        assert set(st.roles) <= set(ROLES)
        assert callable(st.estimator) and callable(st.driver)
        assert set(st.routes.values()) <= set(st.tables)
        if st.worker is not None:  # a pool stage: its tables, its roles and the ray key sizing its pool
            assert st.tables and st.roles and st.routes
            assert "failed" in st.routes
            assert hasattr(JobConfig().ray, st.pool_key)
            assert lookup(name) == (list(st.roles), st.worker)
    assert [n for n in BUILTIN if get_stage(n).worker is None] == ["ingest", "optimize"]
    assert get_stage("rate").routes == {"kept": "kept", "rejected": "rejected", "failed": "failed"}


def test_the_config_literal_lists_exactly_the_builtin_stages():
    """config.py is below the registry (layer 0), so its pipeline Literal is spelled out: it must match."""
    field = JobConfig.model_fields["pipeline"].annotation
    (literal,) = typing.get_args(field)
    assert typing.get_args(literal) == BUILTIN == tuple(n for n in stage_names() if n in BUILTIN)
    for stage, (section, role) in BATCH_STAGES.items():  # the batch-capable stages, also spelled out there
        assert section == stage and role in get_stage(stage).roles


def test_a_name_registered_twice_or_unknown_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register(get_stage("rate"))
    with pytest.raises(KeyError, match=r"unknown stage 'nope' \(known: ingest, optimize"):
        get_stage("nope")
    with pytest.raises(KeyError, match="unknown stage worker 'optimize'"):
        lookup("optimize")


def test_loading_the_registry_imports_no_ray():
    code = "import sys, evoray.stage as s; s.stage_names(); print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False", out.stderr


# ---- the toy stage -------------------------------------------------------------------------------------------

def test_a_registered_stage_is_listed_looked_up_and_estimated(shout, tmp_path):
    assert "shout" in stage_names()
    roles, factory = lookup("shout")
    assert roles == [] and factory is shout_worker
    row = asyncio.run(factory(None, {}, {})({"id": "1", "instruction": "hi there"}))
    assert row["instruction"] == "HI THERE" and row["status"] == "shouted"
    data = _data(tmp_path / "d.jsonl")
    cfg = _config(data, ["shout"])
    (e,) = estimate(cfg, str(data), stages=["shout"])
    assert e.stage == "shout" and e.rows == 3 and e.requests == 0
    assert "no model calls" in " ".join(e.notes)


def test_the_pipeline_runs_a_registered_stage(shout, tmp_path):
    from evoray.stages import run_pipeline

    data = _data(tmp_path / "d.jsonl")
    cfg = _config(data, ["ingest", "shout"])
    ctx = SimpleNamespace(config=cfg, results=[])
    results = run_pipeline(ctx, tmp_path / "out")
    assert list(results) == ["shout"] and results["shout"].counts == {"input": 3, "shouted": 3}
    rows = read_table(tmp_path / "out" / "shout" / "shouted.parquet").to_pylist()
    assert [r["instruction"] for r in rows] == ["SAY HELLO 0", "SAY HELLO 1", "SAY HELLO 2"]


def test_a_registered_stage_gets_a_subcommand_and_report_lines(shout, tmp_path):
    from evoray.cli import build_parser, job_commands
    from evoray.commands import outcome_words
    from evoray.report import find_stages

    args = build_parser().parse_args(["shout", "job.yaml", "-i", "in.jsonl"])
    assert args.command == "shout" and args.input == "in.jsonl"
    assert "shout" in job_commands() and outcome_words("shout") == ("shouted",)
    (tmp_path / "shouted.parquet").write_bytes(b"")
    assert "shout" in find_stages(tmp_path)
