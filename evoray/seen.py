"""Exactly-once bookkeeping for the driver: which row keys have already landed.

A retried Ray task may hand the driver a batch it has already written, so the driver drops every
key it has seen. A Python ``set`` of a million string ids costs about 100 MB; :class:`SeenKeys`
keeps the same answer in about 40 bytes per key:

* the keys themselves, exactly, as Arrow string arrays (the bytes plus a 4-byte offset);
* a sorted ``uint64`` array of their hashes with a parallel array of positions, merged from a
  small dict of recent hashes every ``merge_every`` keys.

A hash match is only a candidate: the stored key at that position is compared with the new one,
so two different keys that share a hash are both kept (no row is ever dropped by a collision).
"""

from __future__ import annotations

import bisect
from typing import Iterable

import numpy as np
import pyarrow as pa

_MASK = (1 << 64) - 1


def _h(key: str) -> int:
    # str hashes are salted per process, which is fine: a SeenKeys never leaves its process
    return hash(key) & _MASK


class SeenKeys:
    def __init__(self, merge_every: int = 65_536):
        self.merge_every = merge_every
        self._hashes = np.empty(0, dtype=np.uint64)  # sorted
        self._pos = np.empty(0, dtype=np.int64)      # global position of the key behind each hash
        self._recent: dict[int, list[int]] = {}       # hash -> positions, not merged yet
        self._chunks: list[pa.Array] = []             # the keys, in arrival order
        self._starts: list[int] = []                  # global position of each chunk's first key
        self._tail: list[str] = []                    # keys not yet packed into a chunk
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __contains__(self, key: str) -> bool:
        return self._find(key, _h(key))

    def add_new(self, keys: Iterable[str]) -> list[bool]:
        """Adds the keys; True for each key not seen before (including earlier in ``keys``)."""
        keys = list(keys)
        hs = [_h(k) for k in keys]
        maybe = self._maybe_merged(hs)
        out = []
        for k, h, m in zip(keys, hs, maybe):
            if (m or h in self._recent) and self._find(k, h):
                out.append(False)
                continue
            self._recent.setdefault(h, []).append(self._n)
            self._tail.append(k)
            self._n += 1
            out.append(True)
        self._pack()
        if sum(len(v) for v in self._recent.values()) >= self.merge_every:
            self._merge()
        return out

    # ---- internals -------------------------------------------------------------------------------
    def _maybe_merged(self, hs: list[int]) -> list[bool]:
        if not len(self._hashes) or not hs:
            return [False] * len(hs)
        arr = np.fromiter(hs, dtype=np.uint64, count=len(hs))
        idx = np.searchsorted(self._hashes, arr)
        ok = idx < len(self._hashes)
        hit = np.zeros(len(hs), dtype=bool)
        hit[ok] = self._hashes[idx[ok]] == arr[ok]
        return hit.tolist()

    def _find(self, key: str, h: int) -> bool:
        for p in self._recent.get(h, ()):
            if self._key_at(p) == key:
                return True
        if len(self._hashes):
            h64 = np.uint64(h)
            i = int(np.searchsorted(self._hashes, h64))
            while i < len(self._hashes) and self._hashes[i] == h64:
                if self._key_at(int(self._pos[i])) == key:
                    return True
                i += 1
        return False

    def _key_at(self, pos: int) -> str:
        packed = self._starts[-1] + len(self._chunks[-1]) if self._chunks else 0
        if pos >= packed:
            return self._tail[pos - packed]
        c = bisect.bisect_right(self._starts, pos) - 1
        return self._chunks[c][pos - self._starts[c]].as_py()

    def _pack(self) -> None:
        if self._tail:
            start = self._starts[-1] + len(self._chunks[-1]) if self._chunks else 0
            self._chunks.append(pa.array(self._tail, pa.string()))
            self._starts.append(start)
            self._tail = []
            if len(self._chunks) > 64:  # fewer, larger chunks keep lookups and overhead small
                self._chunks = [pa.concat_arrays(self._chunks)]
                self._starts = [0]

    def _merge(self) -> None:
        hs = np.fromiter((h for h, ps in self._recent.items() for _ in ps), dtype=np.uint64)
        ps = np.fromiter((p for _, ps_ in self._recent.items() for p in ps_), dtype=np.int64)
        all_h = np.concatenate([self._hashes, hs])
        all_p = np.concatenate([self._pos, ps])
        order = np.argsort(all_h, kind="stable")
        self._hashes, self._pos = all_h[order], all_p[order]
        self._recent = {}


__all__ = ["SeenKeys"]
