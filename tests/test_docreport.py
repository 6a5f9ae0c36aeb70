"""The study's tables for document datasets in the memory report (`jaxlora/memory/docreport.py`):
method x metric, PaperQA per level with its bar plot, and training format x metric when the
libraries differ in training data, on the tiny PaperQA twin swept over the ID header."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jax
import pytest
import yaml

from jaxlora.config import load_config
from jaxlora.memory import docreport
from jaxlora.memory.report import write_memory_report
from jaxlora.sweep import SweepJob

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paperqa_formats(tmp_path_factory) -> Path:
    """The tiny PaperQA twin with both study ID headers (two libraries of 6 papers), shortened."""
    tmp = tmp_path_factory.mktemp("paperqa")
    raw = yaml.safe_load((REPO / "configs" / "paperqa_memory_tiny.yaml").read_text())
    raw["training"]["steps"] = 4
    raw["checkpoint"]["every_steps"] = 4
    raw["memory"].update(methods=["oracle", "bm25@2/ties"], max_new_tokens=4)
    raw["sweep"] = {"data.paper_header": ["bracket", "natural"]}
    (tmp / "run.yaml").write_text(json.dumps(raw))
    out = tmp / "run"
    SweepJob(load_config(tmp / "run.yaml"), out, progress=False, devices=jax.devices()[:1]).run()
    return out


def _section(report: str, title: str) -> str:
    """The text of a `## title` section of the report (up to the next one)."""
    start = report.index(f"## {title}")
    end = report.find("\n## ", start + 1)
    return report[start : end if end >= 0 else len(report)]


def test_paperqa_report_has_method_level_and_format_tables(paperqa_formats):
    out = paperqa_formats
    rows = list(csv.DictReader((out / "memory_results.csv").open()))
    assert [(r["data.paper_header"], r["method"]) for r in rows] == [
        ("bracket", "oracle"), ("bracket", "bm25@2/ties"),
        ("natural", "oracle"), ("natural", "bm25@2/ties"),
    ]  # fmt: skip
    report = (out / "memory_report.md").read_text()

    methods = _section(report, "PaperQA: method x metric")
    assert "| data.paper_header | method | bleu | rouge_l | accuracy |" in methods
    first = rows[0]
    assert f"| bracket | oracle | {float(first['bleu']):.3f} |" in methods

    levels = _section(report, "PaperQA per level")
    assert "L1 recall, L2 comprehension, L3 logical structure" in levels
    assert "| data.paper_header | method | bleu L1 | bleu L2 | bleu L3 | rouge_l L1 |" in levels
    assert f"| {float(first['rouge_l_level3']):.3f} |" in levels

    formats = _section(report, "Training format x metric")
    assert "Formats: the libraries' data.paper_header." in formats
    assert formats.count("| format | bleu | rouge_l | accuracy | bleu_level1 |") == 2
    oracle = formats[formats.index("**oracle**") : formats.index("**bm25@2/ties**")]
    assert "| bracket |" in oracle and "| natural |" in oracle

    for stem in ("memory_per_level", "memory_by_format", "memory_by_method"):
        assert (out / "plots" / f"{stem}.png").stat().st_size > 0
        assert f"](plots/{stem}.png)" in report


def test_report_is_rewritten_from_the_results_file_alone(paperqa_formats, tmp_path):
    """Only memory_results.csv is needed: the tables come from the file, not the run."""
    (tmp_path / "memory_results.csv").write_bytes(
        (paperqa_formats / "memory_results.csv").read_bytes()
    )
    path = write_memory_report(tmp_path)
    assert "## PaperQA per level" in path.read_text()


def test_quality_and_narrativeqa_tables_and_plain_datasets():
    quality = [
        {"library": "", "method": "base", "accuracy": 0.25, "hard_accuracy": 0.0,
         "loglik_accuracy": 0.5, "loglik_hard_accuracy": 1.0, "unanswered": 2, "n_hard": 1},
        {"library": "", "method": "bm25", "accuracy": 0.5, "hard_accuracy": "",
         "loglik_accuracy": 0.75, "loglik_hard_accuracy": 0.0, "unanswered": 0, "n_hard": 1},
    ]  # fmt: skip
    assert docreport.detect_dataset(quality) == "quality"
    text = docreport.markdown(quality)
    assert "## QuALITY: method x metric" in text
    header = "| method | accuracy | hard_accuracy | loglik_accuracy | loglik_hard_accuracy |"
    assert header + " unanswered |" in text
    assert "| base | 0.250 | 0.000 | 0.500 | 1.000 | 2 |" in text
    assert "| bm25 | 0.500 | - | 0.750 |" in text  # an empty cell reads as "-"
    assert "per level" not in text and "format" not in text.lower().split("x metric")[-1]
    assert docreport.plot_per_level(quality) is None
    assert docreport.plot_by_format(quality, "accuracy") is None

    narrative = [{"library": "", "method": "bm25", "rouge1": 0.1, "rouge2": 0.0, "rougeL": 0.1,
                  "rougeLsum": 0.1, "n_documents": 2}]  # fmt: skip
    assert "| method | rouge1 | rouge2 | rougeL | rougeLsum |" in docreport.markdown(narrative)

    phonebook = [{"library": "", "method": "oracle", "accuracy": 1.0}]
    assert docreport.detect_dataset(phonebook) is None and docreport.markdown(phonebook) == ""


def test_formats_from_training_files_are_named_by_file():
    rows = [
        {"library": "a", "data.train_path": "/d/paper_qa.jsonl", "lora.rank": 4,
         "method": "oracle", "accuracy": 0.5, "hard_accuracy": 0.5},
        {"library": "b", "data.train_path": "/d/paper_summary.jsonl", "lora.rank": 4,
         "method": "oracle", "accuracy": 0.25, "hard_accuracy": 0.0},
    ]  # fmt: skip
    assert docreport.format_axes(rows) == ["data.train_path"]
    text = docreport.markdown(rows)
    tables = text[text.index("## Training format x metric") :]
    assert "**oracle** (lora.rank=4)" in tables
    assert "| paper_qa.jsonl | 0.500 | 0.500 |" in tables
    assert "| paper_summary.jsonl | 0.250 | 0.000 |" in tables
    assert docreport.plot_by_format(rows, "accuracy") is not None


# ----------------------------------------------------------------------------- the tiny twins


@pytest.mark.parametrize(
    ("name", "methods", "columns"),
    [
        ("narrativeqa", "[bm25,base+rag@3]", "| method | rouge1 | rouge2 | rougeL | rougeLsum |"),
        (
            "quality",
            "[bm25+rag,bm25@3/ties+icl_doc]",
            "| method | accuracy | hard_accuracy | loglik_accuracy | loglik_hard_accuracy |",
        ),
    ],
)
def test_tiny_twins_run_and_write_their_tables(name, methods, columns, tmp_path):
    """The shipped twins as `jaxlora train` runs them (fewer steps and methods)."""
    sets = [
        "training.steps=4",
        "checkpoint.every_steps=4",
        f"memory.methods={methods}",
        "memory.max_new_tokens=4",
    ]
    config = load_config(REPO / "configs" / f"{name}_memory_tiny.yaml", sets)
    out = tmp_path / "run"
    SweepJob(config, out, progress=False, devices=jax.devices()[:1]).run()
    rows = list(csv.DictReader((out / "memory_results.csv").open()))
    assert [r["n_questions"] for r in rows] == ["15", "15"]
    report = (out / "memory_report.md").read_text()
    assert columns in report
    if name == "quality":
        assert rows[0]["n_hard"] == "6"
        assert all(0.0 <= float(r["loglik_accuracy"]) <= 1.0 for r in rows)
    else:
        assert rows[0]["n_documents"] == "3"
