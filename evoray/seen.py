"""Exactly-once bookkeeping for the driver: which input rows have already landed.

A retried Ray task may hand the driver a batch it has already written, so the driver drops every
row whose input position it has seen. Pool workers carry each input row's position in its file
(:data:`evoray.raydata.POS`) to their output, so one bit per input row is enough: 125 KB for a
million rows, where a ``set`` of their string ids took about 100 MB. Positions, not ids, also keep
two input rows that happen to share an id as two rows.
"""

from __future__ import annotations

from typing import Iterable


class SeenRows:
    def __init__(self, n_rows: int):
        self.n_rows = n_rows
        self._bits = bytearray((n_rows + 7) // 8)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add_new(self, positions: Iterable[int | None]) -> list[bool]:
        """Marks the positions; True for each one not seen before (including earlier in the call)."""
        out = []
        bits = self._bits
        for p in positions:
            if p is None or not 0 <= p < self.n_rows:
                raise ValueError(f"row position {p!r} is outside the input's {self.n_rows} rows")
            byte, mask = p >> 3, 1 << (p & 7)
            if bits[byte] & mask:
                out.append(False)
            else:
                bits[byte] |= mask
                self._count += 1
                out.append(True)
        return out


__all__ = ["SeenRows"]
