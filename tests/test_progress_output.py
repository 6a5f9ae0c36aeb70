"""What a job tells its user (issue 28, point 4): compile time apart from throughput, library
labels as key=value, plurals, a "compiling" line before the first step, progress bars for
evaluation and memory (none with --no-progress), and last lines that name every output."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
import yaml

from jaxlora.cli import main
from jaxlora.config import MemorySection
from jaxlora.evaluate import CompileClock, plural
from jaxlora.job import Job
from jaxlora.memory.evaluate import evaluate_memory
from jaxlora.memory.library import library_label
from jaxlora.memory.results import columns


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_plural():
    assert [plural(n, "method") for n in (0, 1, 2, 1000)] == [
        "0 methods",
        "1 method",
        "2 methods",
        "1,000 methods",
    ]


def test_compile_clock_counts_compilation_only():
    # A function traced and compiled for the first time inside the clock is counted...
    x = jnp.arange(7.0)
    fresh = jax.jit(lambda v: jnp.sin(v) * 3.0 + v[::-1])
    with CompileClock() as first:
        jax.block_until_ready(fresh(x))
    assert first.seconds > 0
    # ...its cached program is not, and a clock that has exited hears nothing more.
    with CompileClock() as again:
        jax.block_until_ready(fresh(x))
    assert again.seconds == 0
    counted = first.seconds
    jax.block_until_ready(jax.jit(lambda v: v * 5.0 - 1.0)(x))
    assert first.seconds == counted and again.seconds == 0
    assert first.split(first.seconds / 2) == (first.seconds / 2, 0.0)  # capped at the wall time
    compile_s, steady = first.split(first.seconds + 2.0)
    assert compile_s == first.seconds and steady == pytest.approx(2.0)


def test_library_labels_are_key_value():
    assert library_label([("training.objective", "ntp")], "sectors") == "objective=ntp"
    assert (
        library_label([("lora.rank", "8"), ("training.objective", "distill")], "sectors")
        == "rank=8,objective=distill"
    )
    # two axes with the same last part keep their whole keys
    assert (
        library_label([("lora.alpha", "8"), ("distill.alpha", "0.5")], "documents")
        == "lora.alpha=8,distill.alpha=0.5"
    )
    assert library_label([], "sectors") == "units=sectors"  # never blank


def test_memory_rows_name_their_library_and_time_compilation_apart(memory_run):
    rows = _rows(memory_run / "memory_results.csv")
    assert list(rows[0]) == list(columns([]))
    assert {r["library"] for r in rows} == {"units=sectors"}
    for r in rows:
        assert float(r["compile_seconds"]) >= 0 and float(r["questions_per_s"]) > 0
    # The first method (the base model) compiles the decoding: its time is in compile_seconds.
    assert float(rows[0]["compile_seconds"]) > 0
    report = (memory_run / "memory_report.md").read_text()
    assert "## Library units=sectors" in report
    assert "| compile_seconds | questions_per_s |" in report and "incl. compile" not in report


def test_memory_progress_bar_names_library_and_methods(memory_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(memory_run, copy)
    job = Job(_config(copy), jax.devices()[:1])
    capsys.readouterr()
    section = MemorySection(methods=("base",), max_new_tokens=4)
    evaluate_memory(job, copy, section, progress=True, out="one")
    err = capsys.readouterr().err
    n = int(_rows(memory_run / "memory_results.csv")[0]["n_questions"])
    assert "memory units=sectors: 1 method" in err and f"{n}/{n}" in err
    assert "1 methods" not in err
    capsys.readouterr()
    evaluate_memory(job, copy, section, progress=False, out="two")
    assert "memory units=sectors" not in capsys.readouterr().err


def test_results_from_before_key_value_labels_are_relabelled_not_duplicated(memory_run, tmp_path):
    """A result set written when the only library's label was "" keeps its methods, now under
    `units=sectors`, and a re-evaluated method replaces its old row."""
    copy = tmp_path / "run"
    shutil.copytree(memory_run, copy)
    path = copy / "memory_results.csv"
    old = _rows(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(old[0]))
        writer.writeheader()
        writer.writerows({**r, "library": ""} for r in old)
    predictions = copy / "memory_predictions.jsonl"
    predictions.write_text(
        predictions.read_text().replace('"library": "units=sectors"', '"library": ""')
    )
    section = MemorySection(methods=("base",), max_new_tokens=4)
    evaluate_memory(Job(_config(copy), jax.devices()[:1]), copy, section, progress=False)
    rows = _rows(path)
    assert [(r["library"], r["method"]) for r in rows] == [
        ("units=sectors", r["method"]) for r in old
    ]
    assert '"library": ""' not in predictions.read_text()


def _config(run_dir: Path):
    from jaxlora.config import load_config

    return load_config(run_dir / "config.yaml")


# A 2 ranks x 2 sizes grid trained for a few steps and evaluated: what the command line says.
GRID = {
    "model": {"path": "tiny-llama"},
    "lora": {"rank": 2, "dropout": 0.0},
    "data": {"dataset": "phonebook", "size_tokens": 100, "max_length": 64},
    "training": {"steps": 3, "batch_size": 4, "lr": 1.0e-3, "log_every": 1},
    "mesh": {"adapter": -1},  # the command line takes every (simulated CPU) device
    "checkpoint": {"every_steps": 1000},
    "eval": {"max_new_tokens": 4, "batch_size": 4},
    "sweep": {"lora.rank": [2, 4], "data.size_tokens": [100, 200]},
}


def test_train_and_eval_say_what_they_do_and_where_the_outputs_are(tmp_path, capsys):
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(GRID))
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", str(tmp_path / "grid.yaml"), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    err, stdout = captured.err, captured.out.splitlines()

    # One "compiling" line, before the first step is done, then the time it took.
    (compiling,) = re.findall(
        r"jaxlora: compiling the training step \(4 adapters in .*?\) \.\.\.", err
    )
    assert re.search(r"in (1 group|[2-9] groups)\)", compiling)
    start = err.index(compiling)
    assert re.search(r"compiled the training step in \d+\.\d s", err[start:])
    assert "1/3" not in err[:start]  # no step was done before it
    assert "training 4 adapters" in err
    # the evaluation's bar, to the last question
    n_questions = sum(int(r["n_facts"]) for r in _rows(out / "results.csv"))
    assert "evaluating 4 adapters" in err and f"{n_questions}/{n_questions}" in err

    # The last lines name the summary, the results, the report and the plots by their paths.
    assert stdout[0].startswith("trained 4 adapters -> ")
    assert f"results: {out / 'results.csv'}" in stdout
    assert f"report: {out / 'report.md'}" in stdout
    (plots,) = [line for line in stdout if line.startswith("plots ")]
    named = [Path(p) for p in plots.partition(": ")[2].split(", ")]
    assert {p.name for p in named} >= {"accuracy_vs_size.png", "capacity_vs_rank.png"}
    assert all(p.is_file() and p.with_suffix(".svg").is_file() for p in named)
    assert not any("memory" in line for line in stdout)  # no memory section, no memory lines

    # One time per rank group, named so: the same on each row of a group, compile apart.
    rows = _rows(out / "results.csv")
    assert "eval_seconds" not in rows[0]
    groups = int(re.search(r"in (\d+) groups?\)", compiling)[1])
    for column in ("group_eval_seconds", "group_compile_seconds"):
        assert 1 <= len({r[column] for r in rows}) <= groups
    assert float(rows[0]["group_compile_seconds"]) > 0

    # `jaxlora eval --no-progress`: no bar, the same last lines.
    (out / "results.csv").unlink()
    assert main(["eval", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "evaluating" not in captured.err and "compiling" not in captured.err
    lines = captured.out.splitlines()
    assert lines[0] == "evaluated 4 adapters"
    assert f"results: {out / 'results.csv'}" in lines and f"report: {out / 'report.md'}" in lines
