"""Document datasets trained on `jaxlora synth` outputs: `data.train_path` a synth directory,
`data.format` any format or mix in it, and a sweep over formats as ONE job (one adapter per
paper x format) on the generated PaperQA corpus, the built-in tiny model and a few steps."""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

import jax
import pytest

from jaxlora.config import ConfigError, load_config, parse_config
from jaxlora.data import load_document_set
from jaxlora.data.docsets import generate_paperqa
from jaxlora.errors import DataError
from jaxlora.llm.synth import SynthResult, write_outputs
from jaxlora.sweep import SweepJob
from tests.runs import jaxlora_cmd

PAPERS = generate_paperqa()  # what `data.path: null` reads (seed 0): papers "0" ... "5"
TINY = {
    "model": {"path": "tiny-llama"},
    "lora": {"rank": 4, "dropout": 0.0},
    "training": {"steps": 2, "batch_size": 2, "lr": 1.0e-3, "log_every": 1},
    "mesh": {"adapter": 1, "fsdp": 1, "tensor": 1},
    "checkpoint": {"every_steps": 2, "keep": 1},
}


def _qa(paper: dict) -> list[tuple[str, str]]:
    """Two training QA of a paper, unlike its evaluation questions (the leakage guard passes)."""
    intro, uid = paper["introduction"], str(paper["id"])
    method = re.match(r"We introduce (\w+),", intro)[1]
    pct = re.search(r"(\d+) percent", intro)[1]
    return [
        (f"What is the name of the method of paper {uid}?", method),
        (f"Which percentage appears in the introduction of paper {uid}?", f"{pct} percent"),
    ]


def _summary(paper: dict) -> str:
    return f"Paper {paper['id']} in short: {paper['introduction'].split('. ')[0]}."


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    """What `jaxlora synth --formats qa,summary --mix qa=0.5,summary=0.5` writes for the six
    papers (the record layout of jaxlora/llm/synth.py), through synth's own `write_outputs`;
    the generations are fixed strings, so no LLM is needed to know what each adapter reads."""

    def meta(paper, fmt, index):
        return {"unit_id": str(paper["id"]), "format": fmt, "index": index, "title": paper["title"]}

    def qa(paper, i, fmt="qa"):
        q, a = _qa(paper)[i]
        return {
            "question": q,
            "answer": a,
            "text": f"Question: {q}\nAnswer: {a}",
            **meta(paper, fmt, i),
        }

    def summary(paper, fmt="summary", index=0):
        return {"text": _summary(paper), **meta(paper, fmt, index)}

    files = {
        "qa": [qa(p, i) for p in PAPERS for i in range(2)],
        "summary": [summary(p) for p in PAPERS],
        "qa_summary": [
            r for p in PAPERS for r in (qa(p, 0, "qa_summary"), summary(p, "qa_summary", 1))
        ],
    }
    report = {"formats": {name: {"produced": len(recs)} for name, recs in files.items()}}
    out = tmp_path_factory.mktemp("synth")
    write_outputs(SynthResult(files, report), out)
    assert sorted(p.name for p in out.iterdir()) == [
        "qa.jsonl", "qa_summary.jsonl", "summary.jsonl", "synth_report.json",
    ]  # fmt: skip
    return out


def _data(synth_dir: Path, **extra) -> dict:
    return {"dataset": "paperqa", "path": None, "train_path": str(synth_dir),
            "size_tokens": None, "max_length": 256, **extra}  # fmt: skip


def _expected(fmt: str, paper: dict) -> list[tuple]:
    """(kind, text, question, answer) of what an adapter of `paper` trains on in `fmt`."""
    if fmt == "qa":
        return [("qa", "", q, a) for q, a in _qa(paper)]
    if fmt == "summary":
        return [("text", _summary(paper), None, None)]
    return [("text", f"[Paper ID: {paper['id']}]\n\n{paper['introduction']}", None, None)]


def _seen(records) -> list[tuple]:
    return [(r.kind, r.text, r.question, r.answer) for r in records]


def test_one_job_sweeps_formats_of_a_synth_directory(synth_dir, tmp_path):
    raw = {
        **TINY,
        "data": _data(synth_dir, units="documents"),
        "sweep": {"data.format": ["text", "qa", "summary"]},
        "memory": {"methods": ["oracle"], "max_new_tokens": 2, "batch_size": 16},
    }
    (tmp_path / "run.yaml").write_text(json.dumps(raw))
    out = tmp_path / "out"
    job = SweepJob(load_config(tmp_path / "run.yaml"), out, progress=False,
                   devices=jax.devices()[:1])  # fmt: skip
    job.run()
    cells = {(p.cell.config.data.format, p.cell.config.data.unit): p for p in job.plans}
    assert len(cells) == 18  # 3 formats x 6 papers, one job
    for (fmt, unit), plan in cells.items():
        (paper,) = [p for p in PAPERS if str(p["id"]) == unit]
        assert _seen(job.data.records(plan)) == _expected(fmt, paper), (fmt, unit)
        assert len(job.data.encoded(plan)) == len(_expected(fmt, paper))
    summary = list(csv.DictReader((out / "train_summary.csv").open()))
    n_rows = {(r["data.format"], r["n_rows"]) for r in summary}
    assert len(summary) == 18 and n_rows == {("text", "1"), ("qa", "2"), ("summary", "1")}
    leakage = json.loads((out / "leakage.json").read_text())
    assert sorted(r["format"] for r in leakage) == ["qa", "summary", "text"]
    assert all(r["dropped"] == 0 for r in leakage)
    results = list(csv.DictReader((out / "memory_results.csv").open()))
    assert [r["data.format"] for r in results] == ["text", "qa", "summary"]
    assert {r["n_questions"] for r in results} == {"36"}


def test_mixes_and_qa_user_read_per_record(synth_dir):
    mix = load_document_set(parse_config({"data": _data(synth_dir, format="qa_summary")}).data)
    assert [r.kind for r in mix.records if r.document == "0"] == ["qa", "text"]
    user = load_document_set(parse_config({"data": _data(synth_dir, format="qa_user")}).data)
    assert {r.kind for r in user.records} == {"row"} and len(user.records) == 12
    with pytest.raises(DataError, match=r"has no rewrite.jsonl \(jaxlora synth wrote: qa, "):
        load_document_set(parse_config({"data": _data(synth_dir, format="rewrite")}).data)


def test_config_rules_for_synth_formats():
    with pytest.raises(ConfigError, match=r"data.train_path: format summary needs"):
        parse_config({"data": {"dataset": "paperqa", "format": "summary"}})
    with pytest.raises(ConfigError, match=r"data.format: must be text, qa, qa_user or a format"):
        parse_config({"data": {"dataset": "paperqa", "format": "../x", "train_path": "d"}})
    # quality and narrativeqa take a synth directory, and `text` with it is the documents.
    parse_config({"data": {"dataset": "quality", "format": "summary", "train_path": "d"}})
    parse_config({"data": {"dataset": "narrativeqa", "format": "text", "train_path": "d"}})


def test_a_unit_id_outside_the_corpus_stops_the_job_and_nothing_is_written(synth_dir, tmp_path):
    bad = tmp_path / "synth"
    bad.mkdir()
    for f in synth_dir.iterdir():
        (bad / f.name).write_text(f.read_text())
    rows = (bad / "summary.jsonl").read_text().splitlines()
    rows.append(json.dumps({"text": "A stray summary.", "unit_id": "99", "format": "summary"}))
    (bad / "summary.jsonl").write_text("\n".join(rows) + "\n")
    raw = {**TINY, "data": _data(bad, units="documents"),
           "sweep": {"data.format": ["text", "summary"]}}  # fmt: skip
    (tmp_path / "run.yaml").write_text(json.dumps(raw))
    out = tmp_path / "out"
    proc = subprocess.run(
        jaxlora_cmd("train", tmp_path / "run.yaml", "--out", out), capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "line 7: unit_id '99' is not a document of" in lines[0], lines
    assert not out.exists()
