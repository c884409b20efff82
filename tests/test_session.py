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
