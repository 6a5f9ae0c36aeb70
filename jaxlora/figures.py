"""Figure and table helpers shared by the reports (`jaxlora/report.py`, `jaxlora/memory/`).

A figure says what it cannot show. The reports build on these rules:

- **scales**: each metric family has one range (`metric_scale`: ratios 0-1, BLEU 0-100, the
  judge 0-10); an axis label names it (`metric_label`, "bleu (0-100)"), a table says it in a
  line (`scales_note`), and an axis of such a metric starts at 0 (`set_metric_ylim`);
- **lines drawn over each other**: each line has its own marker, size and dashes
  (`line_style`), and lines with the same points are named in a note (`coincide_notes`);
- **dropped points**: a point without a value is never drawn as 0; it is named in a note under
  the axes (`add_notes`);
- **bars** carry their values as text, and a missing one says "n/a" where its bar would be
  (`bar_values`), so a 0.0 bar and a missing method never look alike.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# The scale of each metric family: ratios run 0-1, BLEU 0-100 (sacrebleu), the judge 0-10. A
# per-level column (`bleu_level2`) has its metric's scale. Unknown columns (losses) have none.
_SCALES = {"bleu": 100.0, "judge": 10.0}
_RATIOS = frozenset(
    {
        "accuracy",
        "efficacy",
        "exact_match",
        "hard_accuracy",
        "loglik_accuracy",
        "loglik_hard_accuracy",
        "rouge_l",
        "rouge1",
        "rouge2",
        "rougeL",
        "rougeLsum",
        "routing_top1",
        "routing_recall",
        "judge_failure_rate",
    }
)


def metric_scale(metric: str) -> float | None:
    """The top of a metric's range (1 for ratios, 100 for BLEU, 10 for the judge), or None."""
    base = re.sub(r"_level\d+$", "", metric)
    if base in _SCALES:
        return _SCALES[base]
    if base in _RATIOS or base.endswith(("_accuracy", "_efficacy", "_rouge_l")):
        return 1.0
    return _SCALES.get(base.rpartition("_")[2])  # e.g. `val_bleu`


def _fmt_scale(top: float) -> str:
    return f"0-{top:g}"


def metric_label(metric: str) -> str:
    """An axis label naming the metric's scale, e.g. "bleu (0-100)", "accuracy (0-1)"."""
    top = metric_scale(metric)
    return metric if top is None else f"{metric} ({_fmt_scale(top)})"


def scales_note(metrics: Iterable[str]) -> str:
    """One line naming the scale of each metric family among `metrics` ("" when none has one),
    e.g. "Scales: bleu 0-100; rouge_l, accuracy 0-1." """
    by_scale: dict[float, list[str]] = {}
    for m in metrics:
        top = metric_scale(m)
        if top is not None:
            by_scale.setdefault(top, []).append(m)
    if not by_scale:
        return ""
    parts = [f"{', '.join(ms)} {_fmt_scale(top)}" for top, ms in by_scale.items()]
    return "Scales: " + "; ".join(parts) + "."


def set_metric_ylim(ax: Any, metric: str, values: Iterable[float], headroom: float = 1.05) -> None:
    """A metric with a known range starts its axis at 0 and reaches at least its top (or the
    data's largest value), `headroom` above that so that points at the top and value labels
    stay inside the frame. Other metrics keep matplotlib's limits."""
    top = metric_scale(metric)
    if top is None:
        return
    finite = [v for v in values if v is not None and math.isfinite(v)]
    reach = max([top, *finite])
    ax.set_ylim(0.0, reach * headroom)
    # No tick in the headroom: an axis of a 0-1 metric is not labelled 1.2.
    ax.set_yticks([t for t in ax.get_yticks() if 0.0 <= t <= reach * (1 + 1e-9)])


# Distinct markers and dashes per line, so that lines drawn over each other stay visible.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
DASHES = ("-", "--", ":", "-.")


def line_style(i: int) -> dict[str, Any]:
    """The marker, marker size and line style of the i-th line: each line's marker differs
    from the lines before it, and later lines are drawn smaller on top of earlier ones."""
    return {
        "marker": MARKERS[i % len(MARKERS)],
        "ms": max(3.0, 8.0 - 0.8 * (i % 6)),
        "ls": DASHES[i % len(DASHES)],
    }


def coinciding(series: Mapping[str, Sequence[tuple[float, float]]]) -> list[list[str]]:
    """Groups (two or more) of series labels whose points are the same: same x values and y
    values within 1e-3 of the largest |y|, so that one line would hide the other."""
    ys = [abs(y) for pts in series.values() for _, y in pts]
    tol = 1e-3 * max(ys, default=0.0) or 1e-12
    groups: list[list[str]] = []
    shapes: list[list[tuple[float, float]]] = []
    for label, pts in series.items():
        pts = sorted(pts)
        for group, shape in zip(groups, shapes, strict=True):
            if [x for x, _ in pts] == [x for x, _ in shape] and all(
                abs(a[1] - b[1]) <= tol for a, b in zip(pts, shape, strict=True)
            ):
                group.append(label)
                break
        else:
            groups.append([label])
            shapes.append(pts)
    return [g for g in groups if len(g) > 1 and series[g[0]]]


def coincide_notes(series: Mapping[str, Sequence[tuple[float, float]]]) -> list[str]:
    """One note per group of coinciding lines, e.g. "same points: rank=8, rank=16"."""
    return [f"same points (lines overlap): {'; '.join(g)}" for g in coinciding(series)]


def add_notes(ax: Any, notes: Sequence[str]) -> None:
    """Notes under the x-axis label (dropped points, coinciding lines), inside the layout."""
    notes = [n for n in notes if n]
    if not notes:
        return
    ax.annotate(
        "\n".join(notes),
        xy=(0.5, 0.0),
        xycoords=ax.xaxis.label,
        xytext=(0, -4),
        textcoords="offset points",
        ha="center",
        va="top",
        fontsize="small",
        color="0.3",
        wrap=True,
        gid="jaxlora-note",
    )


def bar_values(
    ax: Any,
    xs: Sequence[float],
    values: Sequence[float | None],
    width: float,
    *,
    color: Any,
    label: str | None = None,
    fmt: str = "{:.2f}",
) -> None:
    """Bars with their values written above them; a missing value (None or NaN) has no bar
    and says "n/a" at the base in the series' color, so that it never reads as a 0.0 bar."""
    present = [(x, v) for x, v in zip(xs, values, strict=True) if _finite(v)]
    ax.bar([x for x, _ in present], [v for _, v in present], width, color=color, label=label)
    # A missing bar still takes its place on the x axis, so its "n/a" is never cut off.
    ax.update_datalim([(x + d, 0.0) for x in xs for d in (-width / 2, width / 2)])
    ax.autoscale_view()
    for x, v in zip(xs, values, strict=True):
        text, y = (fmt.format(v), v) if _finite(v) else ("n/a", 0.0)
        ax.text(
            x, y, text, ha="center", va="bottom", rotation=90, fontsize="x-small",
            color="black" if _finite(v) else color,
            gid="jaxlora-value" if _finite(v) else "jaxlora-missing",
        )  # fmt: skip


def slant(ax: Any) -> None:
    """Slanted x tick labels end under their tick (rotated about their right end)."""
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
        label.set_rotation_mode("anchor")


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
