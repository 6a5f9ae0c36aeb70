"""Memory results keyed by (library, method): merged, never lost (jaxlora/memory/results.py)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import jax
import pytest

from jaxlora.config import MemorySection, load_config
from jaxlora.job import Job
from jaxlora.memory import results
from jaxlora.memory.evaluate import MemoryEvaluator, evaluate_memory
from tests.runs import jaxlora_cmd

TRAINED = ["base", "bm25", "bm25@2/ties"]  # tests/conftest.py MEMORY_RUN's memory.methods


def _copy(memory_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(memory_run, copy)
    return copy


def _memory(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        jaxlora_cmd("memory", run_dir, "--no-progress", *args), capture_output=True, text=True
    )


def _rows(directory: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((directory / results.RESULTS).open()))


def _lines(directory: Path) -> dict[str, str]:
    """Each method's line of memory_results.csv, as written."""
    lines = (directory / results.RESULTS).read_text().splitlines()[1:]
    return {row["method"]: line for row, line in zip(_rows(directory), lines, strict=True)}


def _predictions(directory: Path) -> list[dict]:
    return [json.loads(x) for x in (directory / results.PREDICTIONS).read_text().splitlines()]


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def test_one_more_method_keeps_the_methods_training_evaluated(memory_run, tmp_path):
    copy = _copy(memory_run, tmp_path)
    trained, trained_predictions = _lines(copy), _predictions(copy)
    proc = _memory(copy, "--set", "memory.methods=[oracle]")
    assert proc.returncode == 0, proc.stderr
    assert "evaluated 1 memory method ->" in proc.stdout
    assert [r["method"] for r in _rows(copy)] == [*TRAINED, "oracle"]
    after = _lines(copy)
    assert all(after[m] == trained[m] for m in TRAINED)  # kept as they were written
    predictions = _predictions(copy)
    assert [p for p in predictions if p["method"] != "oracle"] == trained_predictions
    n = int(after["oracle"].split(",")[results.columns(()).index("n_questions")])
    assert sum(p["method"] == "oracle" for p in predictions) == n > 0
    assert "| oracle |" in (copy / results.REPORT).read_text()
    # The last lines name the memory set's results, report and plots, not training's.
    lines = proc.stdout.splitlines()
    assert lines[-3:-1] == [
        f"memory results: {copy / results.RESULTS}",
        f"memory report: {copy / results.REPORT}",
    ]
    assert _named_plots(lines[-1]) == sorted((copy / "plots").glob("memory_*.png"))
    assert not any(line.startswith(("results:", "report:", "plots ")) for line in lines)


def _named_plots(line: str) -> list[Path]:
    """The plots a `memory plots (png, and svg beside): A, B` line names, each with its SVG."""
    assert line.startswith("memory plots (png, and svg beside): "), line
    named = [Path(p) for p in line.partition(": ")[2].split(", ")]
    assert named and all(p.is_file() and p.with_suffix(".svg").is_file() for p in named)
    return named


def test_a_method_evaluated_again_replaces_its_rows(memory_run, tmp_path):
    copy = _copy(memory_run, tmp_path)
    trained = _lines(copy)
    proc = _memory(copy, "--set", "memory.methods=[bm25]")
    assert proc.returncode == 0, proc.stderr
    rows = _rows(copy)
    assert [r["method"] for r in rows] == TRAINED  # in its place, not duplicated
    after = _lines(copy)
    assert after["base"] == trained["base"] and after["bm25@2/ties"] == trained["bm25@2/ties"]
    n = int(rows[1]["n_questions"])
    assert sum(p["method"] == "bm25" for p in _predictions(copy)) == n


def test_out_writes_a_separate_set_and_the_schema_is_fixed(memory_run, tmp_path):
    copy = _copy(memory_run, tmp_path)
    before = _snapshot(copy)
    proc = _memory(copy, "--out", "probe", "--set", "memory.methods=[oracle]")
    assert proc.returncode == 0, proc.stderr
    probe = copy / results.SETS / "probe"
    assert f"-> {probe / results.RESULTS}" in proc.stdout
    after = {k: v for k, v in _snapshot(copy).items() if not k.startswith(results.SETS + "/")}
    assert after == before  # the default set (and everything else) byte-identical
    assert [r["method"] for r in _rows(probe)] == ["oracle"]
    assert (probe / results.REPORT).exists() and (probe / "plots" / "memory_by_method.png").exists()
    lines = proc.stdout.splitlines()
    assert f"memory report: {probe / results.REPORT}" in lines
    assert probe / "plots" / "memory_by_method.png" in _named_plots(lines[-1])
    # One schema whichever methods ran: the oracle alone (no routing, no context) and training's
    # three have the same header, blank where a metric does not apply.
    header = (copy / results.RESULTS).read_text().splitlines()[0]
    assert (probe / results.RESULTS).read_text().splitlines()[0] == header
    assert header.split(",") == list(results.columns(()))
    (oracle,) = _rows(probe)
    assert oracle["routing_top1"] == "" and oracle["rouge1"] == "" and oracle["accuracy"] != ""
    assert "None" not in (probe / results.REPORT).read_text()


def test_a_bad_set_name_is_one_line_and_touches_nothing(memory_run, tmp_path):
    copy = _copy(memory_run, tmp_path)
    before = _snapshot(copy)
    proc = _memory(copy, "--out", "../elsewhere", "--set", "memory.methods=[oracle]")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--out '../elsewhere'" in lines[0], lines
    assert _snapshot(copy) == before


def test_an_interrupted_evaluation_keeps_its_finished_methods_and_resumes(
    memory_run, tmp_path, monkeypatch
):
    """The second method fails midway (its decoding raises, as an interrupt or a lost device
    would): the first is committed, and `--resume` then evaluates only the second."""
    copy = _copy(memory_run, tmp_path)
    job = Job(load_config(copy / "config.yaml"), jax.devices()[:1])
    section = MemorySection(methods=("oracle", "bm25@2/linear"), max_new_tokens=12)
    decode = MemoryEvaluator.decode

    def failing(self, method, prompts, bar):
        if method.name == "bm25@2/linear":
            raise KeyboardInterrupt
        return decode(self, method, prompts, bar)

    monkeypatch.setattr(MemoryEvaluator, "decode", failing)
    with pytest.raises(KeyboardInterrupt):
        evaluate_memory(job, copy, section, progress=False)
    assert [r["method"] for r in _rows(copy)] == [*TRAINED, "oracle"]
    assert {p["method"] for p in _predictions(copy)} == {*TRAINED, "oracle"}
    oracle = _lines(copy)["oracle"]

    proc = _memory(copy, "--resume", "--set", "memory.methods=[oracle,bm25@2/linear]")
    assert proc.returncode == 0, proc.stderr
    assert "evaluated 1 memory method ->" in proc.stdout  # the oracle was not evaluated again
    assert [r["method"] for r in _rows(copy)] == [*TRAINED, "oracle", "bm25@2/linear"]
    assert _lines(copy)["oracle"] == oracle
    methods = ("oracle", "bm25@2/linear")
    counts = {m: sum(p["method"] == m for p in _predictions(copy)) for m in methods}
    assert counts["oracle"] == counts["bm25@2/linear"] > 0  # each once, none duplicated

    # Resumed again, nothing is left to do.
    proc = _memory(copy, "--resume", "--set", "memory.methods=[oracle,bm25@2/linear]")
    assert proc.returncode == 0 and "evaluated 0 memory methods ->" in proc.stdout, proc.stderr


def test_a_results_file_of_another_schema_is_one_line_and_touches_nothing(memory_run, tmp_path):
    """The set's files are read and checked, with every other input, before anything is written:
    a memory_results.csv with a column the schema does not name is refused, not rewritten."""
    copy = _copy(memory_run, tmp_path)
    (copy / results.RESULTS).write_text("method,score\nbm25,0.5\n")
    before = _snapshot(copy)
    proc = _memory(copy, "--set", "memory.methods=[oracle]")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"{copy / results.RESULTS}: column 'score' is not" in lines[0] and "--out" in lines[0]
    assert _snapshot(copy) == before
