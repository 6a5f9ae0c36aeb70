"""Document datasets through the real pipeline: `jaxlora train` on PaperQA, NarrativeQA and
QuALITY (tiny local datasets in the hub schemas, the built-in tiny model, a few steps), the
leakage guard between training data and evaluation questions, and the per-dataset metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import jax
import pytest

from jaxlora.config import load_config, parse_config
from jaxlora.data import ask_record, load_document_set
from jaxlora.data.documents import article_id
from jaxlora.data.generated import generate_paperqa
from jaxlora.errors import ConfigError, DataError
from jaxlora.eval import scoring
from jaxlora.sweep import SweepJob
from tests.runs import train_refuses

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "model": {"path": "tiny-llama"},
    "lora": {"rank": 4, "dropout": 0.0},
    "training": {"steps": 3, "batch_size": 2, "lr": 1.0e-3, "log_every": 1},
    "mesh": {"adapter": 1, "fsdp": 1, "tensor": 1},
    "checkpoint": {"every_steps": 3, "keep": 1},
}


def _train(tmp_path: Path, data: dict, **sections) -> tuple[Path, dict]:
    raw = {**TINY, "data": {"size_tokens": None, "chat_template": True, **data}, **sections}
    (tmp_path / "run.yaml").write_text(json.dumps(raw))
    out = tmp_path / "out"
    job = SweepJob(
        load_config(tmp_path / "run.yaml"), out, progress=False, devices=jax.devices()[:1]
    )
    return out, job.run()


def _rows(path: Path) -> dict[str, dict]:
    return {r["method"]: r for r in csv.DictReader(path.open())}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- PaperQA


def test_paperqa_tiny_twin_trains_a_memory_with_the_per_level_breakdown(tmp_path):
    """The shipped tiny twin, as `jaxlora train` runs it (fewer steps and methods): one adapter per paper,
    the generated corpus's questions asked, BLEU and ROUGE-L overall and per level."""
    from tests.openai_http import OpenAIHTTP, rubric_fields

    # The judge: a real HTTP server on 127.0.0.1 that scores by the question's level (9, 6, 3)
    # and answers prose (a judge failure) to the level-3 questions of the even papers.
    levels = {
        qa["question"]: (qa["level"], qa["level"] == 3 and i % 2 == 0)
        for i, paper in enumerate(generate_paperqa())
        for qa in paper["QA"]
    }

    def reply(user: str) -> tuple[int, str]:
        question = rubric_fields(user)[0]
        ((level, fails),) = [v for q, v in levels.items() if q in question]
        if fails:
            return 200, "A fair attempt."
        return 200, json.dumps({"score": 12 - 3 * level, "rationale": "by level"})

    out = tmp_path / "run"
    sets = ["training.steps=4", "memory.methods=[oracle,bm25@2/ties]", "memory.max_new_tokens=4"]
    with OpenAIHTTP(reply) as server:
        llm = ["llm.backend=openai", "llm.model=m", f"llm.base_url={server.url}"]
        sets += ["memory.judge=true", *llm]
        config = load_config(REPO / "configs" / "paperqa_memory_tiny.yaml", sets)
        SweepJob(config, out, progress=False, devices=jax.devices()[:1]).run()
    rows = _rows(out / "memory_results.csv")
    failed = sum(fails for _, fails in levels.values())
    for row in rows.values():  # per level, the mean of the scored; failures counted apart
        judge = [float(row[f"judge_level{lv}"]) for lv in (1, 2, 3)]
        assert judge == [9.0, 6.0, 3.0] and int(row["judge_failed"]) == failed == 6
        # 12 x 9 + 12 x 6 + 6 x 3 over 30 scored: a float mean read from the CSV, rounding only
        assert float(row["judge"]) == pytest.approx(6.6)
    assert list(rows) == ["oracle", "bm25@2/ties"]
    for column in ("bleu", "rouge_l", "bleu_level1", "rouge_l_level3", "routing_top1"):
        assert column in rows["bm25@2/ties"], column
    assert [rows["oracle"][f"n_level{lv}"] for lv in (1, 2, 3)] == ["12", "12", "12"]
    assert rows["oracle"]["n_questions"] == "36"
    # BM25 finds each question's paper: the invented method name is in both.
    assert float(rows["bm25@2/ties"]["routing_top1"]) == 1.0
    units = [json.loads(line) for line in (out / "units.jsonl").read_text().splitlines()]
    assert [u["document"] for u in units] == [str(i) for i in range(6)]
    assert units[0]["text"].startswith("[Paper ID: 0]\n\n")
    asked = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    assert len(asked) == 36 and asked[0]["level"] == 1
    assert json.loads((out / "leakage.json").read_text())[0]["dropped"] == 0
    predictions = [
        json.loads(x) for x in (out / "memory_predictions.jsonl").read_text().splitlines()
    ]
    assert {p["level"] for p in predictions} == {1, 2, 3}


def _training_qa(tmp_path: Path, planted: str | None) -> Path:
    """A training QA file for generated paper 0 (the study's paper_{id}_qa.jsonl layout)."""
    rows = [
        {"question": "[Paper ID: 0] What is the name of the method of this paper?", "answer": "x"},
        {"question": "[Paper ID: 0] Which percentage appears in the introduction?", "answer": "y"},
    ]
    if planted is not None:
        rows.append({"question": f"[Paper ID: 0] {planted}", "answer": "z"})
    return _jsonl(tmp_path / "paper_0_qa.jsonl", rows)


def test_a_planted_evaluation_question_stops_the_run_and_nothing_is_written(tmp_path):
    question = generate_paperqa()[0]["QA"][2]["question"]  # "How much does X lower Y?"
    planted = question.replace("How much", "By how much")  # paraphrased by a few words
    train = _training_qa(tmp_path, planted)
    config = {
        **TINY,
        "data": {"dataset": "paperqa", "format": "qa", "train_path": str(train),
                 "size_tokens": None, "max_length": 64},
    }  # fmt: skip
    lines = train_refuses(tmp_path, config).strip().splitlines()
    assert len(lines) == 1 and "leaks evaluation question 0.02" in lines[0], lines
    assert "data.leakage: drop" in lines[0]


def test_drop_mode_trains_without_the_leak_counts_it_and_evaluates_paperqa(tmp_path):
    question = generate_paperqa()[0]["QA"][1]["question"]
    train = _training_qa(tmp_path, question)  # planted verbatim
    data = {"dataset": "paperqa", "format": "qa", "train_path": str(train), "leakage": "drop",
            "max_length": 128}  # fmt: skip
    out, result = _train(tmp_path, data, eval={"max_new_tokens": 4, "batch_size": 8})
    (report,) = json.loads((out / "leakage.json").read_text())
    assert (report["records"], report["dropped"], report["policy"]) == (3, 1, "drop")
    assert report["hits"][0]["question"] == "0.01" and report["hits"][0]["kind"] == "exact"
    summary = list(csv.DictReader((out / "train_summary.csv").open()))
    assert summary[0]["n_rows"] == "2"
    # The adapter over the whole corpus is asked every evaluation question, per level too.
    (row,) = result["results"]
    assert row["n_facts"] == 36 and row["n_level2"] == 12 and "rouge_l_level3" in row


def test_study_configs_train_on_qa_only_with_a_training_set():
    with pytest.raises(ConfigError, match=r"data.train_path: format qa needs the training QA"):
        parse_config({"data": {"dataset": "paperqa", "path": "x", "format": "qa"}})
    with pytest.raises(ConfigError, match=r"data.format: dataset quality trains on its"):
        parse_config({"data": {"dataset": "quality", "path": "x", "format": "qa"}})
    with pytest.raises(ConfigError, match=r"data.split: is for the document datasets"):
        parse_config({"data": {"dataset": "text", "path": "x", "split": "test"}})


# ----------------------------------------------------------------------------- NarrativeQA

BOOKS = {
    "b1": "A small fox named Tolo lived in a hollow oak by the river. Every spring Tolo carried "
    "acorns to the old miller, who paid him with bread. One winter the river froze and Tolo "
    "crossed it to find the miller sick. He stayed seven nights and kept the fire burning.",
    "b2": "Captain Mera sailed the Silver Gull to the northern islands for salt. Her crew of "
    "nine feared the fog, but Mera trusted the lighthouse keeper, an old man called Ansel. "
    "When the storm came, Ansel lit every lamp and the Silver Gull came home with its salt.",
}


def _nqa(doc: str, question: str, answers: list[str]) -> dict:
    text = BOOKS[doc]
    return {
        "document": {
            "id": doc, "kind": "gutenberg", "url": f"http://example.org/{doc}",
            "file_size": len(text), "word_count": len(text.split()), "start": "", "end": "",
            "summary": {"text": "-", "tokens": ["-"], "url": "http://example.org", "title": doc},
            "text": text,
        },
        "question": {"text": question, "tokens": question.split()},
        "answers": [{"text": a, "tokens": a.split()} for a in answers],
    }  # fmt: skip


def test_narrativeqa_chunks_score_rouge_per_document(tmp_path):
    rows = [
        _nqa("b1", "Who paid Tolo with bread?", ["the old miller", "The miller."]),
        _nqa("b1", "How long did Tolo stay?", ["seven nights", "Seven nights."]),
        _nqa("b2", "Who kept the lighthouse?", ["Ansel", "an old man called Ansel"]),
    ]
    path = tmp_path / "test.parquet"
    datasets.Dataset.from_list(rows).to_parquet(path)
    data = {"dataset": "narrativeqa", "path": str(path), "units": "chunks",
            "unit_tokens": 96, "unit_overlap": 16, "max_length": 104}  # fmt: skip
    memory = {"methods": ["bm25", "base+rag@2"], "scope": "document",
              "max_new_tokens": 4, "context_tokens": 256}  # fmt: skip
    out, _ = _train(tmp_path, data, memory=memory)
    units = [json.loads(line) for line in (out / "units.jsonl").read_text().splitlines()]
    assert {u["document"] for u in units} == {"b1", "b2"} and len(units) > 2
    result = _rows(out / "memory_results.csv")
    for column in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert 0.0 <= float(result["bm25"][column]) <= 1.0
    assert result["bm25"]["n_documents"] == "2" and result["bm25"]["n_questions"] == "3"
    # RAG routes within the question's own book (memory.scope: document).
    preds = [json.loads(x) for x in (out / "memory_predictions.jsonl").read_text().splitlines()]
    assert {p["document"] for p in preds} == {"b1", "b2"}


def test_rouge_is_best_over_references_and_averaged_per_document():
    from jaxlora.data.documents import EvalQuestion

    qs = [
        EvalQuestion("a.0", "a", "q", ("the old miller", "a miller")),
        EvalQuestion("a.1", "a", "q", ("seven nights", "a week")),
        EvalQuestion("b.0", "b", "q", ("Ansel", "an old man")),
    ]
    scores = [scoring.score_question("narrativeqa", p, q) for p, q in zip(
        ["a miller", "nothing", "Ansel"], qs, strict=True)]  # fmt: skip
    assert scores[0]["rouge1"] == 1.0 and scores[1]["rouge1"] == 0.0
    row = scoring.aggregate("narrativeqa", scores, qs)
    # a float mean of per-document means: approx's default relative 1e-6 is rounding only
    assert row["rouge1"] == pytest.approx((0.5 + 1.0) / 2) and row["n_documents"] == 2


# ----------------------------------------------------------------------------- QuALITY

ARTICLES = [
    "The probe Vela reached the ice moon after nine years. Its drill found salt water under "
    "the crust, and the engineers cheered. The probe then sent pictures of blue cracks.",
    "The baker Orla opened her shop at dawn. She sold rye loaves to the miners and sweet buns "
    "to the children, and on Fridays she gave the rest away to the monks.",
]


# (article, question, hard) of the tiny QuALITY sets; option 0 is always the answer.
QUALITY_QUESTIONS = (
    (0, "How long did Vela travel?", False),
    (1, "What did Orla sell the miners?", True),
    (0, "What did the probe do?", True),
)


def write_quality(tmp_path: Path, options) -> Path:
    """QUALITY_QUESTIONS with their `options` in the hub's parquet layout (validation split);
    returns the dataset directory to pass as data.path."""
    rows = [
        {"article": ARTICLES[a], "question": q, "options": opts, "answer": 0, "hard": hard}
        for (a, q, hard), opts in zip(QUALITY_QUESTIONS, options, strict=True)
    ]
    repo = tmp_path / "quality" / "data"
    repo.mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(repo / "validation-00000-of-00001.parquet")
    return repo.parent


def test_quality_chunks_score_accuracy_hard_and_unanswered(tmp_path):
    opts = (["Nine years", "Two years", "A month", "Forty years"],
            ["Rye loaves", "Fish", "Salt", "Wine"], ["Drilled", "Sang", "Slept", "Flew"])  # fmt: skip
    path = write_quality(tmp_path, opts)
    data = {"dataset": "quality", "path": str(path), "units": "chunks",
            "unit_tokens": 96, "unit_overlap": 10, "max_length": 104}  # fmt: skip
    memory = {"methods": ["base", "bm25"], "template": "quality", "scope": "document",
              "max_new_tokens": 4}  # fmt: skip
    out, _ = _train(tmp_path, data, memory=memory)
    result = _rows(out / "memory_results.csv")["bm25"]
    for column in ("accuracy", "hard_accuracy", "n_hard", "unanswered"):
        assert column in result, column
    assert result["n_hard"] == "2" and 0 <= int(result["unanswered"]) <= 3
    preds = [json.loads(x) for x in (out / "memory_predictions.jsonl").read_text().splitlines()]
    assert preds[0]["gold"] == "A" and "choice" in preds[0]
    # The options are asked, and routers search the bare question.
    assert "A: Nine years\nB: Two years" in preds[0]["question"]
    assert {p["document"] for p in preds} == {article_id(a) for a in ARTICLES}


def test_quality_strict_parser_counts_unanswered_and_hard():
    from jaxlora.data.documents import EvalQuestion

    q = [EvalQuestion(f"x.{i}", "x", "q", ("o",), options=("a", "b", "c", "d"), gold=2,
                      hard=i > 0) for i in range(3)]  # fmt: skip
    outputs = ["The correct answer is C", "Certainly", "(B)"]
    scores = [scoring.score_question("quality", o, qq) for o, qq in zip(outputs, q, strict=True)]
    assert [s["choice"] for s in scores] == ["C", None, "B"]
    row = scoring.aggregate("quality", scores, q)
    assert row == {"accuracy": 1 / 3, "unanswered": 1, "hard_accuracy": 0.0, "n_hard": 2}


def test_asked_multiple_choice_lists_the_options():
    from jaxlora.data.documents import EvalQuestion

    q = EvalQuestion("x.0", "x", "Why?", ("b",), options=("a", "b"), gold=1, hard=False)
    r = ask_record(q)
    assert r.question == "Why?\nA: a\nB: b\n\nAnswer with the letter of the correct option:"
    assert (r.answer, r.document) == ("b", "x")


def test_generated_paperqa_is_deterministic_and_leak_free():
    assert generate_paperqa(seed=1) == generate_paperqa(seed=1) != generate_paperqa(seed=2)
    data = parse_config({"data": {"dataset": "paperqa", "size_tokens": None}}).data
    docset = load_document_set(data)
    assert len(docset.records) == 6 and len(docset.questions) == 36 and not docset.hits


def test_generated_paperqa_trains_each_format_on_its_own_training_qa():
    """With data.path null the generated corpus has training QA of its own (8 per paper): they
    pass the leakage guard, state every fact its evaluation answers need, and `text_qa` is the
    documents and the QA together."""
    kinds = {}
    for fmt in ("text", "qa", "qa_user", "text_qa"):
        data = parse_config({"data": {"dataset": "paperqa", "format": fmt, "size_tokens": None}})
        docset = load_document_set(data.data)
        assert not docset.hits, fmt
        kinds[fmt] = sorted(r.kind for r in docset.records)
    assert kinds["text"] == ["text"] * 6
    assert kinds["qa"] == ["qa"] * 48 and kinds["qa_user"] == ["row"] * 48
    assert kinds["text_qa"] == ["qa"] * 48 + ["text"] * 6
    qa = load_document_set(parse_config({"data": {"dataset": "paperqa", "format": "qa"}}).data)
    for paper in generate_paperqa():
        taught = " ".join(r.answer for r in qa.records if r.document == str(paper["id"]))
        intro = set(paper["introduction"].lower().replace(".", "").replace(",", "").split())
        stop = {"by", "on", "the", "it", "is", "for", "of"}
        for item in paper["QA"]:  # the answer's words from the introduction: names, numbers, ...
            facts = set(item["answer"].lower().rstrip(".").split()) & intro - stop
            assert facts and all(w in taught.lower() for w in facts), (item, taught)


def test_text_qa_takes_the_text_and_qa_rows_of_a_study_training_set(tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    _jsonl(train / "paper_0_qa.jsonl", [{"question": "What does it do?", "answer": "Folds."}])
    _jsonl(train / "paper_0_introduction.jsonl", [{"text": "[Paper ID: 0]\n\nWe fold."}])
    sets = {"dataset": "paperqa", "train_path": str(train), "size_tokens": None}
    docset = load_document_set(parse_config({"data": {**sets, "format": "text_qa"}}).data)
    assert sorted((r.kind, r.document) for r in docset.records) == [("qa", "0"), ("text", "0")]
    only_qa = _jsonl(tmp_path / "paper_0_qa.jsonl", [{"question": "Why?", "answer": "Folds."}])
    with pytest.raises(DataError, match=r"has no text_qa rows \(found qa\)"):
        load_document_set(
            parse_config({"data": {**sets, "train_path": str(only_qa), "format": "text_qa"}}).data
        )
