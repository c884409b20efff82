"""SeenKeys: the driver's compact exactly-once set must answer like a Python set, collisions included."""

import random

import pytest

import evoray.seen as seen_mod
from evoray.seen import SeenKeys


def _check_against_set(keys, merge_every):
    s, ref = SeenKeys(merge_every=merge_every), set()
    for start in range(0, len(keys), 37):
        batch = keys[start:start + 37]
        got = s.add_new(batch)
        want = []
        for k in batch:
            want.append(k not in ref)
            ref.add(k)
        assert got == want
    assert len(s) == len(ref)
    for k in random.Random(1).sample(keys, 200):
        assert k in s
    assert "never-added" not in s


@pytest.mark.parametrize("merge_every", [1, 7, 65_536])
def test_answers_like_a_set_with_repeats(merge_every):
    rng = random.Random(0)
    keys = [f"row-{rng.randrange(3000)}" for _ in range(5000)]  # about 40 % repeats, some inside one batch
    _check_against_set(keys, merge_every)


@pytest.mark.parametrize("merge_every", [1, 50])
def test_hash_collisions_never_drop_a_distinct_key(monkeypatch, merge_every):
    # every key shares one of 3 hashes: only the exact comparison can tell them apart
    monkeypatch.setattr(seen_mod, "_h", lambda k: len(k) % 3)
    rng = random.Random(2)
    keys = [f"k{rng.randrange(400)}" for _ in range(1500)]
    _check_against_set(keys, merge_every)


def test_many_chunks_are_packed_and_still_found():
    s = SeenKeys(merge_every=100)
    for b in range(200):  # more than 64 chunks forces the repacking path
        assert s.add_new([f"b{b}-{i}" for i in range(5)]) == [True] * 5
    assert s.add_new(["b0-0", "b199-4", "b100-2", "new"]) == [False, False, False, True]
