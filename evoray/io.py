"""Data io: read instruction data in many shapes into canonical rows, write tables.

Reading
-------
Every reader yields canonical row dicts (:func:`evoray.schema.new_row`); ``source`` is the file's
base name without its extension (``random_9k``), and every source field that did not become
``instruction`` / ``input`` / ``output`` is kept in ``meta`` (JSON text), so nothing is lost.

Formats (``--format``):

* ``alpaca``   JSON array (or JSONL) of ``{instruction, input, output}``; extra keys go to meta.
* ``jsonl``    one JSON object per line with the same keys (blank lines skipped).
* ``sharegpt`` records with ``conversations: [{from, value}, ...]`` (``role``/``content`` too):
  the first human/user turn is the instruction, the first gpt/assistant turn after it the output,
  a leading system turn and any further turns go to meta. JSON array or JSONL.
* ``gsm8k``    ``{question, answer}``: instruction = question, output = answer.
* ``parquet``  a Parquet file with canonical columns (kept as they are, ids and lineage included
  when all canonical columns are there) or with columns named through a mapping.
* ``auto``     detected from the content: Parquet magic bytes ``PAR1``; first non-space character
  ``[`` means a JSON array, anything else JSONL; then the keys of the first record decide
  (``conversations`` -> sharegpt, ``question`` + ``answer`` -> gsm8k, ``instruction`` +
  ``instances`` -> the Self-Instruct mapping, ``instruction`` -> alpaca/jsonl, and the keys of the
  AlpaGasus test sets, see :data:`KNOWN_MAPPINGS`). Detection never leaves a field unread
  silently: a test-set shape is recognised only when its other keys are the test set's own ids and
  categories (:data:`KNOWN_EXTRAS`), so ``{prompt, completion}`` is not Koala's prompts with empty
  outputs; and an ``instruction`` record without ``input`` or ``output`` but with another text
  field (``response``, ``context``...) is ambiguous. Both are errors that ask for ``--map`` (the
  message suggests one) or an explicit ``--format``.

Any other schema is read through a mapping ``{canonical_field: source_field}``
(``--map instruction=prompt,input=ctx``); a source field may be a dotted path with list indexes,
``instances.0.input``. Fields named by a mapping are required; without a mapping ``input`` and
``output`` default to "" when absent.

Memory: JSONL is streamed line by line from a binary file object (no per-line buffer limit, a
1 MB line is fine); a JSON array is parsed whole with :func:`json.loads` (a JSON array cannot be
validated without reading it whole); Parquet is streamed in record batches.

Bad input raises :class:`~evoray.errors.InputError` whose ``where`` is ``FILE:LINE`` (JSONL,
1-based) or ``FILE[record N]`` (JSON arrays and Parquet, 0-based record index). With
``skip_invalid`` a bad record is written to the quarantine file instead
(``<OUT without extension>.quarantine.jsonl``, one ``{"file", "line" | "record", "reason",
"text"}`` object per line). Errors that concern the whole file (empty file, unknown format, a
mapping to a field the file does not have, a JSON array that does not parse) are always raised.

Ids and duplicates
------------------
A row's id hashes its source name and content (:func:`evoray.schema.make_id`), so the same input
gives the same ids on every run. Data sets do contain repeated content (``dolly_3k.json`` has two
pairs with the same instruction, input and output) and their published row counts include the
repeats, so repeats are *kept*: the k-th repeat (k = 1, 2, ...) of the same content within one
ingest gets the id ``make_id(source, instruction, input, output, "repeat", k)`` -- still stable
across runs for the same input. Repeats are not silent: :class:`IngestSummary` counts them
(``duplicates``) and lists where they are (``duplicate_where``, the first 100). Rows read from a
canonical table (which already carry ids) keep their ids; repeats there are only counted.

Writing
-------
:func:`write_table` streams rows (dicts, record batches or tables) into ``NAME.parquet`` or
``NAME.jsonl`` in chunks, atomically: it writes a temporary file in the same folder and
:func:`os.replace` s it over the target at the end, so a half-written file is never mistaken for a
complete one. Both load with pyarrow and with ``datasets.load_dataset("parquet" | "json")``.

Every whole file evoray writes goes through the same rule, :func:`atomic_path` (and its shorthands
:func:`write_text_atomic`, :func:`write_json_atomic`): a temporary name in the target's folder
(:func:`temp_path`, ``.NAME.<random>.partial``), flushed to disk and renamed over the target on
success, removed on error. Streaming writers that outlive one call (:class:`evoray.sinks.TableSink`)
take their temporary name from :func:`temp_path` and rename it themselves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError, UsageError
from .files import atomic_path, remove_stale_temps, temp_path, write_json_atomic, write_text_atomic  # noqa: F401 (re-exported)
from .schema import RESULT_SCHEMA, ROW_FIELDS, ROW_SCHEMA, make_id, new_row

FORMATS = ("auto", "alpaca", "jsonl", "sharegpt", "gsm8k", "parquet")
TABLE_FORMATS = ("parquet", "jsonl")
CANONICAL_FIELDS = ("instruction", "input", "output")
CHUNK_ROWS = 10_000
PARQUET_MAGIC = b"PAR1"

# Known schemas without the canonical keys, detected by ``--format auto``.
KNOWN_MAPPINGS: dict[str, dict[str, str]] = {
    "vicuna": {"instruction": "text"},
    "koala": {"instruction": "prompt"},
    "wizardlm": {"instruction": "Instruction"},
    "sinstruct": {"instruction": "instruction", "input": "instances.0.input", "output": "instances.0.output"},
}

# The other keys each known test set has (ids and categories); a record with any further key is not
# taken for that test set: {prompt, completion} is a prompt/answer file, not Koala's prompts.
KNOWN_EXTRAS: dict[str, set[str]] = {
    "vicuna": {"question_id", "category", "id"},
    "koala": {"id"},
    "wizardlm": {"idx", "Skill", "Difficulty", "id"},
}

# Names that hold record metadata rather than text of the example (compared in lower case).
METADATA_KEYS = {"id", "idx", "uid", "index", "question_id", "category", "categories", "skill", "difficulty", "source",
                 "name", "motivation_app", "is_classification", "meta", "metadata", "lang", "language", "tags",
                 "url", "license", "split", "task", "type"}

# Field names that usually hold each canonical field: used to suggest a --map.
_GUESS = {"instruction": ("instruction", "prompt", "question", "query", "text", "problem"),
          "input": ("input", "context", "ctx"),
          "output": ("output", "completion", "response", "answer", "target", "chosen", "reply", "solution")}

# Default field mapping of each record format (fields marked optional may be absent).
_FORMAT_MAPPINGS: dict[str, dict[str, str]] = {
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "jsonl": {"instruction": "instruction", "input": "input", "output": "output"},
    "parquet": {"instruction": "instruction", "input": "input", "output": "output"},
    "gsm8k": {"instruction": "question", "output": "answer"},
}
_OPTIONAL_DEFAULTS = {"input", "output"}  # absent -> "" unless a mapping named them
_CANONICAL_KEYS = {n for n, _ in ROW_FIELDS}
_MAX_DUP_WHERE = 100


# ------------------------------------------------------------------------------------------------
# small helpers


def source_name(path: str | os.PathLike) -> str:
    """The ``source`` of rows read from ``path``: its base name without extension."""
    return Path(path).stem


def table_path(dir: str | os.PathLike, name: str, fmt: str = "parquet") -> Path:
    """``DIR/NAME.parquet`` or ``DIR/NAME.jsonl``."""
    if fmt not in TABLE_FORMATS:
        raise UsageError(f"unknown table format '{fmt}' (use one of: {', '.join(TABLE_FORMATS)})")
    return Path(dir) / f"{name}.{fmt}"


def quarantine_path_for(out: str | os.PathLike) -> Path:
    """``<OUT without extension>.quarantine.jsonl`` beside the output."""
    p = Path(out)
    return p.with_name(f"{p.stem}.quarantine.jsonl")


def parse_mapping(text: str | dict[str, str] | None) -> dict[str, str]:
    """``"instruction=prompt,input=ctx"`` -> ``{"instruction": "prompt", "input": "ctx"}``.

    A dict is validated and returned. Raises :class:`UsageError` for bad syntax or a canonical
    field other than instruction, input, output.
    """
    if text is None:
        return {}
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            key, eq, value = part.partition("=")
            if not eq or not key.strip() or not value.strip():
                raise UsageError(
                    f"--map {text!r}: expected CANONICAL=FIELD pairs separated by commas, "
                    f"e.g. instruction=prompt,input=ctx (bad part: {part!r})"
                )
            items.append((key.strip(), value.strip()))
    out: dict[str, str] = {}
    for key, value in items:
        if key not in CANONICAL_FIELDS:
            raise UsageError(
                f"--map: unknown canonical field '{key}' (map one of: {', '.join(CANONICAL_FIELDS)})"
            )
        if not isinstance(value, str) or not value:
            raise UsageError(f"--map: field for '{key}' must be a non-empty name, got {value!r}")
        if key in out:
            raise UsageError(f"--map: '{key}' is mapped twice")
        out[key] = value
    return out


class _MissingField(Exception):
    pass


def _get_path(record: Any, path: str) -> Any:
    """Value at a dotted path (``instances.0.input``); a key with a dot is tried whole first."""
    if isinstance(record, dict) and path in record:
        return record[path]
    cur = record
    for part in path.split("."):
        if isinstance(cur, dict):
            if part not in cur:
                raise _MissingField(part)
            cur = cur[part]
        elif isinstance(cur, list):
            try:
                cur = cur[int(part)]
            except (ValueError, IndexError):
                raise _MissingField(f"{part} (list of {len(cur)})") from None
        else:
            raise _MissingField(part)
    return cur


def _type_name(v: Any) -> str:
    return "null" if v is None else {dict: "object", list: "list", str: "string", bool: "boolean"}.get(
        type(v), type(v).__name__
    )


def _json_default(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, default=_json_default)


# ------------------------------------------------------------------------------------------------
# record -> row


class _BadRecord(Exception):
    """A record-level problem (quarantinable)."""


@dataclass
class _Plan:
    """How the records of one file become rows."""

    kind: str  # "mapped" | "sharegpt" | "canonical"
    label: str  # the format reported in the summary
    mapping: dict[str, str] = field(default_factory=dict)
    required: set[str] = field(default_factory=set)
    user_keys: set[str] = field(default_factory=set)  # canonical fields the user's --map named


def _plan(fmt: str, mapping: dict[str, str], first: dict | None, path: str, where0: str) -> _Plan:
    """Decide how to read records of ``fmt`` (``auto`` resolved with ``first``)."""
    keys = set(first or {})
    if fmt == "auto":
        if mapping:
            fmt = "mapped"
        elif _CANONICAL_KEYS <= keys:
            return _Plan("canonical", "canonical")
        elif "conversations" in keys:
            fmt = "sharegpt"
        elif {"question", "answer"} <= keys:
            fmt = "gsm8k"
        elif {"instruction", "instances"} <= keys:
            return _Plan("mapped", "sinstruct", dict(KNOWN_MAPPINGS["sinstruct"]), set(KNOWN_MAPPINGS["sinstruct"]))
        elif "instruction" in keys:
            _refuse_unread_fields(first or {}, where0)
            fmt = "alpaca"
        else:
            for name, m in KNOWN_MAPPINGS.items():
                if name != "sinstruct" and set(m.values()) <= keys and keys - set(m.values()) <= KNOWN_EXTRAS[name]:
                    return _Plan("mapped", name, dict(m), set(m))
            raise InputError(
                f"cannot detect the format: the first record has keys {sorted(keys)}, and no known format reads "
                f"them all; name the fields with --map {_suggest_map(keys)} (input.map in a job config) "
                f"or give --format",
                where0,
            )
    if fmt == "sharegpt":
        if mapping:
            raise UsageError("--map does not apply to --format sharegpt (its fields are fixed)")
        return _Plan("sharegpt", "sharegpt")
    if fmt in ("parquet", "alpaca", "jsonl") and not mapping and _CANONICAL_KEYS <= keys:
        return _Plan("canonical", "canonical")
    base = dict(_FORMAT_MAPPINGS.get(fmt, {"instruction": "instruction", "input": "input", "output": "output"}))
    required = {"instruction"} | ({"output"} if fmt == "gsm8k" else set())
    base.update(mapping)
    required |= set(mapping)
    label = fmt if not mapping else ("mapped" if fmt == "mapped" else f"{fmt}+map")
    return _Plan("mapped", label, base, required, set(mapping))


def _suggest_map(keys: set[str]) -> str:
    lower = {k.lower(): k for k in keys}
    parts = []
    for canon, names in _GUESS.items():
        hit = next((lower[n] for n in names if n in lower), None)
        if hit is not None:
            parts.append(f"{canon}={hit}")
    if not any(p.startswith("instruction=") for p in parts):
        parts.insert(0, "instruction=FIELD")
    return ",".join(parts)


def _refuse_unread_fields(first: dict, where0: str) -> None:
    """Auto-detected Alpaca records lacking ``input`` or ``output`` while other text fields are
    there: one of them may be the missing field, and reading the file as Alpaca would leave it
    empty (the field would only be kept in meta). Ambiguous: the user says which."""
    keys = set(first)
    missing = [c for c in ("input", "output") if c not in keys]
    extras = sorted(k for k in keys - set(CANONICAL_FIELDS)
                    if k.lower() not in METADATA_KEYS and isinstance(first.get(k), str) and first.get(k).strip())
    if not missing or not extras:
        return
    suggestion = _suggest_map(keys)
    if suggestion == "instruction=instruction":
        suggestion = "instruction=instruction," + ",".join(f"{c}={extras[0]}" for c in missing[-1:])
    raise InputError(
        f"ambiguous format: the first record has keys {sorted(keys)}: 'instruction' but no "
        f"{' or '.join(repr(m) for m in missing)}, and {', '.join(repr(e) for e in extras)} may hold it. "
        f"Say how to read it: --map {suggestion} (input.map in a job config), or --format alpaca to read it as "
        f"Alpaca with {' and '.join(missing)} empty and the other fields kept in meta",
        where0,
    )


def _check_mapping_against(plan: _Plan, first: dict, where0: str) -> None:
    """A --map naming a field the first record does not have is a file-level error."""
    if plan.kind != "mapped":
        return
    for canon in sorted(plan.user_keys):
        src = plan.mapping[canon]
        try:
            _get_path(first, src)
        except _MissingField:
            raise InputError(
                f"field '{src}' (for {canon}) does not exist; the first record has keys {sorted(first)} "
                f"(name the right field with --map {canon}=FIELD)",
                where0,
            ) from None


def _text_field(value: Any, name: str, src: str) -> str:
    if value is None and name != "instruction":
        return ""
    if not isinstance(value, str):
        label = name if src == name else f"{name} (field '{src}')"
        raise _BadRecord(f"wrong type: {label} must be a string, got {_type_name(value)}")
    return value


def _row_from_record(rec: Any, plan: _Plan, source: str) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise _BadRecord(f"wrong type: expected a JSON object, got {_type_name(rec)}")
    if plan.kind == "canonical":
        return _canonical_row(rec)
    if plan.kind == "sharegpt":
        return _sharegpt_row(rec, source)
    values: dict[str, str] = {}
    used_top: set[str] = set()
    for canon in CANONICAL_FIELDS:
        src = plan.mapping.get(canon)
        if src is None:
            values[canon] = ""
            continue
        try:
            raw = _get_path(rec, src)
        except _MissingField:
            if canon in plan.required or canon not in _OPTIONAL_DEFAULTS:
                raise _BadRecord(f"missing required field '{src}'" + (f" (for {canon})" if src != canon else "")) from None
            values[canon] = ""
            continue
        if src in rec:
            used_top.add(src)
        values[canon] = _text_field(raw, canon, src)
    if not values["instruction"].strip():
        raise _BadRecord("empty instruction")
    meta = {k: v for k, v in rec.items() if k not in used_top}
    return new_row(values["instruction"], values["input"], values["output"], source=source, meta=_meta(meta))


def _meta(meta: dict) -> str:
    return json.dumps(meta, ensure_ascii=False, sort_keys=True, default=_json_default)


_HUMAN = {"human", "user"}
_GPT = {"gpt", "assistant", "chatgpt", "bard", "model"}


def _sharegpt_row(rec: dict, source: str) -> dict[str, Any]:
    conv = rec.get("conversations")
    if conv is None:
        raise _BadRecord("missing required field 'conversations'")
    if not isinstance(conv, list):
        raise _BadRecord(f"wrong type: conversations must be a list, got {_type_name(conv)}")
    turns = []
    for i, t in enumerate(conv):
        if not isinstance(t, dict):
            raise _BadRecord(f"wrong type: conversations[{i}] must be an object, got {_type_name(t)}")
        who = t.get("from", t.get("role"))
        text = t.get("value", t.get("content"))
        if not isinstance(who, str) or not isinstance(text, str):
            raise _BadRecord(f"conversations[{i}] needs string 'from' and 'value'")
        turns.append((who.lower(), text))
    meta = {k: v for k, v in rec.items() if k != "conversations"}
    used = set()
    i = 0
    if turns and turns[0][0] == "system":
        meta["system"] = turns[0][1]
        used.add(0)
        i = 1
    while i < len(turns) and turns[i][0] not in _HUMAN:
        i += 1
    if i >= len(turns):
        raise _BadRecord("no human/user turn in conversations")
    instruction = turns[i][1]
    used.add(i)
    j = i + 1
    while j < len(turns) and turns[j][0] not in _GPT:
        j += 1
    output = ""
    if j < len(turns):
        output = turns[j][1]
        used.add(j)
    other = [t for k, t in enumerate(conv) if k not in used]
    if other:
        meta["other_turns"] = other  # later turns of a multi-turn conversation, kept
    if not instruction.strip():
        raise _BadRecord("empty instruction")
    return new_row(instruction, "", output, source=source, meta=_meta(meta))


def _canonical_row(rec: dict) -> dict[str, Any]:
    row = {n: rec.get(n) for n, _ in ROW_FIELDS}
    for n in ("id", "instruction"):
        if not isinstance(row[n], str):
            raise _BadRecord(f"wrong type: {n} must be a string, got {_type_name(row[n])}")
    for n in ("input", "output", "source", "meta", "parent_id", "method_id"):
        if row[n] is not None and not isinstance(row[n], str):
            raise _BadRecord(f"wrong type: {n} must be a string, got {_type_name(row[n])}")
    if row["round"] is not None and (not isinstance(row["round"], int) or isinstance(row["round"], bool)):
        raise _BadRecord(f"wrong type: round must be an integer, got {_type_name(row['round'])}")
    if not row["instruction"].strip():
        raise _BadRecord("empty instruction")
    row["input"] = row["input"] or ""
    row["output"] = row["output"] or ""
    row["meta"] = row["meta"] or "{}"
    return row


# ------------------------------------------------------------------------------------------------
# containers: yield (location, record-or-error, raw text)


@dataclass
class _Item:
    loc_kind: str  # "line" | "record"
    loc: int
    record: Any = None
    error: str | None = None
    raw: str | None = None


def _sniff(path: Path) -> str:
    """'parquet', 'array' or 'lines' from the first bytes; InputError when the file is empty."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if head == PARQUET_MAGIC:
                return "parquet"
            f.seek(0)
            while True:
                chunk = f.read(65536)
                if not chunk:
                    raise InputError("no rows: the file is empty", str(path))
                s = chunk.lstrip(b" \t\r\n\xef\xbb\xbf")  # whitespace and a UTF-8 BOM
                if s:
                    return "array" if s[:1] == b"[" else "lines"
    except FileNotFoundError:
        raise InputError("file not found", str(path)) from None
    except IsADirectoryError:
        raise InputError("is a folder, not a data file", str(path)) from None


def _decode_line(raw: bytes, lineno: int, file_offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadRecord(
            f"not UTF-8: invalid byte 0x{raw[e.start]:02x} at byte offset {e.start} of the line "
            f"(byte {file_offset + e.start} of the file)"
        ) from None


def _iter_lines(path: Path) -> Iterator[_Item]:
    """JSONL, streamed: one item per non-blank line."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            start = offset
            offset += len(raw)
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
                start += 3
            stripped = raw.strip()
            if not stripped:
                continue
            text = raw.decode("utf-8", errors="backslashreplace").rstrip("\r\n")
            try:
                line = _decode_line(raw, lineno, start).strip()
            except _BadRecord as e:
                yield _Item("line", lineno, error=str(e), raw=text)
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                hint = " (a pretty-printed JSON object? JSONL needs one object per line)" if line == "{" else ""
                yield _Item("line", lineno, error=f"malformed JSON: {e.msg} at column {e.colno}{hint}", raw=text)
                continue
            yield _Item("line", lineno, record=rec, raw=text)


def _iter_array(path: Path) -> Iterator[_Item]:
    """A JSON array, parsed whole (documented): one item per element."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1)
        raise InputError(
            f"not UTF-8: invalid byte 0x{data[e.start]:02x} at byte offset {col} of the line "
            f"(byte {e.start} of the file)",
            f"{path}:{line}",
        ) from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON: {e.msg} at column {e.colno}", f"{path}:{e.lineno}") from None
    del text, data
    if not isinstance(records, list):
        raise InputError(f"expected a JSON array of records, got {_type_name(records)}", str(path))
    for i, rec in enumerate(records):
        yield _Item("record", i, record=rec)


def parquet_stream(path: str | os.PathLike, buffer_size: int = 0) -> pq.ParquetFile:
    """A Parquet file opened for streaming with ``iter_batches``: without pre-buffering.

    ``pq.ParquetFile`` pre-buffers by default, and ``iter_batches`` over all row groups then reads
    every column chunk of the file ahead: iterating a 25 MiB file held 31 MiB of Arrow memory
    (6 MiB without), so a stage's selection pass grew the driver with the number of rows.
    ``buffer_size`` > 0 reads column chunks through a buffer of that size instead of whole, for
    reading only the first rows of a file that may be one huge row group.
    """
    return pq.ParquetFile(path, pre_buffer=False, buffer_size=buffer_size)


def _iter_parquet(path: Path) -> Iterator[_Item]:
    try:
        pf = parquet_stream(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"not a readable Parquet file: {e}", str(path)) from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            yield _Item("record", i, record=rec)
            i += 1


def _label(label: str, container: str) -> str:
    """The format name reported for a file: alpaca/jsonl/parquet follow the container."""
    if label in ("alpaca", "jsonl", "parquet"):
        return {"parquet": "parquet", "array": "alpaca", "lines": "jsonl"}[container]
    return label


def _where(path: Path, item: _Item) -> str:
    return f"{path}:{item.loc}" if item.loc_kind == "line" else f"{path}[record {item.loc}]"


# ------------------------------------------------------------------------------------------------
# the entry points


@dataclass
class IngestSummary:
    """What an ingest did. ``per_source`` and ``formats`` are keyed by the path as given."""

    out: str | None = None
    rows: int = 0
    quarantined: int = 0
    quarantine_path: str | None = None
    duplicates: int = 0
    duplicate_where: list[str] = field(default_factory=list)
    per_source: dict[str, int] = field(default_factory=dict)
    quarantined_per_source: dict[str, int] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Quarantine:
    """Opens its file on the first bad record, so a clean run leaves none."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self._f = None
        self.count = 0

    def add(self, file: str, item: _Item, reason: str) -> None:
        self.count += 1
        if self.path is None:
            return
        if self._f is None:
            self._f = open(self.path, "w", encoding="utf-8")
        raw = item.raw if item.raw is not None else _dumps(item.record)
        self._f.write(_dumps({"file": file, item.loc_kind: item.loc, "reason": reason, "text": raw}) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def iter_rows(
    sources: Iterable[str | os.PathLike] | str | os.PathLike,
    fmt: str = "auto",
    mapping: dict[str, str] | str | None = None,
    skip_invalid: bool = False,
    quarantine_path: str | os.PathLike | None = None,
    limit: int | None = None,
    summary: IngestSummary | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield canonical rows from each source in order.

    Bad records raise :class:`InputError` (``where`` = ``FILE:LINE`` or ``FILE[record N]``), or
    with ``skip_invalid`` are appended to ``quarantine_path`` (when given) and counted. ``limit``
    stops after that many rows in all. ``summary`` (optional) is filled in as rows go by.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown format '{fmt}' (use one of: {', '.join(FORMATS)})")
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [str(s) for s in sources]
    if not sources:
        raise UsageError("no input files given")
    mapping = parse_mapping(mapping)
    summary = summary if summary is not None else IngestSummary()
    quarantine = _Quarantine(quarantine_path if skip_invalid else None)
    seen: dict[int, int] = {}  # content id -> repeats so far
    produced = 0
    try:
        for src in sources:
            if limit is not None and produced >= limit:
                break
            path = Path(src)
            source = source_name(path)
            container = _sniff(path)
            if fmt == "parquet" and container != "parquet":
                raise InputError("--format parquet, but the file is not Parquet (no PAR1 magic bytes)", src)
            if container == "parquet" and fmt not in ("auto", "parquet"):
                raise InputError(f"--format {fmt}, but the file is Parquet (use --format parquet or auto)", src)
            items = {"parquet": _iter_parquet, "array": _iter_array, "lines": _iter_lines}[container](path)
            plan: _Plan | None = None
            count = bad = any_items = 0
            summary.per_source.setdefault(src, 0)
            for item in items:
                any_items += 1
                where = _where(path, item)
                if plan is None:
                    if item.error is not None or not isinstance(item.record, dict):
                        if not skip_invalid:
                            reason = item.error or f"wrong type: expected a JSON object, got {_type_name(item.record)}"
                            raise InputError(reason, where)
                    else:
                        plan = _plan(fmt, mapping, item.record, src, where)
                        _check_mapping_against(plan, item.record, where)
                        summary.formats[src] = _label(plan.label, container)
                try:
                    if item.error is not None:
                        raise _BadRecord(item.error)
                    if plan is None:
                        raise _BadRecord(f"wrong type: expected a JSON object, got {_type_name(item.record)}")
                    row = _row_from_record(item.record, plan, source)
                except _BadRecord as e:
                    if not skip_invalid:
                        raise InputError(str(e), where) from None
                    quarantine.add(src, item, str(e))
                    bad += 1
                    summary.quarantined += 1
                    summary.quarantined_per_source[src] = bad
                    continue
                key = int(row["id"], 16)
                k = seen.get(key)
                if k is None:
                    seen[key] = 0
                else:
                    seen[key] = k + 1
                    summary.duplicates += 1
                    if len(summary.duplicate_where) < _MAX_DUP_WHERE:
                        summary.duplicate_where.append(where)
                    if plan.kind != "canonical":
                        row["id"] = make_id(source, row["instruction"], row["input"], row["output"], "repeat", k + 1)
                count += 1
                produced += 1
                summary.rows += 1
                summary.per_source[src] = count
                yield row
                if limit is not None and produced >= limit:
                    break
            if not any_items:
                raise InputError("no rows: the file holds no records", src)
    finally:
        quarantine.close()


def ingest(
    sources: list[str] | str,
    out: str | os.PathLike,
    fmt: str = "auto",
    mapping: dict[str, str] | str | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
) -> IngestSummary:
    """Read ``sources`` into one canonical table at ``out`` (``.parquet`` or ``.jsonl``).

    Both the table and the quarantine file (``<OUT without extension>.quarantine.jsonl``, only
    with ``skip_invalid`` and only when something was quarantined) appear atomically at the end;
    on an error neither is written. A successful ingest removes a stale quarantine file left by an
    earlier run of the same output.
    """
    out = Path(out)
    fmt_out = _table_format(out)
    qpath = quarantine_path_for(out)
    summary = IngestSummary(out=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    qtmp = temp_path(qpath) if skip_invalid else None
    try:
        rows = iter_rows(sources, fmt, mapping, skip_invalid, qtmp, limit, summary)
        write_table(rows, out, ROW_SCHEMA, fmt=fmt_out)
        if qtmp is not None and summary.quarantined and qtmp.exists():
            os.replace(qtmp, qpath)
            summary.quarantine_path = str(qpath)
        elif qpath.exists():
            qpath.unlink()
    finally:
        if qtmp is not None and qtmp.exists():
            qtmp.unlink()
    return summary


# ------------------------------------------------------------------------------------------------
# tables


def _table_format(path: Path, fmt: str | None = None) -> str:
    if fmt is not None:
        if fmt not in TABLE_FORMATS:
            raise UsageError(f"unknown table format '{fmt}' (use one of: {', '.join(TABLE_FORMATS)})")
        return fmt
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    raise UsageError(f"{path}: the output must end in .parquet or .jsonl")




def _chunks(data: Any, schema: pa.Schema | None, chunk_rows: int) -> Iterator[pa.Table]:
    """Tables of at most ``chunk_rows`` rows from a table, batches or an iterable of dicts."""
    if isinstance(data, (pa.Table, pa.RecordBatch)):
        data = [data]
    buf: list[dict] = []
    for item in data:
        if isinstance(item, (pa.Table, pa.RecordBatch)):
            if buf:
                yield _from_rows(buf, schema)
                buf = []
            t = item if isinstance(item, pa.Table) else pa.Table.from_batches([item])
            if schema is not None:
                t = _conform(t, schema)
            for off in range(0, t.num_rows, chunk_rows):
                yield t.slice(off, chunk_rows)
            continue
        buf.append(item)
        if len(buf) >= chunk_rows:
            yield _from_rows(buf, schema)
            buf = []
    if buf:
        yield _from_rows(buf, schema)


def _from_rows(rows: list[dict], schema: pa.Schema | None) -> pa.Table:
    if schema is None:
        return pa.Table.from_pylist(rows)
    return pa.Table.from_pydict({f.name: [r.get(f.name) for r in rows] for f in schema}, schema=schema)


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast ``t``'s columns to ``schema`` (missing nullable columns become nulls)."""
    cols = []
    for f in schema:
        if f.name in t.column_names:
            cols.append(t.column(f.name).cast(f.type))
        elif f.nullable:
            cols.append(pa.nulls(t.num_rows, f.type))
        else:
            raise UsageError(f"table has no column '{f.name}' (columns: {', '.join(t.column_names)})")
    return pa.Table.from_arrays(cols, schema=schema)


def write_table(
    data: Any,
    path: str | os.PathLike,
    schema: pa.Schema | None = ROW_SCHEMA,
    fmt: str | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> int:
    """Write rows to ``path`` (Parquet or JSONL, from ``fmt`` or the extension), atomically.

    ``data`` is a ``pa.Table``, a ``pa.RecordBatch``, or an iterable of row dicts or of
    tables/batches (e.g. ``ds.iter_batches(batch_format="pyarrow")``); it is consumed in chunks of
    ``chunk_rows``. With a ``schema`` (default :data:`ROW_SCHEMA`; use ``RESULT_SCHEMA`` for stage
    results) the columns are exactly the schema's: missing ones are null, extra keys dropped.
    ``schema=None`` takes the schema of the first chunk. Returns the number of rows written.
    """
    path = Path(path)
    fmt = _table_format(path, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with atomic_path(path) as tmp:
        if fmt == "parquet":
            writer = None
            try:
                for t in _chunks(data, schema, chunk_rows):
                    if writer is None:
                        schema = schema or t.schema
                        writer = pq.ParquetWriter(tmp, schema)
                    elif t.schema != schema:
                        t = _conform(t, schema)
                    writer.write_table(t)
                    n += t.num_rows
                if writer is None:
                    writer = pq.ParquetWriter(tmp, schema or pa.schema([]))
            finally:
                if writer is not None:
                    writer.close()
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for t in _chunks(data, schema, chunk_rows):
                    for row in t.to_pylist():
                        f.write(_dumps(row) + "\n")
                    n += t.num_rows
    return n


def read_table(path: str | os.PathLike, schema: pa.Schema | None = None) -> pa.Table:
    """Read a table written by :func:`write_table` (``.parquet`` or ``.jsonl``).

    JSONL is parsed line by line (no block-size limit on long rows); its columns take their types
    from ``schema``, else from :data:`RESULT_SCHEMA` for the canonical and result columns.
    """
    path = Path(path)
    fmt = _table_format(path)
    if not path.exists():
        raise InputError("file not found", str(path))
    if fmt == "parquet":
        t = pq.read_table(path)
        return _conform(t, schema) if schema is not None else t
    rows = []
    names: dict[str, None] = {}
    for item in _iter_lines(path):
        if item.error is not None:
            raise InputError(item.error, f"{path}:{item.loc}")
        if not isinstance(item.record, dict):
            raise InputError(f"expected a JSON object, got {_type_name(item.record)}", f"{path}:{item.loc}")
        rows.append(item.record)
        names.update(dict.fromkeys(item.record))
    if schema is None:
        known = {f.name: f for f in RESULT_SCHEMA}
        if names and all(n in known for n in names):
            schema = pa.schema([pa.field(n, known[n].type) for n in names])
        else:
            return pa.Table.from_pylist(rows)
    return pa.Table.from_pydict({f.name: [r.get(f.name) for r in rows] for f in schema}, schema=schema)
