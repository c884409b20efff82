"""SeenRows: the driver's exactly-once bitmap must answer like a Python set of positions."""

import random

import pytest

from evoray.seen import SeenRows


def test_answers_like_a_set_with_repeats_inside_and_across_batches():
    rng = random.Random(0)
    n = 3000
    positions = [rng.randrange(n) for _ in range(5000)]  # about 40 % repeats
    s, ref = SeenRows(n), set()
    for start in range(0, len(positions), 37):
        batch = positions[start:start + 37]
        want = []
        for p in batch:
            want.append(p not in ref)
            ref.add(p)
        assert s.add_new(batch) == want
    assert len(s) == len(ref)


def test_every_position_of_a_large_input_lands_once_in_a_small_bitmap():
    n = 1_000_003  # not a multiple of 8: the last byte is partial
    s = SeenRows(n)
    assert all(s.add_new(range(n)))
    assert len(s) == n and len(s._bits) == 125_001
    assert s.add_new([0, n - 1, 500_000]) == [False, False, False]


@pytest.mark.parametrize("bad", [None, -1, 10])
def test_a_position_outside_the_input_is_an_error_not_a_silent_drop(bad):
    with pytest.raises(ValueError, match="outside the input's 10 rows"):
        SeenRows(10).add_new([1, bad])
