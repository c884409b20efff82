"""``evoray export``: a stage's output table to the formats fine-tuning tools read.

Formats (one row in, at most one record out):

* ``alpaca``: a JSON array of ``{"instruction", "input", "output"}``.
* ``sharegpt``: a JSON array of ``{"id", "conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}``
  (the human turn is the instruction, then a blank line and the input when there is one).
* ``openai``: OpenAI fine-tuning chat JSONL, one ``{"messages": [...]}`` a line (an optional system
  message first).
* ``hf``: a Hugging Face dataset folder (``datasets``' ``save_to_disk``; read it back with
  ``load_from_disk``) with the text columns and the lineage columns, and a dataset card
  (``README.md``) recording the selection: threshold or budget, rater, method ids, counts.

The table is read one row group (Parquet) or line block (JSONL) at a time and records are written
as they come, so memory stays flat in the number of rows for the JSON formats; the ``hf`` format
goes through ``datasets``' own Arrow cache, which is memory-mapped.

Every input row becomes exactly one output record or one named skip: ``no_response`` (an empty
``output``; ``keep_empty`` exports them anyway) and ``not_kept`` (a row whose status is failed or
rejected, when such a table is exported by name). :class:`ExportSummary` counts them and
:func:`export` checks that they add up.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from .errors import UsageError
from .io import atomic_path

FORMATS = ("alpaca", "sharegpt", "openai", "hf")
#: tables looked for in a stage folder, in this order, when none is named
STAGE_TABLES = ("kept", "answered", "evolved")
#: columns carried into the ``hf`` dataset besides instruction/input/output, when the table has them
LINEAGE = ("id", "parent_id", "round", "method_id", "source", "score", "provider", "model")
_DROP_STATUS = ("failed", "rejected")
_EXT = {"alpaca": ".json", "sharegpt": ".json", "openai": ".jsonl"}


@dataclass
class ExportSummary:
    source: str
    out: str
    fmt: str
    rows_in: int = 0
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def line(self) -> str:
        skips = ", ".join(f"{n} {k}" for k, n in sorted(self.skipped.items()) if n)
        return (f"exported {self.written} of {self.rows_in} row(s) as {self.fmt} -> {self.out}"
                + (f"; skipped {skips}" if skips else ""))


# ---- reading ---------------------------------------------------------------------------------------

def resolve_table(src: str | os.PathLike, table: str | None = None) -> Path:
    """The table file to export: ``src`` itself, or ``src/TABLE.parquet|jsonl`` in a stage folder
    (the first of :data:`STAGE_TABLES` that exists when ``table`` is None)."""
    from .sinks import find_table

    p = Path(src)
    if p.is_file():
        return p
    if not p.is_dir():
        raise UsageError(f"export: {p} is neither a table file nor a stage folder")
    names = [table] if table else list(STAGE_TABLES)
    for name in names:
        found = find_table(p, name)
        if found is not None:
            return found
    have = sorted(x.name for x in p.iterdir() if x.suffix in (".parquet", ".jsonl") and not x.name.startswith("."))
    raise UsageError(f"export: no {' / '.join(n + '.parquet|jsonl' for n in names)} in {p} "
                     f"(tables there: {', '.join(have) or 'none'}); name one with --table")


def iter_batches(path: Path, batch_rows: int = 8192) -> Iterator[list[dict]]:
    """Row dicts in blocks of at most ``batch_rows``, never the whole table."""
    if path.suffix == ".jsonl":
        block: list[dict] = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    block.append(json.loads(line))
                    if len(block) >= batch_rows:
                        yield block
                        block = []
        if block:
            yield block
        return
    from .io import parquet_stream

    for b in parquet_stream(path).iter_batches(batch_size=batch_rows):
        yield b.to_pylist()


# ---- records ---------------------------------------------------------------------------------------

def _prompt(row: dict) -> str:
    ins, inp = row.get("instruction") or "", row.get("input") or ""
    return f"{ins}\n\n{inp}" if inp else ins


def to_alpaca(row: dict) -> dict:
    return {"instruction": row.get("instruction") or "", "input": row.get("input") or "",
            "output": row.get("output") or ""}


def to_sharegpt(row: dict) -> dict:
    return {"id": row.get("id"), "conversations": [{"from": "human", "value": _prompt(row)},
                                                   {"from": "gpt", "value": row.get("output") or ""}]}


def to_openai(row: dict, system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += [{"role": "user", "content": _prompt(row)}, {"role": "assistant", "content": row.get("output") or ""}]
    return {"messages": msgs}


def skip_reason(row: dict, keep_empty: bool = False) -> str | None:
    """Why a row is not exported, or None."""
    if row.get("status") in _DROP_STATUS:
        return "not_kept"
    if not keep_empty and not (row.get("output") or "").strip():
        return "no_response"
    return None


# ---- selection (for the dataset card) ----------------------------------------------------------------

def stage_selection(table_path: Path) -> dict[str, Any]:
    """What the stage folder says about how the rows were chosen: scores.json (threshold, budget,
    dimension, counts), _SUCCESS.json's counts, method.txt's presence."""
    d = table_path.parent
    sel: dict[str, Any] = {"table": table_path.stem, "stage_folder": str(d)}
    scores = d / "scores.json"
    if scores.exists():
        s = json.loads(scores.read_text())
        for k in ("threshold", "threshold_chosen", "target_rows", "target_fraction", "top_k", "dimension",
                  "kept", "rejected", "failed", "input"):
            if k in s and s[k] is not None:
                sel[k] = s[k]
        ens = s.get("ensemble")
        if isinstance(ens, dict):
            sel["ensemble_rule"] = ens.get("rule")
            sel["raters"] = ens.get("raters")
            sel["fleiss_kappa"] = ens.get("fleiss_kappa")
            sel["spearman_mean"] = ens.get("spearman_mean")
    marker = d / "_SUCCESS.json"
    if marker.exists():
        sel["stage_counts"] = {k: v for k, v in json.loads(marker.read_text()).get("counts", {}).items()
                               if isinstance(v, (int, float))}
    return sel


class _Observer:
    """Cheap facts gathered while streaming: who rated/answered, which methods, which lineage columns."""

    def __init__(self) -> None:
        self.models: Counter = Counter()
        self.methods: Counter = Counter()
        self.rounds: Counter = Counter()
        self.lineage: set[str] = set()

    def see(self, row: dict) -> None:
        if row.get("provider") or row.get("model"):
            self.models[f"{row.get('provider') or '?'}/{row.get('model') or '?'}"] += 1
        if row.get("method_id"):
            self.methods[row["method_id"]] += 1
        if row.get("round") is not None:
            self.rounds[str(row["round"])] += 1
        for c in ("parent_id", "round", "method_id"):
            if row.get(c) is not None:
                self.lineage.add(c)

    def to_dict(self) -> dict[str, Any]:
        return {"models": dict(self.models.most_common(20)), "method_ids": dict(self.methods.most_common(20)),
                "rounds": dict(sorted(self.rounds.items())), "lineage_columns": sorted(self.lineage)}


def dataset_card(summary: ExportSummary) -> str:
    sel = summary.selection
    lines = ["---", "tags:", "- evoray", "- instruction-tuning", "---", "",
             f"# {Path(summary.out).name}", "",
             f"Exported by `evoray export` from `{summary.source}`: {summary.written} of {summary.rows_in} row(s).", "",
             "## Selection", ""]
    if "top_k" in sel and sel.get("top_k") is not None:
        lines.append(f"- budget: the best {sel['top_k']} row(s) by score")
    thr = sel.get("threshold_chosen", sel.get("threshold")) if sel.get("top_k") is None else None
    if thr is not None:
        how = " (chosen automatically for " + (f"target_rows {sel['target_rows']}" if sel.get("target_rows") is not None
                                                else f"target_fraction {sel.get('target_fraction')}") + ")" \
            if "threshold_chosen" in sel else ""
        lines.append(f"- threshold: score >= {thr}{how}")
    for k in ("dimension", "ensemble_rule", "raters", "fleiss_kappa", "spearman_mean"):
        if k in sel:
            lines.append(f"- {k}: {sel[k]}")
    for k in ("input", "kept", "rejected", "failed"):
        if k in sel:
            lines.append(f"- rows {k}: {sel[k]}")
    obs = sel.get("observed", {})
    if obs.get("models"):
        lines.append("- provider/model of the last stage (rater, answerer or evolver): "
                     + ", ".join(f"`{m}` ({n})" for m, n in obs["models"].items()))
    if obs.get("method_ids"):
        lines.append("- evolving method ids: " + ", ".join(f"`{m}` ({n})" for m, n in obs["method_ids"].items()))
    if obs.get("rounds"):
        lines.append("- evolution rounds: " + ", ".join(f"{r}: {n}" for r, n in obs["rounds"].items()))
    lines.append("- lineage columns: " + (", ".join(f"`{c}`" for c in obs.get("lineage_columns", [])) or "none"))
    lines += ["", "## Counts", "", f"- rows in the table: {summary.rows_in}", f"- rows exported: {summary.written}"]
    lines += [f"- skipped ({k}): {n}" for k, n in sorted(summary.skipped.items())]
    lines += ["", "## Selection record", "", "```json", json.dumps(sel, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


# ---- writing ---------------------------------------------------------------------------------------

def _hf_features(datasets, columns: list[str]):
    types = {"round": datasets.Value("int32"), "score": datasets.Value("float64")}
    return datasets.Features({c: types.get(c, datasets.Value("string")) for c in columns})


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise UsageError("export --format hf needs the `datasets` package: pip install 'evoray[hf]' "
                         "(or pip install datasets)") from None
    return datasets


def export(src: str | os.PathLike, out: str | os.PathLike, fmt: str, table: str | None = None,
           system: str | None = None, keep_empty: bool = False, batch_rows: int = 8192,
           progress: bool = False) -> ExportSummary:
    """Export one table (see the module docstring); returns the counts. ``progress``: let
    ``datasets`` draw its progress bars (format ``hf``; off unless ``--verbose``)."""
    if fmt not in FORMATS:
        raise UsageError(f"export: unknown format '{fmt}' (known: {', '.join(FORMATS)})")
    path = resolve_table(src, table)
    out = Path(out)
    summary = ExportSummary(source=str(path), out=str(out), fmt=fmt)
    skipped: Counter = Counter()
    obs = _Observer()

    def records() -> Iterator[dict]:
        for block in iter_batches(path, batch_rows):
            for row in block:
                summary.rows_in += 1
                why = skip_reason(row, keep_empty)
                if why is not None:
                    skipped[why] += 1
                    continue
                obs.see(row)
                summary.written += 1
                yield row

    if fmt == "hf":
        _export_hf(path, out, records, summary, skipped, obs, progress)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
            if fmt == "openai":
                for row in records():
                    f.write(json.dumps(to_openai(row, system), ensure_ascii=False) + "\n")
            else:
                conv = to_alpaca if fmt == "alpaca" else to_sharegpt
                f.write("[")
                first = True
                for row in records():
                    f.write(("\n" if first else ",\n") + json.dumps(conv(row), ensure_ascii=False))
                    first = False
                f.write("\n]\n")
        summary.skipped = dict(skipped)
        summary.selection = {**stage_selection(path), "observed": obs.to_dict()}
    if summary.written + sum(summary.skipped.values()) != summary.rows_in:  # pragma: no cover - a bug, not input
        raise RuntimeError(f"export: {summary.rows_in} rows in but {summary.written} written and "
                           f"{summary.skipped} skipped")
    return summary


def _export_hf(path: Path, out: Path, records, summary: ExportSummary, skipped: Counter, obs: _Observer,
               progress: bool = False) -> None:
    datasets = _import_datasets()
    was_off = datasets.are_progress_bars_disabled() if hasattr(datasets, "are_progress_bars_disabled") else True
    if not progress:
        datasets.disable_progress_bars()
    try:
        _write_hf(datasets, path, out, records, summary, skipped, obs)
    finally:
        if not progress and not was_off:
            datasets.enable_progress_bars()


def _write_hf(datasets, path: Path, out: Path, records, summary: ExportSummary, skipped: Counter,
              obs: _Observer) -> None:
    import tempfile

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        have = set(pq.read_schema(path).names)
    else:
        first = next(iter_batches(path, 1), [{}])
        have = set(first[0]) if first else set()
    columns = ["instruction", "input", "output"] + [c for c in LINEAGE if c in have]

    def gen():
        for row in records():
            yield {c: row.get(c) if c not in ("input", "output") else (row.get(c) or "") for c in columns}

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, directory=True) as tmp:
        with tempfile.TemporaryDirectory(prefix="evoray-export-") as cache:
            ds = datasets.Dataset.from_generator(gen, features=_hf_features(datasets, columns), cache_dir=cache)
            summary.skipped = dict(skipped)
            summary.selection = {**stage_selection(path), "observed": obs.to_dict()}
            ds.save_to_disk(str(tmp))
            del ds
        summary_rows = summary.to_dict()
        (tmp / "README.md").write_text(dataset_card(summary))
        (tmp / "evoray_export.json").write_text(json.dumps(summary_rows, indent=2, default=str) + "\n")


def default_out(src: str | os.PathLike, fmt: str, table: str | None = None) -> Path:
    """``STAGE/export/TABLE.alpaca.json`` and so on, or ``STAGE/export/TABLE.hf/`` for ``hf``."""
    path = resolve_table(src, table)
    name = f"{path.stem}.{fmt}" + _EXT.get(fmt, "")
    return path.parent / "export" / name


__all__ = ["FORMATS", "ExportSummary", "dataset_card", "default_out", "export", "resolve_table", "skip_reason",
           "to_alpaca", "to_openai", "to_sharegpt"]
