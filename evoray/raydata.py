"""Ray Data helpers: canonical rows in, stage tables out.

Design: input files are validated and canonicalised exactly once, in the driver, by the streaming
readers of :mod:`evoray.io` -- that is where bad rows get their ``FILE:LINE`` in an error or go to
the quarantine file. The result is one canonical Parquet file, which :func:`read_parquet_chunks`
streams to the workers in chunks of whole row groups. A Parquet file that already has the
canonical columns is used as it is (no copy). So Ray never sees a malformed row, and line numbers
are exact (a distributed JSON reader could not give them).

Ray is imported inside the functions, so importing this module stays cheap and Ray-free.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import io
from .errors import UsageError
from .schema import ROW_FIELDS, ROW_SCHEMA

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

#: column with each input row's position in its file; pool workers carry it to their output rows
POS = "_pos"


def is_canonical_parquet(path: str | os.PathLike) -> bool:
    """True when ``path`` is a Parquet file with every canonical column."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            if f.read(4) != io.PARQUET_MAGIC:
                return False
        names = set(pq.read_schema(p).names)
    except (OSError, pa.ArrowInvalid):
        return False
    return {n for n, _ in ROW_FIELDS} <= names


def canonicalize(
    paths: list[str] | str,
    fmt: str = "auto",
    mapping: dict[str, str] | str | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
    work_dir: str | os.PathLike | None = None,
) -> tuple[Path, io.IngestSummary | None]:
    """One canonical Parquet file for ``paths``, and the ingest summary (None when reused as is).

    A single canonical Parquet input (no mapping, no limit) is returned unchanged; anything else
    is ingested into ``work_dir/input.parquet`` (``work_dir`` defaults to a new temp folder), with
    the quarantine file beside it when ``skip_invalid``.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [str(paths)]
    paths = [str(p) for p in paths]
    if len(paths) == 1 and not mapping and limit is None and fmt in ("auto", "parquet") and is_canonical_parquet(paths[0]):
        return Path(paths[0]), None
    wd = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="evoray-input-"))
    out = wd / "input.parquet"
    summary = io.ingest(paths, out, fmt=fmt, mapping=mapping, skip_invalid=skip_invalid, limit=limit)
    return out, summary


def read_dataset(
    paths: list[str] | str,
    fmt: str = "auto",
    mapping: dict[str, str] | str | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
    work_dir: str | os.PathLike | None = None,
    rows_per_read: int = 4096,
    num_cpus: float = 0.25,
) -> "ray.data.Dataset":
    """A Ray Dataset of canonical rows (see the module docstring for the design).

    Errors in the input are raised here, in the driver, as :class:`~evoray.errors.InputError`.
    """
    path, _ = canonicalize(paths, fmt, mapping, skip_invalid, limit, work_dir)
    return read_parquet_chunks(str(path), rows_per_read=rows_per_read, num_cpus=num_cpus)


def read_parquet_chunks(path: str, rows_per_read: int = 4096, num_cpus: float = 0.25,
                        positions: bool = False) -> "ray.data.Dataset":
    """A Dataset over one Parquet file, read by one small task per chunk of whole row groups
    (about ``rows_per_read`` rows each).

    ``ray.data.read_parquet`` reads a single file in one task whose worker grew with the file
    (B5 in BENCHMARKS.md: 276 MiB at 10,000 rows, 585 MiB at 160,000); chunked reads keep every
    worker flat. Reading is light: a small CPU request keeps it schedulable beside local-model
    replicas and API-bound pools. ``positions=True`` adds :data:`POS`, each row's 0-based position
    in the file, which the stages use to land every input row exactly once.
    """
    import ray.data

    items = [{"path": path, "first": a, "stop": b, "offset": offset, "positions": positions}
             for a, b, offset in row_group_chunks(path, rows_per_read)]
    ds = ray.data.from_items(items or [{"path": path, "first": 0, "stop": 0, "offset": 0, "positions": positions}])
    return ds.map_batches(read_row_groups, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus)


def pool_block_rows(total_rows: int | None, batch_size: int, n_actors: int) -> int:
    """Rows per block fed to a pool: ``batch_size`` for small inputs, so every actor gets work,
    growing to at most 16 batches for large ones, keeping at least 8 blocks per actor.

    Ray Data's driver keeps a little bookkeeping for every block it has run (about 11 KB: B5 in
    BENCHMARKS.md), so a million rows in 64-row blocks (15,625 of them) grew the driver by about
    170 MiB; in blocks of 1,024 rows, about 11 MiB.
    """
    if not total_rows:
        return batch_size
    per_block = total_rows // (max(1, n_actors) * 8) // batch_size * batch_size
    return max(batch_size, min(per_block, batch_size * 16))


def parquet_row_bytes(path: str | os.PathLike) -> int:
    """Arrow bytes per row of a Parquet file, measured on its first 1,024 rows (0 when empty).

    The footer's sizes are of encoded data (a dictionary-encoded column of repeats is a few bytes);
    blocks in the object store are Arrow, so this decodes the first rows (a buffered read: a file
    written as one huge row group is not read whole).
    """
    for batch in io.parquet_stream(path, buffer_size=1 << 20).iter_batches(batch_size=1024):
        if batch.num_rows:
            return batch.nbytes // batch.num_rows
    return 0


#: in-flight tasks per pool actor (``ActorPoolStrategy(max_tasks_in_flight_per_actor=...)``)
TASKS_PER_ACTOR = 4


def read_ahead_mb(setting: int | None, n_actors: int, block_rows: int, row_bytes: int) -> int:
    """Object-store MiB a stage's pipeline may hold (``ray.read_ahead_mb``; None = sized here).

    Sized to the pool: twice the input of the blocks its actors can have in flight (room for their
    outputs, which add the reply columns, and for the next blocks), at least 16 and at most 256 MiB.
    Every process that writes or reads blocks keeps the store pages it touched resident, so a
    larger window costs RSS everywhere: rating 1,000,000 rows with 4 actors, a 64 MiB window put
    51 MiB of store pages in the driver and 47 worker processes on the node; 16 MiB put 19 MiB
    and 17 processes, at the same rate (B5 in BENCHMARKS.md).
    """
    if setting is not None:
        return setting
    need = 2 * max(1, n_actors) * TASKS_PER_ACTOR * block_rows * row_bytes
    return int(min(256, max(16, math.ceil(need / 2**20))))


def row_group_chunks(path: str, rows_per_read: int) -> list[tuple[int, int, int]]:
    """Consecutive row-group ranges ``(first, stop, offset)`` of about ``rows_per_read`` rows each;
    ``offset`` is the position in the file of the range's first row."""
    md = pq.ParquetFile(path).metadata
    out, first, rows, offset = [], 0, 0, 0
    for g in range(md.num_row_groups):
        rows += md.row_group(g).num_rows
        if rows >= rows_per_read:
            out.append((first, g + 1, offset))
            first, offset, rows = g + 1, offset + rows, 0
    if first < md.num_row_groups:
        out.append((first, md.num_row_groups, offset))
    return out


def read_row_groups(batch: pa.Table) -> pa.Table:
    """Ray Data UDF: the rows of the row-group ranges named in ``batch`` (path, first, stop, offset,
    positions), with :data:`POS` when asked."""
    parts = []
    cols = ("path", "first", "stop", "offset", "positions")
    for path, first, stop, offset, positions in zip(*(batch.column(c).to_pylist() for c in cols)):
        f = pq.ParquetFile(path)
        t = f.read_row_groups(list(range(first, stop))) if stop > first else f.schema_arrow.empty_table()
        if positions:
            t = t.append_column(POS, pa.array(range(offset, offset + t.num_rows), pa.int64()))
        parts.append(t)
    return pa.concat_tables(parts)
