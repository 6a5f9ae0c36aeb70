"""Units of a memory: sectors, documents, chunks and files, and units as the job's last sweep axis."""

from __future__ import annotations

import csv
import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlora.cells import expand_units
from jaxlora.config import parse_config
from jaxlora.data import Record, count_tokens, load_units, phonebook_records, row_record
from jaxlora.data import units as kunits
from jaxlora.errors import ConfigError, DataError
from jaxlora.models.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer("llama", 512)


def _data(**kw):
    base = dict(
        dataset="text",
        path=None,
        size_tokens=None,
        size_rows=None,
        seed=0,
        text_field="text",
        question_field="question",
        answer_field="answer",
        document_field=None,
        units="none",
        unit_count=None,
        unit_tokens=None,
        unit_overlap=0,
        unit_keys=None,
        unit=None,
    )
    return SimpleNamespace(**{**base, **kw})


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(n=st.integers(1, 300), size=st.integers(1, 64), data=st.data())
def test_windows_cover_every_token_with_exact_overlap(n, size, data):
    overlap = data.draw(st.integers(0, size - 1))
    spans = kunits.windows(n, size, overlap)
    covered = np.zeros(n, int)
    for a, b in spans:
        assert 0 <= a < b <= n and b - a <= size
        covered[a:b] += 1
    assert covered.min() >= 1  # every token is in some chunk
    assert spans[0][0] == 0 and spans[-1][1] == n
    for (_, b0), (a1, _) in itertools.pairwise(spans):
        assert b0 - a1 == overlap  # consecutive chunks share exactly `overlap` tokens
    if n <= size:
        assert spans == [(0, n)]  # a document shorter than a chunk is one chunk


def test_windows_reject_overlap_not_below_size():
    with pytest.raises(DataError, match=r"unit_tokens > data.unit_overlap"):
        kunits.windows(10, 4, 4)


def test_sectors_by_count_are_contiguous_and_balanced(tok):
    records = phonebook_records(tok, size_rows=100, seed=1)
    units = kunits.sectors(records, tok, count=8, tokens=None)
    assert [u.id for u in units] == [str(i) for i in range(8)]
    assert [r for u in units for r in u.records] == records  # contiguous, in order, all rows
    sizes = [int(count_tokens(u.records, tok).sum()) for u in units]
    per_row = int(count_tokens(records, tok).max())
    # Cuts sit where the running count crosses k/8 of the total, so each sector is within one
    # row of an eighth of the tokens.
    assert max(sizes) - min(sizes) <= 2 * per_row
    assert all(u.document == kunits.SECTORS_DOCUMENT for u in units)


def test_sectors_by_tokens_stay_within_size(tok):
    records = phonebook_records(tok, size_rows=60, seed=2)
    units = kunits.sectors(records, tok, count=None, tokens=200)
    assert [r for u in units for r in u.records] == records
    sizes = [int(count_tokens(u.records, tok).sum()) for u in units]
    assert max(sizes) <= 200
    # Greedy: a sector ends only where its next row would take it over the size.
    first = [int(count_tokens(u.records[:1], tok).sum()) for u in units[1:]]
    assert all(s + f > 200 for s, f in zip(sizes, first, strict=False))
    with pytest.raises(DataError, match=r"more than data.unit_tokens"):
        kunits.sectors(records, tok, count=None, tokens=3)
    with pytest.raises(DataError, match="only 60 records"):
        kunits.sectors(records, tok, count=61, tokens=None)


def test_documents_and_chunks_from_a_local_dataset(tmp_path, tok):
    path = tmp_path / "docs.jsonl"
    rows = [
        {"title": "a/b", "text": "alpha beta gamma delta " * 20},
        {"title": "c", "text": "short"},
        {"title": "a/b", "text": "epsilon zeta"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = load_units(_data(path=str(path), units="documents", document_field="title"), tok)
    assert [(u.id, u.document, len(u.records)) for u in docs] == [("a_b", "a/b", 2), ("c", "c", 1)]

    chunks = load_units(
        _data(
            path=str(path), units="chunks", document_field="title", unit_tokens=16, unit_overlap=4
        ),
        tok,
    )
    by_doc = {}
    for u in chunks:
        by_doc.setdefault(u.document, []).append(u)
    assert [u.id for u in by_doc["c"]] == ["c.0"]  # shorter than a chunk: one chunk
    first = by_doc["a/b"]
    text = "\n\n".join(r["text"] for r in rows if r["title"] == "a/b")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(first) == len(kunits.windows(len(ids), 16, 4))
    # The chunks' texts are windows of the document: the first starts it, the last ends it.
    assert text.startswith(first[0].records[0].text) and text.endswith(first[-1].records[0].text)
    for u in first:
        assert len(tok(u.records[0].text, add_special_tokens=False)["input_ids"]) <= 16 + 1


def test_text_rows_are_documents_without_a_field(tmp_path, tok):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)))
    assert [u.id for u in load_units(_data(path=str(path), units="documents"), tok)] == [
        "0",
        "1",
        "2",
    ]
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=r"needs data.document_field"):
        load_units(_data(dataset="qa", path=str(qa), units="documents"), tok)


def test_one_file_per_unit(tmp_path, tok):
    for k in range(3):
        with open(tmp_path / f"book_sector_{k:02d}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["question", "answer"])
            w.writerow([f"who is {k}", f"answer {k}"])
    units = load_units(
        _data(dataset="qa", path=str(tmp_path / "book_sector_*.csv"), units="files"), tok
    )
    assert [u.id for u in units] == [f"book_sector_{k:02d}" for k in range(3)]
    assert [u.questions[0].answer for u in units] == [f"answer {k}" for k in range(3)]
    with pytest.raises(DataError, match="matches no file"):
        load_units(_data(dataset="qa", path=str(tmp_path / "none_*.csv"), units="files"), tok)


def test_unit_keys_replace_the_content(tmp_path, tok):
    units = [kunits._unit(str(i), "d", [row_record(f"q{i}", f"a{i}")]) for i in range(2)]
    keys = tmp_path / "keys.jsonl"
    keys.write_text(
        "".join(json.dumps({"unit": str(i), "key": f"summary {i}"}) + "\n" for i in range(2))
    )
    out = kunits.with_keys(units, keys)
    assert [u.key for u in out] == ["summary 0", "summary 1"]
    assert [u.text for u in out] == [u.text for u in units]  # ICL/RAG still read the content
    keys.write_text(json.dumps({"unit": "0", "key": "only one"}) + "\n")
    with pytest.raises(DataError, match="no key for unit '1'"):
        kunits.with_keys(units, keys)


def test_units_config_rules():
    with pytest.raises(ConfigError, match=r"data.unit_count: sectors need either"):
        parse_config({"data": {"units": "sectors"}})
    with pytest.raises(ConfigError, match=r"data.unit_overlap: must be smaller"):
        parse_config({"data": {"units": "chunks", "unit_tokens": 8, "unit_overlap": 8}})
    with pytest.raises(ConfigError, match=r"data.unit: selects a unit"):
        parse_config({"data": {"unit": "3"}})
    with pytest.raises(ConfigError, match=r"cannot be swept|all adapters of a job are units"):
        parse_config(
            {"data": {"units": "sectors", "unit_count": 2}, "sweep": {"data.unit_count": [2, 4]}}
        )


def test_units_are_the_last_sweep_axis(tok):
    config = parse_config(
        {
            "data": {"size_tokens": 300, "units": "sectors", "unit_count": 4},
            "sweep": {"lora.rank": [2, 4]},
        }
    )
    expanded, units = expand_units(config, tok)
    assert [u.id for u in units] == ["0", "1", "2", "3"]
    cells = expanded.cells()
    # units x ranks: the unit varies fastest, each cell trains exactly its unit's rows
    assert [c.name for c in cells[:5]] == [
        "rank2-unit0",
        "rank2-unit1",
        "rank2-unit2",
        "rank2-unit3",
        "rank4-unit0",
    ]
    assert expand_units(expanded, tok)[0] == expanded  # expanding twice changes nothing
    from jaxlora.data import load_records

    # Cell 2 trains the third quarter of the budgeted phonebook, cut where sectors() cuts.
    book = phonebook_records(tok, size_tokens=300, seed=0)
    bounds = [0, *np.cumsum([len(u.records) for u in units]).tolist()]
    assert bounds[-1] == len(book)
    assert load_records(cells[2].config.data, tok) == book[bounds[2] : bounds[3]]
    with pytest.raises(DataError, match="not a unit of this corpus"):
        load_records(config.with_value("data.unit", "9").data, tok)


def test_record_documents_are_read(tmp_path):
    from jaxlora.data import read_records

    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a", "paper": "7"}) + "\n")
    assert read_records("qa", path, document_field="paper") == [
        Record("qa", question="q", answer="a", document="7")
    ]


def test_units_in_one_job_equal_each_unit_alone(tmp_path):
    from jaxlora.config import load_config
    from tests.runs import adapters, assert_equal_to_rounding, rounding_bound, run, write_config

    data = {"dataset": "phonebook", "size_tokens": 300, "max_length": 64, "units": "sectors"}
    job = load_config(write_config(tmp_path / "job.yaml", data={**data, "unit_count": 3}))
    run(job, tmp_path / "job")
    together = adapters(tmp_path / "job")
    assert sorted(together) == ["unit0", "unit1", "unit2"]
    alone = load_config(
        write_config(tmp_path / "one.yaml", data={**data, "unit_count": 3, "unit": "1"})
    )
    run(alone, tmp_path / "one")
    # A stack of 3 and a stack of 1 compile to different kernels: equal to float rounding.
    assert_equal_to_rounding(
        {"unit1": together["unit1"]},
        {"unit1": adapters(tmp_path / "one")["adapter"]},
        rounding_bound(job),
    )
    # ...and a different unit's adapter is not within that bound (the test can fail).
    with pytest.raises(AssertionError):
        assert_equal_to_rounding(
            {"u": together["unit0"]}, {"u": together["unit1"]}, rounding_bound(job)
        )
