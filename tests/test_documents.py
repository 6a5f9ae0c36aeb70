"""Document readers (jaxlora.data.documents) on tiny local data in each dataset's own schema.

NarrativeQA and QuALITY files are written with `datasets` in the hub schemas and read back
through `datasets` (parquet, jsonl, a hub-layout folder); nothing is downloaded. Tests on the
study's PaperQA release skip when ../shared/data is absent.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import datasets
import pytest

from jaxlora.data.documents import (
    EvalQuestion,
    article_id,
    read_narrativeqa,
    read_paperqa,
    read_paperqa_training,
    read_quality,
    story_text,
    write_questions,
)
from jaxlora.data.readers import read_table
from jaxlora.errors import DataError

SHARED = Path(
    os.environ.get("JAXLORA_STUDY_DATA", Path(__file__).resolve().parents[2] / "shared/data")
)

# ----------------------------------------------------------------------------- PaperQA


def _papers() -> list[dict]:
    return [
        {
            "id": pid,
            "link": f"https://arxiv.org/abs/{pid}",
            "conference": "ICML",
            "title": f"Paper {pid}",
            "introduction": f"Introduction of paper {pid}.\n\nSecond paragraph {pid}.",
            "QA": [
                {"level": lv, "question": f"Question {lv} about {pid}?", "answer": f"A{lv}"}
                for lv in (1, 2, 3)
            ],
        }
        for pid in (0, 7)
    ]


@pytest.fixture
def paperqa_json(tmp_path):
    path = tmp_path / "paperQA.json"
    path.write_text(json.dumps(_papers()))
    return path


def test_paperqa_headers_questions_and_levels(paperqa_json):
    c = read_paperqa(paperqa_json)
    assert [d.document for d in c.documents] == ["0", "7"]
    assert all(d.kind == "text" for d in c.documents)
    intro = _papers()[1]["introduction"]
    assert c.documents[1].text == f"[Paper ID: 7]\n\n{intro}"
    q = c.questions[4]
    assert (q.id, q.document, q.level) == ("7.01", "7", 2)
    assert q.question == "[Paper ID: 7] Question 2 about 7?"
    assert q.query == "Question 2 about 7?"  # routers and the leakage guard get it bare
    assert q.answers == ("A2",) and q.answer == "A2"
    assert q.record().kind == "qa" and q.record().document == "7"
    assert c.titles["7"] == "Paper 7"
    assert len(c.questions_of("0")) == 3


def test_paperqa_natural_header_and_bare_questions(paperqa_json):
    c = read_paperqa(paperqa_json, header="natural", question_prefix="none")
    assert c.documents[0].text.startswith("This paper 0 discusses:\n\nIntroduction of paper 0.")
    assert c.questions[0].question == c.questions[0].query == "Question 1 about 0?"
    c = read_paperqa(paperqa_json, header="none", question_prefix="natural", papers={"7"})
    assert [d.text for d in c.documents] == [_papers()[1]["introduction"]]
    assert c.questions[0].question == "In the Paper ID 7, Question 1 about 7?"


def test_paperqa_errors(tmp_path, paperqa_json):
    with pytest.raises(DataError, match="no paper '3'"):
        read_paperqa(paperqa_json, papers={"3"})
    with pytest.raises(DataError, match="unknown PaperQA header"):
        read_paperqa(paperqa_json, header="square")  # type: ignore[arg-type]
    bad = _papers()
    bad[0]["QA"][1]["level"] = 4
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"paper 0 QA 1 has level 4"):
        read_paperqa(tmp_path / "bad.json")
    del bad[0]["introduction"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="lacks 'introduction'"):
        read_paperqa(tmp_path / "bad.json")
    with pytest.raises(DataError, match="not found"):
        read_paperqa(tmp_path / "missing.json")
    twice = _papers()
    twice[1]["id"] = 0
    (tmp_path / "bad.json").write_text(json.dumps(twice))
    with pytest.raises(DataError, match="two papers with id 0"):
        read_paperqa(tmp_path / "bad.json")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_paperqa_training_files_and_turns(tmp_path):
    d = tmp_path / "individual_qa_bracket"
    for pid in (10, 2):
        _jsonl(d / f"paper_{pid}_qa.jsonl", [{"question": f"[Paper ID: {pid}] Q?", "answer": "A"}])
    records = read_paperqa_training(d)
    assert [r.document for r in records] == ["2", "10"]  # numeric paper order
    assert records[0].kind == "qa" and records[0].question == "[Paper ID: 2] Q?"
    flawed = read_paperqa_training(d, qa_turns="user")  # the study's variant
    assert flawed[0].kind == "row" and flawed[0].text == "[Paper ID: 2] Q? A"
    assert flawed[0].question == "[Paper ID: 2] Q?" and flawed[0].document == "2"


def test_paperqa_training_concatenated_sets_find_their_papers(tmp_path):
    qa = _jsonl(
        tmp_path / "concatenated_qa_natural.jsonl",
        [
            {"question": "In the Paper ID 3, What is X?", "answer": "X."},
            {"question": "[Paper ID: 12] What is Y?", "answer": "Y."},
        ],
    )
    assert [r.document for r in read_paperqa_training(qa)] == ["3", "12"]
    text = "[Paper ID: 0]\n\nIntro zero.\n\nMore zero.\n\n[Paper ID: 1]\n\nIntro one."
    intros = read_paperqa_training(_jsonl(tmp_path / "intro.jsonl", [{"text": text}]))
    assert [(r.kind, r.document, r.text) for r in intros] == [
        ("text", "0", "[Paper ID: 0]\n\nIntro zero.\n\nMore zero."),
        ("text", "1", "[Paper ID: 1]\n\nIntro one."),
    ]


def test_paperqa_training_errors(tmp_path):
    with pytest.raises(DataError, match="no paper ID"):
        read_paperqa_training(_jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": "A"}]))
    with pytest.raises(DataError, match=r"expected \{question, answer\} or \{text\}"):
        read_paperqa_training(_jsonl(tmp_path / "paper_1_x.jsonl", [{"prompt": "Q?"}]))
    with pytest.raises(DataError, match="not found"):
        read_paperqa_training(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.jsonl files"):
        read_paperqa_training(tmp_path / "empty")


@pytest.mark.skipif(not (SHARED / "paper_dataset").is_dir(), reason="../shared/data absent")
def test_study_paperqa_release():
    c = read_paperqa(SHARED / "paper_dataset" / "paperQA.json")
    assert len(c.documents) == 15 and len(c.questions) == 450
    assert [sum(q.level == lv for q in c.questions) for lv in (1, 2, 3)] == [150, 150, 150]
    train = SHARED / "paperqa_train"
    for style in ("bracket", "natural"):
        docs = read_paperqa(SHARED / "paper_dataset" / "paperQA.json", header=style).documents
        each = read_paperqa_training(train / f"individual_introductions_{style}")
        joined = read_paperqa_training(train / f"concatenated_introductions_{style}.jsonl")
        assert [r.text for r in each] == [r.text for r in joined] == [d.text for d in docs]
        assert [r.document for r in joined] == [d.document for d in docs]
        qa = read_paperqa_training(train / f"individual_qa_{style}")
        flat = read_paperqa_training(train / f"concatenated_qa_{style}.jsonl")
        assert len(qa) == 600 and {r.document for r in qa} == {d.document for d in docs}
        assert sorted((r.document, r.question) for r in qa) == sorted(
            (r.document, r.question) for r in flat
        )


# ----------------------------------------------------------------------------- NarrativeQA

BOOK = (
    "\ufeffThe Project Gutenberg EBook of Tiny Tales, by Nobody\r\n\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK TINY TALES ***\r\n\r\n"
    "Produced by volunteers\r\n\r\nCHAPTER I\r\n\r\nOnce upon a time a small\r\n"
    "fox lived in a wood.\r\n\r\nThe fox was happy.  THE END\r\n\r\n"
    "End of the Project Gutenberg EBook of Tiny Tales\r\n\r\nLicence text follows.\r\n"
)
SCRIPT = (
    "<html><body><pre>INT. HOUSE - NIGHT\n\n<b>BOB</b>\nHello &amp; goodbye.</pre></body></html>"
)


def _nqa_row(doc_id: str, kind: str, text: str, q: str, answers: list[str], **doc) -> dict:
    return {
        "document": {
            "id": doc_id,
            "kind": kind,
            "url": f"http://example.org/{doc_id}",
            "file_size": len(text),
            "word_count": len(text.split()),
            "start": doc.get("start", ""),
            "end": doc.get("end", ""),
            "summary": {
                "text": "A fox is happy.",
                "tokens": ["A", "fox", "is", "happy", "."],
                "url": "http://example.org/wiki",
                "title": f"Title {doc_id}",
            },
            "text": text,
        },
        "question": {"text": q, "tokens": q.split()},
        "answers": [{"text": a, "tokens": a.split()} for a in answers],
    }


def _nqa_rows() -> list[dict]:
    marks = {"start": "CHAPTER I", "end": "THE END"}
    return [
        _nqa_row(
            "b1", "gutenberg", BOOK, "Where did the fox live?", ["In a wood.", "a wood"], **marks
        ),
        _nqa_row("m1", "movie", SCRIPT, "Who says hello?", ["Bob", "BOB"]),
        _nqa_row("b1", "gutenberg", BOOK, "Was the fox happy?", ["Yes", "yes, it was"], **marks),
    ]


def test_narrativeqa_parquet_in_hub_schema(tmp_path):
    path = tmp_path / "test.parquet"
    datasets.Dataset.from_list(_nqa_rows()).to_parquet(path)
    c = read_narrativeqa(path)
    assert [d.document for d in c.documents] == ["b1"]  # movies are left out by default
    assert c.documents[0].text == (
        "CHAPTER I\n\nOnce upon a time a small fox lived in a wood.\n\nThe fox was happy. THE END"
    )
    assert [(q.id, q.answers) for q in c.questions] == [
        ("b1.000", ("In a wood.", "a wood")),
        ("b1.001", ("Yes", "yes, it was")),
    ]
    assert c.titles == {"b1": "Title b1"}
    assert "A fox is happy." not in c.documents[0].text  # the summary is never training data


def test_narrativeqa_hub_folder_layout_jsonl_and_movies(tmp_path):
    repo = tmp_path / "narrativeqa"
    (repo / "data").mkdir(parents=True)
    datasets.Dataset.from_list(_nqa_rows()).to_parquet(
        repo / "data" / "test-00000-of-00001.parquet"
    )
    datasets.Dataset.from_list(_nqa_rows()[:1]).to_parquet(
        repo / "data" / "validation-00000-of-00001.parquet"
    )
    c = read_narrativeqa(repo, split="test", kinds=None)
    assert [d.document for d in c.documents] == ["b1", "m1"]
    assert c.documents[1].text == "INT. HOUSE - NIGHT\n\nBOB\nHello & goodbye."
    assert len(read_narrativeqa(repo, split="validation").questions) == 1
    jsonl = tmp_path / "nqa.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _nqa_rows()))
    only = read_narrativeqa(jsonl, kinds=None, documents={"m1"})
    assert [q.question for q in only.questions] == ["Who says hello?"]
    raw = read_narrativeqa(jsonl, normalize=False)
    assert raw.documents[0].text == BOOK


def test_narrativeqa_errors(tmp_path):
    path = tmp_path / "t.parquet"
    datasets.Dataset.from_list(_nqa_rows()).to_parquet(path)
    with pytest.raises(DataError, match="no document 'zz'"):
        read_narrativeqa(path, documents={"b1", "zz"})
    datasets.Dataset.from_list([{"question": "q", "answer": "a"}]).to_parquet(path)
    with pytest.raises(
        DataError, match=r"no column 'document' \(columns found: question, answer\)"
    ):
        read_narrativeqa(path)
    with pytest.raises(DataError, match="no file or directory, nor a hub id"):
        read_narrativeqa(tmp_path / "nothing.parquet")
    with pytest.raises(DataError, match="no file or directory, nor a hub id"):
        read_narrativeqa("data/test.parquet")  # looks like org/name, but is a missing file
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    datasets.Dataset.from_list(_nqa_rows()).to_parquet(repo / "test-00000-of-00001.parquet")
    with pytest.raises(DataError, match="split 'validation'"):
        read_narrativeqa(repo.parent, split="validation")  # a folder without that split


def test_story_text_without_markers_still_drops_gutenberg_boilerplate():
    text = story_text(BOOK)  # no start/end markers given
    assert text.startswith("Produced by volunteers\n\nCHAPTER I")
    assert text.endswith("The fox was happy. THE END")
    assert "Licence" not in text and "START OF" not in text


def test_long_documents_come_back_whole(tmp_path):
    long_book = "\n\n".join(f"Paragraph {i} of a very long story." for i in range(20_000))
    path = tmp_path / "long.parquet"
    datasets.Dataset.from_list(
        [_nqa_row("L", "gutenberg", long_book, "Q?", ["A", "B"])]
    ).to_parquet(path)
    assert read_narrativeqa(path).documents[0].text == long_book  # chunking is units.py's job


# ----------------------------------------------------------------------------- QuALITY

ARTICLE_1 = "THE LONG TRIP\n\nBy Someone\n\nA crew flew to Mars and came back changed."
ARTICLE_2 = "SHORT STORY\n\nA cat sat on a mat."


def _quality_rows() -> list[dict]:
    opts = ["Mars", "Venus", "The Moon", "Jupiter"]
    return [
        {"article": ARTICLE_1, "question": "Where did the crew fly?", "options": opts, "answer": 0, "hard": False},
        {"article": ARTICLE_2, "question": "Where did the cat sit?", "options": ["Mat", "Rug", "Bed", "Sofa"], "answer": 0, "hard": True},
        {"article": ARTICLE_1, "question": "What changed?", "options": ["Ship", "Crew", "Mars", "Nothing"], "answer": 1, "hard": True},
    ]  # fmt: skip


def test_quality_in_hub_schema(tmp_path):
    repo = tmp_path / "quality"
    (repo / "data").mkdir(parents=True)
    ds = datasets.Dataset.from_list(_quality_rows())
    ds.to_parquet(repo / "data" / "validation-00000-of-00001.parquet")
    ds.select([0]).to_parquet(repo / "data" / "train-00000-of-00001.parquet")
    c = read_quality(repo)
    a1, a2 = article_id(ARTICLE_1), article_id(ARTICLE_2)
    assert [d.document for d in c.documents] == [a1, a2]
    assert c.documents[0].text == ARTICLE_1
    q = c.questions[2]
    assert (q.id, q.document, q.gold, q.gold_letter, q.hard) == (f"{a1}.001", a1, 1, "B", True)
    assert q.options == ("Ship", "Crew", "Mars", "Nothing") and q.answers == ("Crew",)
    assert len(read_quality(repo, split="train").questions) == 1
    assert [d.document for d in read_quality(repo, documents={a2}).documents] == [a2]


def test_quality_rejects_one_based_answers_and_missing_columns(tmp_path):
    rows = _quality_rows()
    rows[1]["answer"] = 4  # upstream QuALITY's 1-based gold_label, not this schema
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="row 1: answer 4 is not a 0-based index"):
        read_quality(path)
    for r in rows:
        del r["hard"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="no column 'hard'"):
        read_quality(path)


# ----------------------------------------------------------------------------- question files


def test_written_questions_are_a_question_file(tmp_path):
    qs = [
        EvalQuestion("d.0", "d", "Q1?", ("A1", "A1b")),
        EvalQuestion("d.1", "d", "Q2?", ("B",), options=("B", "C"), gold=0, hard=False),
    ]
    write_questions(tmp_path / "q.jsonl", qs)
    table = read_table(tmp_path / "q.jsonl")  # what memory.questions reads
    assert table.strings("question", "k") == ["Q1?", "Q2?"]
    assert table.strings("answer", "k") == ["A1", "B"]
    assert table.strings("document", "k") == ["d", "d"]
    rows = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert rows[0]["answers"] == ["A1", "A1b"] and rows[1]["gold"] == 0


# ----------------------------------------------------------------------------- selection


def test_size_rows_counts_documents_of_document_datasets():
    """Three papers of two QA records each: size_rows 2 keeps both records of the first two
    papers (a QA format keeps the documents `text` keeps), and asks no more than exist."""
    from types import SimpleNamespace

    from jaxlora.data.docsets import budgeted
    from jaxlora.data.records import Record

    records = [Record("qa", question=f"q{d}{i}", answer="a", document=f"p{d}") for d in "abc"
               for i in range(2)]  # fmt: skip
    data = SimpleNamespace(dataset="paperqa", size_rows=2, size_tokens=None, document_tokens=None)
    kept = budgeted(records, data, tokenizer=None)
    assert [r.question for r in kept] == ["qa0", "qa1", "qb0", "qb1"]
    data.size_rows = 4
    with pytest.raises(DataError, match="has only 3 documents"):
        budgeted(records, data, tokenizer=None)


def test_documents_are_selected_by_length_before_the_budget(tmp_path, caplog):
    """data.document_tokens keeps the documents of MIN..MAX tokens (the run's tokenizer, bounds
    inclusive, either null) before size_rows takes the first ones, on every read path."""
    from jaxlora.config import parse_config
    from jaxlora.data import count_tokens, load_document_set, load_records, load_units
    from jaxlora.data.generated import write_generated
    from jaxlora.models.tokenizer import train_tokenizer

    path = write_generated("narrativeqa", tmp_path / "nqa.jsonl")
    tok = train_tokenizer("llama", 512)
    base = {"dataset": "narrativeqa", "path": str(path), "size_tokens": None}
    docs = load_document_set(parse_config({"data": base}).data).documents
    tokens = dict(zip([d.document for d in docs], count_tokens(docs, tok).tolist(), strict=True))
    short, mid, long = sorted(tokens, key=tokens.get)
    assert tokens[short] < tokens[mid] < tokens[long]

    def data(**kw):
        return parse_config({"data": {**base, **kw}}).data

    with caplog.at_level(logging.WARNING, logger="jaxlora"):
        kept = load_records(data(document_tokens=[tokens[mid], None], size_rows=1), tok)
    first = next(d.document for d in docs if d.document in (mid, long))
    assert [r.document for r in kept] == [first]
    said = f"[{tokens[mid]}, null] keeps 2 of 3 documents of narrativeqa (dropped 1 shorter"
    assert said in caplog.text
    # One adapter per kept document; the generated set (data.path: null) is the same stories.
    units = load_units(data(document_tokens=[None, tokens[mid]], units="documents"), tok)
    assert [u.id for u in units] == [d.document for d in docs if d.document in (short, mid)]
    generated = data(path=None, document_tokens=[tokens[long], tokens[long]], units="documents")
    assert [u.id for u in load_units(generated, tok)] == [long]
    lengths = ", ".join(str(tokens[d]) for d in (short, mid, long))
    with pytest.raises(DataError, match=rf"data.document_tokens \[0, 10\] keeps no document of "
                       rf"narrativeqa: its 3 documents have {lengths} tokens"):  # fmt: skip
        load_records(data(document_tokens=[0, 10]), tok)
