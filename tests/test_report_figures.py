"""Honest figures and tables (issue 28, point 4): lines drawn over each other stay visible and
are named, dropped points are named, bars carry their values ("n/a" for a missing one), axes of
bounded metrics start at 0 and name their scale, labels read key=value, no "None" cell, and the
memory report does not call a rate that includes compilation a speed.

Every figure is built from rows written by hand and inspected as matplotlib objects (lines,
markers, texts, limits, labels); nothing is trained."""

from __future__ import annotations

import csv

import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

from jaxlora.figures import coinciding, metric_label, metric_scale, scales_note
from jaxlora.report import (
    capacity_table,
    plot_accuracy_vs_size,
    plot_capacity_vs_rank,
    plot_efficiency_vs_rank,
    write_report,
)

# ----------------------------------------------------------------------------- helpers


def _notes(fig: Figure) -> str:
    """The notes under the axes (`jaxlora.figures.add_notes`), joined."""
    return "\n".join(t.get_text() for t in fig.findobj(Text) if t.get_gid() == "jaxlora-note")


def _lines(fig: Figure) -> dict[str, object]:
    """The labelled data lines of the figure's axes, by label."""
    ax = fig.axes[0]
    return {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}


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
