"""The canonical row, defined once: a pyarrow schema and a pydantic model that agree.

Every reader turns its input into these rows; every stage reads and writes them (stages add their
own result columns, see :data:`RESULT_FIELDS`).

``id`` is stable: a hash of the source and the content, so the same input gives the same ids on
every run (and evolved rows hash their parent, round and method too).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa


ROW_FIELDS: list[tuple[str, pa.DataType]] = [
    ("id", pa.string()),
    ("instruction", pa.string()),
    ("input", pa.string()),
    ("output", pa.string()),
    ("source", pa.string()),
    ("meta", pa.string()),
    ("parent_id", pa.string()),
    ("round", pa.int32()),
    ("method_id", pa.string()),
]

ROW_SCHEMA = pa.schema([pa.field(n, t, nullable=n not in ("id", "instruction")) for n, t in ROW_FIELDS])

# Columns stages add to a row. Every output table has the canonical columns plus these.
RESULT_FIELDS: list[tuple[str, pa.DataType]] = [
    ("status", pa.string()),  # kept | rejected | failed | evolved | answered | judged
    ("score", pa.float64()),
    ("explanation", pa.string()),
    ("provider", pa.string()),
    ("model", pa.string()),
    ("reason", pa.string()),
    ("rule", pa.string()),
    ("attempts", pa.int32()),
    ("raw", pa.string()),
]

RESULT_SCHEMA = pa.schema(
    [pa.field(n, t, nullable=n not in ("id", "instruction")) for n, t in ROW_FIELDS + RESULT_FIELDS]
)


def make_id(source: str, instruction: str, input: str = "", output: str = "", *lineage: Any) -> str:
    """A stable 16-hex-digit id from the source name, the content and optional lineage."""
    h = hashlib.sha256()
    for part in (source, instruction, input, output, *lineage):
        b = ("" if part is None else str(part)).encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


def new_row(
    instruction: str,
    input: str = "",
    output: str = "",
    source: str = "",
    meta: dict | str | None = None,
    parent_id: str | None = None,
    round: int | None = None,
    method_id: str | None = None,
) -> dict[str, Any]:
    """A canonical row dict with its id computed."""
    meta_text = meta if isinstance(meta, str) else json.dumps(meta or {}, ensure_ascii=False, sort_keys=True)
    lineage = () if parent_id is None else (parent_id, round, method_id)
    return {
        "id": make_id(source, instruction, input, output, *lineage),
        "instruction": instruction,
        "input": input or "",
        "output": output or "",
        "source": source,
        "meta": meta_text,
        "parent_id": parent_id,
        "round": round,
        "method_id": method_id,
    }


def result_row(row: dict[str, Any], **results: Any) -> dict[str, Any]:
    """A row with every result column present (missing ones None)."""
    out = {n: row.get(n) for n, _ in ROW_FIELDS}
    for n, _ in RESULT_FIELDS:
        out[n] = results.get(n, row.get(n))
    return out
