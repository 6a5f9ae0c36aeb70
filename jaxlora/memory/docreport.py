"""The study's tables for a document dataset, from `memory_results.csv` (docs/study.md §3-4).

The dataset is recognised from the metric columns (`jaxlora/eval/scoring.py` writes them):
PaperQA by `bleu_level1`, NarrativeQA by `rougeLsum`, QuALITY by `hard_accuracy`. Then:

- **method x metric**: every method with the dataset's metrics (one row per library x method;
  the library's sweep values are its first columns);
- **per level** (PaperQA): BLEU-4, ROUGE-L and the judge (when present) for levels 1-3
  (recall, comprehension, logical structure), with a grouped bar plot `memory_per_level`;
- **format x metric**: when the libraries differ in how they were trained (`data.*` sweep axes
  such as `data.format`, `data.train_path`, `data.paper_header`, and the objective:
  `training.objective`, `distill.*`), per method one row per format, and a bar plot
  `memory_by_format` of the headline metric. NTP against distillation is such a table.

Each table is markdown; the method table is followed by a line naming the metrics' scales
(BLEU 0-100 next to ROUGE 0-1), and the plots follow `jaxlora/figures.py` (values on the bars,
"n/a" for a missing one, the scale in the axis label). `write_memory_report`
(`jaxlora/memory/report.py`) appends them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

from matplotlib.figure import Figure

from jaxlora.eval.metrics import PAPERQA_LEVELS
from jaxlora.figures import bar_values, metric_label, scales_note, set_metric_ylim, slant

Rows = Sequence[Mapping[str, Any]]

# Per dataset: the column that marks it, then its metric columns in the study's order.
DATASET_MARKERS: dict[str, str] = {
    "paperqa": "bleu_level1",
    "narrativeqa": "rougeLsum",
    "quality": "hard_accuracy",
}
DATASET_COLUMNS: dict[str, tuple[str, ...]] = {
    "paperqa": ("judge", "bleu", "rouge_l", "accuracy"),
    "narrativeqa": ("judge", "rouge1", "rouge2", "rougeL", "rougeLsum"),
    "quality": (
        "accuracy",
        "hard_accuracy",
        "loglik_accuracy",
        "loglik_hard_accuracy",
        "unanswered",
    ),
}
LEVEL_METRICS = ("judge", "bleu", "rouge_l")
LEVEL_NAMES = {1: "recall", 2: "comprehension", 3: "logical structure"}


def detect_dataset(rows: Rows) -> str | None:
    """The document dataset whose metric columns the rows hold, or None."""
    for name, marker in DATASET_MARKERS.items():
        if any(_present(r.get(marker)) for r in rows):
            return name
    return None


def axis_columns(rows: Rows) -> list[str]:
    """The libraries' sweep axes: the dotted columns (`data.format`, `lora.rank`, ...)."""
    return [c for c in dict.fromkeys(k for r in rows for k in r) if "." in c]


def library_names(rows: Rows) -> dict[str, str]:
    """Each library's name for tables and legends: its sweep values as key=value, the key
    by its last part unless two axes share it (`objective=ntp, rank=8`). The `library` column's
    own label is kept where the rows have no axis columns; the only library of a run is ""."""
    axes = axis_columns(rows)
    short = [a.rpartition(".")[2] for a in axes]
    keys = [s if short.count(s) == 1 else a for a, s in zip(axes, short, strict=True)]
    names: dict[str, str] = {}
    for r in rows:
        lib = str(r.get("library") or "")
        if lib in names:
            continue
        values = [(k, r.get(a)) for k, a in zip(keys, axes, strict=True) if _present(r.get(a))]
        names[lib] = ", ".join(f"{k}={_plain(v)}" for k, v in values) if lib and values else lib
    return names


def _plain(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def format_axes(rows: Rows) -> list[str]:
    """The axes of training data and objective whose values differ between libraries."""
    return [
        c
        for c in axis_columns(rows)
        if c.startswith(("data.", "distill.", "training.objective"))
        and len({str(r.get(c)) for r in rows}) > 1
    ]


def format_label(row: Mapping[str, Any], axes: Sequence[str]) -> str:
    """A library's training format: its data and objective values (a path by its file name)."""
    parts = []
    for a in axes:
        v = str(row.get(a, ""))
        parts.append(PurePath(v).name if a.endswith("_path") else v)
    return " / ".join(parts)


def metric_columns(rows: Rows, dataset: str) -> list[str]:
    """The dataset's metrics the rows hold (the judge only when it ran)."""
    return [c for c in DATASET_COLUMNS[dataset] if any(_present(r.get(c)) for r in rows)]


def level_columns(rows: Rows) -> list[str]:
    """PaperQA's per-level columns the rows hold, metric by metric."""
    return [
        f"{m}_level{lv}"
        for m in LEVEL_METRICS
        for lv in PAPERQA_LEVELS
        if any(_present(r.get(f"{m}_level{lv}")) for r in rows)
    ]


def table(rows: Rows, columns: Sequence[str], headers: Sequence[str] | None = None) -> list[str]:
    """A markdown table of `columns` (numbers to 3 decimals, empty cells as -)."""
    headers = list(headers or columns)
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return out


def method_table(rows: Rows, dataset: str) -> list[str]:
    """Method x metric: one row per library x method."""
    keys = [c for c in axis_columns(rows) if len({str(r.get(c)) for r in rows}) > 1]
    return table(rows, [*keys, "method", *metric_columns(rows, dataset)])


def level_table(rows: Rows) -> list[str]:
    """PaperQA: method x (metric, level); the header names each level."""
    keys = [c for c in axis_columns(rows) if len({str(r.get(c)) for r in rows}) > 1]
    cols = level_columns(rows)
    heads = [c.replace("_level", " L") for c in cols]
    return table(rows, [*keys, "method", *cols], [*keys, "method", *heads])


def format_tables(rows: Rows, dataset: str) -> list[str]:
    """Format x metric, per method (and per value of the other axes), or [] without formats."""
    axes = format_axes(rows)
    if not axes:
        return []
    others = [c for c in axis_columns(rows) if c not in axes]
    metrics = metric_columns(rows, dataset) + (level_columns(rows) if dataset == "paperqa" else [])
    out: list[str] = []
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((str(r["method"]), *(str(r.get(c)) for c in others)), []).append(r)
    for (method, *rest), mine in groups.items():
        setting = ", ".join(f"{c}={v}" for c, v in zip(others, rest, strict=True))
        out += ["", f"**{method}**" + (f" ({setting})" if setting else ""), ""]
        labelled = [{**r, "format": format_label(r, axes)} for r in mine]
        out += table(labelled, ["format", *metrics])
    return out


def markdown(rows: Rows) -> str:
    """The document dataset's sections of the memory report ("" for other datasets)."""
    dataset = detect_dataset(rows)
    if dataset is None:
        return ""
    name = {"paperqa": "PaperQA", "narrativeqa": "NarrativeQA", "quality": "QuALITY"}[dataset]
    lines = ["", f"## {name}: method x metric", ""]
    if dataset == "quality":
        lines += [
            "`accuracy` reads the answer letter with a strict parser (`unanswered`: no single "
            "letter stated); `loglik_accuracy` takes the option whose text is most likely as "
            "the answer (no parsing). `hard_` columns: the hard questions only.",
            "",
        ]
    lines += method_table(rows, dataset)
    if scales := scales_note(metric_columns(rows, dataset)):
        lines += ["", scales]
    if dataset == "paperqa" and level_columns(rows):
        levels = ", ".join(f"L{lv} {LEVEL_NAMES[lv]}" for lv in PAPERQA_LEVELS)
        lines += ["", "## PaperQA per level", "", f"Levels: {levels}.", ""]
        lines += level_table(rows)
    formats = format_tables(rows, dataset)
    if formats:
        lines += ["", "## Training format x metric", ""]
        lines.append(f"Formats: the libraries' {', '.join(format_axes(rows))}.")
        lines += formats
    return "\n".join(lines) + "\n"


def plot_per_level(rows: Rows) -> Figure | None:
    """PaperQA: per library x method, bars for levels 1-3 of the first per-level metric
    present (the judge, then ROUGE-L, then BLEU)."""
    if detect_dataset(rows) != "paperqa":
        return None
    present = [
        m for m in ("judge", "rouge_l", "bleu") if any(_present(r.get(f"{m}_level1")) for r in rows)
    ]
    if not present:
        return None
    metric = present[0]
    names = library_names(rows)
    labels = [
        " ".join(x for x in (names.get(str(r.get("library") or ""), ""), str(r["method"])) if x)
        for r in rows
    ]
    fig = Figure(figsize=(max(6.0, 0.9 * len(rows)), 4.0), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(PAPERQA_LEVELS)
    values = []
    for j, lv in enumerate(PAPERQA_LEVELS):
        xs = [i + j * width for i in range(len(rows))]
        ys = [_number(r.get(f"{metric}_level{lv}")) for r in rows]
        values += ys
        bar_values(ax, xs, ys, width, color=f"C{j}", label=f"L{lv} {LEVEL_NAMES[lv]}")
    ax.set_xticks([i + width for i in range(len(rows))], labels)
    ax.tick_params(axis="x", rotation=30)
    slant(ax)
    ax.set_ylabel(metric_label(metric))
    set_metric_ylim(ax, metric, [v for v in values if v is not None], headroom=1.2)
    ax.set_title(f"PaperQA {metric} per level")
    ax.legend()
    return fig


def plot_by_format(rows: Rows, metric: str) -> Figure | None:
    """The headline metric per method, one bar per training format, values written on the
    bars ("n/a" where a method has no value in a format); None without formats."""
    axes = format_axes(rows)
    if not axes or detect_dataset(rows) is None:
        return None
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    formats = list(dict.fromkeys(format_label(r, axes) for r in rows))
    fig = Figure(figsize=(max(6.0, 0.8 * len(methods) * len(formats)), 4.0), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(formats)
    values: list[float] = []
    for j, fmt in enumerate(formats):
        # Several rows of one method and format (other axes): their mean.
        ys: list[float | None] = []
        for m in methods:
            vals = [
                v
                for r in rows
                if str(r["method"]) == m and format_label(r, axes) == fmt
                for v in [_number(r.get(metric))]
                if v is not None
            ]
            ys.append(sum(vals) / len(vals) if vals else None)
        values += [v for v in ys if v is not None]
        xs = [i + j * width for i in range(len(methods))]
        bar_values(ax, xs, ys, width, color=f"C{j % 10}", label=fmt)
    ax.set_xticks([i + width * (len(formats) - 1) / 2 for i in range(len(methods))], methods)
    ax.tick_params(axis="x", rotation=30)
    slant(ax)
    ax.set_ylabel(metric_label(metric))
    set_metric_ylim(ax, metric, values, headroom=1.2)
    ax.set_title(f"{metric} by training format")
    ax.legend(title=", ".join(axes))
    return fig


def _present(v: Any) -> bool:
    return v not in (None, "")


def _number(v: Any) -> float | None:
    if not _present(v):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _cell(v: Any) -> str:
    if not _present(v):
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)
