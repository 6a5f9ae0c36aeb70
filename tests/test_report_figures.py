"""Honest figures and tables (issue 28, point 4): lines drawn over each other stay visible and
are named, dropped points are named, bars carry their values ("n/a" for a missing one), axes of
bounded metrics start at 0 and name their scale, labels read key=value, no "None" cell, and the
memory report does not call a rate that includes compilation a speed.

Every figure is built from rows written by hand and inspected as matplotlib objects (lines,
markers, texts, limits, labels); nothing is trained."""

from __future__ import annotations

import csv
import math

import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.text import Text

from jaxlora.figures import coinciding, metric_label, metric_scale, scales_note
from jaxlora.memory import docreport, results
from jaxlora.memory.report import (
    SPEED_HEADER,
    plot_by_method,
    plot_routing,
    plot_vs_k,
    render_markdown,
    write_memory_report,
)
from jaxlora.report import (
    capacity_table,
    plot_accuracy_vs_size,
    plot_capacity_vs_rank,
    plot_efficiency_vs_rank,
    write_report,
)

# ----------------------------------------------------------------------------- helpers


def _texts(fig: Figure) -> list[str]:
    """Every text the figure draws (titles, labels, notes, bar values, legend entries)."""
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def _notes(fig: Figure) -> str:
    """The notes under the axes (`jaxlora.figures.add_notes`), joined."""
    return "\n".join(t.get_text() for t in fig.findobj(Text) if t.get_gid() == "jaxlora-note")


def _lines(fig: Figure) -> dict[str, object]:
    """The labelled data lines of the figure's axes, by label."""
    ax = fig.axes[0]
    return {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}


def _bars(ax) -> list[Rectangle]:
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def _value_texts(ax, gid: str) -> list[tuple[float, str]]:
    """(x, text) of the bar value labels ("jaxlora-value") or the missing marks
    ("jaxlora-missing")."""
    return sorted((t.get_position()[0], t.get_text()) for t in ax.texts if t.get_gid() == gid)


def _capacity_rows(curves: dict[int, tuple], sizes=(1000, 2000, 4000, 8000)) -> list[dict]:
    """results.csv rows (as `jaxlora/evaluate.py` writes them) of one curve per rank; a None
    accuracy leaves that (rank, size) cell out, as an adapter that was never evaluated."""
    rows = []
    for rank, accs in curves.items():
        for size, acc in zip(sizes, accs, strict=True):
            if acc is None:
                continue
            rows.append(
                {
                    "name": f"r{rank}-s{size}",
                    "rank": rank,
                    "size_tokens": size,
                    "n_facts": size // 10,
                    "trainable_params": rank * 1000,
                    "accuracy": acc,
                    "eval_seconds": 1.5,
                }
            )
    return rows


# ----------------------------------------------------------------------------- capacity plots


def test_coinciding_capacity_curves_get_their_own_markers_and_a_note():
    # rank 8 and rank 16 saturate alike: one line would hide the other.
    rows = _capacity_rows(
        {
            2: (0.9, 0.6, 0.3, 0.1),
            8: (1.0, 1.0, 0.97, 0.5),
            16: (1.0, 1.0, 0.97, 0.5),
            32: (1.0, 1.0, 1.0, 0.9),
        }
    )
    fig = plot_accuracy_vs_size(rows)
    lines = _lines(fig)
    r8, r16 = lines["rank=8"], lines["rank=16"]
    assert list(r8.get_ydata()) == list(r16.get_ydata())  # they do coincide
    assert r8.get_marker() != r16.get_marker()
    assert r8.get_linestyle() != r16.get_linestyle()
    assert r8.get_markersize() > r16.get_markersize()  # the later one drawn inside the first
    markers = [ln.get_marker() for label, ln in lines.items() if label.startswith("rank=")]
    assert len(set(markers)) == len(markers) == 4
    note = _notes(fig)
    assert "rank=8; rank=16" in note
    assert "rank=2" not in note and "rank=32" not in note

    # No note when no two lines coincide.
    distinct = _capacity_rows({8: (1.0, 0.9, 0.5, 0.2), 16: (1.0, 1.0, 0.9, 0.5)})
    assert _notes(plot_accuracy_vs_size(distinct)) == ""


def test_coinciding_series_of_a_swept_column_are_named_in_the_rank_plots():
    rows = []
    for lr in (1e-4, 3e-4):
        for row in _capacity_rows({8: (1.0, 0.9, 0.5, 0.2), 16: (1.0, 1.0, 0.9, 0.5)}):
            rows.append({**row, "name": f"{row['name']}-lr{lr}", "training.lr": lr})
    fig = plot_capacity_vs_rank(rows)
    lines = _lines(fig)
    a, b = lines["training.lr=0.0001"], lines["training.lr=0.0003"]
    assert a.get_linestyle() != b.get_linestyle()
    assert "training.lr=0.0001; training.lr=0.0003" in _notes(fig)


def test_efficiency_plot_names_the_ranks_it_cannot_draw():
    # rank 2 is below tau at the smallest size: it has no efficiency, so no point.
    rows = _capacity_rows(
        {2: (0.6, 0.3, 0.1, 0.0), 8: (1.0, 0.9, 0.5, 0.2), 32: (1.0, 1.0, 0.97, 0.77)}
    )
    fig = plot_efficiency_vs_rank(rows)
    drawn = [x for ln in fig.axes[0].get_lines() for x in ln.get_xdata()]
    assert 2 not in drawn and 8 in drawn
    note = _notes(fig)
    assert "not shown" in note and "rank=2" in note and "rank=8" not in note
    assert "below tau" in note
    # The capacity plot draws rank 2 (as a "<" bound): nothing dropped, no note.
    fig = plot_capacity_vs_rank(rows)
    assert 2 in [x for ln in fig.axes[0].get_lines() for x in ln.get_xdata()]
    assert "not shown" not in _notes(fig)


def test_a_missing_grid_cell_is_named_under_the_accuracy_plot():
    rows = _capacity_rows({8: (1.0, 0.9, 0.5, 0.2), 32: (1.0, 1.0, None, 0.8)})
    note = _notes(plot_accuracy_vs_size(rows))
    assert "rank=32 at 4K" in note and "rank=8" not in note


def test_accuracy_axis_starts_at_zero_and_names_its_scale():
    # Nothing learned: every accuracy 0.0. matplotlib alone would centre the axis on 0.
    rows = _capacity_rows({8: (0.0, 0.0, 0.0, 0.0), 16: (0.0, 0.0, 0.0, 0.0)})
    ax = plot_accuracy_vs_size(rows).axes[0]
    bottom, top = ax.get_ylim()
    assert bottom == 0.0 and top >= 1.0
    assert max(ax.get_yticks()) <= 1.0  # no tick label beyond the metric's range
    assert ax.get_ylabel() == "accuracy (0-1)"
    # A metric without a known range keeps matplotlib's limits and its plain name.
    rows = [{**r, "loss_metric": 2.0 + r["rank"]} for r in rows]
    ax = plot_accuracy_vs_size(rows, metric="loss_metric", tau=0.5).axes[0]
    assert ax.get_ylabel() == "loss_metric" and ax.get_ylim()[1] > 10


def test_capacity_report_prints_no_none_for_a_blank_cell(tmp_path):
    # A swept column blank for some adapters (a default left empty) is its own configuration.
    rows = []
    for objective in ("ntp", None):
        for row in _capacity_rows({8: (1.0, 0.9, 0.5, 0.2)}):
            rows.append({**row, "name": f"{row['name']}-{objective}", "objective": objective})
    with open(tmp_path / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = write_report(tmp_path).read_text()
    assert "None" not in text
    assert "| 8 | ntp |" in text and "| 8 | – |" in text
    legend = plot_accuracy_vs_size(capacity_table(rows)).axes[0].get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert "rank=8, objective=ntp" in labels and "rank=8, objective=–" in labels


# ----------------------------------------------------------------------------- scales


@pytest.mark.parametrize(
    ("metric", "top", "label"),
    [
        ("accuracy", 1.0, "accuracy (0-1)"),
        ("rouge_l", 1.0, "rouge_l (0-1)"),
        ("rougeLsum", 1.0, "rougeLsum (0-1)"),
        ("loglik_hard_accuracy", 1.0, "loglik_hard_accuracy (0-1)"),
        ("routing_recall", 1.0, "routing_recall (0-1)"),
        ("bleu", 100.0, "bleu (0-100)"),
        ("bleu_level2", 100.0, "bleu_level2 (0-100)"),
        ("judge", 10.0, "judge (0-10)"),
        ("judge_level3", 10.0, "judge_level3 (0-10)"),
        ("final_loss", None, "final_loss"),
        ("judge_failed", None, "judge_failed"),
        ("questions_per_s", None, "questions_per_s"),
    ],
)
def test_metric_scales(metric, top, label):
    assert metric_scale(metric) == top
    assert metric_label(metric) == label


def test_scales_note_groups_metric_families():
    note = scales_note(["bleu", "rouge_l", "accuracy", "judge", "n_questions"])
    assert note == "Scales: bleu 0-100; rouge_l, accuracy 0-1; judge 0-10."
    assert scales_note(["n_questions", "truncated"]) == ""


def test_coinciding_tolerates_rounding_but_not_a_real_difference():
    same = {"a": [(1, 0.5), (2, 0.25)], "b": [(2, 0.25), (1, 0.5 + 1e-9)], "c": [(1, 0.5)]}
    assert coinciding(same) == [["a", "b"]]
    assert coinciding({"a": [(1, 0.5)], "b": [(1, 0.45)]}) == []


# ----------------------------------------------------------------------------- memory report


def _memory_row(lib: str, objective: str, method: str, accuracy, **extra) -> dict:
    """A memory_results.csv row of a run swept over training.objective (two libraries)."""
    router, _, rest = method.partition("@")
    k, _, combiner = rest.partition("/")
    row = {c: None for c in results.columns(["training.objective"])}
    row.update(
        library=lib,
        **{"training.objective": objective},
        method=method,
        router=None if router in ("base",) else router,
        k=0 if method == "base" else int(k or 1),
        combiner=combiner or None,
        context="none",
        accuracy=accuracy,
        truncated=0,
        n_questions=40,
        questions_per_s=101.5,
    )
    row.update(extra)
    return row


# The labels as `jaxlora/memory/evaluate.py` writes them: sweep key and value glued together.
NTP, DISTILL = "objectiventp", "objectivedistill"


def _memory_rows() -> list[dict]:
    rows = []
    for lib, obj in ((NTP, "ntp"), (DISTILL, "distill")):
        rows += [
            _memory_row(lib, obj, "base", 0.0),
            _memory_row(lib, obj, "bm25", 0.5, routing_top1=1.0, routing_recall=1.0),
            _memory_row(lib, obj, "bm25@2/ties", 0.5, routing_top1=1.0, routing_recall=1.0),
            _memory_row(lib, obj, "bm25@3/ties", 0.25, routing_top1=1.0, routing_recall=1.0),
        ]
    rows.append(_memory_row(NTP, "ntp", "oracle", 1.0))  # distill has no oracle row
    return rows


def test_bars_carry_their_values_and_a_missing_method_says_na():
    fig = plot_by_method(_memory_rows(), "accuracy")
    ax = fig.axes[0]
    methods = [t.get_text() for t in ax.get_xticklabels()]
    assert methods == ["base", "bm25", "bm25@2/ties", "bm25@3/ties", "oracle"]
    # 9 values, 9 bars: base's two 0.0 bars are there (height 0) and labelled "0.00".
    bars = _bars(ax)
    assert len(bars) == 9
    assert sorted(round(b.get_height(), 2) for b in bars).count(0.0) == 2
    values = [text for _, text in _value_texts(ax, "jaxlora-value")]
    assert values.count("0.00") == 2 and values.count("1.00") == 1 and values.count("0.50") == 4
    # distill's oracle has no row: no bar, an "n/a" where it would be (right of ntp's oracle).
    missing = _value_texts(ax, "jaxlora-missing")
    assert [text for _, text in missing] == ["n/a"]
    oracle_x = max(b.get_x() + b.get_width() / 2 for b in bars)
    assert missing[0][0] > oracle_x
    assert ax.get_xlim()[1] > missing[0][0]  # inside the axes, not cut off
    # Legend by key=value, never the glued label.
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["objective=ntp", "objective=distill"]
    assert not any(NTP in t or DISTILL in t for t in _texts(fig))


def test_a_zero_metric_axis_starts_at_zero():
    # QuALITY with nothing right: all bars 0.0; the axis must not run from -0.04.
    rows = [
        _memory_row("", "ntp", "base", 0.0, hard_accuracy=0.0),
        _memory_row("", "ntp", "bm25", 0.0, hard_accuracy=0.0),
    ]
    ax = plot_by_method(rows, "accuracy").axes[0]
    bottom, top = ax.get_ylim()
    assert bottom == 0.0 and top >= 1.0
    assert ax.get_ylabel() == "accuracy (0-1)"
    assert [text for _, text in _value_texts(ax, "jaxlora-value")] == ["0.00", "0.00"]


def test_coinciding_k_curves_are_distinct_and_named_and_a_missing_point_is_a_gap():
    rows = _memory_rows()
    # A third curve per library, bm25@k/linear: on ntp the same points as ties; on distill
    # its k=2 value is missing (blank cell).
    rows += [
        _memory_row(NTP, "ntp", "bm25@2/linear", 0.5),
        _memory_row(NTP, "ntp", "bm25@3/linear", 0.25),
        _memory_row(DISTILL, "distill", "bm25@2/linear", None),
        _memory_row(DISTILL, "distill", "bm25@3/linear", 0.25),
    ]
    fig = plot_vs_k(rows, "accuracy")
    lines = _lines(fig)
    assert set(lines) == {
        "objective=ntp: bm25@k/ties",
        "objective=ntp: bm25@k/linear",
        "objective=distill: bm25@k/ties",
        "objective=distill: bm25@k/linear",
    }
    assert len({ln.get_marker() for ln in lines.values()}) == 4
    assert len({ln.get_markersize() for ln in lines.values()}) == 4
    note = _notes(fig)
    # The three curves with points (1, .5), (2, .5), (3, .25) are named together.
    same = next(line for line in note.split("\n") if line.startswith("same points"))
    for label in ("objective=ntp: bm25@k/ties", "objective=ntp: bm25@k/linear"):
        assert label in same
    assert "objective=distill: bm25@k/ties" in same
    assert "objective=distill: bm25@k/linear" not in same
    # The missing value: a gap in the line (never a 0), named in the note.
    gap = lines["objective=distill: bm25@k/linear"]
    ys = list(gap.get_ydata())
    assert list(gap.get_xdata()) == [1, 2, 3] and math.isnan(ys[1]) and ys[2] == 0.25
    assert "objective=distill: bm25@k/linear at k=2" in note
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0.0 and ax.get_ylabel() == "accuracy (0-1)"


def test_routing_bars_say_na_for_a_missing_recall():
    rows = _memory_rows()
    rows[1]["routing_recall"] = None  # ntp bm25: top-1 but no recall
    ax = plot_routing(rows).axes[0]
    assert [t for _, t in _value_texts(ax, "jaxlora-missing")] == ["n/a"]
    assert len(_bars(ax)) == 2 * 6 - 1
    assert ax.get_ylim()[0] == 0.0
    assert "objective=ntp bm25" in [t.get_text() for t in ax.get_xticklabels()]


def test_memory_report_tables(tmp_path):
    rows = _memory_rows()
    text = render_markdown(rows, "accuracy")
    assert "## Library objective=ntp" in text and "## Library objective=distill" in text
    assert NTP not in text and DISTILL not in text
    assert "None" not in text
    # questions_per_s includes compilation: the header and a sentence say so.
    assert f"| {SPEED_HEADER} |" in text and "compilation included" in text
    assert "Scales: accuracy, routing_top1, routing_recall 0-1." in text
    # A blank router / combiner reads "-".
    assert "| ntp | base | - | 0 | - | none | 0.000 |" in text
    # With a compile time of its own, the rate is shown as it is.
    timed = render_markdown([{**r, "compile_seconds": 3.0} for r in rows], "accuracy")
    assert SPEED_HEADER not in timed and "| questions_per_s |" in timed

    # The same from a written memory_results.csv, read back (blank cells as None).
    fields = results.columns(["training.objective"])
    with open(tmp_path / "memory_results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows([{k: "" if v is None else v for k, v in r.items()} for r in rows])
    report = write_memory_report(tmp_path).read_text()
    assert "None" not in report and "## Library objective=ntp" in report
    for stem in ("memory_by_method", "memory_routing", "memory_vs_k"):
        assert f"](plots/{stem}.png)" in report


def test_library_names_use_short_keys_unless_two_axes_share_one():
    rows = [
        {"library": "rank8-objectiventp", "lora.rank": 8, "training.objective": "ntp"},
        {"library": "rank8-objectiventp", "lora.rank": 8, "training.objective": "ntp"},
        {"library": "rank16-objectivedistill", "lora.rank": 16, "training.objective": "distill"},
    ]
    assert docreport.library_names(rows) == {
        "rank8-objectiventp": "rank=8, objective=ntp",
        "rank16-objectivedistill": "rank=16, objective=distill",
    }
    clash = [{"library": "x", "a.rank": 1, "b.rank": 2}]
    assert docreport.library_names(clash) == {"x": "a.rank=1, b.rank=2"}
    assert docreport.library_names([{"library": "", "method": "bm25"}]) == {"": ""}


# ----------------------------------------------------------------------------- documents


def _paperqa_rows() -> list[dict]:
    rows = []
    for header in ("bracket", "natural"):
        for method, bleu, rouge in (("oracle", 12.5, 0.4), ("bm25@2/ties", 0.0, None)):
            rows.append(
                {
                    "library": f"paper_header{header}",
                    "data.paper_header": header,
                    "method": method,
                    "bleu": bleu,
                    "rouge_l": rouge,
                    "accuracy": 0.0,
                    **{f"bleu_level{lv}": bleu for lv in (1, 2, 3)},
                    **{f"rouge_l_level{lv}": rouge for lv in (1, 2, 3)},
                }
            )
    return rows


def test_paperqa_tables_name_bleu_and_rouge_scales():
    text = docreport.markdown(_paperqa_rows())
    assert "Scales: bleu 0-100; rouge_l, accuracy 0-1." in text
    assert "None" not in text


def test_per_level_bars_carry_values_and_missing_levels_say_na():
    # Without per-level ROUGE-L the plot shows BLEU (the judge and ROUGE-L lead when present).
    rows = [{k: v for k, v in r.items() if not k.startswith("rouge_l_")} for r in _paperqa_rows()]
    rows[0]["bleu_level2"] = None  # oracle (bracket) never asked a level-2 question
    fig = docreport.plot_per_level(rows)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "bleu (0-100)"
    assert ax.get_ylim()[0] == 0.0 and ax.get_ylim()[1] >= 100.0
    assert len(_bars(ax)) == 4 * 3 - 1
    assert [t for _, t in _value_texts(ax, "jaxlora-missing")] == ["n/a"]
    values = [t for _, t in _value_texts(ax, "jaxlora-value")]
    assert values.count("0.00") == 6 and values.count("12.50") == 5
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0] == "paper_header=bracket oracle"


def test_format_bars_never_draw_a_missing_metric_as_zero():
    fig = docreport.plot_by_format(_paperqa_rows(), "rouge_l")
    ax = fig.axes[0]
    assert ax.get_ylabel() == "rouge_l (0-1)"
    # bm25@2/ties has no rouge_l in either format: two "n/a", no bars of height 0.
    assert len(_bars(ax)) == 2
    assert all(b.get_height() == pytest.approx(0.4) for b in _bars(ax))
    assert [t for _, t in _value_texts(ax, "jaxlora-missing")] == ["n/a", "n/a"]
