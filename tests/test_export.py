"""``evoray export``: every format round-trips, every row is written or counted as a named skip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evoray.cli import main
from evoray.errors import UsageError
from evoray.export import export, resolve_table
from evoray.schema import RESULT_SCHEMA, new_row, result_row
from evoray.sinks import TableSink


def _rows() -> list[dict]:
    rows = []
    for i in range(10):
        r = new_row(f"instruction {i}", input="ctx" if i % 2 else "", output="" if i in (3, 7) else f"answer {i}",
                    source="t", parent_id=f"p{i}" if i % 3 == 0 else None, round=1 if i % 3 == 0 else None,
                    method_id="m1" if i % 3 == 0 else None)
        rows.append(result_row(r, status="kept", score=4.5 + (i % 2) * 0.5, provider="fake", model="gpt-x"))
    return rows


def _stage(tmp_path: Path, fmt: str = "parquet", table: str = "kept", row_group_rows: int = 3) -> Path:
    d = tmp_path / "rate"
    sink = TableSink(d, table, fmt, RESULT_SCHEMA, row_group_rows=row_group_rows)
    for r in _rows():
        sink.write([r])
    sink.close()
    (d / "scores.json").write_text(json.dumps({"threshold": 4.5, "top_k": None, "dimension": "accuracy",
                                               "kept": 10, "rejected": 5, "failed": 1, "input": 16}))
    return d


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_alpaca_round_trip_and_skips(tmp_path, fmt):
    d = _stage(tmp_path, fmt)
    out = tmp_path / "a.json"
    s = export(d, out, "alpaca", batch_rows=4)
    data = json.loads(out.read_text())
    assert s.rows_in == 10 and s.written == 8 and s.skipped == {"no_response": 2}
    assert len(data) == 8
    assert data[0] == {"instruction": "instruction 0", "input": "", "output": "answer 0"}
    assert data[1] == {"instruction": "instruction 1", "input": "ctx", "output": "answer 1"}
    assert all(set(r) == {"instruction", "input", "output"} for r in data)


def test_keep_empty_writes_every_row(tmp_path):
    d = _stage(tmp_path)
    s = export(d, tmp_path / "a.json", "alpaca", keep_empty=True)
    assert s.written == 10 and not s.skipped
    assert len(json.loads((tmp_path / "a.json").read_text())) == 10


def test_empty_table_is_an_empty_array(tmp_path):
    d = tmp_path / "st"
    TableSink(d, "kept", "parquet", RESULT_SCHEMA).close()
    s = export(d, tmp_path / "a.json", "sharegpt")
    assert json.loads((tmp_path / "a.json").read_text()) == [] and s.rows_in == 0


def test_sharegpt(tmp_path):
    d = _stage(tmp_path)
    export(d, tmp_path / "s.json", "sharegpt")
    data = json.loads((tmp_path / "s.json").read_text())
    assert len(data) == 8
    assert data[1]["conversations"] == [{"from": "human", "value": "instruction 1\n\nctx"},
                                        {"from": "gpt", "value": "answer 1"}]
    assert data[1]["id"] == _rows()[1]["id"]


def test_openai_jsonl_with_system(tmp_path):
    d = _stage(tmp_path)
    export(d, tmp_path / "o.jsonl", "openai", system="be brief")
    lines = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    assert lines[0]["messages"] == [{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": "instruction 0"},
                                    {"role": "assistant", "content": "answer 0"}]


def test_rejected_rows_are_counted_not_exported(tmp_path):
    d = tmp_path / "st"
    sink = TableSink(d, "mixed", "parquet", RESULT_SCHEMA)
    rows = _rows()
    for i, r in enumerate(rows):
        r["status"] = ["kept", "rejected", "failed"][i % 3]
    sink.write(rows)
    sink.close()
    s = export(d, tmp_path / "o.jsonl", "openai", table="mixed")
    assert s.rows_in == 10 and s.written + sum(s.skipped.values()) == 10
    assert s.skipped["not_kept"] == 6


def test_hf_round_trip_with_card(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = _stage(tmp_path)
    out = tmp_path / "hf"
    s = export(d, out, "hf", batch_rows=4)
    ds = datasets.load_from_disk(str(out))
    assert len(ds) == 8 == s.written
    want = [r for r in _rows() if r["output"]]
    assert ds["instruction"] == [r["instruction"] for r in want]
    assert ds["id"] == [r["id"] for r in want]
    assert ds["parent_id"] == [r["parent_id"] for r in want]
    assert ds["round"] == [r["round"] for r in want]
    card = (out / "README.md").read_text()
    assert "score >= 4.5" in card and "`m1` (3)" in card and "no_response): 2" in card
    assert "`fake/gpt-x` (8)" in card and "`parent_id`" in card
    # a second export replaces the folder
    export(d, out, "hf")
    assert len(datasets.load_from_disk(str(out))) == 8


def test_card_records_budget_and_ensemble(tmp_path):
    from evoray.export import ExportSummary, dataset_card, stage_selection

    d = _stage(tmp_path)
    (d / "scores.json").write_text(json.dumps({"threshold": 4.5, "top_k": 7, "kept": 7, "ensemble": {
        "rule": "majority", "raters": ["a", "b", "c"], "fleiss_kappa": 0.41, "spearman_mean": 0.6}}))
    sel = stage_selection(d / "kept.parquet")
    card = dataset_card(ExportSummary(source="s", out=str(tmp_path / "x"), fmt="hf", rows_in=7, written=7,
                                      selection={**sel, "observed": {}}))
    assert "best 7 row(s)" in card and "score >=" not in card
    assert "ensemble_rule: majority" in card and "raters: ['a', 'b', 'c']" in card and "fleiss_kappa: 0.41" in card


def test_hf_without_datasets_is_a_usage_error(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_datasets(name, *a, **kw):
        if name == "datasets":
            raise ImportError("no")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(UsageError, match="pip install"):
        export(_stage(tmp_path), tmp_path / "hf", "hf")


def test_resolve_table_order_and_errors(tmp_path):
    d = _stage(tmp_path, table="evolved")
    assert resolve_table(d).name == "evolved.parquet"
    with pytest.raises(UsageError, match="evolved.parquet"):
        resolve_table(d, "kept")
    with pytest.raises(UsageError, match="neither"):
        resolve_table(tmp_path / "nope")


def test_cli_export_default_output(tmp_path, capsys):
    d = _stage(tmp_path)
    assert main(["export", str(d), "-f", "openai"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith("exported 8 of 10 row(s) as openai") and "2 no_response" in out
    assert len((d / "export" / "kept.openai.jsonl").read_text().splitlines()) == 8
    assert main(["export", str(tmp_path / "missing"), "-f", "alpaca"]) == 2
