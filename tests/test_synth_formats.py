"""Document datasets trained on `jaxlora synth` outputs: `data.train_path` a synth directory,
`data.format` any format or mix in it, and a sweep over formats as ONE job (one adapter per
paper x format) on the generated PaperQA corpus, the built-in tiny model and a few steps."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import jax
import pytest

from jaxlora.config import load_config, parse_config
from jaxlora.data import count_tokens, load_document_set, load_units
from jaxlora.data.generated import generate_paperqa, write_generated
from jaxlora.data.units import text_hash
from jaxlora.errors import ConfigError, DataError
from jaxlora.llm.synth import SynthResult, run_synth, write_outputs
from jaxlora.llm.synth_config import config_units
from jaxlora.models.tokenizer import train_tokenizer
from jaxlora.sweep import SweepJob
from tests.runs import train_refuses

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
    text = _summary(paper) if fmt == "summary" else paper["introduction"]
    return [("text", f"[Paper ID: {paper['id']}]\n\n{text}", None, None)]  # as introductions


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
    with pytest.raises(
        ConfigError, match=r"data.format: must be text, qa, qa_user, text_qa or a format"
    ):
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
    lines = train_refuses(tmp_path, raw).strip().splitlines()
    assert len(lines) == 1 and "line 7: unit_id '99' is neither a document of" in lines[0], lines


@pytest.mark.parametrize(
    ("header", "head"), [("natural", "This paper 0 discusses:\n\n"), ("none", "")]
)
def test_synthesised_text_carries_the_configured_paper_header(synth_dir, header, head):
    data = parse_config({"data": _data(synth_dir, format="qa_summary", paper_header=header)}).data
    records = [r for r in load_document_set(data).records if r.document == "0"]
    (q, a), _ = _qa(PAPERS[0])
    assert _seen(records) == [("qa", "", q, a), ("text", head + _summary(PAPERS[0]), None, None)]


# ----------------------------------------------------------------------------- chunks


def _chunk_run(tmp_path: Path, **data) -> tuple[Path, dict]:
    """A NarrativeQA run config (generated stories in the hub schema, a local file) cut into
    2 chunks of 256 tokens overlapping by 32: the story gen0 alone, selected by its length."""
    path = write_generated("narrativeqa", tmp_path / "nqa.jsonl")
    tok = train_tokenizer("llama", 512)  # tiny-llama's
    probe = parse_config({"data": {"dataset": "narrativeqa", "path": str(path)}}).data
    docs = load_document_set(probe).documents
    n = dict(zip([d.document for d in docs], count_tokens(docs, tok).tolist(), strict=True))
    assert sorted(n.values()) == sorted(set(n.values()))  # gen0 is the only one of its length
    data = {"dataset": "narrativeqa", "path": str(path), "size_tokens": None,
            "document_tokens": [n["gen0"], n["gen0"]], "units": "chunks", "unit_tokens": 256,
            "unit_overlap": 32, "max_length": 264, "train_path": str(tmp_path / "synth"),
            "format": "original", **data}  # fmt: skip
    run = tmp_path / "run.yaml"
    run.write_text(json.dumps({**TINY, "data": data}))
    return run, data


def _notes(units: list[dict]) -> list[dict]:
    """Two summaries per chunk, in the layout jaxlora synth writes: each names its chunk."""
    return [
        {"text": f"Note {i} on chunk {u['unit_id']}.", "unit_id": u["unit_id"],
         "unit_hash": u["unit_hash"], "format": "summary", "index": i}
        for u in units for i in range(2)
    ]  # fmt: skip


def test_chunk_synth_records_train_only_their_own_chunk(tmp_path):
    """`jaxlora synth` over a run config's chunks writes records with the chunk ids training
    makes; that config trained on the synth directory gives each chunk's adapter its own
    records only (not the document's, not every chunk's), its passage as its text."""
    run, data = _chunk_run(tmp_path, format="summary", max_length=32)
    llm = {"backend": "openai", "model": "none", "base_url": "http://127.0.0.1:9/v1"}
    synth, report = run_synth(
        run, out=tmp_path / "synth", formats="original", llm=llm, progress=False
    )  # `original` asks no LLM: the run's own chunks, as synth reads them
    assert report["units_from"] == {
        "config": str(run), "model": "tiny-llama", "dataset": "narrativeqa", "units": "chunks",
        "unit_tokens": 256, "unit_overlap": 32,
    }  # fmt: skip
    passages = [json.loads(x) for x in (synth / "original.jsonl").read_text().splitlines()]
    assert [p["unit_id"] for p in passages] == ["gen0.0", "gen0.1"]
    assert all(p["unit_hash"] == text_hash(p["text"]) for p in passages)
    original = parse_config({"data": {**data, "format": "original"}}).data
    cut = load_units(original, train_tokenizer("llama", 512))
    assert [[r.text for r in u.records] for u in cut] == [[p["text"].strip()] for p in passages]
    (synth / "summary.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _notes(passages)))
    # The job as `jaxlora train` builds it: its units (units.jsonl) and each adapter's data.
    job = SweepJob(load_config(run), tmp_path / "out", progress=False, devices=jax.devices()[:1])
    assert [(u.document, u.id) for u in job.units] == [("gen0", "gen0.0"), ("gen0", "gen0.1")]
    assert [u.text for u in job.units] == [p["text"] for p in passages]  # what ICL / RAG read
    for plan, uid in zip(job.plans, ["gen0.0", "gen0.1"], strict=True):
        assert plan.cell.config.data.unit == uid
        notes = [r.text for r in job.data.records(plan)]
        assert notes == [f"Note 0 on chunk {uid}.", f"Note 1 on chunk {uid}."]
        assert len(job.data.encoded(plan)) == 2


def test_chunks_cut_otherwise_than_the_synth_run_are_refused(tmp_path):
    run, data = _chunk_run(tmp_path, format="summary")
    units, source = config_units(run)
    rows = _notes([{"unit_id": u.id, "unit_hash": text_hash(u.text)} for u in units])
    write_outputs(SynthResult({"summary": rows}, {"units_from": source}), tmp_path / "synth")
    tok = train_tokenizer("llama", 512)
    assert [u.id for u in load_units(parse_config({"data": data}).data, tok)] == [
        "gen0.0",
        "gen0.1",
    ]

    def cut(**settings):
        return load_units(parse_config({"data": {**data, **settings}}).data, tok)

    # The same ids (2 chunks) from another overlap: the report names both settings ...
    with pytest.raises(DataError, match=r"synthesized over other chunks than this run cuts "
                       r"\(data.unit_tokens=256, data.unit_overlap=16; jaxlora synth cut "
                       r"unit_tokens=256, unit_overlap=32 with tiny-llama"):  # fmt: skip
        cut(unit_overlap=16)
    # ... and without it, the text each record was written from tells the second chunk apart.
    (tmp_path / "synth" / "synth_report.json").write_text("{}")
    with pytest.raises(DataError, match=r"records of unit 'gen0.1' were written from other text"):
        cut(unit_overlap=16)
    with pytest.raises(DataError, match=r"unit_id 'gen0.1' is not a chunk of document 'gen0' "
                       r"cut by data.unit_tokens=512, data.unit_overlap=0 \(its chunks: gen0.0 "
                       r"to gen0.0\)"):  # fmt: skip
        cut(unit_tokens=512, unit_overlap=0)
    # Records of the whole document cannot go to one chunk (they train its document's
    # adapter); a unit_id that is neither a document nor a chunk id is refused.
    for name, uid in (("whole", "gen0"), ("stray", "gen0.x")):
        variant = tmp_path / name
        variant.mkdir()
        for f in (tmp_path / "synth").iterdir():
            (variant / f.name).write_text(f.read_text())
        with (variant / "summary.jsonl").open("a") as f:
            f.write(json.dumps({"text": "About the whole story.", "unit_id": uid}) + "\n")
    with pytest.raises(DataError, match=r"has records of a whole document \('gen0'; 1 in all\)"):
        cut(train_path=str(tmp_path / "whole"))
    (story,) = cut(train_path=str(tmp_path / "whole"), units="documents")
    assert len(story.records) == 5  # every record of the story
    with pytest.raises(DataError, match=r"line 5: unit_id 'gen0.x' is neither a document"):
        cut(train_path=str(tmp_path / "stray"))
