"""``evoray report OUTDIR``: one self-contained ``OUTDIR/report.html``.

The report reads what the stages wrote (see INTERFACE.md, "Outputs") and needs nothing else: no
config, no Ray, no network. It works on the folder of ``evoray run`` (one sub-folder per stage:
``optimize/``, ``evolve/``, ``answer/``, ``rate/``, ``judge/``, plus the job's ``ledger.json``) and
on the folder of a single stage command (the stage is recognised by its files).

The file is self-contained: CSS is inline, the charts are PNGs inlined as
``data:image/png;base64`` URIs, there are no scripts and no links to anything outside. A chart
whose PNG is missing is drawn again from the JSON beside it with :mod:`evoray.plots` (into a
temporary folder; the outputs are not touched).

Sections (each a ``<section id=...>`` with a heading): ``summary``, ``scores``, ``optimization``,
``evolution``, ``judge`` and ``ledger``. A stage that did not run gives a section that says so;
a file that cannot be read gives a section that says why - the report is still written. Every
text that comes from data (rows, methods, feedback, error messages) is HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .io import write_text_atomic

REPORT_NAME = "report.html"
EXAMPLES = 3  # rows shown per example table
TEXT_CHARS = 500  # longer texts are cut in examples

# The stages, their marker files (the files that show a folder holds a stage's outputs), their tables
# and their report sections come from the stage registry (evoray.stage): one object per stage.

def _stage(name: str):
    from .stage import STAGES, load_builtin

    load_builtin()
    return STAGES.get(name)


def stage_order() -> tuple[str, ...]:
    """The registered stages in pipeline order (ingest, optimize, evolve, answer, rate, judge, ...)."""
    from .stage import stage_names

    return stage_names()


def _stage_markers(stage: str) -> tuple[str, ...]:
    return tuple(getattr(_stage(stage), "markers", ()))


def _stage_tables(stage: str) -> tuple[str, ...]:
    return tuple(getattr(_stage(stage), "tables", ()))


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:70rem;padding:0 1rem;color:#222;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
.muted{color:#777}.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.5rem .8rem}
.notrun{color:#777;font-style:italic}
table{border-collapse:collapse;margin:.6rem 0 1rem;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:.6rem;white-space:pre-wrap;word-break:break-word;font-size:.85rem;max-height:30rem;overflow:auto}
td pre{max-height:12rem;margin:0;padding:.3rem}
img{max-width:100%;height:auto;border:1px solid #eee}
nav a{margin-right:1rem}
.pair{display:flex;flex-wrap:wrap;gap:.6rem;align-items:flex-start}.pair img{max-width:49%}
"""


# ---- small html helpers ------------------------------------------------------------------------------

def esc(value: Any) -> str:
    """HTML-escaped text of any value (None -> empty)."""
    return html.escape("" if value is None else str(value), quote=True)


def _cut(text: Any, n: int = TEXT_CHARS) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= n else s[:n] + f" [... {len(s) - n:,} more characters]"


def _num(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.4f}".rstrip("0").rstrip(".") if abs(v) < 1e6 else f"{v:,.0f}"
    return str(v)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    """An HTML table; cells are escaped unless given as :class:`_Raw`."""
    out = ["<table><thead><tr>", *(f"<th>{esc(h)}</th>" for h in header), "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>")
        for i, cell in enumerate(r):
            cls = ' class="num"' if i in numeric else ""
            content = cell.html if isinstance(cell, _Raw) else esc(_num(cell) if i in numeric else cell)
            out.append(f"<td{cls}>{content}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


class _Raw:
    """Markup built here (already escaped) to put in a table cell."""

    def __init__(self, html_text: str):
        self.html = html_text


def _pre(text: Any, n: int = TEXT_CHARS) -> _Raw:
    return _Raw(f"<pre>{esc(_cut(text, n))}</pre>")


def _img(png: Path, alt: str) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _not_run(what: str) -> str:
    return f'<p class="notrun">{esc(what)}</p>'


# ---- reading outputs ----------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _find_table(directory: Path, name: str) -> Path | None:
    for fmt in ("parquet", "jsonl"):
        p = directory / f"{name}.{fmt}"
        if p.is_file():
            return p
    return None


def _count_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _head(path: Path | None, n: int = EXAMPLES) -> list[dict[str, Any]]:
    """The first ``n`` rows of a table (read without loading the whole table)."""
    if path is None:
        return []
    if path.suffix == ".parquet":
        from .io import parquet_stream

        for batch in parquet_stream(path).iter_batches(batch_size=max(1, n)):  # reads the first batch only
            return batch.to_pylist()[:n]
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if len(rows) >= n:
                    break
    return rows


def _column(path: Path, name: str) -> list[Any]:
    """One column of a table (parquet reads only that column)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        f = pq.ParquetFile(path)
        if name not in f.schema_arrow.names:
            return []
        return f.read(columns=[name]).column(name).to_pylist()
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                out.append(json.loads(line).get(name))
    return out


def _looks_like(directory: Path, stage: str) -> bool:
    return any((directory / m).is_file() for m in _stage_markers(stage))


def find_stages(outdir: str | Path) -> dict[str, Path]:
    """Stage -> the folder holding its outputs: ``OUTDIR/<stage>/`` for a run, else OUTDIR itself
    when it holds that stage's files (a single-stage command)."""
    out = Path(outdir)
    found: dict[str, Path] = {}
    for stage in stage_order():
        sub = out / stage
        if sub.is_dir() and (_looks_like(sub, stage) or any(sub.iterdir())):
            found[stage] = sub
        elif _looks_like(out, stage):
            found[stage] = out
    return found


class _Ctx:
    """What the section builders share: the stage folders and a scratch folder for charts."""

    def __init__(self, outdir: Path, scratch: Path):
        self.outdir = outdir
        self.stages = find_stages(outdir)
        self.scratch = scratch

    def chart(self, stage_dir: Path, name: str, draw: Callable[[Path], Any]) -> Path:
        """``stage_dir/name`` when it exists, else drawn by ``draw(path)`` into the scratch folder."""
        p = stage_dir / name
        if p.is_file() and p.stat().st_size > 0:
            return p
        target = self.scratch / f"{stage_dir.name}-{name}"
        draw(target)
        return target


# ---- sections ---------------------------------------------------------------------------------------------

def _section_summary(ctx: _Ctx) -> str:
    parts = [f"<p>Output folder: <code>{esc(ctx.outdir.resolve())}</code></p>"]
    if not ctx.stages:
        parts.append(_not_run("No stage outputs were found in this folder (no stage has run here yet)."))
        return "".join(parts)
    rows = []
    for stage, d in ctx.stages.items():
        status = "finished" if (d / "_SUCCESS.json").is_file() else "no completion marker"
        stopped = d / "_STOPPED.json"
        if stopped.is_file():
            try:
                info = _read_json(stopped)
                status = f"stopped ({info.get('reason', 'unknown reason')})"
            except (OSError, ValueError):
                status = "stopped"
        counts = []
        for name in _stage_tables(stage):
            t = _find_table(d, name)
            if t is not None:
                counts.append(f"{name}: {_count_rows(t):,}")
        if stage == "optimize" and (d / "history.json").is_file():
            try:
                h = _read_json(d / "history.json")
                counts.append(f"steps: {h.get('steps_run', len(h.get('steps') or []))}")
            except (OSError, ValueError):
                pass
        rel = d.relative_to(ctx.outdir) if d != ctx.outdir else Path(".")
        rows.append((stage, str(rel), status, ", ".join(counts) or "-"))
    parts.append("<p>Stages found, in pipeline order, with the rows in each output table.</p>")
    parts.append(_table(("stage", "folder", "status", "rows"), rows))
    if any((d / "_STOPPED.json").is_file() for d in ctx.stages.values()):
        parts.append('<p class="warn">The job stopped at the budget cap; every finished row is kept. '
                     "Raise budget_usd and run again to resume.</p>")
    return "".join(parts)


def _example_rows(rows: list[dict[str, Any]], with_score: bool = True, reason: bool = False) -> str:
    header = ["id", "instruction", "output"]
    if with_score:
        header += ["score", "explanation"]
    if reason:
        header += ["reason"]
    body = []
    for r in rows:
        cells: list[Any] = [r.get("id"), _pre(_instruction_with_input(r)), _pre(r.get("output"))]
        if with_score:
            cells += [_num(r.get("score")), _pre(r.get("explanation"), 300)]
        if reason:
            cells += [_pre(r.get("reason") or r.get("rule"), 300)]
        body.append(cells)
    return _table(header, body)


def _instruction_with_input(r: Mapping[str, Any]) -> str:
    ins, inp = r.get("instruction") or "", r.get("input") or ""
    return f"{ins}\n\n[input]\n{inp}" if inp else ins


def _section_scores(ctx: _Ctx) -> str:
    d = ctx.stages.get("rate")
    if d is None:
        return _not_run("Rating (evoray rate) did not run: no scores.json or kept table was found.")
    parts = []
    scores = None
    if (d / "scores.json").is_file():
        scores = _read_json(d / "scores.json")
    counts = {}
    for name in ("kept", "rejected", "failed", "random_baseline"):
        t = _find_table(d, name)
        if scores is not None and isinstance(scores.get(name), int):
            counts[name] = scores[name]
        elif t is not None:
            counts[name] = _count_rows(t)
    if scores is not None:
        if scores.get("top_k"):
            mode = f"top {scores['top_k']} rows"
        elif "threshold_chosen" in scores:
            target = (f"{scores['target_rows']} rows" if scores.get("target_rows") is not None
                      else f"{scores.get('target_fraction')} of the scored rows")
            mode = f"score at least {scores['threshold_chosen']}, chosen for a target of {target}"
        else:
            mode = f"score at least {scores.get('threshold')}"
        parts.append(f"<p>Dimension: <b>{esc(scores.get('dimension', '?'))}</b>; kept: {esc(mode)}.</p>")
    parts.append(_table(("table", "rows"), [(k, v) for k, v in counts.items()], numeric=(1,)))
    buckets = (scores or {}).get("buckets")
    if buckets:
        from .plots import score_histogram

        png = ctx.chart(d, "score_histogram.png", lambda p: score_histogram(buckets, p))
        parts.append("<h3>Score histogram</h3>" + _img(png, "score histogram"))
        parts.append(_table(list(buckets.keys()), [list(buckets.values())], numeric=range(len(buckets))))
    else:
        parts.append(_not_run("No score buckets (scores.json missing): no histogram."))
    if (scores or {}).get("ensemble"):
        parts.append(_ensemble_html(scores["ensemble"]))
    for name, title, kwargs in (("kept", "Kept examples", {}), ("rejected", "Rejected examples", {}),
                                ("failed", "Failed examples", {"with_score": False, "reason": True})):
        rows = _head(_find_table(d, name))
        parts.append(f"<h3>{esc(title)}</h3>")
        parts.append(_example_rows(rows, **kwargs) if rows else _not_run(f"no {name} rows"))
    return "".join(parts)


def _ensemble_html(e: Mapping[str, Any]) -> str:
    """The rater ensemble: agreement, per-rater histograms and the rows the raters disagree on most."""
    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    raters = list(e.get("raters") or [])
    parts = [f"<h3>Rater ensemble</h3><p>{len(raters)} raters ({esc(', '.join(raters))}), rule "
             f"<b>{esc(e.get('rule', '?'))}</b>, {e.get('rows', 0)} row(s) rated by all: Fleiss' kappa on integer "
             f"buckets {f(e.get('fleiss_kappa'))}, mean pairwise Spearman {f(e.get('spearman_mean'))}.</p>"]
    hists = e.get("histograms") or {}
    if hists:
        keys = list(next(iter(hists.values())).keys())
        parts.append(_table(["rater", *keys, "mean"], [[r, *hists[r].values(), f((e.get("mean_scores") or {}).get(r))]
                                                       for r in raters if r in hists],
                            numeric=range(1, len(keys) + 2)))
    pairs = e.get("spearman_pairs") or {}
    if pairs:
        parts.append(_table(["pair", "Spearman"], [[k.replace("|", " / "), f(v)] for k, v in pairs.items()],
                            numeric=(1,)))
    dis = e.get("disagreements") or []
    parts.append("<h4>Rows the raters disagree on most</h4>")
    if dis:
        parts.append(_table(["id", "instruction", *raters, "spread"],
                            [[d.get("id"), _pre(d.get("instruction"), 300),
                              *[f((d.get("scores") or {}).get(r)) for r in raters], f(d.get("spread"))] for d in dis],
                            numeric=range(2, len(raters) + 3)))
    else:
        parts.append(_not_run("no row was scored by every rater"))
    return "".join(parts)


def _section_optimization(ctx: _Ctx) -> str:
    d = ctx.stages.get("optimize")
    if d is None:
        return _not_run("Optimization (evoray optimize) did not run: no history.json was found.")
    parts = []
    hist: dict[str, Any] = {}
    if (d / "history.json").is_file():
        hist = _read_json(d / "history.json")
    steps = hist.get("steps") or []
    if hist:
        parts.append(
            f"<p>Baseline (initial method) failure rate: <b>{esc(_num(hist.get('baseline_failure_rate')))}</b>; "
            f"best: <b>{esc(_num(hist.get('best_failure_rate')))}</b>; steps run: {esc(hist.get('steps_run', len(steps)))}; "
            f"stopped: {esc(hist.get('stopped', '?'))}; dev set: {esc(hist.get('dev_size', '?'))} rows.</p>")
    rows = []
    if hist.get("baseline_failure_rate") is not None:
        init = hist.get("initial_method") or {}
        rows.append((0, "-", "", init.get("name") or init.get("id") or "initial", hist.get("baseline_failure_rate"),
                     hist.get("baseline_failure_rate"), ""))
    for s in steps:
        cands = s.get("candidates") or []
        rates = ", ".join(_num(c.get("failure_rate")) for c in cands)
        failed_props = len(s.get("failed_proposals") or [])
        cand_text = f"{len(cands)}" + (f" (+{failed_props} failed proposals)" if failed_props else "")
        rows.append((s.get("step"), cand_text, rates, s.get("chosen") or "-", s.get("chosen_failure_rate"),
                     s.get("best_failure_rate"), "yes" if s.get("improved") else "no"))
    if rows:
        parts.append("<h3>Failure rate per step</h3>")
        parts.append(_table(("step", "candidates", "candidate failure rates", "chosen", "chosen rate",
                             "best so far", "improved"), rows, numeric=(0, 4, 5)))
    else:
        parts.append(_not_run("history.json holds no steps."))

    def draw(p: Path):
        from .plots import optimize_failure_rate_plot

        optimize_failure_rate_plot(hist, p)

    png = ctx.chart(d, "failure_rate.png", draw)
    msteps = _measure_points(d, "steps") or [{"step": s.get("step"), **s["measures"]} for s in steps
                                              if isinstance(s.get("measures"), dict)]
    if msteps:
        mpng = _measures_png(ctx, d, msteps, "step", "Instructions evolved per optimization step")
        parts.append('<div class="pair">' + _img(png, "failure rate per step") + _img(mpng, "measures per step")
                     + "</div>")
        parts.append(_measures_table(msteps, "step"))
    else:
        parts.append(_img(png, "failure rate per step"))
    text = None
    if (d / "best_method.txt").is_file():
        text = (d / "best_method.txt").read_text(encoding="utf-8", errors="replace")
    elif isinstance(hist.get("best_method"), dict):
        text = hist["best_method"].get("text")
    best = hist.get("best_method") or {}
    parts.append(f"<h3>Chosen method{esc(' (' + best['id'] + ')' if best.get('id') else '')}</h3>")
    parts.append(f"<pre>{esc(text)}</pre>" if text else _not_run("best_method.txt is missing."))
    feedback = next((s.get("feedback") for s in reversed(steps) if s.get("feedback")), None)
    if feedback:
        parts.append("<details><summary>Optimizer feedback of the last step with feedback</summary>"
                     f"<pre>{esc(_cut(feedback[0], 4000))}</pre></details>")
    return "".join(parts)


def _failures_by_rule(path: Path | None) -> list[tuple[str, int]]:
    if path is None:
        return []
    counts: dict[str, int] = {}
    for rule in _column(path, "rule"):
        key = rule or "(provider error / no rule)"
        counts[key] = counts.get(key, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _lineage_rows(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        traj = None
        meta = r.get("meta")
        try:
            m = json.loads(meta) if isinstance(meta, str) and meta else (meta or {})
            traj = m.get("trajectory") if isinstance(m, dict) else None
        except ValueError:
            pass
        lineage = f"parent {r.get('parent_id') or '-'}\nround {r.get('round') if r.get('round') is not None else '-'}\nmethod {r.get('method_id') or '-'}"
        traj_text = "\n---\n".join(str(t) for t in traj) if traj else ""
        body.append((r.get("id"), _pre(lineage, 200), _pre(_instruction_with_input(r)), _pre(r.get("output")),
                     _pre(traj_text) if traj_text else "",
                     _pre("\n".join(x for x in (r.get("rule"), r.get("reason")) if x), 300)))
    return _table(("id", "lineage", "instruction", "output", "trajectory (evolved per round)", "rule / reason"), body)


def _stage_rows_block(d: Path, main: str, title: str) -> str:
    parts = []
    main_t, failed_t = _find_table(d, main), _find_table(d, "failed")
    n_main = _count_rows(main_t) if main_t else 0
    n_failed = _count_rows(failed_t) if failed_t else 0
    total = n_main + n_failed
    rate = f"{n_failed / total:.1%}" if total else "-"
    parts.append(_table((main, "failed", "failure rate"), [(n_main, n_failed, rate)], numeric=(0, 1)))
    by_rule = _failures_by_rule(failed_t)
    if by_rule:
        parts.append("<h4>Failures by rule</h4>" + _table(("rule", "rows"), by_rule, numeric=(1,)))
    ex = _head(main_t)
    parts.append(f"<h4>{esc(title)}</h4>" + (_lineage_rows(ex) if ex else _not_run(f"no {main} rows")))
    fex = _head(failed_t)
    if fex:
        parts.append("<h4>Failed examples</h4>" + _lineage_rows(fex))
    return "".join(parts)


def _measure_points(d: Path, key: str) -> list[dict[str, Any]]:
    p = d / "measures.json"
    if not p.is_file():
        return []
    try:
        pts = _read_json(p).get(key) or []
    except (ValueError, AttributeError):
        return []
    return [x for x in pts if isinstance(x, dict)]


def _measures_png(ctx: _Ctx, d: Path, points: list[dict[str, Any]], x: str, title: str) -> Path:
    from .plots import measures_plot

    return ctx.chart(d, f"measures_{x}.png", lambda p: measures_plot(points, p, x=x, title=title))


def _measures_table(points: list[dict[str, Any]], x: str) -> str:
    keys = ("rows", "mean_words", "distinct_1", "distinct_2", "self_similarity", "grew")
    return _table((x, "rows", "mean words", "distinct-1", "distinct-2", "self-similarity", "grew"),
                  [[p.get(x), *(p.get(k) for k in keys)] for p in points], numeric=range(0, 7))


def _section_evolution(ctx: _Ctx) -> str:
    parts = []
    d = ctx.stages.get("evolve")
    if d is None:
        parts.append(_not_run("Evolution (evoray evolve) did not run: no evolved table was found."))
    else:
        rounds = _measure_points(d, "rounds")
        if rounds:
            parts.append("<h3>Measures per round (round 0 = the seeds)</h3>")
            parts.append(_img(_measures_png(ctx, d, rounds, "round", "Instructions per evolution round"),
                              "measures per round"))
            parts.append(_measures_table(rounds, "round"))
        parts.append(_stage_rows_block(d, "evolved", "Evolved examples (with lineage)"))
    a = ctx.stages.get("answer")
    if a is not None:
        parts.append("<h3>Answers (evoray answer)</h3>" + _stage_rows_block(a, "answered", "Answered examples"))
    return "".join(parts)


def _section_judge(ctx: _Ctx) -> str:
    d = ctx.stages.get("judge")
    if d is None or not (d / "summary.json").is_file():
        return _not_run("The judge (evoray judge) did not run: no summary.json was found.")
    summary = _read_json(d / "summary.json")
    groups = list((summary.get("test_sets") or {}).items())
    if "overall" in summary:
        groups.append(("overall", summary["overall"]))
    rows = [(name, g.get("win", 0), g.get("tie", 0), g.get("lose", 0), g.get("failed", 0),
             g.get("total", g.get("n", 0)), g.get("winning_score"), g.get("winning_score_judged_only"))
            for name, g in groups]
    parts = ["<p>Model A against model B; each prompt judged in both orders. "
             "Winning score (paper) = (Win - Lose) / test-set size + 1, a failed judgment counting as neither Win "
             "nor Lose; judged-only = (Win - Lose) / judged prompts + 1 (above 1: A is better).</p>",
             _table(("test set", "Win", "Tie", "Lose", "failed", "size", "winning score (paper)", "judged only"),
                    rows, numeric=(1, 2, 3, 4, 5, 6, 7))]
    from .plots import wtl_bar_chart

    png = ctx.chart(d, "wtl.png", lambda p: wtl_bar_chart(summary, p))
    parts.append(_img(png, "Win / Tie / Lose per test set"))
    return "".join(parts)


_LEDGER_COLS = (("requests", "requests"), ("batched", "batch_requests"), ("cache hits", "cache_hits"), ("retries", "retries"),
                ("429s", "rate_limited"), ("errors", "errors"), ("input tokens", "input_tokens"),
                ("output tokens", "output_tokens"), ("dollars", "dollars"))


def _ledger_table(led: Mapping[str, Any]) -> str:
    rows = []
    for name, t in sorted((led.get("providers") or {}).items()):
        rows.append([name, t.get("model", ""), *(t.get(k, 0) for _, k in _LEDGER_COLS)])
    tot = led.get("total") or {}
    if not tot and rows:
        tot = {k: sum(r[2 + i] or 0 for r in rows) for i, (_, k) in enumerate(_LEDGER_COLS)}
    rows.append([_Raw("<b>total</b>"), "", *(tot.get(k, 0) for _, k in _LEDGER_COLS)])
    return _table(("provider", "model", *(h for h, _ in _LEDGER_COLS)), rows, numeric=range(2, 2 + len(_LEDGER_COLS)))


def _section_ledger(ctx: _Ctx) -> str:
    parts = []
    root = ctx.outdir / "ledger.json"
    stage_ledgers = {s: d / "ledger.json" for s, d in ctx.stages.items()
                     if d != ctx.outdir and (d / "ledger.json").is_file()}
    if root.is_file():
        parts.append("<p>The whole job, per provider (cache hits are free and not counted as requests).</p>")
        parts.append(_ledger_table(_read_json(root)))
    elif stage_ledgers:
        from .ledger import Ledger

        merged = Ledger()
        for p in stage_ledgers.values():
            merged.merge(_read_json(p).get("providers", {}))
        parts.append("<p>No job ledger.json: the stages' ledgers added up.</p>")
        parts.append(_ledger_table(merged.to_dict()))
    else:
        return _not_run("No ledger.json was found: no stage that calls a model has run here.")
    if stage_ledgers:
        rows = []
        for stage, p in stage_ledgers.items():
            tot = (_read_json(p).get("total") or {})
            rows.append([stage, *(tot.get(k, 0) for _, k in _LEDGER_COLS)])
        parts.append("<h3>Per stage</h3>")
        parts.append(_table(("stage", *(h for h, _ in _LEDGER_COLS)), rows, numeric=range(1, 1 + len(_LEDGER_COLS))))
    return "".join(parts)


def sections() -> tuple[tuple[str, str, Callable[[_Ctx], str]], ...]:
    """``(id, title, build)`` of every section: the summary, each stage's own section (the stage
    objects' ``report``, ordered by their rank: scores, optimization, evolution, judge), the ledger."""
    from .stage import stages

    own = sorted((r for r in (getattr(s, "report", None) for s in stages()) if r is not None), key=lambda r: r.rank)
    return (("summary", "Summary", _section_summary), *((r.id, r.title, r.build) for r in own),
            ("ledger", "Ledger: requests, tokens and dollars", _section_ledger))


def __getattr__(name: str):
    # SECTIONS and STAGE_ORDER as module attributes, read from the registry when asked for (the stage
    # modules build their sections from this module's builders, so not at import time)
    if name == "SECTIONS":
        return sections()
    if name == "STAGE_ORDER":
        return stage_order()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def render_report(outdir: str | Path) -> str:
    """The report's HTML for ``outdir`` (see the module)."""
    out = Path(outdir)
    with tempfile.TemporaryDirectory(prefix="evoray-report-") as scratch:
        ctx = _Ctx(out, Path(scratch))
        bodies = []
        all_sections = sections()
        for sid, title, build in all_sections:
            try:
                body = build(ctx)
            except Exception as e:  # one unreadable file must not lose the whole report
                body = f'<p class="warn">This section could not be built: {esc(type(e).__name__)}: {esc(e)}</p>'
            bodies.append(f'<section id="{sid}"><h2>{esc(title)}</h2>{body}</section>')
    nav = "".join(f'<a href="#{sid}">{esc(title.split(":")[0])}</a>' for sid, title, _ in all_sections)
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>evoray report: {esc(out.resolve().name)}</title><style>{CSS}</style></head><body>"
        f"<h1>evoray report</h1><p class=\"muted\">{esc(out.resolve())} &middot; written {esc(when)}</p>"
        f"<nav>{nav}</nav>{''.join(bodies)}</body></html>\n"
    )


def write_report(outdir: str | Path) -> Path:
    """Write ``OUTDIR/report.html`` (atomically) and return its path."""
    out = Path(outdir)
    if not out.is_dir():
        from .errors import UsageError

        raise UsageError(f"{out}: no such output folder")
    text = render_report(out)
    path = out / REPORT_NAME
    return write_text_atomic(path, text)


__all__ = ["SECTIONS", "esc", "find_stages", "render_report", "write_report"]
