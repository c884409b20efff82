"""How evolution changes a set of instructions: cheap lexical measures per evolve round and per
optimization step (``measures.json``; plotted beside the failure rate in ``report.html``).

For one set of instructions (:class:`SetMeasures`, fed one instruction at a time):

* ``rows`` and ``mean_words`` / ``mean_chars``: over every row (exact, streaming);
* ``grew``: the share of rows whose instruction has more words than the one it was evolved from
  (rows with a known predecessor only; None for the seeds);
* ``distinct_1`` / ``distinct_2``: distinct word unigrams (bigrams) / all unigrams (bigrams) of the
  lower-cased instructions, on a seeded sample of at most ``sample_rows`` rows (10,000), so sets of
  1,000,000 rows cost no more than 10,000 and rounds compare at the same size;
* ``self_similarity``: the mean pairwise Jaccard similarity of the instructions' word 3-shingle sets
  (1- and 2-word instructions count as one shingle), estimated with MinHash signatures
  (``minhash_perm`` = 64 permutations) on a seeded sample of at most ``minhash_rows`` (2,000) rows.
  The mean over all pairs is counted without comparing pairs: for each permutation, the pairs that
  share its minimum are ``sum C(c, 2)`` over the counts ``c`` of each minimum value, so a sample of
  ``S`` costs ``S x perm`` hash updates, not ``S^2``. 0 = no shared shingles, 1 = identical sets.

Plain Python: ``random.Random(seed)`` reservoirs, ``hashlib.blake2b`` for stable shingle hashes and
``(a * h + b) mod (2^61 - 1)`` permutations. The optional LLM-based InsTag measure (tags per
instruction) is not implemented.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

from .io import write_text_atomic

_P = (1 << 61) - 1
DEFAULT_SAMPLE_ROWS = 10_000
DEFAULT_MINHASH_ROWS = 2_000
DEFAULT_PERM = 64


def words(text: str | None) -> list[str]:
    return (text or "").lower().split()


class _Reservoir:
    def __init__(self, k: int, seed: int):
        self.k = k
        self.rng = random.Random(seed)
        self.items: list[str] = []
        self.seen = 0

    def add(self, item: str) -> None:
        self.seen += 1
        if len(self.items) < self.k:
            self.items.append(item)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.k:
                self.items[j] = item


def distinct_n(texts: Iterable[str], n: int) -> float | None:
    """Distinct n-grams / all n-grams of the texts' lower-cased words; None when there are none."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for t in texts:
        w = words(t)
        for i in range(len(w) - n + 1):
            seen.add(tuple(w[i:i + n]))
            total += 1
    return len(seen) / total if total else None


def shingles(text: str, k: int = 3) -> set[str]:
    w = words(text)
    if not w:
        return set()
    if len(w) < k:
        return {" ".join(w)}
    return {" ".join(w[i:i + k]) for i in range(len(w) - k + 1)}


def _perms(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randrange(1, _P), rng.randrange(0, _P)) for _ in range(n)]


def minhash(sh: set[str], perms: Sequence[tuple[int, int]]) -> tuple[int, ...] | None:
    if not sh:
        return None
    hs = [int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little") for s in sh]
    return tuple(min((a * h + b) % _P for h in hs) for a, b in perms)


def mean_pairwise_jaccard(signatures: Sequence[Sequence[int]]) -> float | None:
    """The MinHash estimate of the mean Jaccard similarity over all pairs (see the module docstring)."""
    s = len(signatures)
    if s < 2:
        return None
    perm = len(signatures[0])
    pairs = s * (s - 1) // 2
    matching = 0
    for k in range(perm):
        counts: dict[int, int] = {}
        for sig in signatures:
            counts[sig[k]] = counts.get(sig[k], 0) + 1
        matching += sum(c * (c - 1) // 2 for c in counts.values())
    return matching / (pairs * perm)


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class SetMeasures:
    """The measures of one set of instructions (see the module docstring)."""

    def __init__(self, seed: int = 0, sample_rows: int = DEFAULT_SAMPLE_ROWS, minhash_rows: int = DEFAULT_MINHASH_ROWS,
                 perm: int = DEFAULT_PERM):
        self.rows = 0
        self.words = 0
        self.chars = 0
        self.compared = 0
        self.grown = 0
        self.perm = perm
        self.seed = seed
        self._distinct = _Reservoir(sample_rows, seed)
        self._minhash = _Reservoir(minhash_rows, seed + 1)

    def add(self, instruction: str | None, previous: str | None = None, previous_words: int | None = None) -> None:
        """One instruction; ``previous`` (or its word count ``previous_words``) is what it was evolved from."""
        text = instruction or ""
        n = len(text.split())
        self.rows += 1
        self.words += n
        self.chars += len(text)
        if previous is not None:
            previous_words = len(previous.split())
        if previous_words is not None:
            self.compared += 1
            self.grown += n > previous_words
        self._distinct.add(text)
        self._minhash.add(text)

    def to_dict(self) -> dict[str, Any]:
        perms = _perms(self.perm, self.seed)
        sigs = [s for s in (minhash(shingles(t), perms) for t in self._minhash.items) if s is not None]
        return {
            "rows": self.rows,
            "mean_words": self.words / self.rows if self.rows else None,
            "mean_chars": self.chars / self.rows if self.rows else None,
            "grew": self.grown / self.compared if self.compared else None,
            "distinct_1": distinct_n(self._distinct.items, 1),
            "distinct_2": distinct_n(self._distinct.items, 2),
            "self_similarity": mean_pairwise_jaccard(sigs),
            "sample_rows": len(self._distinct.items),
            "minhash_rows": len(sigs),
        }


def measure(instructions: Iterable[str], previous: Iterable[str | None] | None = None, **kw) -> dict[str, Any]:
    """:class:`SetMeasures` of a list (``previous``: each instruction's predecessor, or None)."""
    m = SetMeasures(**kw)
    prev = iter(previous) if previous is not None else None
    for t in instructions:
        m.add(t, next(prev) if prev is not None else None)
    return m.to_dict()


# ---- evolve: per round ----------------------------------------------------------------------------

class _SeedWords:
    """Seed id -> word count, held as two sorted numpy arrays (a 64-bit hash of the id and an int32):
    12 bytes a seed, so a million seeds cost 12 MB rather than a dict of strings."""

    def __init__(self) -> None:
        self._keys: list[int] = []
        self._words: list[int] = []
        self.keys = self.words = None

    def add(self, id_: str, n: int) -> None:
        self._keys.append(_key(id_))
        self._words.append(n)

    def freeze(self) -> None:
        import numpy as np

        keys = np.array(self._keys, dtype=np.uint64)
        words = np.array(self._words, dtype=np.int32)
        self._keys, self._words = [], []
        order = np.argsort(keys, kind="stable")
        self.keys, self.words = keys[order], words[order]

    def lookup(self, ids: Sequence[str | None]) -> list[int | None]:
        import numpy as np

        if self.keys is None or not len(self.keys):
            return [None] * len(ids)
        q = np.array([_key(i) if i else 0 for i in ids], dtype=np.uint64)
        pos = np.searchsorted(self.keys, q).clip(0, len(self.keys) - 1)
        hit = (self.keys[pos] == q)
        return [int(self.words[p]) if h and i else None for p, h, i in zip(pos.tolist(), hit.tolist(), ids)]


def _key(id_: str) -> int:
    return int.from_bytes(hashlib.blake2b(id_.encode("utf-8"), digest_size=8).digest(), "little")


def evolve_round_measures(seed_rows: Iterable[Sequence[dict]], evolved_rows: Iterable[Sequence[dict]],
                          seed: int = 0) -> list[dict[str, Any]]:
    """Per round of an evolve stage: round 0 = the seeds (every input row), round r = the
    instructions after round r of the evolved rows (``meta.trajectory[r - 1]``), grown against
    round r - 1 (round 1 against the row's seed, found by ``parent_id``).

    ``seed_rows`` and ``evolved_rows`` are iterables of row batches (a table read a batch at a
    time); only the seeds' word counts are held (:class:`_SeedWords`)."""
    base = SetMeasures(seed=seed)
    seeds = _SeedWords()
    for batch in seed_rows:
        for r in batch:
            text = r.get("instruction") or ""
            base.add(text)
            seeds.add(r["id"], len(text.split()))
    seeds.freeze()
    rounds: list[SetMeasures] = []
    for batch in evolved_rows:
        first = seeds.lookup([r.get("parent_id") for r in batch])
        for r, prev_words in zip(batch, first):
            prev = None
            for i, text in enumerate(_trajectory(r)):
                while len(rounds) <= i:
                    rounds.append(SetMeasures(seed=seed))
                rounds[i].add(text, prev, previous_words=prev_words if prev is None else None)
                prev = text
    out = [{"round": 0, **base.to_dict()}]
    out += [{"round": i + 1, **m.to_dict()} for i, m in enumerate(rounds)]
    return out


def _trajectory(row: dict) -> list[str]:
    meta = row.get("meta")
    try:
        m = json.loads(meta) if isinstance(meta, str) and meta else (meta or {})
    except ValueError:
        m = {}
    traj = m.get("trajectory") if isinstance(m, dict) else None
    if isinstance(traj, list) and traj:
        return [str(t) for t in traj]
    return [row.get("instruction") or ""]


def write_evolve_measures(input_path: Path, evolved_path: Path | None, outdir: Path, seed: int = 0) -> Path:
    """measures.json of an evolve stage, streaming the input and evolved tables."""
    from .export import iter_batches

    def seeds():
        yield from iter_batches(input_path, 8192)

    def evolved():
        if evolved_path is not None and evolved_path.exists():
            yield from iter_batches(evolved_path, 8192)

    rounds = evolve_round_measures(seeds(), evolved(), seed=seed)
    p = outdir / "measures.json"
    write_text_atomic(p, json.dumps({"rounds": rounds}, indent=2) + "\n")
    return p


# ---- optimize: per step ---------------------------------------------------------------------------

def trajectory_measures(trajectories: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """One optimization step: the instructions its trajectories evolved (every round that gave
    one), each grown against the instruction it was evolved from."""
    m = SetMeasures(seed=seed)
    for tr in trajectories:
        for s in tr.get("steps") or []:
            if s.get("evolved") is not None:
                m.add(s["evolved"], s.get("instruction"))
    return m.to_dict()


MEASURE_KEYS = ("mean_words", "distinct_1", "distinct_2", "self_similarity", "grew")


__all__ = ["MEASURE_KEYS", "SetMeasures", "distinct_n", "evolve_round_measures", "jaccard", "mean_pairwise_jaccard",
           "measure", "minhash", "shingles", "trajectory_measures", "write_evolve_measures"]
