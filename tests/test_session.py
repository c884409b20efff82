"""RaySession helpers that need Ray importable but no running cluster."""

import math

import pytest


def test_read_ahead_cap_sets_only_the_object_store_limit():
    ray_data = pytest.importorskip("ray.data")
    from actors.session import limit_read_ahead

    opts = ray_data.DataContext.get_current().execution_options
    saved = opts.resource_limits
    try:
        limit_read_ahead(64)
        lim = opts.resource_limits
        assert lim.object_store_memory == 64 * 2**20
        assert math.isinf(lim.cpu) and math.isinf(lim.memory)  # a zero CPU limit would starve reads
    finally:
        opts.resource_limits = saved


def test_pool_blocks_stay_small_for_small_inputs_and_grow_for_large_ones():
    from evoray.raydata import pool_block_rows

    assert pool_block_rows(None, 64, 4) == 64
    assert pool_block_rows(12, 64, 4) == 64          # a tiny input: one batch-sized block
    assert pool_block_rows(2_000, 64, 4) == 64       # 31 blocks: every actor gets several
    assert pool_block_rows(20_000, 64, 4) == 576     # 35 blocks of whole batches
    assert pool_block_rows(50_000, 64, 4) == 1_024   # capped at 16 batches
    assert pool_block_rows(1_000_000, 64, 4) == 1_024  # capped at 16 batches: 977 blocks, not 15,625
    for total in (100, 5_000, 77_777, 10**7):
        rows = pool_block_rows(total, 50, 3)
        assert rows % 50 == 0 and 50 <= rows <= 800


def test_row_group_chunks_cover_the_file_once_with_the_offset_of_each_first_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from evoray.raydata import row_group_chunks

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"n": list(range(10_000))}), path, row_group_size=700)
    chunks = row_group_chunks(str(path), 2_000)
    f = pq.ParquetFile(path)
    got = []
    for first, stop, offset in chunks:
        part = f.read_row_groups(list(range(first, stop))).column("n").to_pylist()
        assert part[0] == offset
        got += part
    assert got == list(range(10_000))  # every row in exactly one chunk, in order


def test_read_ahead_is_sized_to_the_pool_unless_set(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from evoray.raydata import parquet_row_bytes, read_ahead_mb

    assert read_ahead_mb(64, 4, 1024, 500) == 64                 # an explicit setting wins
    assert read_ahead_mb(None, 4, 1024, 250) == 16               # 8 MB of blocks in flight: the floor
    assert read_ahead_mb(None, 32, 1024, 500) == 125             # 2 x 32 actors x 4 tasks x 512 KB
    assert read_ahead_mb(None, 512, 1024, 4000) == 256           # the ceiling
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"t": ["x" * 1000] * 2000}), path, row_group_size=500)
    assert 1000 <= parquet_row_bytes(path) < 1100
    pq.write_table(pa.table({"t": pa.array([], pa.string())}), path)
    assert parquet_row_bytes(path) == 0
