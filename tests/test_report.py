"""Capacity analysis: T_max by hand, its edge cases, the table, and the written report."""

from __future__ import annotations

import csv
import math

import pytest
from matplotlib.figure import Figure

from jaxlora.capacity import Capacity, efficiency, saturation_capacity
from jaxlora.errors import DataError
from jaxlora.report import (
    capacity_table,
    plot_accuracy_vs_size,
    plot_capacity_vs_rank,
    plot_efficiency_vs_rank,
    read_results,
    save_figure,
    sweep_columns,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# ----------------------------------------------------------------------------- T_max


def test_interpolation_by_hand():
    cap = saturation_capacity([1000, 2000, 4000], [1.0, 0.97, 0.80], tau=0.95)
    # Last size >= tau is 2000 (0.97); the crossing toward 4000 (0.80) is at 2/17 of the gap.
    assert cap.kind == "interpolated"
    assert cap.value == pytest.approx(2000 + (0.97 - 0.95) / (0.97 - 0.80) * 2000)
    # the figure rounded to 3 decimals, as written by hand: abs 1e-3
    assert cap.value == pytest.approx(2235.294, abs=1e-3)
    assert str(cap) == "2,235"


def test_unsorted_input_is_sorted_first():
    assert saturation_capacity([4000, 1000, 2000], [0.80, 1.0, 0.97]) == saturation_capacity(
        [1000, 2000, 4000], [1.0, 0.97, 0.80]
    )


@pytest.mark.parametrize(
    "sizes, accs, expected",
    [
        ([1000], [0.99], Capacity(1000, "at_least")),  # single point above
        ([1000], [0.50], Capacity(1000, "below")),  # single point below
        ([1000, 2000, 4000], [1.0, 0.99, 0.96], Capacity(4000, "at_least")),  # all above
        ([1000, 2000, 4000], [0.9, 0.5, 0.1], Capacity(1000, "below")),  # all below
        ([1000, 2000, 4000], [1.0, 0.95, 0.5], Capacity(2000, "exact")),  # hits tau, then drops
        ([1000, 2000, 4000], [1.0, 1.0, 0.95], Capacity(4000, "at_least")),  # hits tau at the end
        ([1000, 2000], [19 / 20, 0.5], Capacity(1000, "exact")),
        ([1000, 2000], [57 / 60, 0.5], Capacity(1000, "exact")),  # 0.95 up to float rounding
    ],
)
def test_edge_cases(sizes, accs, expected):
    assert saturation_capacity(sizes, accs, tau=0.95) == expected


def test_non_monotone_curve_uses_the_last_crossing():
    # Dips below tau at 2000, recovers at 4000: the largest size reaching tau is 4000.
    cap = saturation_capacity([1000, 2000, 4000, 8000], [1.0, 0.9, 0.97, 0.5])
    assert cap.kind == "interpolated"
    # the same interpolation in floats: approx's default relative 1e-6 is rounding only
    assert cap.value == pytest.approx(4000 + 0.02 / 0.47 * 4000)


def test_duplicate_sizes_are_averaged():
    # Two seeds at 1000 (1.0, 0.9) average to 0.95 exactly: T_max is 1000.
    assert saturation_capacity([1000, 1000, 2000], [1.0, 0.9, 0.5]) == Capacity(1000, "exact")
    cap = saturation_capacity([1000, 2000, 2000], [1.0, 1.0, 0.94], tau=0.95)
    # a float size that should be 2000 exactly: abs 1e-6 is rounding only
    assert cap.value == pytest.approx(2000, abs=1e-6) and cap.kind == "at_least"


@pytest.mark.parametrize(
    "sizes, accs, match",
    [
        ([1000, 2000], [1.0, math.nan], "accuracy at size 2,000 is nan"),
        ([1000, 2000], [1.0], "2 sizes but 1 accuracies"),
        ([], [], "no \\(size, accuracy\\) points"),
        ([math.inf], [1.0], "not a finite number"),
    ],
)
def test_bad_curves_are_data_errors(sizes, accs, match):
    with pytest.raises(DataError, match=match):
        saturation_capacity(sizes, accs)


def test_capacity_str():
    assert str(Capacity(3250.4, "interpolated")) == "3,250"
    assert str(Capacity(4000, "exact")) == "4,000"
    assert str(Capacity(4000, "at_least")) == ">= 4,000"
    assert str(Capacity(1000, "below")) == "< 1,000"
    assert str(Capacity(None, "below")) == "n/a"
    assert Capacity(4000, "at_least").is_bound and not Capacity(4000, "exact").is_bound


def test_efficiency():
    # float quotients: approx's default relative 1e-6 is rounding only
    assert efficiency(Capacity(3000, "interpolated"), 1500) == pytest.approx(2.0)
    assert efficiency(Capacity(8000, "at_least"), 1000) == pytest.approx(8.0)  # a lower bound
    assert efficiency(Capacity(1000, "below"), 1000) is None
    with pytest.raises(DataError, match="trainable_params must be positive"):
        efficiency(Capacity(1000, "exact"), 0)


# ----------------------------------------------------------------------------- results table

RANKS = (2, 8, 32, 128)
SIZES = (1000, 2000, 4000, 8000)
# Bigger ranks saturate later; the expected T_max (tau 0.95) is worked out by hand.
ACCURACY = {
    2: (0.90, 0.60, 0.30, 0.10),  # below tau from the start         -> "< 1,000"
    8: (1.00, 0.90, 0.50, 0.20),  # 1000 + 0.05/0.10 * 1000          -> "1,500"
    32: (1.00, 1.00, 0.97, 0.77),  # 4000 + 0.02/0.20 * 4000         -> "4,400"
    128: (1.00, 1.00, 1.00, 0.99),  # still above at the largest size -> ">= 8,000"
}
EXPECTED_T_MAX = {2: "< 1,000", 8: "1,500", 32: "4,400", 128: ">= 8,000"}


def _results_rows(seeds=(0, 1), lrs=(5e-5,)):
    rows = []
    for lr in lrs:
        for rank in RANKS:
            for size, acc in zip(SIZES, ACCURACY[rank], strict=True):
                for seed in seeds:
                    # Seeds straddle the mean, so averaging them recovers ACCURACY.
                    jitter = 0.01 if seed % 2 else -0.01
                    rows.append(
                        {
                            "name": f"r{rank}-s{size}-seed{seed}-lr{lr}",
                            "rank": rank,
                            "size_tokens": size,
                            "trainable_params": rank * 1000,
                            "lr": lr,
                            "dataset": "phonebook",
                            "seed": seed,
                            "accuracy": acc + (jitter if len(seeds) > 1 else 0.0),
                            "final_loss": 0.1 * rank + size / 1e4 + seed,
                            "train_seconds": 3.5 + seed,
                        }
                    )
    return rows


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_sweep_columns_ignore_identity_and_results():
    rows = _results_rows(lrs=(5e-5, 1e-4))
    # seed, final_loss and train_seconds vary but are not configuration; dataset is constant.
    assert sweep_columns(rows) == ["rank", "lr"]
    assert sweep_columns(_results_rows()) == ["rank"]


def test_capacity_table_per_rank_with_seeds_averaged():
    table = capacity_table(_results_rows())
    assert [row["rank"] for row in table] == list(RANKS)
    for row in table:
        assert str(row["T_max"]) == EXPECTED_T_MAX[row["rank"]]
        assert row["trainable_params"] == row["rank"] * 1000
        assert list(row["accuracies"]) == list(SIZES)
        # seeds' float means: approx's default relative 1e-6 is rounding only
        assert list(row["accuracies"].values()) == pytest.approx(ACCURACY[row["rank"]])
        assert row["group"] == {"rank": row["rank"]}
    eff = {row["rank"]: row["efficiency"] for row in table}
    assert eff[2] is None
    # float quotients: rounding only
    assert eff[8] == pytest.approx(1500 / 8000)
    assert eff[128] == pytest.approx(8000 / 128000)


def test_capacity_table_splits_a_swept_column():
    table = capacity_table(_results_rows(seeds=(0,), lrs=(1e-4, 5e-5)))
    assert [(row["rank"], row["lr"]) for row in table] == [
        (r, lr) for r in RANKS for lr in (5e-5, 1e-4)
    ]
    # Forcing rank-only grouping averages the two (identical) lr curves instead.
    merged = capacity_table(_results_rows(seeds=(0,), lrs=(1e-4, 5e-5)), group_by=["rank"])
    assert [str(row["T_max"]) for row in merged] == [EXPECTED_T_MAX[r] for r in RANKS]


def test_capacity_table_errors():
    rows = _results_rows(seeds=(0,))
    with pytest.raises(DataError, match="no column efficacy"):
        capacity_table(rows, metric="efficacy")
    with pytest.raises(DataError, match="lacks 'rank'"):
        capacity_table(rows, group_by=["lr"])
    bad = [dict(r) for r in rows]
    bad[3]["trainable_params"] = 1
    with pytest.raises(DataError, match="trainable_params differs within rank=2"):
        capacity_table(bad)
    bad = [dict(r) for r in rows]
    bad[5]["accuracy"] = None
    with pytest.raises(DataError, match=f"adapter '{bad[5]['name']}' has no accuracy value"):
        capacity_table(bad)
    bad = [dict(r) for r in rows]
    bad[0]["rank"] = "eight"
    with pytest.raises(DataError, match="has rank='eight'; it must be a whole number"):
        capacity_table(bad)
    with pytest.raises(DataError, match="no results rows"):
        capacity_table([])


def test_read_results_parses_numbers(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text(
        "name,rank,size_tokens,trainable_params,lr,accuracy,note\n"
        "007,8,1000,8000,5e-05,0.75,1_000\n"
        "b,8,2000,8000,1e-4,nan,\n"
    )
    rows = read_results(path)
    assert rows[0] == {
        "name": "007",  # names stay strings
        "rank": 8,
        "size_tokens": 1000,
        "trainable_params": 8000,
        "lr": 5e-05,
        "accuracy": 0.75,
        "note": "1_000",  # int() would accept this; a results table should not
    }
    assert math.isnan(rows[1]["accuracy"]) and rows[1]["note"] is None


# ----------------------------------------------------------------------------- plots and report


def test_plots_accept_rows_or_table_and_return_figures():
    rows = _results_rows(seeds=(0,))
    table = capacity_table(rows)
    for plot in (plot_accuracy_vs_size, plot_capacity_vs_rank, plot_efficiency_vs_rank):
        assert isinstance(plot(rows), Figure)
        assert isinstance(plot(table), Figure)
    assert isinstance(plot_accuracy_vs_size(rows, log2_x=False), Figure)
    with pytest.raises(DataError, match=r"computed for accuracy at tau=0\.95"):
        plot_capacity_vs_rank(table, tau=0.9)


def test_svg_is_reproducible(tmp_path):
    # A re-run of the report (a fresh figure, saved once) gives byte-identical SVG.
    for stem in ("a", "b"):
        save_figure(plot_capacity_vs_rank(_results_rows(seeds=(0,))), tmp_path / stem)
    assert (tmp_path / "a.svg").read_bytes() == (tmp_path / "b.svg").read_bytes()


def test_write_report(tmp_path):
    _write_csv(tmp_path / "results.csv", _results_rows())
    report = write_report(tmp_path)
    assert report == tmp_path / "report.md"
    text = report.read_text()
    for rank in RANKS:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {rank} |"))
        assert f"| {EXPECTED_T_MAX[rank]} |" in line
    assert "| 8 | 8,000 | 1,500 | 0.188 | 1.000 | 0.900 | 0.500 | 0.200 |" in text
    assert "| 128 | 128,000 | >= 8,000 | >= 0.0625 |" in text
    assert "tau = 0.95" in text and "accuracy @ 8K" in text
    for name in ("accuracy_vs_size", "capacity_vs_rank", "efficiency_vs_rank"):
        assert f"plots/{name}.png" in text
        assert (tmp_path / "plots" / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
        svg = (tmp_path / "plots" / f"{name}.svg").read_text()
        assert svg.startswith("<?xml") and "<svg" in svg and svg.rstrip().endswith("</svg>")
    # Atomic writes leave no temporary files behind.
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_report_of_a_grid_where_nothing_saturates(tmp_path):
    rows = [dict(r, accuracy=0.0) for r in _results_rows(seeds=(0,))]
    _write_csv(tmp_path / "results.csv", rows)
    text = write_report(tmp_path).read_text()
    assert all(f"| {rank} |" in text and "< 1,000" in text for rank in RANKS)
    for name in ("accuracy_vs_size", "capacity_vs_rank", "efficiency_vs_rank"):
        assert (tmp_path / "plots" / f"{name}.png").read_bytes().startswith(PNG_MAGIC)


def test_write_report_errors(tmp_path):
    with pytest.raises(DataError, match=r"results\.csv not found") as err:
        write_report(tmp_path)
    assert "\n" not in str(err.value)
    _write_csv(tmp_path / "results.csv", _results_rows(seeds=(0,)))
    with pytest.raises(DataError, match="no column bleu") as err:
        write_report(tmp_path, metric="bleu")
    assert "\n" not in str(err.value)
    assert "pass metric= one of: accuracy, final_loss, train_seconds" in str(err.value)
    (tmp_path / "results.csv").write_text("name,rank,size_tokens,trainable_params,accuracy\n")
    with pytest.raises(DataError, match="has no rows"):
        write_report(tmp_path)
    assert not (tmp_path / "report.md").exists()
