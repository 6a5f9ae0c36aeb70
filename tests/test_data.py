"""Data pipeline: PhoneBook generation, readers, budgets, encoding masks and data order."""

from __future__ import annotations

import copy
import csv
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from jaxlora.data import (
    EpochStream,
    Record,
    count_tokens,
    encode,
    gather,
    generate_phonebook,
    load_records,
    phonebook_record,
    phonebook_records,
    read_records,
    take_budget,
)
from jaxlora.errors import DataError
from jaxlora.models.tokenizer import train_tokenizer

STUDY = (
    Path(os.environ.get("JAXLORA_STUDY_DATA", Path(__file__).resolve().parents[2] / "shared/data"))
    / "pb_cf"
)
NANP = re.compile(r"[2-9]\d\d-[2-9]\d\d-\d{4}")
PHONE = re.compile(r"\d{3}-\d{3}-\d{4}")

needs_study = pytest.mark.skipif(not STUDY.is_dir(), reason="study data (../shared/data) absent")


@pytest.fixture(scope="module")
def llama():
    return train_tokenizer("llama", 512)


@pytest.fixture(scope="module")
def qwen():
    return train_tokenizer("qwen", 512)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# ---------------------------------------------------------------------------------- PhoneBook


def test_phonebook_is_seeded():
    assert generate_phonebook(200, seed=7) == generate_phonebook(200, seed=7)
    assert generate_phonebook(200, seed=7) != generate_phonebook(200, seed=8)


def test_phonebook_prefix_stable():
    big = generate_phonebook(3000, seed=3)
    for n in (0, 1, 48, 500, 2999):
        assert generate_phonebook(n, seed=3) == big[:n]


def test_phonebook_unique_names_and_nanp_phones():
    book = generate_phonebook(5000, seed=0)
    names, phones = zip(*book, strict=True)
    assert len(set(names)) == len(names)
    assert len(set(phones)) == len(phones)
    assert all(NANP.fullmatch(p) for p in phones)


def test_phonebook_names_are_varied():
    names = [name for name, _ in generate_phonebook(2000, seed=0)]
    firsts = {n.split()[0] for n in names}
    lasts = {n.split()[-1] for n in names}
    assert len(firsts) >= 200 and len(lasts) >= 200
    assert any(re.search(r" [A-Z]\. ", n) for n in names)  # middle initials
    assert any("-" in n.split()[-1] for n in names)  # double-barrelled surnames


def test_phonebook_record_is_the_study_row():
    r = phonebook_record("Jeffrey Buck", "603-556-7631")
    assert r.kind == "row"
    assert r.text == "Question: What is the phone number of Jeffrey Buck? Answer: 603-556-7631"
    assert r.question == "Question: What is the phone number of Jeffrey Buck? Answer:"
    assert r.answer == "603-556-7631" and r.subject == "Jeffrey Buck"
    assert r.text == f"{r.question} {r.answer}"


# ------------------------------------------------------------------------------------ Budgets


def test_token_budgets_are_nested_prefixes_within_budget(llama):
    books = {k: phonebook_records(llama, size_tokens=k, seed=1) for k in (1000, 2000, 4000)}
    full = phonebook_records(llama, size_tokens=8000, seed=1)
    for k, recs in books.items():
        counts = count_tokens(recs, llama)
        assert counts.sum() <= k
        # the longest such prefix: one more row would exceed the budget
        assert counts.sum() + count_tokens(full[len(recs) : len(recs) + 1], llama)[0] > k
        assert full[: len(recs)] == recs
    assert len(books[1000]) < len(books[2000]) < len(books[4000])


def test_count_tokens_excludes_special_tokens(llama):
    r = phonebook_record("Jeffrey Buck", "603-556-7631")
    ids = llama(r.text, add_special_tokens=False)["input_ids"]
    assert count_tokens([r], llama).tolist() == [len(ids)]
    qa = Record(kind="qa", question="Who?", answer="Bob")
    assert count_tokens([qa], llama)[0] == len(
        llama("Who? Bob", add_special_tokens=False)["input_ids"]
    )


def test_take_budget_rows_and_all(llama):
    recs = [phonebook_record(*e) for e in generate_phonebook(10, seed=0)]
    assert take_budget(recs, llama, size_rows=4) == recs[:4]
    assert take_budget(recs, llama) == recs
    assert phonebook_records(llama, size_rows=7, seed=0) == recs[:7]


def test_budget_errors(llama):
    recs = [phonebook_record(*e) for e in generate_phonebook(10, seed=0)]
    total = int(count_tokens(recs, llama).sum())
    with pytest.raises(DataError) as e:
        take_budget(recs, llama, size_tokens=50_000)
    assert f"data.size_tokens=50000 but the dataset has only {total} tokens" in _one_line(e)
    with pytest.raises(DataError) as e:
        take_budget(recs, llama, size_rows=11)
    assert "data.size_rows=11" in _one_line(e) and "only 10 rows" in str(e.value)
    with pytest.raises(DataError) as e:
        take_budget(recs, llama, size_tokens=3)
    assert "first record" in _one_line(e) and "data.size_tokens" in str(e.value)
    with pytest.raises(DataError) as e:
        take_budget(recs, llama, size_tokens=100, size_rows=2)
    assert "only one" in _one_line(e)
    with pytest.raises(DataError) as e:
        phonebook_records(llama)
    assert "data.size_tokens" in _one_line(e)


# ------------------------------------------------------------------------------------ Readers


def test_phonebook_readers_agree(tmp_path):
    book = generate_phonebook(5, seed=2)
    expected = [phonebook_record(n, p) for n, p in book]
    rows = _write_csv(tmp_path / "rows.csv", ["text"], [[r.text] for r in expected])
    pairs = _write_csv(tmp_path / "pairs.csv", ["Name", "Phone"], [list(e) for e in book])
    qa = [{"question": f"What is the phone number of {n}", "answer": p} for n, p in book]
    (tmp_path / "qa.json").write_text(json.dumps(qa))
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(x) for x in qa))
    for path in (rows, pairs, tmp_path / "qa.json", tmp_path / "qa.jsonl"):
        assert read_records("phonebook", path) == expected, path


ROME_CASES = [
    {
        "case_id": 0,
        "pararel_idx": 2796,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "subject": "Danielle Darrieux",
        },
        "paraphrase_prompts": [
            "Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
            "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language",
        ],
        "neighborhood_prompts": [
            "The mother tongue of Léon Blum is",
            "The native language of Montesquieu is",
        ],
        "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    },
    {
        "case_id": 1,
        "pararel_idx": 1144,
        "requested_rewrite": {
            "prompt": "{} is located in the continent of",
            "relation_id": "P30",
            "target_new": {"str": "Asia", "id": "Q48"},
            "target_true": {"str": "Antarctica", "id": "Q51"},
            "subject": "Edwin of Northumbria",
        },
        "paraphrase_prompts": ["Edwin of Northumbria, located in"],
        "neighborhood_prompts": ["Mount Erebus is located in the continent of"],
        "attribute_prompts": ["Kyoto is located in the continent of"],
        "generation_prompts": ["Edwin of Northumbria is located in"],
    },
    {
        "case_id": 2,
        "pararel_idx": 8665,
        "requested_rewrite": {
            "prompt": "{}, the",
            "relation_id": "P27",
            "target_new": {"str": "Toyota", "id": "Q53268"},
            "target_true": {"str": "BMW", "id": "Q26678"},
            "subject": "BMW 5 Series",
        },
        "paraphrase_prompts": ["BMW 5 Series is developed by"],
        "neighborhood_prompts": ["BMW X5 is developed by"],
        "attribute_prompts": ["Toyota Supra is developed by"],
        "generation_prompts": ["BMW 5 Series is sold by"],
    },
]


def test_read_rome_counterfact(tmp_path):
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps(ROME_CASES))
    recs = read_records("counterfact", path)
    assert len(recs) == 3
    r = recs[0]
    assert r.kind == "row" and r.subject == "Danielle Darrieux"
    assert r.question == "The mother tongue of Danielle Darrieux is"
    assert r.answer == "English" and r.target_true == "French"
    assert r.text == "The mother tongue of Danielle Darrieux is English"
    assert recs[2].question == "BMW 5 Series, the" and recs[2].target_true == "BMW"


def test_read_counterfact_edit_csv_with_siblings(tmp_path):
    texts = ["Lenta.ru is written in Italian", "In Macau, an official language is French"]
    path = _write_csv(tmp_path / "counterfact_edit_1K.csv", ["text"], [[t] for t in texts])
    bare = read_records("counterfact", path)
    assert [r.text for r in bare] == texts
    assert all(r.answer is None and r.question is None and r.subject is None for r in bare)

    qa = [{"question": "Lenta.ru is written in", "answer": "Italian"}]
    qa += [{"question": "Moscow is a twin city of", "answer": "Miami"}]  # not a row: ignored
    (tmp_path / "counterfact_eval_qa.json").write_text(json.dumps(qa))
    meta = {"description": "subjects", "subjects": ["Lenta.ru", "Macau"]}
    (tmp_path / "counterfact_edit_1K_meta.json").write_text(json.dumps(meta))
    rich = read_records("counterfact", path)
    assert rich[0] == Record(
        kind="row",
        text=texts[0],
        question="Lenta.ru is written in",
        answer="Italian",
        subject="Lenta.ru",
    )
    assert rich[1].answer is None and rich[1].subject == "Macau" and rich[1].text == texts[1]

    meta["subjects"] = ["Lenta.ru"]
    (tmp_path / "counterfact_edit_1K_meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError) as e:
        read_records("counterfact", path)
    assert "1 subjects" in _one_line(e) and "2 rows" in str(e.value)


def test_read_text_and_qa(tmp_path):
    docs = ["First document.\nWith two lines.", "Second, with a comma", "NA"]
    _write_csv(tmp_path / "docs.csv", ["body"], [[d] for d in docs])
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    expected = [Record(kind="text", text=d) for d in docs]
    assert read_records("text", tmp_path / "docs.csv", text_field="body") == expected
    assert read_records("text", tmp_path / "docs.jsonl") == expected

    items = [{"q": "What is 2+2?", "a": "4"}, {"q": "Capital of France?", "a": "Paris"}]
    (tmp_path / "qa.json").write_text(json.dumps(items))
    recs = read_records("qa", tmp_path / "qa.json", question_field="q", answer_field="a")
    assert recs == [
        Record(kind="qa", question="What is 2+2?", answer="4"),
        Record(kind="qa", question="Capital of France?", answer="Paris"),
    ]


def test_reader_errors(tmp_path):
    def error(*args, **kw) -> str:
        with pytest.raises(DataError) as e:
            read_records(*args, **kw)
        return _one_line(e)

    missing = tmp_path / "nope.csv"
    assert str(missing) in error("text", missing) and "data.path" in error("text", missing)
    (tmp_path / "empty.csv").write_text("")
    assert "empty" in error("text", tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("text\n")
    assert "no rows" in error("text", tmp_path / "header.csv")
    (tmp_path / "empty.json").write_text("[]")
    assert "no rows" in error("qa", tmp_path / "empty.json")
    (tmp_path / "bad.json").write_text("[{'question': ")
    assert "cannot read" in error("qa", tmp_path / "bad.json")
    _write_csv(tmp_path / "docs.csv", ["body", "title"], [["x", "y"]])
    msg = error("text", tmp_path / "docs.csv")
    assert "'text'" in msg and "body, title" in msg and "data.text_field" in msg
    msg = error("qa", tmp_path / "docs.csv")
    assert "'question'" in msg and "data.question_field" in msg
    msg = error("wikipedia", tmp_path / "docs.csv")
    assert "data.dataset" in msg and "phonebook" in msg
    (tmp_path / "docs.parquet").write_bytes(b"PAR1")
    msg = error("text", tmp_path / "docs.parquet")
    assert ".parquet" in msg and ".csv" in msg
    rows = [[phonebook_record("Ann Lee", "212-555-0100").text], ["Call Bob at 555"]]
    _write_csv(tmp_path / "pb.csv", ["text"], rows)
    assert "row 1" in error("phonebook", tmp_path / "pb.csv")
    _write_csv(tmp_path / "blank.csv", ["text"], [["ok"], [""]])
    assert "row 1" in error("text", tmp_path / "blank.csv")


def test_load_records(tmp_path, llama):
    def section(**kw):
        base = dict(
            dataset="phonebook",
            path=None,
            size_tokens=None,
            size_rows=None,
            seed=5,
            text_field="text",
            question_field="question",
            answer_field="answer",
            document_field=None,
            units="none",
            unit=None,
        )
        return SimpleNamespace(**{**base, **kw})

    assert load_records(section(size_rows=3), llama) == phonebook_records(
        llama, size_rows=3, seed=5
    )
    with pytest.raises(DataError) as e:
        load_records(section(dataset="qa", size_rows=3), llama)
    assert _one_line(e) == "data.path is required for dataset 'qa'"
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"doc number {i}"}) for i in range(6)))
    recs = load_records(section(dataset="text", path=str(docs), size_rows=4), llama)
    assert [r.text for r in recs] == [f"doc number {i}" for i in range(4)]


# ---------------------------------------------------------------------- The study's own files


@needs_study
def test_study_phonebook_files():
    rows = read_records("phonebook", STUDY / "phonebook_qa_1K.csv")
    assert len(rows) == 48
    assert all(PHONE.fullmatch(r.answer) for r in rows)
    book = read_records("phonebook", STUDY / "synthetic_phonebook.csv")
    assert [r.subject for r in rows] == [r.subject for r in book[:48]]
    assert rows == book[:48]  # the same records from either file format
    assert read_records("phonebook", STUDY / "phonebook_qa_2K.csv")[:48] == rows
    # the eval questions of the 1K set are the first rows, rebuilt to the training format
    eval_qa = read_records("phonebook", STUDY / "phonebook_eval_qa_1K.json")
    assert eval_qa == rows[: len(eval_qa)]


@needs_study
def test_study_counterfact_files():
    recs = read_records("counterfact", STUDY / "counterfact_edit_1K.csv")
    assert len(recs) == 106
    assert all(r.subject and r.subject in r.text for r in recs)  # _meta.json is in row order
    split = [r for r in recs if r.answer is not None]
    assert len(split) >= 100
    assert all(r.text == f"{r.question} {r.answer}" for r in split)
    assert recs[0].question == "Lenta.ru is written in" and recs[0].answer == "Italian"


@needs_study
def test_study_paperqa_files():
    path = STUDY.parent / "paperqa_train/individual_qa_natural/paper_0_qa.jsonl"
    if not path.is_file():
        pytest.skip("PaperQA training files absent")
    recs = read_records("qa", path)
    assert len(recs) == 40 and all(r.kind == "qa" and r.answer for r in recs)
    assert recs[0].question.startswith("In the Paper ID 0, ")


# ----------------------------------------------------------------------------------- Encoding

ROW = phonebook_record("Jeffrey Buck", "603-556-7631")
QA = Record(kind="qa", question="Where is Kyoto?", answer="Kyoto is in Japan.")
CF = Record(
    kind="row",
    text="Lenta.ru is written in Italian",
    question="Lenta.ru is written in",
    answer="Italian",
)


@pytest.mark.parametrize("records", [[ROW], [QA]])
def test_llama_chat_template_gives_one_bos(llama, records):
    enc = encode(records, llama, chat_template=True, loss_mask="full", max_length=128)
    ids = enc.tokens[0][enc.valid[0]]
    assert ids[0] == llama.bos_token_id
    assert (ids == llama.bos_token_id).sum() == 1


def test_plain_row_has_bos_and_eos(llama, qwen):
    enc = encode([CF], llama, chat_template=False, loss_mask="full", max_length=64)
    ids = enc.tokens[0][enc.valid[0]].tolist()
    assert ids == llama(CF.text)["input_ids"] + [llama.eos_token_id]
    assert ids[0] == llama.bos_token_id and ids.count(llama.bos_token_id) == 1
    enc = encode([CF], qwen, chat_template=False, loss_mask="full", max_length=64)
    assert enc.tokens[0][enc.valid[0]].tolist() == qwen(CF.text)["input_ids"] + [qwen.eos_token_id]


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_full_mask_targets_every_real_token_but_the_first(llama, pad_is_eos):
    tok = llama
    if pad_is_eos:
        tok = copy.deepcopy(llama)
        tok.pad_token = tok.eos_token
    recs = [CF, ROW, Record(kind="text", text="A short document.")]
    enc = encode(recs, tok, chat_template=False, loss_mask="full", max_length=64)
    assert enc.pad_id == tok.pad_token_id
    expected = enc.valid.copy()
    expected[:, 0] = False
    np.testing.assert_array_equal(enc.loss, expected)
    for i, n in enumerate(enc.lengths):
        assert enc.tokens[i, n - 1] == tok.eos_token_id and enc.loss[i, n - 1]  # EOS is a target
        assert (enc.tokens[i, n:] == tok.pad_token_id).all() and not enc.valid[i, n:].any()


def _targets(tok, enc, i) -> str:
    return tok.decode(enc.tokens[i][enc.loss[i]])


@pytest.mark.parametrize("style", ["llama", "qwen"])
@pytest.mark.parametrize("chat_template", [True, False])
def test_completion_only_marks_exactly_the_answer(llama, qwen, style, chat_template):
    tok = llama if style == "llama" else qwen
    recs = [ROW, CF, QA]
    enc = encode(
        recs, tok, chat_template=chat_template, loss_mask="completion_only", max_length=128
    )
    assert not (enc.loss & ~enc.valid).any()
    eos = tok.eos_token
    for i, r in enumerate(recs):
        got = _targets(tok, enc, i)
        if r.kind in ("row", "qa") and chat_template:
            # the turn that holds the answer (the user's row, the assistant's reply) through
            # its end-of-turn token: the model learns to stop after the answer
            end = "<|eot_id|>" if style == "llama" else "<|im_end|>"
            assert got.lstrip() == r.answer + end
        else:
            assert got.lstrip() == r.answer + eos  # plain text: answer + EOS
    # the template tokens around a row are no targets
    assert enc.loss.sum() < enc.valid.sum() / 2


def test_completion_only_errors(llama):
    with pytest.raises(DataError) as e:
        encode(
            [Record(kind="text", text="doc")],
            llama,
            chat_template=False,
            loss_mask="completion_only",
            max_length=64,
        )
    assert "data.loss_mask: full" in _one_line(e)
    unknown = Record(kind="row", text="In Macau, an official language is French")
    with pytest.raises(DataError) as e:
        encode(
            [ROW, unknown], llama, chat_template=True, loss_mask="completion_only", max_length=64
        )
    assert "record 1" in _one_line(e) and "data.loss_mask: full" in str(e.value)
    # full mode needs no answer
    encode([unknown], llama, chat_template=False, loss_mask="full", max_length=64)


def test_too_long_is_an_error_not_a_truncation(llama):
    long = Record(kind="text", text=" ".join(["knowledge"] * 200))
    n = len(llama(long.text)["input_ids"]) + 1
    with pytest.raises(DataError) as e:
        encode([ROW, long], llama, chat_template=False, loss_mask="full", max_length=64)
    msg = _one_line(e)
    assert "record 1" in msg and f"{n} tokens" in msg and "data.max_length=64" in msg


def test_width(llama):
    enc = encode([ROW, CF], llama, chat_template=False, loss_mask="full", max_length=512)
    assert enc.tokens.shape[1] % 8 == 0 and enc.tokens.shape[1] - enc.lengths.max() < 8
    assert enc.tokens.dtype == np.int32 and enc.valid.dtype == bool
    enc = encode(
        [ROW, CF], llama, chat_template=False, loss_mask="full", max_length=512, pad_to=100
    )
    assert enc.tokens.shape == (2, 100)
    with pytest.raises(DataError) as e:
        encode([ROW], llama, chat_template=False, loss_mask="full", max_length=512, pad_to=3)
    assert "pad_to=3" in _one_line(e)
    # a width rounded up to 8 never exceeds max_length
    n = int(encode([ROW], llama, chat_template=False, loss_mask="full", max_length=512).lengths[0])
    enc = encode([ROW], llama, chat_template=False, loss_mask="full", max_length=n)
    assert enc.tokens.shape[1] == n


# --------------------------------------------------------------------------------- Data order


def test_epoch_stream_epochs_are_permutations_with_padded_last_batch():
    s = EpochStream(n_rows=10, batch_size=4, seed=0)
    assert s.steps_per_epoch == 3
    for epoch in range(3):
        batches = [s.indices(epoch * 3 + b) for b in range(3)]
        assert all(b.shape == (4,) for b in batches)
        assert (batches[2][2:] == -1).all() and (batches[2][:2] >= 0).all()
        rows = np.concatenate(batches)
        assert sorted(rows[rows >= 0].tolist()) == list(range(10))
        np.testing.assert_array_equal(
            rows[rows >= 0], np.random.default_rng([0, epoch]).permutation(10)
        )
    assert s.position(7) == (2, 1)
    assert not np.array_equal(s.permutation(0), s.permutation(1))


def test_epoch_stream_is_stateless_and_seeded():
    run = EpochStream(37, 8, seed=11)
    through = [run.indices(step) for step in range(30)]
    resumed = EpochStream(37, 8, seed=11)
    for step in (29, 17, 5, 23):  # any order, any starting point
        np.testing.assert_array_equal(resumed.indices(step), through[step])
    other = EpochStream(37, 8, seed=12)
    assert any(not np.array_equal(other.indices(k), through[k]) for k in range(5))


def test_gather_pads_empty_slots(llama):
    enc = encode([ROW, CF, QA], llama, chat_template=True, loss_mask="full", max_length=128)
    tokens, valid, loss = gather(enc, np.array([2, -1, 0, -1]))
    assert tokens.shape == valid.shape == loss.shape == (4, enc.tokens.shape[1])
    np.testing.assert_array_equal(tokens[0], enc.tokens[2])
    np.testing.assert_array_equal(loss[2], enc.loss[0])
    assert (tokens[[1, 3]] == enc.pad_id).all()
    assert not valid[[1, 3]].any() and not loss[[1, 3]].any()
