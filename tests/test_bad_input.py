"""The bad-input matrix through every command that reads data, and bad configs (no Ray).

Each case: exit code 2, a message that names the file and the line / record (or the config key),
nothing started (Ray is never initialised: bad input is found before any actor starts) and nothing
written that a re-run would trust (no table with its final name, no ``_SUCCESS.json``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from evoray.cli import main

GOOD = '{"instruction": "Name three primary colours.", "input": "", "output": "Red, yellow and blue."}\n'

# name -> (file bytes, extra args for ingest, the text the message must contain besides the file name)
MATRIX: dict[str, tuple[bytes, list[str], list[str]]] = {
    "malformed_json": ((GOOD + '{"instruction": "b", oops\n' + GOOD).encode(), [], [":2", "malformed JSON"]),
    "missing_instruction": ((GOOD + '{"input": "", "output": "no instruction"}\n').encode(), [],
                            [":2", "missing required field 'instruction'"]),
    "wrong_type": ((GOOD + '{"instruction": 42, "output": "x"}\n').encode(), [], [":2", "wrong type"]),
    "wrong_type_record": ((GOOD + '["not", "an", "object"]\n').encode(), [], [":2", "expected a JSON object"]),
    "empty_file": (b"", [], ["empty"]),
    "blank_file": (b"\n  \n\n", [], ["empty"]),
    "non_utf8": ((GOOD + '{"instruction": "caf').encode() + b"\xff\xfe" + b'", "output": ""}\n', [],
                 [":2", "not UTF-8"]),
    "unknown_format": (b'{"prompt_text": "a", "reply": "b"}\n', [], [":1", "cannot detect the format"]),
    "bad_map_field": ((GOOD * 2).encode(), ["--map", "instruction=prompt"], [":1", "'prompt'"]),
    "empty_instruction": ((GOOD + '{"instruction": "   ", "output": "x"}\n').encode(), [], [":2", "empty instruction"]),
    "json_array_bad_record": (("[" + GOOD.strip() + ', {"instruction": ""}]').encode(), [],
                              ["[record 1]", "empty instruction"]),
}

JOB_COMMANDS = ["rate", "evolve", "answer", "optimize", "run"]


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if a command gets as far as starting Ray or a job session."""
    import actors.session

    def boom(*a, **k):
        raise AssertionError("a Ray session was started before the bad input was found")

    monkeypatch.setattr(actors.session, "init_ray", boom)
    monkeypatch.setattr(actors.session.RaySession, "__init__", boom)


def write_config(tmp_path: Path, body: str = "", name: str = "job.yaml") -> Path:
    cfg = tmp_path / name
    cfg.write_text(
        "providers:\n"
        "  - {name: main, kind: openai, model: fake-model, base_url: 'http://127.0.0.1:9/v1', rpm: 600}\n"
        f"cache: {{dir: {tmp_path / 'cache'}}}\n"
        "pipeline: [optimize, evolve, rate]\n" + body
    )
    return cfg


def trusted_leftovers(outdir: Path) -> list[str]:
    """Files a re-run could take for finished work: tables with their final name, markers, inputs."""
    if not outdir.exists():
        return []
    bad = []
    for p in outdir.rglob("*"):
        if p.is_dir():
            continue
        if p.name == "ledger.json":  # the job's ledger: no requests sent; never read back as data
            continue
        bad.append(str(p.relative_to(outdir)))
    return bad


def assert_names_place(err: str, path: Path, needles: list[str]) -> None:
    assert str(path) in err, err
    for n in needles:
        if n.startswith(":") or n.startswith("["):
            assert f"{path}{n}" in err, (n, err)
        else:
            assert n in err, (n, err)


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_ingest_bad_input_exit_2_names_place_writes_nothing(case, tmp_path, capsys):
    data, args, needles = MATRIX[case]
    src = tmp_path / f"{case}.jsonl"
    src.write_bytes(data)
    out = tmp_path / "out" / "rows.parquet"
    assert main(["ingest", str(src), "-o", str(out), *args]) == 2
    assert_names_place(capsys.readouterr().err, src, needles)
    assert trusted_leftovers(tmp_path / "out") == []


def test_ingest_skip_invalid_quarantines_row_level_problems(tmp_path, capsys):
    row_level = ["malformed_json", "missing_instruction", "wrong_type", "wrong_type_record", "non_utf8",
                 "empty_instruction"]
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(GOOD.encode() + b"".join(MATRIX[c][0].split(b"\n", 1)[1] for c in row_level))
    out = tmp_path / "rows.parquet"
    assert main(["ingest", str(src), "-o", str(out), "--skip-invalid"]) == 0
    assert pq.read_table(out).num_rows == 1 + 1  # GOOD, and the GOOD line after the malformed one
    q = [json.loads(x) for x in (tmp_path / "rows.quarantine.jsonl").read_text().splitlines()]
    assert len(q) == len(row_level) and all(r["reason"] and r["line"] >= 2 for r in q)


def test_bad_map_syntax_and_unknown_format_flag(tmp_path, capsys):
    src = tmp_path / "ok.jsonl"
    src.write_text(GOOD)
    assert main(["ingest", str(src), "-o", str(tmp_path / "o.parquet"), "--map", "instruction"]) == 2
    assert "--map" in capsys.readouterr().err
    assert main(["ingest", str(src), "-o", str(tmp_path / "o.parquet"), "--map", "answer=prompt"]) == 2
    assert "unknown canonical field 'answer'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["ingest", str(src), "-o", str(tmp_path / "o.parquet"), "--format", "xml"])
    assert e.value.code == 2
    assert "xml" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()


def test_one_megabyte_row_is_accepted(tmp_path, capsys):
    from evoray.config import JobConfig
    from evoray.jobs import prepare_input

    big = "word " * 210_000  # ~1 MB on one line
    src = tmp_path / "big.jsonl"
    src.write_text(GOOD + json.dumps({"instruction": "Summarise this text.", "input": big, "output": "ok"}) + "\n")
    assert src.stat().st_size > 1_000_000
    out = tmp_path / "rows.parquet"
    assert main(["ingest", str(src), "-o", str(out)]) == 0
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 2 and rows[1]["input"] == big
    # what every job command does with its input, before Ray
    cfg = JobConfig.from_dict({"providers": [{"name": "l", "kind": "local"}], "input": {"path": str(src)}})
    target = prepare_input(cfg, None, tmp_path / "stage")
    assert pq.read_table(target).column("input").to_pylist()[1] == big


@pytest.mark.parametrize("command", JOB_COMMANDS)
def test_job_commands_reject_bad_input_before_ray(command, tmp_path, capsys, fake_key, no_ray):
    cfg = write_config(tmp_path)
    for case in ("malformed_json", "missing_instruction", "wrong_type", "empty_file", "non_utf8", "unknown_format",
                 "empty_instruction"):
        data, _, needles = MATRIX[case]
        src = tmp_path / f"{case}.jsonl"
        src.write_bytes(data)
        outdir = tmp_path / f"out-{command}-{case}"
        rc = main([command, str(cfg), "-i", str(src), "-o", str(outdir), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2, (case, err)
        assert_names_place(err, src, needles)
        assert trusted_leftovers(outdir) == [], case
    # a bad mapping in the config (input.map), and an unknown format name
    src = tmp_path / "ok.jsonl"
    src.write_text(GOOD * 2)
    outdir = tmp_path / f"out-{command}-map"
    assert main([command, str(cfg), "-i", str(src), "-o", str(outdir), "--set", "input.map.instruction=prompt",
                 "--quiet"]) == 2
    assert_names_place(capsys.readouterr().err, src, [":1", "'prompt'"])
    assert trusted_leftovers(outdir) == []
    assert main([command, str(cfg), "-i", str(src), "-o", str(outdir), "--set", "input.format=xml", "--quiet"]) == 2
    assert "input.format" in capsys.readouterr().err
    assert trusted_leftovers(outdir) == []
    # a missing input file
    assert main([command, str(cfg), "-i", str(tmp_path / "absent.jsonl"), "-o", str(outdir), "--quiet"]) == 2
    assert "absent.jsonl" in capsys.readouterr().err


def test_judge_bad_answers_file_before_ray(tmp_path, capsys, fake_key, no_ray):
    good = tmp_path / "a.jsonl"
    good.write_text(GOOD * 2)
    for case in ("malformed_json", "missing_instruction", "wrong_type", "empty_file", "non_utf8"):
        data, _, needles = MATRIX[case]
        bad = tmp_path / f"b-{case}.jsonl"
        bad.write_bytes(data)
        cfg = write_config(tmp_path, f"judge: {{answers_a: {good}, answers_b: {bad}}}\n", name=f"j-{case}.yaml")
        outdir = tmp_path / f"judge-{case}"
        assert main(["judge", str(cfg), "-o", str(outdir), "--quiet"]) == 2
        assert_names_place(capsys.readouterr().err, bad, needles)
        assert trusted_leftovers(outdir) == []


def test_failed_ingest_keeps_a_previous_good_input_untrusted_no_partial(tmp_path, capsys, fake_key, no_ray):
    """A stage input written by an earlier run is not replaced by a partial one when the data turns bad."""
    cfg = write_config(tmp_path)
    src = tmp_path / "data.jsonl"
    src.write_bytes(MATRIX["malformed_json"][0])
    outdir = tmp_path / "out"
    assert main(["rate", str(cfg), "-i", str(src), "-o", str(outdir), "--quiet"]) == 2
    assert not any(p.name.endswith((".partial", ".tmp")) or p.name.startswith(".") and p.is_file()
                   for p in outdir.rglob("*") if p.name != ".input.fingerprint"), list(outdir.rglob("*"))
    assert not (outdir / ".input.fingerprint").exists()


BAD_CONFIGS = {
    "unknown_key": ("ray: {rater_actor: 2}\n", "ray.rater_actor"),
    "unknown_top_key": ("budget: 5\n", "budget"),
    "wrong_type": ("ray: {rater_actors: two}\n", "ray.rater_actors"),
    "wrong_type_section": ("rate: 4.5\n", "rate"),
    "role_unknown_provider": ("roles: {rater: [nope]}\n", "nope"),
    "unknown_role": ("roles: {critic: [main]}\n", "critic"),
    "negative_rpm": (None, "providers.0.rpm"),
    "negative_actors": ("ray: {rater_actors: -1}\n", "ray.rater_actors"),
    "negative_budget": ("budget_usd: -1\n", "budget_usd"),
    "negative_threshold": ("rate: {threshold: -2}\n", "rate.threshold"),
    "no_providers": (None, "providers"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_exit_2_names_key(case, tmp_path, capsys, fake_key, no_ray):
    body, key = BAD_CONFIGS[case]
    src = tmp_path / "ok.jsonl"
    src.write_text(GOOD)
    if case == "negative_rpm":
        cfg = tmp_path / "c.yaml"
        cfg.write_text("providers:\n  - {name: main, kind: openai, model: m, rpm: -5}\n")
    elif case == "no_providers":
        cfg = tmp_path / "c.yaml"
        cfg.write_text("providers: []\n")
    else:
        cfg = write_config(tmp_path, body)
    for command in ("rate", "run", "estimate"):
        outdir = tmp_path / f"out-{command}"
        assert main([command, str(cfg), "-i", str(src), "-o", str(outdir)]) == 2
        err = capsys.readouterr().err
        assert key in err and str(cfg) in err, err
        assert trusted_leftovers(outdir) == []


def test_bad_set_override_and_missing_key(tmp_path, capsys, monkeypatch, no_ray):
    src = tmp_path / "ok.jsonl"
    src.write_text(GOOD)
    cfg = write_config(tmp_path)
    assert main(["rate", str(cfg), "-i", str(src), "--set", "ray.rater_actors=-3", "-o", str(tmp_path / "o")]) == 2
    assert "ray.rater_actors" in capsys.readouterr().err
    assert main(["rate", str(cfg), "-i", str(src), "--set", "noequals", "-o", str(tmp_path / "o")]) == 2
    assert "noequals" in capsys.readouterr().err
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(["rate", str(cfg), "-i", str(src), "-o", str(tmp_path / "o2")]) == 2
    assert "OPENAI_API_KEY" in capsys.readouterr().err


def test_console_script_exit_code_2_on_bad_input(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(MATRIX["malformed_json"][0])
    exe = Path(sys.executable).with_name("evoray")
    r = subprocess.run([str(exe), "ingest", str(src), "-o", str(tmp_path / "o.parquet")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and f"{src}:2" in r.stderr and "Traceback" not in r.stderr
