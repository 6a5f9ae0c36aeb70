"""The unit of knowledge data: one `Record` per training example.

Every reader (PhoneBook, CounterFact, documents, QA) produces the same frozen dataclass, so
budgeting, encoding and evaluation never branch on the source file format, only on `kind`:

- `row`: one fact as trained, `text == question + " " + answer`. The question is the prompt a
  recall test asks, the answer the string to recall. Study files that only keep the trained
  text (CounterFact edit CSVs) give rows whose split is unknown (`question = answer = None`).
- `qa`: a question/answer pair trained as a dialogue turn; `text` stays empty.
- `text`: a document or chunk with no designated answer.

`document` names the document a record belongs to (a paper, a book, an article), when the
source says so; units of a memory are cut within documents (`jaxlora/data/units.py`). A
`UnitRecord` is a record `jaxlora synth` wrote for one unit (a chunk of its document), and
`unit_name` turns a document name into the unit id such records and the units carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RecordKind = Literal["row", "qa", "text"]
RECORD_KINDS: tuple[str, ...] = ("row", "qa", "text")


@dataclass(frozen=True)
class Record:
    """One knowledge example; see the module docstring for what each field holds per kind."""

    kind: RecordKind
    text: str = ""
    question: str | None = None
    answer: str | None = None
    target_true: str | None = None
    subject: str | None = None
    document: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in RECORD_KINDS:
            raise ValueError(f"unknown record kind {self.kind!r}: use one of {RECORD_KINDS}")

    @property
    def knowledge_text(self) -> str:
        """The raw knowledge the record carries, as counted against a token budget."""
        if self.kind == "qa":
            return f"{self.question or ''} {self.answer or ''}"
        return self.text


def row_record(
    question: str,
    answer: str,
    *,
    target_true: str | None = None,
    subject: str | None = None,
) -> Record:
    """A `row` whose prompt/answer split is known: `text = question + " " + answer`."""
    return Record(
        kind="row",
        text=f"{question} {answer}",
        question=question,
        answer=answer,
        target_true=target_true,
        subject=subject,
    )


@dataclass(frozen=True)
class UnitRecord(Record):
    """A record written for one chunk of its document (a `jaxlora synth` record whose unit_id
    names the chunk): `unit` is that id, `unit_hash` the `text_hash` (`jaxlora.data.units`) of
    the chunk text it was written from (None when the record does not say)."""

    unit: str = ""
    unit_hash: str | None = None


def unit_name(name: str) -> str:
    """A document name as a unit id: file-name safe, still readable."""
    out = "".join(c if c.isalnum() or c in "._-" else "_" for c in str(name).strip())
    return out or "_"
