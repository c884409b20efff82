"""The command line: exit codes and messages for ingest and bad configs (no Ray)."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from evoray.cli import main


def test_ingest_counts_real_data(shared_data, tmp_path, capsys):
    assert main(["ingest", str(shared_data / "alpagasus/random_9k.json"), "-o", str(tmp_path / "a.parquet")]) == 0
    assert pq.read_table(tmp_path / "a.parquet").num_rows == 9229
    assert main(["ingest", str(shared_data / "gsm8k/train.jsonl"), "-o", str(tmp_path / "g.jsonl")]) == 0
    assert sum(1 for _ in open(tmp_path / "g.jsonl")) == 7473
    assert "ingested 7473 row(s)" in capsys.readouterr().out


def test_broken_third_line_exit_2_then_quarantine(tmp_path, capsys):
    src = tmp_path / "data.jsonl"
    src.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n{"instruction": "e", oops\n'
                   '{"instruction": "f", "output": "g"}\n')
    out = tmp_path / "out.parquet"
    assert main(["ingest", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "data.jsonl:3" in err and not out.exists()
    assert main(["ingest", str(src), "-o", str(out), "--skip-invalid"]) == 0
    captured = capsys.readouterr()
    assert "1 invalid row(s) quarantined" in captured.err
    assert pq.read_table(out).num_rows == 3
    q = [json.loads(x) for x in (tmp_path / "out.quarantine.jsonl").read_text().splitlines()]
    assert len(q) == 1 and q[0]["line"] == 3 and "oops" in q[0]["text"] and q[0]["reason"]


def test_misspelt_config_key_exit_2_names_it(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("providers:\n  - {name: a, kind: local}\nevolve: {rouds: 2}\n")
    assert main(["rate", str(cfg)]) == 2
    assert "evolve.rouds" in capsys.readouterr().err


def test_missing_input_and_unknown_format_exit_2(tmp_path, capsys):
    assert main(["ingest", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o.parquet")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"foo": 1}\n')
    assert main(["ingest", str(bad), "-o", str(tmp_path / "o.parquet")]) == 2
    assert "x.jsonl" in capsys.readouterr().err


def test_console_script_is_installed(tmp_path):
    exe = Path(sys.executable).with_name("evoray")
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ingest" in r.stdout and "submit" in r.stdout


def test_estimate_sends_nothing_and_exits_0(shared_data, tmp_path, capsys):
    cfg = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"  # its input is under ../shared/data
    import os

    here = os.getcwd()
    os.chdir(cfg.parents[1])
    try:
        assert main(["estimate", str(cfg)]) == 0
    finally:
        os.chdir(here)
    out = capsys.readouterr().out
    assert "optimize" in out and "rate" in out
