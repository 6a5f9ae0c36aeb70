"""The memory report: a result set's `memory_results.csv` as tables and plots.

The results have one fixed schema (`jaxlora.memory.results.columns`), blank where a metric does
not apply; the tables show the columns that hold a value in some row. One table per library
(one row per method: its metrics, routing accuracy, truncations and speed) and three figures, each drawn on its own `matplotlib.figure.Figure` (no pyplot state):

- `memory_by_method`: the headline metric of every method, one bar group per library;
- `memory_vs_k`: the metric against k for each (router, combiner, context) evaluated at
  several k (only when some are);
- `memory_routing`: routing top-1 and recall@k of the routed methods against the oracle.

A document dataset (PaperQA, NarrativeQA, QuALITY) adds the study's tables and plots
(`jaxlora/memory/docreport.py`): method x metric, per level (PaperQA, `memory_per_level`) and
training format x metric when the libraries differ in training data (`memory_by_format`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from jaxlora.errors import DataError
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
    lines = ["# Memory report", ""]
    lines.append(
        f"Headline metric: **{metric}**. Routing accuracy is measured against the oracle "
        "(each question's own unit); `truncated` counts contexts cut to the token budget."
    )
    for lib in _libraries(rows):
        mine = [r for r in rows if str(r["library"]) == lib]
        lines += ["", f"## Library {lib}" if lib else "## Library", ""]
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "---|" * len(columns))
        for r in mine:
            lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    if extra:
        lines.append(extra.rstrip("\n"))
    for stem, title in plots:
        lines += ["", f"![{title}](plots/{stem}.png)"]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if v is None:  # a blank cell of the CSV (read_results reads it as None)
        return ""
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def plot_by_method(rows: Sequence[Mapping[str, Any]], metric: str) -> Figure:
    libs = _libraries(rows)
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    fig = Figure(figsize=(max(6.0, 0.8 * len(methods) * len(libs)), 4.0), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(libs)
    for j, lib in enumerate(libs):
        by = {str(r["method"]): _value(r, metric) for r in rows if str(r["library"]) == lib}
        xs = [i + j * width for i in range(len(methods))]
        ax.bar(xs, [by.get(m) or 0.0 for m in methods], width, label=lib or None)
    ax.set_xticks([i + width * (len(libs) - 1) / 2 for i in range(len(methods))], methods)
    ax.tick_params(axis="x", rotation=30)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by method")
    if len(libs) > 1:
        ax.legend(title="library")
    return fig


def plot_vs_k(rows: Sequence[Mapping[str, Any]], metric: str) -> Figure | None:
    curves: dict[tuple, list[tuple[int, float]]] = {}
    for r in rows:
        if not r.get("router"):
            continue
        key = (
            str(r["library"]),
            r["router"],
            r["combiner"] if int(r["k"]) > 1 else "*",
            r["context"],
        )
        curves.setdefault(key, []).append((int(r["k"]), _value(r, metric) or 0.0))
    # A top-1 method belongs to every curve of its router and context (k = 1 of each).
    lines = {}
    for key, points in curves.items():
        if key[2] == "*":
            continue
        ones = curves.get((key[0], key[1], "*", key[3]), [])
        lines[key] = sorted(set(points + ones))
    lines = {k: v for k, v in lines.items() if len(v) > 1}
    if not lines:
        return None
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for (lib, router, combiner, context), pts in lines.items():
        label = " ".join(
            x for x in (lib, router, combiner, context if context != "none" else "") if x
        )
        ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", label=label)
    ax.set_xlabel("k (units composed)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs k")
    ax.legend()
    return fig


def plot_routing(rows: Sequence[Mapping[str, Any]]) -> Figure | None:
    routed = [r for r in rows if _value(r, "routing_top1") is not None]
    if not routed:
        return None
    fig = Figure(figsize=(max(6.0, 0.8 * len(routed)), 4.0), layout="constrained")
    ax = fig.add_subplot()
    labels = [f"{r['library']} {r['method']}".strip() for r in routed]
    xs = range(len(routed))
    ax.bar([x - 0.2 for x in xs], [_value(r, "routing_top1") for r in routed], 0.4, label="top-1")
    ax.bar(
        [x + 0.2 for x in xs], [_value(r, "routing_recall") for r in routed], 0.4, label="recall@k"
    )
    ax.set_xticks(list(xs), labels)
    ax.tick_params(axis="x", rotation=30)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("agreement with the oracle")
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
