"""Capacity analysis of an adapter grid: from `results.csv` to T_max, efficiency and plots.

The study asks how much knowledge a LoRA adapter holds as a function of its rank. A run's
`results.csv` has one row per adapter (at least `name, rank, size_tokens, trainable_params`
and a metric such as `accuracy`); this module turns it into:

- **T_max(tau)**, the saturation capacity of each configuration: the largest knowledge size
  (training tokens) whose accuracy is still >= tau, read off the accuracy-vs-size curve
  (`saturation_capacity` in jaxlora/capacity.py; the rule and its edge cases are in its
  docstring). It is a `Capacity`, a value plus how it was obtained, because a grid often
  brackets the answer only from one side: "still >= tau at the largest size" (`>= 20,000`) and
  "below tau at the smallest" (`< 1,000`) are bounds, not measurements, and the report and
  plots keep them visibly apart.
- **efficiency** = T_max / trainable parameters: tokens stored per trainable parameter.
- one table row per configuration (`capacity_table`), a markdown report and three figures
  (`write_report`).

Which rows form one curve: all adapters that share `rank` and every other *swept* column, i.e.
every column that varies across the file except identity and result columns (`name`,
`size_tokens`, `seed`, `trainable_params`, the metric, and the result columns listed in
`RESULT_COLUMNS` / `RESULT_SUFFIXES`, such as losses and timings). A `lr` or `dataset` sweep
therefore gives one curve per (rank, lr) or (rank, dataset); seeds are averaged, as are any
other duplicate (configuration, size) rows. `group_by=` overrides the choice.

Figures are built on `matplotlib.figure.Figure` objects, never through pyplot's global state,
so no backend is selected or changed: a notebook shows the returned figure with its own
backend, and files are rendered by the format's own canvas (Agg for PNG). They follow
`jaxlora/figures.py`: each line has its own marker and dashes, lines with the same points and
points that cannot be drawn (a grid cell never evaluated, an efficiency below tau) are named in
a note under the axes, and the metric's axis starts at 0 and names its scale.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from jaxlora.capacity import Capacity, efficiency, mean_by_size, saturation_capacity
from jaxlora.errors import DataError
from jaxlora.figures import (
    DASHES,
    add_notes,
    coincide_notes,
    line_style,
    metric_label,
    set_metric_ylim,
)
from jaxlora.fsutil import atomic_write

IDENTITY_COLUMNS = ("name", "size_tokens", "seed", "trainable_params")
RESULT_COLUMNS = frozenset(
    {
        "accuracy",
        "efficacy",
        "exact_match",
        "bleu",
        "rouge_l",
        "judge",
        "judge_failed",
        "judge_failure_rate",
        "loss",
        "final_loss",
        "train_loss",
        "eval_loss",
        "grad_norm",
        "seconds",
        "time",
        "wall_s",
        "tokens_per_s",
        "step",
        "status",
    }
)
RESULT_SUFFIXES = (
    "_loss",
    "_s",
    "_seconds",
    "_time",
    "_per_s",
    "_per_hour",
    "_acc",
    "_accuracy",
    "_efficacy",
    "_bleu",
    "_rouge_l",
    "_score",
    "_count",
)
RESULT_PREFIXES = ("n_",)
PLOT_NAMES = ("accuracy_vs_size", "capacity_vs_rank", "efficiency_vs_rank")


# ----------------------------------------------------------------------------- results table

_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.I)


def _parse_cell(text: str) -> Any:
    """CSV text to int / float / str; an empty cell is None. Python's int() and float() alone
    would also accept "1_000", so the shape is checked first."""
    text = text.strip()
    if not text:
        return None
    if _INT_RE.fullmatch(text):
        return int(text)
    if _FLOAT_RE.fullmatch(text):
        return float(text)
    return text


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a results CSV with numbers parsed (`name` always stays a string)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found; evaluate the run first so it writes results.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [
            {k: (v or "").strip() if k == "name" else _parse_cell(v or "") for k, v in r.items()}
            for r in reader
        ]
    if not rows:
        raise DataError(f"{path} has no rows; evaluate at least one adapter first")
    return rows


def _is_result_column(column: str, metric: str) -> bool:
    return (
        column == metric
        or column in RESULT_COLUMNS
        or column.endswith(RESULT_SUFFIXES)
        or column.startswith(RESULT_PREFIXES)
    )


def sweep_columns(rows: Sequence[Mapping[str, Any]], metric: str = "accuracy") -> list[str]:
    """The columns that define one curve: `rank` first, then every other column that varies
    across `rows` and is neither an identity column nor a result (see the module docstring)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    varying = [
        c
        for c in columns
        if c != "rank"
        and c not in IDENTITY_COLUMNS
        and not _is_result_column(c, metric)
        and len({repr(row.get(c)) for row in rows}) > 1
    ]
    return ["rank", *varying]


def _sort_key(value: Any) -> tuple[int, Any]:
    # Numbers before strings before missing values, so mixed columns still sort.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value)) if value is not None else (2, "")


def _as_int(row: Mapping[str, Any], column: str) -> int:
    value = row.get(column)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataError(
            f"adapter {row.get('name')!r} has {column}={value!r}; it must be a whole number"
        )
    return value


def _metric_value(row: Mapping[str, Any], metric: str) -> float:
    value = row.get(metric)
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(
            f"adapter {row.get('name')!r} has no {metric} value ({value!r}); "
            "re-run its evaluation or remove the row"
        )
    return float(value)


def capacity_table(
    rows: Sequence[Mapping[str, Any]],
    metric: str = "accuracy",
    tau: float = 0.95,
    group_by: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per configuration (rank and any other swept column), sorted by those columns.

    Each row has the group columns at top level (`rank`, e.g. `lr`), plus
    `group` ({column: value} of the group columns, in order), `trainable_params`,
    `T_max` (a `Capacity`), `efficiency` (float or None), `accuracies` ({size: mean metric},
    sizes ascending), `metric` and `tau`. `group_by=None` picks the columns with
    `sweep_columns`; an explicit `group_by` must include "rank".
    """
    if not rows:
        raise DataError("no results rows; evaluate at least one adapter first")
    columns = set().union(*(row.keys() for row in rows))
    required = ["rank", "size_tokens", "trainable_params", metric]
    if missing := [c for c in required if c not in columns]:
        hint = ""
        if metric in missing:
            # Offer the result-like columns first: they are what metric= usually means.
            offer = sorted(c for c in columns if _is_result_column(c, metric)) or sorted(columns)
            hint = f"; pass metric= one of: {', '.join(offer)}"
        raise DataError(f"results have no column {', '.join(missing)}{hint}")
    group_cols = list(group_by) if group_by is not None else sweep_columns(rows, metric)
    if "rank" not in group_cols:
        raise DataError(f"group_by={tuple(group_cols)} lacks 'rank'; curves are per rank")
    if unknown := [c for c in group_cols if c not in columns]:
        raise DataError(f"group_by column {', '.join(unknown)} is not in the results")

    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        key = tuple(_as_int(row, c) if c == "rank" else row.get(c) for c in group_cols)
        groups[key].append(row)

    table = []
    for key in sorted(groups, key=lambda k: tuple(_sort_key(v) for v in k)):
        members = groups[key]
        group = dict(zip(group_cols, key, strict=True))
        label = _group_label(group)
        params = {_as_int(r, "trainable_params") for r in members}
        if len(params) > 1:
            raise DataError(
                f"trainable_params differs within {label} ({sorted(params)}); add the column "
                "that changes it to group_by"
            )
        sizes = [_as_int(r, "size_tokens") for r in members]
        values = [_metric_value(r, metric) for r in members]
        capacity = saturation_capacity(sizes, values, tau)
        n_params = params.pop()
        table.append(
            {
                **group,
                "group": group,
                "trainable_params": n_params,
                "T_max": capacity,
                "efficiency": efficiency(capacity, n_params),
                "accuracies": mean_by_size(sizes, values),
                "metric": metric,
                "tau": tau,
            }
        )
    return table


# ----------------------------------------------------------------------------- plots


def _as_table(
    table_or_rows: Sequence[Mapping[str, Any]], metric: str | None, tau: float | None
) -> tuple[list[dict[str, Any]], str, float]:
    """Accept either `capacity_table` output or raw results rows."""
    rows = list(table_or_rows)
    if rows and isinstance(rows[0].get("T_max"), Capacity):
        made_metric, made_tau = rows[0]["metric"], rows[0]["tau"]
        if (metric not in (None, made_metric)) or (tau not in (None, made_tau)):
            raise DataError(
                f"this table was computed for {made_metric} at tau={made_tau}; call "
                "capacity_table again with the metric and tau you want, or pass the raw rows"
            )
        return [dict(r) for r in rows], made_metric, made_tau
    metric, tau = metric or "accuracy", 0.95 if tau is None else tau
    return capacity_table(rows, metric, tau), metric, tau


def _fmt_value(value: Any) -> str:
    if value is None:  # a blank cell: never printed as "None" (the table's dash for no value)
        return "–"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _fmt_tokens(n: float) -> str:
    return f"{n / 1000:g}K" if n >= 1000 else f"{n:g}"


def _group_label(group: Mapping[str, Any]) -> str:
    """`rank=8, lr=0.0001`: key=value for each swept column."""
    return ", ".join(f"{c}={_fmt_value(v)}" for c, v in group.items())


def _others(row: Mapping[str, Any]) -> tuple:
    """The group values other than rank: the series a row belongs to in the per-rank plots."""
    return tuple((c, v) for c, v in row["group"].items() if c != "rank")


def _new_axes(title: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _label_ticks(axis: Any, ticks: Iterable[float], fmt: Any) -> None:
    """Ticks at the measured values only: a log axis' default powers of ten hide the grid."""
    ticks = sorted(set(ticks))
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_minor_locator(NullLocator())
    axis.set_ticklabels([fmt(t) for t in ticks])


def plot_accuracy_vs_size(
    table_or_rows: Sequence[Mapping[str, Any]],
    *,
    metric: str | None = None,
    tau: float | None = None,
    log2_x: bool = True,
) -> Figure:
    """Metric against knowledge size, one line per configuration, with the tau line.

    Each line has its own marker and dashes; lines with the same points are named in a note
    under the axes, as is every (configuration, size) cell of the grid without a value."""
    table, metric, tau = _as_table(table_or_rows, metric, tau)
    fig, ax = _new_axes(f"{metric} vs knowledge size")
    cmap = matplotlib.colormaps["viridis"]
    all_sizes = sorted({s for row in table for s in row["accuracies"]})
    series, missing = {}, []
    for i, row in enumerate(table):
        sizes = list(row["accuracies"])
        label = _group_label(row["group"])
        color = cmap(i / max(len(table) - 1, 1) * 0.9)
        ax.plot(sizes, list(row["accuracies"].values()), color=color, label=label, **line_style(i))
        series[label] = list(row["accuracies"].items())
        if gaps := [s for s in all_sizes if s not in row["accuracies"]]:
            missing.append(f"{label} at {', '.join(_fmt_tokens(s) for s in gaps)}")
    ax.axhline(tau, color="0.3", ls="--", lw=1, label=f"tau = {tau:g}")
    if log2_x:
        ax.set_xscale("log", base=2)
        _label_ticks(ax.xaxis, all_sizes, _fmt_tokens)
        if len(all_sizes) > 8:
            ax.tick_params(axis="x", labelrotation=45)
    ax.set_xlabel("knowledge size (training tokens)")
    ax.set_ylabel(metric_label(metric))
    set_metric_ylim(ax, metric, [v for row in table for v in row["accuracies"].values()])
    notes = coincide_notes(series)
    if missing:
        notes.append(f"no {metric} (not evaluated): {'; '.join(missing)}")
    add_notes(ax, notes)
    ax.legend(fontsize="small", ncol=2 if len(table) > 8 else 1)
    return fig


def _plot_per_rank(
    table: list[dict[str, Any]],
    title: str,
    ylabel: str,
    value_of: Any,
    log_y: bool,
    no_value: str = "no value",
) -> Figure:
    """Shared body of the capacity and efficiency plots: one series per non-rank config,
    point estimates filled, one-sided bounds as hollow triangles pointing where T_max lies.
    Series have their own dashes; a note under the axes names the configurations without a
    value (`no_value` says why) and the series that coincide."""
    fig, ax = _new_axes(title)
    series: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in table:
        series[_others(row)].append(row)
    markers = {"interpolated": "o", "exact": "o", "at_least": "^", "below": "v"}
    cmap = matplotlib.colormaps["tab10"]
    drawn: dict[str, list[tuple[float, float]]] = {}
    for i, (others, rows) in enumerate(series.items()):
        color = cmap(i % 10)
        points = sorted(
            ((r["rank"], value_of(r), r["T_max"].kind) for r in rows if value_of(r) is not None),
            key=lambda p: p[0],
        )
        label = _group_label(dict(others)) or None
        ls = DASHES[i % len(DASHES)]
        ax.plot([p[0] for p in points], [p[1] for p in points], ls=ls, color=color, label=label)
        drawn[label or "all"] = [(p[0], p[1]) for p in points]
        for rank, y, kind in points:
            hollow = kind in ("at_least", "below")
            ax.plot([rank], [y], markers[kind], ms=7, color=color, mfc="white" if hollow else color)
    ranks = [r["rank"] for r in table]
    ax.set_xscale("log", base=2)
    _label_ticks(ax.xaxis, ranks, lambda r: f"{r:g}")
    if not any(value_of(r) for r in table):  # e.g. no configuration reached tau
        ax.text(
            0.5,
            0.5,
            "no value to show: no configuration reached the threshold",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="0.4",
        )
    elif log_y:
        ax.set_yscale("log")
    else:
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel(ylabel)
    notes = coincide_notes(drawn)
    if dropped := [_group_label(r["group"]) for r in table if value_of(r) is None]:
        notes.append(f"not shown ({no_value}): {'; '.join(dropped)}")
    add_notes(ax, notes)
    legend = [
        Line2D([], [], marker="o", ls="", color="0.3", label="interpolated"),
        Line2D([], [], marker="^", ls="", color="0.3", mfc="white", label=">= (largest size)"),
        Line2D([], [], marker="v", ls="", color="0.3", mfc="white", label="< (smallest size)"),
    ]
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=[*handles, *legend], fontsize="small")
    return fig


def plot_capacity_vs_rank(
    table_or_rows: Sequence[Mapping[str, Any]],
    *,
    metric: str | None = None,
    tau: float | None = None,
) -> Figure:
    """T_max against rank; ">=" and "<" bounds drawn as hollow up / down triangles."""
    table, metric, tau = _as_table(table_or_rows, metric, tau)
    return _plot_per_rank(
        table,
        f"saturation capacity T_max ({metric} >= {tau:g})",
        "T_max (training tokens)",
        lambda r: r["T_max"].value,
        log_y=False,
    )


def plot_efficiency_vs_rank(
    table_or_rows: Sequence[Mapping[str, Any]],
    *,
    metric: str | None = None,
    tau: float | None = None,
) -> Figure:
    """T_max / trainable parameters against rank (log y); "<" cells have no value: they are
    left out and named in a note under the axes."""
    table, metric, tau = _as_table(table_or_rows, metric, tau)
    return _plot_per_rank(
        table,
        f"capacity efficiency ({metric} >= {tau:g})",
        "T_max / trainable parameters (tokens per parameter)",
        lambda r: r["efficiency"],
        log_y=True,
        no_value=f"{metric} below tau already at the smallest size: no efficiency",
    )


def save_figure(fig: Figure, stem: str | Path) -> list[Path]:
    """Write `stem.png` and `stem.svg` atomically; returns the two paths."""
    paths = []
    for fmt in ("png", "svg"):
        buf = io.BytesIO()
        # A fixed hash salt and no date make the SVG byte-identical across re-runs.
        with matplotlib.rc_context({"svg.hashsalt": "jaxlora"}):
            metadata = {"Date": None} if fmt == "svg" else None
            fig.savefig(buf, format=fmt, dpi=150, metadata=metadata)
        path = Path(f"{stem}.{fmt}")
        atomic_write(path, buf.getvalue())
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- report


def _fmt_efficiency(row: Mapping[str, Any]) -> str:
    value = row["efficiency"]
    if value is None:
        return "–"
    prefix = ">= " if row["T_max"].kind == "at_least" else ""
    return f"{prefix}{value:.3g}"


def render_markdown(table: list[dict[str, Any]], *, title: str = "Capacity report") -> str:
    """The report as markdown: definitions, the capacity table and links to the figures."""
    metric, tau = table[0]["metric"], table[0]["tau"]
    group_cols = list(table[0]["group"])
    sizes = sorted({s for row in table for s in row["accuracies"]})
    header = [
        *group_cols,
        "trainable params",
        "T_max (tokens)",
        "efficiency (tokens/param)",
        *(f"{metric} @ {_fmt_tokens(s)}" for s in sizes),
    ]
    lines = [
        f"# {title}",
        "",
        f"Metric `{metric}`, tau = {tau:g}. T_max(tau) is the largest knowledge size (training "
        f"tokens) whose {metric} is >= tau, linearly interpolated between that size and the next "
        "one, which is below tau. `>= N`: still >= tau at the largest size tried (a lower "
        "bound); `< N`: below tau already at the smallest size. Efficiency = T_max / trainable "
        "parameters. Rows with the same configuration and size (e.g. seeds) are averaged.",
        "",
        f"One row per {', '.join(group_cols)}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" for _ in header) + "|",
    ]
    for row in table:
        cells = [
            *(_fmt_value(row["group"][c]) for c in group_cols),
            f"{row['trainable_params']:,}",
            str(row["T_max"]),
            _fmt_efficiency(row),
            *(f"{row['accuracies'][s]:.3f}" if s in row["accuracies"] else "–" for s in sizes),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Figures", ""]
    for name in PLOT_NAMES:
        text = name.replace("_", " ")
        lines.append(f"![{text}](plots/{name}.png) ([svg](plots/{name}.svg))")
        lines.append("")
    return "\n".join(lines)


def write_report(
    run_dir: str | Path,
    metric: str = "accuracy",
    tau: float = 0.95,
    group_by: Sequence[str] | None = None,
) -> Path:
    """Read `run_dir/results.csv`; write `run_dir/report.md` and `run_dir/plots/*.{png,svg}`.

    Every file is written atomically, the figures first, so report.md never names a missing
    figure. Returns the path of report.md.
    """
    run_dir = Path(run_dir)
    table = capacity_table(read_results(run_dir / "results.csv"), metric, tau, group_by)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for name, plot in zip(
        PLOT_NAMES,
        (plot_accuracy_vs_size, plot_capacity_vs_rank, plot_efficiency_vs_rank),
        strict=True,
    ):
        save_figure(plot(table), plots / name)
    report = run_dir / "report.md"
    atomic_write(report, render_markdown(table, title=f"Capacity report: {run_dir.name}"))
    return report
