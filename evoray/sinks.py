"""Streaming table writers for stage outputs.

A :class:`TableSink` takes pyarrow batches as they come out of a pool and writes them to
``NAME.parquet`` or ``NAME.jsonl`` under a temporary name; ``close()`` renames it into place, so a
file with the final name is always complete and a crashed stage leaves nothing a re-run would trust.

Parquet sinks buffer small batches and write row groups of ``row_group_rows`` rows: a row group per
64-row pool batch made the writer's footer metadata (column statistics for every row group, kept in
memory until close) the largest thing in the driver at a million rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .io import remove_stale_temps, temp_path


class TableSink:
    def __init__(self, directory: str | Path, name: str, fmt: str, schema: pa.Schema, row_group_rows: int = 4096):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fmt = fmt
        self.schema = schema
        self.path = self.dir / f"{name}.{fmt}"
        if fmt not in ("parquet", "jsonl"):
            raise ValueError(f"unknown table format '{fmt}' (parquet or jsonl)")
        remove_stale_temps(self.path)  # a killed earlier run's partial file (one stage writes a table)
        self.tmp = temp_path(self.path)  # the atomic-write naming rule of evoray.io
        self.rows = 0
        self.row_group_rows = row_group_rows
        self._buf: list[pa.Table] = []
        self._buffered = 0
        self._pq: pq.ParquetWriter | None = None
        self._fh = None
        if fmt == "parquet":
            self._pq = pq.ParquetWriter(self.tmp, schema)
        else:
            self._fh = open(self.tmp, "w", encoding="utf-8")

    def write(self, table: pa.Table | pa.RecordBatch | list[dict]) -> None:
        if isinstance(table, list):
            if not table:
                return
            table = pa.Table.from_pydict({f.name: [r.get(f.name) for r in table] for f in self.schema}, schema=self.schema)
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if table.num_rows == 0:
            return
        table = table.select([f.name for f in self.schema]).cast(self.schema)
        self.rows += table.num_rows
        if self._pq is not None:
            self._buf.append(table)
            self._buffered += table.num_rows
            if self._buffered >= self.row_group_rows:
                self._flush()
        else:
            for row in table.to_pylist():
                self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    def _flush(self) -> None:
        if self._buf:
            self._pq.write_table(pa.concat_tables(self._buf), row_group_size=max(self.row_group_rows, self._buffered))
            self._buf, self._buffered = [], 0

    def close(self) -> Path:
        if self._pq is not None:
            self._flush()
            self._pq.close()
            self._pq = None
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            if self._pq is not None:
                self._pq.close()
            if self._fh is not None:
                self._fh.close()
        finally:
            self._pq = self._fh = None
            self._buf, self._buffered = [], 0
            try:
                os.unlink(self.tmp)
            except OSError:
                pass


def find_table(directory: str | Path, name: str) -> Path | None:
    for fmt in ("parquet", "jsonl"):
        p = Path(directory) / f"{name}.{fmt}"
        if p.exists():
            return p
    return None
