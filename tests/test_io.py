"""Data io: readers, format detection, bad input, quarantine, writers (no Ray, except one test)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evoray import io
from evoray.errors import InputError, UsageError
from evoray.schema import RESULT_SCHEMA, ROW_SCHEMA, new_row

TEST_SETS = {
    "vicuna_test_set.jsonl": (80, "vicuna", {"instruction": "text"}),
    "koala_test_set.jsonl": (180, "koala", {"instruction": "prompt"}),
    "wizardlm_test_set.jsonl": (218, "wizardlm", {"instruction": "Instruction"}),
    "sinstruct_test_set.jsonl": (
        252,
        "sinstruct",
        {"instruction": "instruction", "input": "instances.0.input", "output": "instances.0.output"},
    ),
}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def good(i: int) -> str:
    return json.dumps({"instruction": f"task {i}", "input": "", "output": f"answer {i}"})


def rows_of(sources, **kw) -> list[dict]:
    return list(io.iter_rows(sources if isinstance(sources, list) else [sources], **kw))


# ---- the shared public data sets ------------------------------------------------------------


def test_random_9k_count_and_format(shared_data, tmp_path):
    src = shared_data / "alpagasus" / "random_9k.json"
    s = io.ingest([str(src)], tmp_path / "out.parquet")
    assert s.rows == 9229 and s.quarantined == 0 and s.duplicates == 0
    assert s.formats[str(src)] == "alpaca"
    t = pq.read_table(tmp_path / "out.parquet")
    assert t.num_rows == 9229
    assert t.schema.equals(ROW_SCHEMA)
    assert set(t.column("source").to_pylist()) == {"random_9k"}
    assert len(set(t.column("id").to_pylist())) == 9229
    assert not (tmp_path / "out.quarantine.jsonl").exists()


def test_gsm8k_train_count(shared_data, tmp_path):
    src = shared_data / "gsm8k" / "train.jsonl"
    s = io.ingest([str(src)], tmp_path / "gsm.jsonl")
    assert s.rows == 7473 and s.formats[str(src)] == "gsm8k"
    first = json.loads((tmp_path / "gsm.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first["instruction"].startswith("Natalia sold clips")
    assert first["output"].endswith("#### 72")
    assert first["meta"] == "{}"


def test_dolly_keeps_repeats_with_distinct_ids(shared_data, tmp_path):
    src = shared_data / "alpagasus" / "dolly_3k.json"
    s = io.ingest([str(src)], tmp_path / "d.parquet")
    assert s.rows == 2996  # the published count includes two repeated records
    assert s.duplicates == 2 and len(s.duplicate_where) == 2
    t = pq.read_table(tmp_path / "d.parquet")
    assert len(set(t.column("id").to_pylist())) == 2996
    assert json.loads(t.column("meta")[0].as_py())["category"] == "general_qa"


@pytest.mark.parametrize("name", sorted(TEST_SETS))
def test_test_sets_auto(shared_data, name):
    n, label, _ = TEST_SETS[name]
    src = str(shared_data / "alpagasus" / name)
    s = io.IngestSummary()
    rows = rows_of(src, summary=s)
    assert len(rows) == n
    assert s.formats[src] == label
    assert all(r["instruction"].strip() for r in rows)


@pytest.mark.parametrize("name", sorted(TEST_SETS))
def test_test_sets_explicit_mapping(shared_data, name):
    n, _, mapping = TEST_SETS[name]
    src = str(shared_data / "alpagasus" / name)
    text = ",".join(f"{k}={v}" for k, v in mapping.items())
    rows = rows_of(src, fmt="jsonl", mapping=io.parse_mapping(text))
    assert len(rows) == n
    assert rows == rows_of(src)  # same rows (and ids) as auto detection


def test_sinstruct_mapping_content(shared_data):
    src = str(shared_data / "alpagasus" / "sinstruct_test_set.jsonl")
    r = rows_of(src)[0]
    raw = json.loads(open(src, encoding="utf-8").readline())
    assert r["input"] == raw["instances"][0]["input"]
    assert r["output"] == raw["instances"][0]["output"]
    meta = json.loads(r["meta"])
    assert meta["id"] == raw["id"] and "instruction" not in meta


def test_ids_stable_across_ingests(shared_data, tmp_path):
    src = [str(shared_data / "alpagasus" / "koala_test_set.jsonl"), str(shared_data / "gsm8k" / "test.jsonl")]
    a = io.ingest(src, tmp_path / "a.parquet")
    b = io.ingest(src, tmp_path / "b.jsonl")
    assert a.rows == b.rows == 180 + 1319
    assert a.per_source == b.per_source == {src[0]: 180, src[1]: 1319}
    ids_a = pq.read_table(tmp_path / "a.parquet").column("id").to_pylist()
    ids_b = io.read_table(tmp_path / "b.jsonl").column("id").to_pylist()
    assert ids_a == ids_b


# ---- formats and detection ------------------------------------------------------------------


def test_alpaca_array_and_meta(tmp_path):
    p = tmp_path / "my_data.json"
    p.write_text(json.dumps([{"instruction": "a", "input": "x", "output": "b", "category": "qa"}, {"instruction": "c"}]))
    s = io.IngestSummary()
    rows = rows_of(str(p), summary=s)
    assert s.formats[str(p)] == "alpaca"
    assert rows[0]["source"] == "my_data" and json.loads(rows[0]["meta"]) == {"category": "qa"}
    assert rows[1]["input"] == "" and rows[1]["output"] == ""
    assert rows_of(str(p), fmt="alpaca") == rows


def test_jsonl_blank_lines_and_detection(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [good(1), "", "   ", good(2)])
    s = io.IngestSummary()
    rows = rows_of(str(p), summary=s)
    assert [r["instruction"] for r in rows] == ["task 1", "task 2"]
    assert s.formats[str(p)] == "jsonl"


@pytest.mark.parametrize("container", ["array", "jsonl"])
def test_sharegpt(tmp_path, container):
    recs = [
        {"id": "c1", "conversations": [
            {"from": "system", "value": "be nice"},
            {"from": "human", "value": "hi?"},
            {"from": "gpt", "value": "hello"},
            {"from": "human", "value": "more"},
        ]},
        {"conversations": [{"from": "user", "value": "q2"}, {"from": "assistant", "value": "a2"}]},
    ]
    p = tmp_path / "chat.json"
    p.write_text(json.dumps(recs) if container == "array" else "\n".join(json.dumps(r) for r in recs))
    s = io.IngestSummary()
    rows = rows_of(str(p), summary=s)
    assert s.formats[str(p)] == "sharegpt"
    assert (rows[0]["instruction"], rows[0]["output"]) == ("hi?", "hello")
    meta = json.loads(rows[0]["meta"])
    assert meta["system"] == "be nice" and meta["id"] == "c1" and meta["other_turns"][0]["value"] == "more"
    assert (rows[1]["instruction"], rows[1]["output"]) == ("q2", "a2")
    assert rows_of(str(p), fmt="sharegpt") == rows


def test_sharegpt_without_human_turn(tmp_path):
    p = write_lines(tmp_path / "c.jsonl", [json.dumps({"conversations": [{"from": "gpt", "value": "x"}]})])
    with pytest.raises(InputError, match="no human/user turn"):
        rows_of(str(p), fmt="sharegpt")


def test_gsm8k_missing_answer(tmp_path):
    p = write_lines(tmp_path / "g.jsonl", [json.dumps({"question": "q", "answer": "a"}), json.dumps({"question": "q2"})])
    with pytest.raises(InputError) as e:
        rows_of(str(p), fmt="gsm8k")
    assert e.value.where == f"{p}:2" and "missing required field 'answer'" in str(e.value)


def test_parquet_input_mapped_and_canonical(tmp_path):
    p = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "resp": ["r1", "r2"], "lang": ["en", "de"]}), p)
    s = io.IngestSummary()
    rows = rows_of(str(p), mapping="instruction=prompt,output=resp", summary=s)
    assert [(r["instruction"], r["output"]) for r in rows] == [("p1", "r1"), ("p2", "r2")]
    assert json.loads(rows[1]["meta"]) == {"lang": "de"}
    assert s.formats[str(p)] == "mapped"
    # a canonical table (e.g. an evolved stage output) keeps ids and lineage
    canon = tmp_path / "canon.parquet"
    child = new_row("evolved", source="evolve", parent_id=rows[0]["id"], round=1, method_id="m1")
    io.write_table(rows + [child], canon)
    s2 = io.IngestSummary()
    again = rows_of(str(canon), fmt="parquet", summary=s2)
    assert s2.formats[str(canon)] == "canonical"
    assert again == rows + [child]


def test_parquet_format_mismatch(tmp_path):
    p = write_lines(tmp_path / "x.jsonl", [good(1)])
    with pytest.raises(InputError, match="not Parquet"):
        rows_of(str(p), fmt="parquet")


def test_custom_schema_mapping_and_unknown_keys(tmp_path):
    p = write_lines(tmp_path / "custom.jsonl", [json.dumps({"q": "do", "ctx": "c", "completion": "done", "x": 1})])
    with pytest.raises(InputError) as e:
        rows_of(str(p))
    msg = str(e.value)
    assert "custom.jsonl" in msg and "'completion'" in msg and "--map" in msg and "cannot detect" in msg
    s = io.IngestSummary()
    rows = rows_of(str(p), mapping="instruction=q,input=ctx,output=completion", summary=s)
    assert s.formats[str(p)] == "mapped"
    assert (rows[0]["instruction"], rows[0]["input"], rows[0]["output"]) == ("do", "c", "done")
    assert json.loads(rows[0]["meta"]) == {"x": 1}


def test_prompt_completion_is_not_taken_for_a_test_set(tmp_path):
    """{prompt, completion} has Koala's 'prompt' key, but reading it as Koala would leave every output
    empty: detection refuses and suggests the mapping that reads both fields."""
    p = write_lines(tmp_path / "pc.jsonl", [json.dumps({"prompt": "Name a colour.", "completion": "Blue."})])
    with pytest.raises(InputError) as e:
        rows_of(str(p))
    msg = str(e.value)
    assert "pc.jsonl:1" in msg and "--map instruction=prompt,output=completion" in msg and "--format" in msg
    rows = rows_of(str(p), mapping="instruction=prompt,output=completion")
    assert (rows[0]["instruction"], rows[0]["output"]) == ("Name a colour.", "Blue.")
    # Koala's own shape (an id beside the prompt) is still recognised
    k = write_lines(tmp_path / "k.jsonl", [json.dumps({"id": "koala_0", "prompt": "Write a poem."})])
    s = io.IngestSummary()
    assert rows_of(str(k), summary=s)[0]["instruction"] == "Write a poem." and s.formats[str(k)] == "koala"


def test_instruction_without_output_but_a_response_field_is_ambiguous(tmp_path, capsys):
    rec = {"instruction": "Add 2 and 2.", "response": "4", "category": "math"}
    p = write_lines(tmp_path / "ir.jsonl", [json.dumps(rec)])
    with pytest.raises(InputError) as e:
        rows_of(str(p))
    msg = str(e.value)
    assert "ambiguous" in msg and "'output'" in msg and "'response'" in msg
    assert "--map instruction=instruction,output=response" in msg and "--format alpaca" in msg
    # either answer is explicit: the map reads the response as the output ...
    assert rows_of(str(p), mapping="output=response")[0]["output"] == "4"
    # ... or --format alpaca keeps it in meta, as asked
    row = rows_of(str(p), fmt="alpaca")[0]
    assert row["output"] == "" and json.loads(row["meta"])["response"] == "4"
    # only metadata beside the instruction (an id, a category) is not ambiguous
    q = write_lines(tmp_path / "iq.jsonl", [json.dumps({"instruction": "Add 2 and 2.", "id": "a1", "category": "m"})])
    assert rows_of(str(q))[0]["output"] == ""
    # the command line says the same, exit 2, nothing written
    from evoray.cli import main

    assert main(["ingest", str(p), "-o", str(tmp_path / "o.parquet")]) == 2
    err = capsys.readouterr().err
    assert "ir.jsonl:1" in err and "--map" in err and not (tmp_path / "o.parquet").exists()


def test_mapping_to_missing_field(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [good(1), good(2)])
    with pytest.raises(InputError) as e:
        rows_of(str(p), mapping="instruction=prompt", skip_invalid=True)  # file-level: never quarantined
    assert "'prompt'" in str(e.value) and e.value.where == f"{p}:1"


def test_parse_mapping():
    assert io.parse_mapping("instruction=prompt, input=ctx") == {"instruction": "prompt", "input": "ctx"}
    assert io.parse_mapping("") == {} and io.parse_mapping(None) == {}
    with pytest.raises(UsageError, match="CANONICAL=FIELD"):
        io.parse_mapping("instruction:prompt")
    with pytest.raises(UsageError, match="unknown canonical field 'answer'"):
        io.parse_mapping("answer=x")
    with pytest.raises(UsageError, match="mapped twice"):
        io.parse_mapping("instruction=a,instruction=b")
    assert io.parse_mapping({"output": "answer"}) == {"output": "answer"}


def test_unknown_format_name(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [good(1)])
    with pytest.raises(UsageError, match="unknown format 'csv'"):
        rows_of(str(p), fmt="csv")


# ---- bad input --------------------------------------------------------------------------------


def test_broken_third_line_raises_with_file_and_line(tmp_path):
    p = write_lines(tmp_path / "broken.jsonl", [good(1), good(2), '{"instruction": "x", ', good(4)])
    with pytest.raises(InputError) as e:
        io.ingest([str(p)], tmp_path / "out.parquet")
    assert "broken.jsonl" in str(e.value) and ":3" in str(e.value) and "malformed JSON" in str(e.value)
    assert e.value.exit_code == 2
    assert not (tmp_path / "out.parquet").exists()
    assert [f.name for f in tmp_path.iterdir()] == ["broken.jsonl"]  # no temp files left


def test_skip_invalid_quarantines_with_reason(tmp_path):
    p = write_lines(tmp_path / "broken.jsonl", [good(1), good(2), '{"instruction": "x", ', good(4)])
    s = io.ingest([str(p)], tmp_path / "out.parquet", skip_invalid=True)
    assert s.rows == 3 and s.quarantined == 1
    q = tmp_path / "out.quarantine.jsonl"
    assert s.quarantine_path == str(q)
    (entry,) = [json.loads(x) for x in q.read_text(encoding="utf-8").splitlines()]
    assert entry["file"] == str(p) and entry["line"] == 3
    assert "malformed JSON" in entry["reason"] and entry["text"] == '{"instruction": "x", '
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 3
    # a clean re-run removes the stale quarantine file
    write_lines(p, [good(1)])
    s = io.ingest([str(p)], tmp_path / "out.parquet", skip_invalid=True)
    assert s.quarantined == 0 and s.quarantine_path is None and not q.exists()


BAD_LINES = {
    "missing": (json.dumps({"input": "x", "output": "y"}), "missing required field 'instruction'"),
    "number": (json.dumps({"instruction": 42}), "wrong type: instruction must be a string, got int"),
    "list": (json.dumps({"instruction": ["a"]}), "wrong type: instruction must be a string, got list"),
    "null": (json.dumps({"instruction": None}), "got null"),
    "output_type": (json.dumps({"instruction": "a", "output": {"x": 1}}), "output must be a string, got object"),
    "empty": (json.dumps({"instruction": "  \n "}), "empty instruction"),
    "not_object": ("[1, 2]", "expected a JSON object, got list"),
    "malformed": ("{nope", "malformed JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_record_cases(tmp_path, case):
    line, reason = BAD_LINES[case]
    p = write_lines(tmp_path / "bad.jsonl", [good(1), line, good(3)])
    with pytest.raises(InputError) as e:
        rows_of(str(p))
    assert e.value.where == f"{p}:2" and reason in str(e.value)
    qp = tmp_path / "q.jsonl"
    rows = rows_of(str(p), skip_invalid=True, quarantine_path=qp)
    assert [r["instruction"] for r in rows] == ["task 1", "task 3"]
    entry = json.loads(qp.read_text(encoding="utf-8"))
    assert entry["line"] == 2 and reason in entry["reason"] and entry["text"] == line


def test_bad_record_in_json_array(tmp_path):
    p = tmp_path / "arr.json"
    p.write_text(json.dumps([{"instruction": "a"}, {"instruction": 7}, {"instruction": "c"}]))
    with pytest.raises(InputError) as e:
        rows_of(str(p))
    assert e.value.where == f"{p}[record 1]" and "got int" in str(e.value)
    qp = tmp_path / "q.jsonl"
    assert len(rows_of(str(p), skip_invalid=True, quarantine_path=qp)) == 2
    entry = json.loads(qp.read_text())
    assert entry["record"] == 1 and json.loads(entry["text"]) == {"instruction": 7}


def test_malformed_json_array(tmp_path):
    p = tmp_path / "arr.json"
    p.write_text('[\n  {"instruction": "a"},\n  {"instruction": \n]\n')
    with pytest.raises(InputError, match=r"arr\.json:4: malformed JSON"):
        rows_of(str(p), skip_invalid=True)


@pytest.mark.parametrize("content", [b"", b"  \n\n", b"[]", b"[ ]\n"])
def test_empty_file_is_always_an_error(tmp_path, content):
    p = tmp_path / "empty.jsonl"
    p.write_bytes(content)
    with pytest.raises(InputError, match="no rows") as e:
        io.ingest([str(p)], tmp_path / "o.parquet", skip_invalid=True)
    assert "empty.jsonl" in str(e.value)


def test_non_utf8_line(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(good(1).encode() + b"\n" + b'{"instruction": "caf\xe9"}\n' + good(3).encode() + b"\n")
    with pytest.raises(InputError) as e:
        rows_of(str(p))
    assert e.value.where == f"{p}:2"
    assert "not UTF-8" in str(e.value) and "0xe9" in str(e.value) and "byte offset 20" in str(e.value)
    qp = tmp_path / "q.jsonl"
    assert len(rows_of(str(p), skip_invalid=True, quarantine_path=qp)) == 2
    entry = json.loads(qp.read_text())
    assert entry["line"] == 2 and "not UTF-8" in entry["reason"] and "caf" in entry["text"]


def test_non_utf8_in_json_array(tmp_path):
    p = tmp_path / "arr.json"
    p.write_bytes(b'[\n{"instruction": "a"},\n{"instruction": "\xff"}\n]')
    with pytest.raises(InputError, match="not UTF-8") as e:
        rows_of(str(p))
    assert e.value.where == f"{p}:3"


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        rows_of(str(tmp_path / "nope.jsonl"))


def test_large_row_accepted(tmp_path):
    big = "x" * (3 * 1024 * 1024)
    p = write_lines(tmp_path / "big.jsonl", [good(1), json.dumps({"instruction": "long", "input": big})])
    s = io.ingest([str(p)], tmp_path / "big_out.jsonl")
    assert s.rows == 2
    t = io.read_table(tmp_path / "big_out.jsonl")
    assert t.column("input")[1].as_py() == big


def test_limit_across_sources(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [good(i) for i in range(5)])
    b = write_lines(tmp_path / "b.jsonl", [good(i) for i in range(5)])
    s = io.ingest([str(a), str(b)], tmp_path / "o.parquet", limit=7)
    assert s.rows == 7 and s.per_source == {str(a): 5, str(b): 2}


def test_exact_duplicates_kept_and_counted(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [good(1), good(1), good(2), good(1)])
    s = io.IngestSummary()
    rows = rows_of(str(p), summary=s)
    assert len(rows) == 4 and len({r["id"] for r in rows}) == 4
    assert s.duplicates == 2 and s.duplicate_where == [f"{p}:2", f"{p}:4"]
    assert [r["id"] for r in rows] == [r["id"] for r in rows_of(str(p))]  # stable


# ---- writers ----------------------------------------------------------------------------------


def _sample_rows(n=25):
    return [new_row(f"instr {i}", "", f"out {i}", source="t", meta={"i": i}) for i in range(n)]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_round_trip_pyarrow_and_datasets(tmp_path, fmt):
    rows = _sample_rows()
    path = io.table_path(tmp_path, "kept", fmt)
    assert path.name == f"kept.{fmt}"
    assert io.write_table(iter(rows), path, chunk_rows=10) == 25  # streamed in chunks
    t = io.read_table(path)
    assert t.num_rows == 25 and t.column("id").to_pylist() == [r["id"] for r in rows]
    assert t.to_pylist() == rows
    datasets = pytest.importorskip("datasets")
    d = datasets.load_dataset("parquet" if fmt == "parquet" else "json", data_files=str(path), split="train")
    assert d.num_rows == 25 and d[3]["instruction"] == "instr 3" and d[3]["id"] == rows[3]["id"]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_result_schema_and_tables(tmp_path, fmt):
    from evoray.schema import result_row

    rows = [result_row(r, status="kept", score=4.5, attempts=1) for r in _sample_rows(5)]
    path = tmp_path / f"res.{fmt}"
    io.write_table(rows, path, RESULT_SCHEMA)
    t = io.read_table(path)
    assert t.column("score").to_pylist() == [4.5] * 5 and t.schema.field("attempts").type == pa.int32()
    # a pyarrow table (or batches) in, same file out
    io.write_table(t.to_batches(max_chunksize=2), tmp_path / f"again.{fmt}", RESULT_SCHEMA)
    assert io.read_table(tmp_path / f"again.{fmt}").to_pylist() == t.to_pylist()


def test_write_is_atomic(tmp_path):
    path = tmp_path / "t.parquet"
    io.write_table(_sample_rows(3), path)

    def failing():
        yield from _sample_rows(15)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        io.write_table(failing(), path, chunk_rows=10)
    assert pq.read_table(path).num_rows == 3  # the old complete file is untouched
    assert sorted(f.name for f in tmp_path.iterdir()) == ["t.parquet"]


def test_atomic_path_success_replaces_the_target(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with io.atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".a.txt.") and tmp.name.endswith(".partial")
        tmp.write_text("new")
        assert path.read_text() == "old"  # nothing visible until the block ends
    assert path.read_text() == "new"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_path_error_leaves_no_tmp_and_no_target(tmp_path):
    path = tmp_path / "a.txt"
    with pytest.raises(RuntimeError):
        with io.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_error_keeps_the_old_target(tmp_path):
    path = tmp_path / "a.json"
    io.write_json_atomic(path, {"v": 1})
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_path(path) as tmp:
            tmp.write_text("{")
            raise KeyboardInterrupt
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.json"]


def test_atomic_path_directory(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    with io.atomic_path(out, directory=True) as tmp:
        assert tmp.is_dir()
        (tmp / "new.txt").write_text("y")
    assert sorted(f.name for f in out.iterdir()) == ["new.txt"]
    with pytest.raises(RuntimeError):
        with io.atomic_path(out, directory=True) as tmp:
            (tmp / "half.txt").write_text("z")
            raise RuntimeError("boom")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ds"]
    assert sorted(f.name for f in out.iterdir()) == ["new.txt"]


def test_write_text_and_json_atomic(tmp_path):
    assert io.write_text_atomic(tmp_path / "t.txt", "héllo\n").read_text(encoding="utf-8") == "héllo\n"
    io.write_json_atomic(tmp_path / "j.json", {"a": [1, 2]}, indent=2)
    assert (tmp_path / "j.json").read_text() == json.dumps({"a": [1, 2]}, indent=2)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["j.json", "t.txt"]


def test_table_path_and_bad_extension(tmp_path):
    assert io.table_path("out", "rejected", "jsonl") == Path("out/rejected.jsonl")
    with pytest.raises(UsageError):
        io.table_path("out", "x", "csv")
    with pytest.raises(UsageError, match=r"\.parquet or \.jsonl"):
        io.ingest([], tmp_path / "out.csv")


# ---- Ray (optional; uses the lead's session-scoped ray_session fixture) ------------------------


@pytest.mark.ray
def test_read_dataset_and_write_back(request, shared_data, tmp_path):
    pytest.importorskip("ray")
    try:
        request.getfixturevalue("ray_session")  # session-scoped, defined in conftest by the lead
    except pytest.FixtureLookupError:
        pytest.skip("no ray_session fixture in conftest yet")
    from evoray import raydata

    src = str(shared_data / "alpagasus" / "vicuna_test_set.jsonl")
    ds = raydata.read_dataset([src], work_dir=tmp_path / "work")
    assert ds.count() == 80
    out = io.table_path(tmp_path, "copy", "jsonl")  # streamed back, a batch at a time
    io.write_table(ds.iter_batches(batch_format="pyarrow"), out, ROW_SCHEMA, fmt="jsonl")
    assert io.read_table(out).num_rows == 80
    # a canonical parquet input is used as it is
    path, summary = raydata.canonicalize([str(tmp_path / "work" / "input.parquet")])
    assert summary is None and path == tmp_path / "work" / "input.parquet"


def test_table_sink_packs_small_batches_into_row_groups_and_aborts_cleanly(tmp_path):
    import pyarrow as pa

    from evoray.sinks import TableSink

    schema = pa.schema([("id", pa.string()), ("n", pa.int64())])
    sink = TableSink(tmp_path, "t", "parquet", schema, row_group_rows=100)
    for start in range(0, 1000, 64):  # pool-sized batches
        sink.write(pa.table({"n": list(range(start, min(start + 64, 1000))),
                             "id": [f"r{i}" for i in range(start, min(start + 64, 1000))]}))
    assert not (tmp_path / "t.parquet").exists()  # nothing under the final name before close
    path = sink.close()
    f = pq.ParquetFile(path)
    assert f.metadata.num_rows == 1000 and f.metadata.num_row_groups == 8  # not one per batch
    assert pq.read_table(path).column("n").to_pylist() == list(range(1000))
    dead = TableSink(tmp_path, "d", "parquet", schema, row_group_rows=100)
    dead.write([{"id": "x", "n": 1}])
    dead.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]


def test_table_sink_rerun_removes_a_killed_runs_partial_file(tmp_path):
    import pyarrow as pa

    from evoray.sinks import TableSink

    schema = pa.schema([("id", pa.string())])
    killed = TableSink(tmp_path, "t", "jsonl", schema)  # never closed nor aborted: the process died
    killed.write([{"id": "a"}])
    other = io.temp_path(tmp_path / "t2.jsonl")  # another table's partial file is not touched
    assert killed.tmp.exists()
    again = TableSink(tmp_path, "t", "jsonl", schema)
    assert not killed.tmp.exists() and again.tmp.exists()
    again.write([{"id": "b"}])
    again.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["t.jsonl", other.name])


def test_parquet_stream_reads_one_row_group_at_a_time(tmp_path):
    """Iterating a many-row-group file holds about one row group of Arrow memory, not the file."""
    path = tmp_path / "big.parquet"
    n, group = 64 * 1024, 1024
    text = pa.array([f"{i:08d} " + "x" * 200 for i in range(n)])  # ~13 MiB, incompressible enough
    pq.write_table(pa.table({"t": text}), path, row_group_size=group, compression="none",
                   use_dictionary=False)
    file_size = path.stat().st_size
    del text
    base = pa.total_allocated_bytes()
    live, rows = 0, 0
    for batch in io.parquet_stream(path).iter_batches(batch_size=group):
        live = max(live, pa.total_allocated_bytes() - base)
        rows += batch.num_rows
    assert rows == n
    # pq.ParquetFile's default pre-buffering holds the whole file here (about file_size)
    assert live < file_size / 8, (live, file_size)
