"""The memory report: a result set's `memory_results.csv` as tables and plots.

The results have one fixed schema (`jaxlora.memory.results.columns`), blank where a metric does
not apply; the tables show the columns that hold a value in some row (a blank cell reads "-").
One table per library (one row per method: its metrics, routing accuracy, truncations and
`questions_per_s`, which includes compilation, as its header says) and three figures, each drawn
on its own `matplotlib.figure.Figure` (no pyplot state). A library is named by its sweep values
as key=value (`objective=ntp`, `docreport.library_names`), and the figures follow
`jaxlora/figures.py`: bars carry their values ("n/a" for a missing one), curves their own
markers, and a note names coinciding curves and points without a value.

- `memory_by_method`: the headline metric of every method, one bar group per library;
- `memory_vs_k`: the metric against k for each (router, combiner, context) evaluated at
  several k (only when some are);
- `memory_routing`: routing top-1 and recall@k of the routed methods against the oracle.

A document dataset (PaperQA, NarrativeQA, QuALITY) adds the study's tables and plots
(`jaxlora/memory/docreport.py`): method x metric, per level (PaperQA, `memory_per_level`) and
training format x metric when the libraries differ in training data (`memory_by_format`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from jaxlora.errors import DataError
from jaxlora.figures import (
    add_notes,
    bar_values,
    coincide_notes,
    line_style,
    metric_label,
    scales_note,
    set_metric_ylim,
    slant,
)
from jaxlora.fsutil import atomic_write
from jaxlora.memory import docreport
from jaxlora.report import read_results, save_figure

# The first present leads: the judge, then ROUGE-L (question answering: exact match is too strict
# for free-form answers, as in the study's PaperQA tables; NarrativeQA's is rougeL, best over its
# references), then accuracy (PhoneBook, CounterFact, QuALITY).
METRICS = ("judge", "rouge_l", "rougeL", "accuracy", "efficacy", "bleu")


def headline_metric(rows: Sequence[Mapping[str, Any]]) -> str:
    present = [m for m in METRICS if any(r.get(m) not in ("", None) for r in rows)]
    if not present:
        raise DataError("memory_results.csv has no metric column (accuracy, rouge_l, ...)")
    return present[0]


def _libraries(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(r["library"]) for r in rows))


def _value(row: Mapping[str, Any], column: str) -> float | None:
    v = row.get(column, "")
    return None if v in ("", None) else float(v)


# `questions_per_s` is the questions over a method's whole wall time, the compilation of its
# shapes included (`jaxlora/memory/evaluate.py`): the report says so rather than call it speed.
SPEED = "questions_per_s"
SPEED_HEADER = "questions_per_s (incl. compile)"
COMPILE_COLUMNS = ("compile_seconds", "compile_s")


def render_markdown(
    rows: Sequence[Mapping[str, Any]],
    metric: str,
    plots: Sequence[tuple[str, str]] = (),
    extra: str = "",
) -> str:
    """The report; `plots` are (file stem, title) of the figures written beside it, `extra`
    markdown sections after the libraries' tables (a document dataset's study tables)."""
    columns = [
        c for c in rows[0] if c != "library" and any(r.get(c) not in ("", None) for r in rows)
    ]
    timed = not any(c in columns for c in COMPILE_COLUMNS)  # no compile time of its own
    headers = [SPEED_HEADER if c == SPEED and timed else c for c in columns]
    names = docreport.library_names(rows)
    lines = ["# Memory report", ""]
    lines.append(
        f"Headline metric: **{metric}**. Routing accuracy is measured against the oracle "
        "(each question's own unit); `truncated` counts contexts cut to the token budget."
    )
    if scales := scales_note(c for c in columns if c not in ("k", "truncated")):
        lines += ["", scales]
    if SPEED in columns and timed:
        lines += [
            "",
            f"`{SPEED}` divides the questions by the method's whole time, compilation "
            "included: the first method of each prompt shape pays it, so it is no measure of "
            "steady throughput.",
        ]
    for lib in _libraries(rows):
        mine = [r for r in rows if str(r["library"]) == lib]
        lines += ["", f"## Library {names[lib]}" if lib else "## Library", ""]
        lines.append("| " + " | ".join(headers) + " |")
        lines.append("|" + "---|" * len(columns))
        for r in mine:
            lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    if extra:
        lines.append(extra.rstrip("\n"))
    for stem, title in plots:
        lines += ["", f"![{title}](plots/{stem}.png)"]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if v is None or v == "":  # a blank cell of the CSV (read_results reads it as None)
        return "-"  # as in the document tables (docreport)
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def plot_by_method(rows: Sequence[Mapping[str, Any]], metric: str) -> Figure:
    """The metric of every method, one bar per library, its value written on it; a method a
    library has no value for says "n/a" where its bar would be."""
    libs = _libraries(rows)
    names = docreport.library_names(rows)
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    fig = Figure(figsize=(max(6.0, 0.8 * len(methods) * len(libs)), 4.0), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(libs)
    values = []
    for j, lib in enumerate(libs):
        by = {str(r["method"]): _value(r, metric) for r in rows if str(r["library"]) == lib}
        xs = [i + j * width for i in range(len(methods))]
        ys = [by.get(m) for m in methods]
        values += ys
        bar_values(ax, xs, ys, width, color=f"C{j % 10}", label=names[lib] or None)
    ax.set_xticks([i + width * (len(libs) - 1) / 2 for i in range(len(methods))], methods)
    ax.tick_params(axis="x", rotation=30)
    slant(ax)
    ax.set_ylabel(metric_label(metric))
    set_metric_ylim(ax, metric, [v for v in values if v is not None], headroom=1.2)
    ax.set_title(f"{metric} by method")
    if len(libs) > 1:
        ax.legend(title="library")
    return fig


def _curve_label(name: str, router: str, combiner: str, context: str) -> str:
    """A curve over k in the methods' own syntax, after its library: `rank=8: bm25@k/ties`."""
    method = f"{router}@k/{combiner}" + (f"+{context}" if context not in ("none", "") else "")
    return f"{name}: {method}" if name else method


def plot_vs_k(rows: Sequence[Mapping[str, Any]], metric: str) -> Figure | None:
    """The metric against k for each (library, router, combiner, context) evaluated at two or
    more k. Each curve has its own marker and dashes; a note names the curves that coincide
    and the points without a value (never drawn as 0)."""
    curves: dict[tuple, list[tuple[int, float | None]]] = {}
    for r in rows:
        if not r.get("router"):
            continue
        key = (
            str(r["library"]),
            str(r["router"]),
            str(r.get("combiner") or "") if int(r["k"]) > 1 else "*",
            str(r.get("context") or "none"),
        )
        curves.setdefault(key, []).append((int(r["k"]), _value(r, metric)))
    # A top-1 method belongs to every curve of its router and context (k = 1 of each).
    lines = {}
    for key, points in curves.items():
        if key[2] == "*":
            continue
        ones = curves.get((key[0], key[1], "*", key[3]), [])
        lines[key] = sorted(set(points + ones), key=lambda p: p[0])
    lines = {k: v for k, v in lines.items() if len(v) > 1}
    if not lines:
        return None
    names = docreport.library_names(rows)
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    drawn: dict[str, list[tuple[float, float]]] = {}
    missing = []
    for i, ((lib, router, combiner, context), pts) in enumerate(lines.items()):
        label = _curve_label(names[lib], router, combiner, context)
        shown = [(k, v) for k, v in pts if v is not None]
        if gaps := [k for k, v in pts if v is None]:
            missing.append(f"{label} at k={', '.join(str(k) for k in gaps)}")
        # a missing value breaks the line (NaN) instead of joining its neighbours over it
        ys = [math.nan if v is None else v for _, v in pts]
        ax.plot([k for k, _ in pts], ys, label=label, **line_style(i))
        drawn[label] = shown
    ax.set_xlabel("k (units composed)")
    ax.set_xticks(sorted({k for pts in lines.values() for k, _ in pts}))
    ax.set_ylabel(metric_label(metric))
    set_metric_ylim(ax, metric, [v for pts in drawn.values() for _, v in pts])
    ax.set_title(f"{metric} vs k")
    notes = coincide_notes(drawn)
    if missing:
        notes.append(f"no {metric} (not shown): {'; '.join(missing)}")
    add_notes(ax, notes)
    ax.legend(fontsize="small")
    return fig


def plot_routing(rows: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Routing top-1 and recall@k of the routed methods, values written on the bars."""
    routed = [r for r in rows if _value(r, "routing_top1") is not None]
    if not routed:
        return None
    names = docreport.library_names(rows)
    fig = Figure(figsize=(max(6.0, 0.8 * len(routed)), 4.0), layout="constrained")
    ax = fig.add_subplot()
    labels = [f"{names[str(r['library'])]} {r['method']}".strip() for r in routed]
    xs = range(len(routed))
    bars = (("routing_top1", "top-1"), ("routing_recall", "recall@k"))
    for j, (column, label) in enumerate(bars):
        ys = [_value(r, column) for r in routed]
        bar_values(ax, [x - 0.2 + 0.4 * j for x in xs], ys, 0.4, color=f"C{j}", label=label)
    ax.set_xticks(list(xs), labels)
    ax.tick_params(axis="x", rotation=30)
    slant(ax)
    set_metric_ylim(ax, "routing_top1", [], headroom=1.2)
    ax.set_ylabel("agreement with the oracle (0-1)")
    ax.set_title("routing accuracy")
    ax.legend()
    return fig


def write_memory_report(run_dir: str | Path) -> Path:
    """memory_report.md and plots/memory_*.png|svg from the memory_results.csv of a result set
    (a run directory, or its memory_sets/NAME: `jaxlora.memory.results`)."""
    run_dir = Path(run_dir)
    path = run_dir / "memory_results.csv"
    if not path.exists():
        raise DataError(f"{run_dir} has no memory_results.csv: run `jaxlora memory RUN` first")
    # read_results gives None for empty cells: a run without other sweep axes has library "".
    rows = [{**r, "library": r.get("library") or ""} for r in read_results(path)]
    metric = headline_metric(rows)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    figures = [
        ("memory_by_method", f"{metric} by method", plot_by_method(rows, metric)),
        ("memory_routing", "routing accuracy", plot_routing(rows)),
        ("memory_vs_k", f"{metric} vs k", plot_vs_k(rows, metric)),
        ("memory_per_level", "PaperQA per level", docreport.plot_per_level(rows)),
        (
            "memory_by_format",
            f"{metric} by training format",
            docreport.plot_by_format(rows, metric),
        ),
    ]
    written = []
    for stem, title, fig in figures:
        if fig is not None:
            save_figure(fig, plots / stem)
            written.append((stem, title))
    out = run_dir / "memory_report.md"
    atomic_write(out, render_markdown(rows, metric, written, docreport.markdown(rows)))
    return out
