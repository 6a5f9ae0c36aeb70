"""Tokenizer against embedding table: unused added tokens beyond the table are a warning at
load, a token a run uses beyond it (data, template, special tokens) is an error."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import jaxlora
from jaxlora import data as kdata
from jaxlora.cli import main as cli
from jaxlora.config import parse_config
from jaxlora.errors import DataError
from jaxlora.evaluate import build_questions
from jaxlora.models.convert import CheckpointError
from tests.runs import write_config

EXTRA = "<|extra|>"  # an added token with id 512, one past the 512-row embedding table


@pytest.fixture(scope="module")
def extra_checkpoint(hf_checkpoint, tmp_path_factory) -> Path:
    """The tiny llama checkpoint with one added token that has no embedding row."""
    out = tmp_path_factory.mktemp("extra") / "llama"
    shutil.copytree(hf_checkpoint("llama"), out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.add_tokens([EXTRA])
    tok.save_pretrained(out)
    assert tok.convert_tokens_to_ids(EXTRA) == 512
    return out


@pytest.fixture(scope="module")
def extra_model(extra_checkpoint):
    return jaxlora.load_pretrained(extra_checkpoint)


def test_unused_added_token_outside_the_table_warns_and_loads(extra_checkpoint, caplog):
    with caplog.at_level(logging.WARNING, logger="jaxlora"):
        model = jaxlora.load_pretrained(extra_checkpoint)
    assert model.config.vocab_size == 512 and len(model.tokenizer) == 513
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert EXTRA in warning and "refused" in warning and "\n" not in warning


def test_data_that_uses_the_added_token_is_refused(extra_model):
    tok = extra_model.tokenizer
    kw = dict(chat_template=False, loss_mask="full", max_length=64, vocab_size=512)
    fine = [kdata.Record(kind="text", text="plain words only"), kdata.Record(kind="text", text="x")]
    assert len(kdata.encode(fine, tok, **kw)) == 2
    bad = [*fine, kdata.Record(kind="text", text=f"a document with {EXTRA} inside")]
    with pytest.raises(DataError, match=r"record 2 has the token '<\|extra\|>' \(id 512\)"):
        kdata.encode(bad, tok, **kw)
    # Without the model's vocab size there is nothing to check against.
    assert len(kdata.encode(bad, tok, **{**kw, "vocab_size": None})) == 3


def test_eval_questions_that_use_the_added_token_are_refused(extra_model):
    config = parse_config(
        {
            "data": {"dataset": "qa", "path": "unused.csv", "chat_template": False},
            "eval": {"prompt": "question"},
        }
    )
    records = [
        kdata.Record(kind="qa", question="Who wrote Hamlet?", answer="Shakespeare"),
        kdata.Record(kind="qa", question=f"Who wrote {EXTRA}?", answer="Nobody"),
    ]
    tok = extra_model.tokenizer
    assert len(build_questions(records[:1], tok, config.data, config.eval, vocab_size=512)) == 1
    with pytest.raises(DataError, match=r"eval question 1 has the token '<\|extra\|>'"):
        build_questions(records, tok, config.data, config.eval, vocab_size=512)


def test_a_run_whose_data_uses_the_added_token_stops_before_writing(
    extra_checkpoint, tmp_path, capsys
):
    facts = tmp_path / "facts.csv"
    facts.write_text(f"question,answer\nWho wrote Hamlet?,Shakespeare\nWhat is {EXTRA}?,Lima\n")
    data = {
        "dataset": "qa",
        "path": str(facts),
        "size_tokens": None,
        "chat_template": False,
        "max_length": 64,
    }
    cfg = write_config(
        tmp_path / "c.yaml", data=data, **{"model.path": str(extra_checkpoint), "mesh.adapter": -1}
    )
    out = tmp_path / "run"
    assert cli(["train", str(cfg), "--out", str(out), "--no-progress"]) == 2
    # The load-time warning about the unused token, then the one-line error when it is used.
    warning, err = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith("jaxlora: WARNING:") and EXTRA in warning
    assert err.startswith("jaxlora: error:")
    assert "record 1 has the token '<|extra|>' (id 512)" in err
    assert not out.exists()


def test_a_larger_base_vocabulary_is_refused_at_load(hf_checkpoint):
    small = hf_checkpoint("llama", vocab=256)  # a 512-token tokenizer for 256 embedding rows
    with pytest.raises(CheckpointError, match=r"base vocabulary has 512 tokens.*vocab_size is 256"):
        jaxlora.load_pretrained(small)


def test_a_special_token_outside_the_table_is_refused_at_load(extra_checkpoint, tmp_path):
    shutil.copytree(extra_checkpoint, tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    tok.pad_token = EXTRA  # id 512: every padded batch would feed it to the model
    tok.save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"pad_token '<\|extra\|>' has id 512"):
        jaxlora.load_pretrained(tmp_path / "m")
