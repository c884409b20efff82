"""The cost ledger: requests, retries, 429s, cache hits, tokens and dollars per provider.

Each process that calls providers keeps a :class:`Ledger`; deltas are merged into the job's
ledger (held by the gate, see :mod:`evoray.gate`) and written as ``ledger.json`` with every job.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import Price
from .files import write_text_atomic


@dataclass
class ProviderTally:
    requests: int = 0  # HTTP calls sent (attempts), cache hits excluded
    succeeded: int = 0
    retries: int = 0
    rate_limited: int = 0  # 429s received
    errors: int = 0  # failed attempts (429s included)
    cache_hits: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    dollars: float = 0.0
    model: str = ""
    batch_requests: int = 0  # lines answered through a provider's batch API (priced at its batch rate)
    unhonoured_sampling: int = 0  # answered without a sampling setting the request asked for (Anthropic top_p)

    def minus(self, other: "ProviderTally") -> "ProviderTally":
        """``self - other`` field by field (the model kept): what a cumulative tally added since ``other``."""
        out = ProviderTally(model=self.model or other.model)
        for k, v in asdict(self).items():
            if k != "model":
                setattr(out, k, v - getattr(other, k))
        return out

    def add(self, other: "ProviderTally") -> None:
        for k, v in asdict(other).items():
            if k == "model":
                self.model = self.model or v
            else:
                setattr(self, k, getattr(self, k) + v)


class Ledger:
    def __init__(self, prices: dict[str, Price] | None = None):
        self.prices = prices or {}
        self.by_provider: dict[str, ProviderTally] = {}

    def _t(self, provider: str, model: str = "") -> ProviderTally:
        t = self.by_provider.get(provider)
        if t is None:
            t = self.by_provider[provider] = ProviderTally(model=model)
        return t

    def cost(self, provider: str, input_tokens: int, output_tokens: int, batch: bool = False) -> float:
        """Dollars of one request; ``batch``: at the provider's batch rate (``Price.batch_rates``)."""
        p = self.prices.get(provider)
        if p is None:
            return 0.0
        pin, pout = p.batch_rates() if batch else (p.input_per_mtok, p.output_per_mtok)
        return (input_tokens * pin + output_tokens * pout) / 1e6

    def success(self, provider: str, model: str, input_tokens: int, output_tokens: int, retry: bool,
                batch: bool = False, unhonoured: bool = False) -> None:
        t = self._t(provider, model)
        t.unhonoured_sampling += int(unhonoured)
        t.requests += 1
        t.succeeded += 1
        t.retries += int(retry)
        t.batch_requests += int(batch)
        t.input_tokens += input_tokens
        t.output_tokens += output_tokens
        t.dollars += self.cost(provider, input_tokens, output_tokens, batch)

    def failure(self, provider: str, model: str, status: int | None, retry: bool) -> None:
        t = self._t(provider, model)
        t.requests += 1
        t.errors += 1
        t.retries += int(retry)
        if status == 429:
            t.rate_limited += 1

    def cache_hit(self, provider: str, model: str) -> None:
        self._t(provider, model).cache_hits += 1

    # ---- merging -------------------------------------------------------------------------------
    def take_delta(self) -> dict[str, dict[str, Any]]:
        """Return the tallies so far and reset them (to ship to the job's ledger)."""
        d = {k: asdict(v) for k, v in self.by_provider.items()}
        self.by_provider = {}
        return d

    @staticmethod
    def difference(total: dict[str, dict[str, Any]], before: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
        """The delta that takes the tallies ``before`` to ``total`` (both ``take_delta``-shaped dicts)."""
        before = before or {}
        out = {}
        for name, vals in total.items():
            t = ProviderTally(**vals)
            if name in before:
                t = t.minus(ProviderTally(**before[name]))
            out[name] = asdict(t)
        return out

    def merge(self, delta: dict[str, dict[str, Any]]) -> None:
        for name, vals in delta.items():
            self._t(name, vals.get("model", "")).add(ProviderTally(**vals))

    @property
    def dollars(self) -> float:
        return sum(t.dollars for t in self.by_provider.values())

    def totals(self) -> ProviderTally:
        tot = ProviderTally(model="")
        for t in self.by_provider.values():
            tot.add(t)
        tot.model = ""
        return tot

    def to_dict(self) -> dict[str, Any]:
        tot = asdict(self.totals())
        tot.pop("model")
        return {"providers": {k: asdict(v) for k, v in sorted(self.by_provider.items())}, "total": tot}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Ledger":
        led = cls()
        led.merge(d.get("providers", {}))
        return led

    def write(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def summary_lines(self) -> list[str]:
        lines = []
        for name, t in sorted(self.by_provider.items()):
            lines.append(
                f"  {name:<12} {t.model[:28]:<28} requests {t.requests:>7}  cache hits {t.cache_hits:>7}  "
                f"retries {t.retries:>5}  429s {t.rate_limited:>5}  tokens {t.input_tokens:>9}+{t.output_tokens:<9} ${t.dollars:.4f}"
                + (f"  ({t.batch_requests} batched)" if t.batch_requests else "")
                + (f"  ({t.unhonoured_sampling} without a requested sampling setting, e.g. top_p)"
                   if t.unhonoured_sampling else "")
            )
        return lines
