"""PNG charts of a run: score histogram (rate), Win/Tie/Lose bars (judge), failure rate (optimize).

Figures are drawn with matplotlib's object API on the Agg canvas (``Figure`` + ``FigureCanvasAgg``),
never through ``pyplot``: no global figure state, no GUI backend, safe inside Ray actors and threads.
Each function writes one PNG (parent folders created) and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .selection import BUCKETS

_WTL_COLORS = {"Win": "#4c9f70", "Tie": "#c9c9c9", "Lose": "#d1605e", "failed": "#7d7d7d"}


def _save(fig: Figure, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(p, format="png", dpi=120, bbox_inches="tight")
    return p


def score_histogram(bucket_counts: Mapping[str, int], path: str | Path, title: str = "Rating scores") -> Path:
    """Bars of rows per score bucket (scores.json order), each labelled with its count."""
    names = [b for b in BUCKETS if b in bucket_counts] + [b for b in bucket_counts if b not in BUCKETS]
    counts = [int(bucket_counts.get(b, 0)) for b in names]
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    colors = ["#7d7d7d" if b == "unparsed" else "#4a78b5" for b in names]
    bars = ax.bar(names, counts, color=colors)
    ax.bar_label(bars, labels=[f"{c:,}" for c in counts], fontsize=8, padding=2)
    ax.set_xlabel("score bucket")
    ax.set_ylabel("rows")
    ax.set_title(f"{title} (n = {sum(counts):,})")
    ax.margins(y=0.12)
    return _save(fig, path)


def wtl_bar_chart(summary: Mapping[str, Any], path: str | Path, title: str = "Model A vs model B") -> Path:
    """Stacked horizontal Win / Tie / Lose bars per test set (and overall), from :func:`evoray.judge.summarize`.

    Failed judgments get a grey segment when there are any. The winning score is shown at the
    right of each bar.
    """
    groups: list[tuple[str, Mapping[str, Any]]] = list((summary.get("test_sets") or {}).items())
    if "overall" in summary:
        groups.append(("overall", summary["overall"]))
    segments = [("Win", "win"), ("Tie", "tie"), ("Lose", "lose")]
    if any(g.get("failed", 0) for _, g in groups):
        segments.append(("failed", "failed"))
    fig = Figure(figsize=(8, 0.6 * max(2, len(groups)) + 1.2))
    ax = fig.add_subplot()
    labels = [name for name, _ in groups]
    ys = list(range(len(groups)))[::-1]
    left = [0] * len(groups)
    for label, key in segments:
        vals = [int(g.get(key, 0)) for _, g in groups]
        bars = ax.barh(ys, vals, left=left, color=_WTL_COLORS[label], label=label, height=0.6)
        ax.bar_label(bars, labels=[str(v) if v else "" for v in vals], label_type="center", fontsize=8)
        left = [a + b for a, b in zip(left, vals)]
    for y, (_, g), total in zip(ys, groups, left):
        ws = g.get("winning_score")
        if ws is not None:
            ax.text(total, y, f"  {ws:.3f}", va="center", fontsize=8)
    ax.set_yticks(ys, labels)
    ax.set_xlabel("prompts (text at the right: winning score)")
    ax.set_title(title)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.08), ncol=len(segments), frameon=False)
    ax.margins(x=0.12)
    return _save(fig, path)


def _rate_of(item: Any) -> float | None:
    if isinstance(item, (int, float)) and not isinstance(item, bool):
        return float(item)
    if isinstance(item, Mapping):
        for k in ("failure_rate", "rate"):
            v = item.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
    return None


def failure_rate_plot(history_steps: Iterable[Any], path: str | Path, title: str = "Evolution failure rate") -> Path:
    """Every candidate's failure rate as a point per step, and the best (lowest) per step as a line.

    A step is a mapping with ``candidates`` (numbers, or mappings with ``failure_rate``) and
    optionally ``step`` (x value; default its position) and ``failure_rate`` / ``best_failure_rate``
    (the step's best rate; default the lowest candidate). A bare number is a step with only that
    rate (for example the initial method at step 0). Steps that carry ``chosen_failure_rate`` (the
    optimizer's history) also get the chosen candidate's rate as a second line.
    """
    xs_pts: list[float] = []
    ys_pts: list[float] = []
    xs_best: list[float] = []
    ys_best: list[float] = []
    xs_chosen: list[float] = []
    ys_chosen: list[float] = []
    for pos, step in enumerate(history_steps):
        if isinstance(step, Mapping):
            x = step.get("step", pos)
            rates = [r for r in (_rate_of(c) for c in step.get("candidates") or []) if r is not None]
            best = step.get("best_failure_rate")
            if best is None:
                best = step.get("failure_rate") if not rates else None
            if best is None and rates:
                best = min(rates)
            chosen = _rate_of({"rate": step.get("chosen_failure_rate")})
            if chosen is not None:
                xs_chosen.append(x)
                ys_chosen.append(chosen)
        else:
            x, rates, best = pos, [], _rate_of(step)
        xs_pts.extend([x] * len(rates))
        ys_pts.extend(rates)
        if best is not None:
            xs_best.append(x)
            ys_best.append(float(best))
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    if xs_pts:
        ax.scatter(xs_pts, ys_pts, s=18, color="#9bb7d4", label="candidates", zorder=2)
    if xs_chosen:
        ax.plot(xs_chosen, ys_chosen, marker=".", linestyle=":", color="#7d7d7d", label="chosen", zorder=3)
    if xs_best:
        ax.plot(xs_best, ys_best, marker="o", color="#2b5d8a", label="best", zorder=4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("failure rate")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    if xs_pts or xs_best:
        ax.legend(frameon=False)
    else:
        ax.text(0.5, 0.5, "no steps", transform=ax.transAxes, ha="center", va="center")
    return _save(fig, path)


def optimize_failure_rate_plot(history: Mapping[str, Any], path: str | Path,
                               title: str = "Evolution failure rate") -> Path:
    """failure_rate.png of an optimize stage from its ``history.json`` (``OptimizeResult.summary()``):
    the initial method's rate at step 0, then every step's candidates, chosen and best rate.

    The one chart of the optimizer's failure rate: the optimizer draws it when it writes its outputs
    and the report draws it again when the PNG is missing.
    """
    pts: list[Any] = []
    base = history.get("baseline_failure_rate")
    if base is not None:
        pts.append({"step": 0, "failure_rate": base, "chosen_failure_rate": base, "candidates": []})
    pts += list(history.get("steps") or [])
    return failure_rate_plot(pts, path, title=title)


def measures_plot(points: Iterable[Mapping[str, Any]], path: str | Path, x: str = "round",
                  title: str = "Evolution measures") -> Path:
    """Four panels of :mod:`evoray.measures` per round or step (``x`` names the key): mean
    instruction length in words, distinct-1 and distinct-2, self-similarity, share of rows that grew."""
    pts = list(points)
    xs = [p.get(x, i) for i, p in enumerate(pts)]
    fig = Figure(figsize=(9, 5.5))
    panels = [("mean words", ("mean_words",)), ("distinct n-grams", ("distinct_1", "distinct_2")),
              ("self-similarity (MinHash Jaccard)", ("self_similarity",)), ("share of rows that grew", ("grew",))]
    for i, (name, keys) in enumerate(panels):
        ax = fig.add_subplot(2, 2, i + 1)
        drawn = False
        for k in keys:
            xy = [(a, p.get(k)) for a, p in zip(xs, pts) if isinstance(p.get(k), (int, float))]
            if xy:
                ax.plot([a for a, _ in xy], [b for _, b in xy], marker="o", label=k.replace("_", "-"))
                drawn = True
        if len(keys) > 1 and drawn:
            ax.legend(frameon=False, fontsize=8)
        if not drawn:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
        if keys[0] != "mean_words" and drawn:
            ax.set_ylim(0, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(x, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


__all__ = ["failure_rate_plot", "measures_plot", "optimize_failure_rate_plot", "score_histogram", "wtl_bar_chart"]
