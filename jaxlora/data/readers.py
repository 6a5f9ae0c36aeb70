"""Readers: files (or hub datasets) to `Record` lists, one reader per dataset kind.

Tables are read with `datasets.load_dataset("csv" | "json")` (JSON arrays and JSON lines alike);
a path that is not a file but looks like `org/name` is tried as a hub dataset. CSV cells are
read with `na_filter=False`, so a name or a fact such as "None" or "NA" stays a string.

Formats understood, per `data.dataset`:

- `phonebook`: the study's `phonebook_qa_*K.csv` (`text` rows, parsed back into name and
  phone), `synthetic_phonebook.csv` (`Name,Phone`), or `{question, answer}` lists such as the
  study's `phonebook_eval_qa_*K.json` (questions without "Question:" and "?"; the canonical row
  is rebuilt, so every source gives identical records).
- `counterfact`: the ROME `counterfact.json` (`requested_rewrite` with a "{}" prompt, subject,
  target_new, target_true), `{question, answer}` items, or the study's `counterfact_edit_*K.csv`
  (`text` only: the prompt/answer split is lost, so `question = answer = None`). The latter is
  enriched from siblings when present: `counterfact_eval_qa.json` restores the split of each row
  whose text is exactly `question + " " + answer`, and `<stem>_meta.json` gives the subject of
  every row (its `subjects` list is in row order; checked on the released files).
- `text`: documents in `data.text_field`.
- `qa`: pairs in `data.question_field` / `data.answer_field`.

Errors name the file, the row index and the columns found, with the config key that fixes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxlora.data.phonebook import phonebook_record
from jaxlora.data.records import Record, row_record
from jaxlora.errors import DataError

DATASET_KINDS: tuple[str, ...] = ("phonebook", "counterfact", "text", "qa")
_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_PHONE_CHARS = r"\+?[0-9][0-9()+\-. ]*[0-9]"
_PB_ROW = re.compile(
    rf"Question: What is the phone number of (?P<name>.+?)\? Answer: (?P<phone>{_PHONE_CHARS})"
)
_PB_QUESTION = re.compile(r"(?:Question:\s*)?What is the phone number of (?P<name>.+?)\s*\??")
_PB_FORMAT = "'Question: What is the phone number of NAME? Answer: PHONE'"

__all__ = ["DATASET_KINDS", "jsonl_objects", "read_records", "read_table"]


def read_records(
    dataset: str,
    path: str | Path,
    *,
    text_field: str = "text",
    question_field: str = "question",
    answer_field: str = "answer",
    document_field: str | None = None,
) -> list[Record]:
    """Read every record of `path` as `dataset` (one of `DATASET_KINDS`), in file order.

    With `document_field`, every record carries its row's value of that column as `document`
    (the column must exist)."""
    if dataset not in DATASET_KINDS:
        raise DataError(f"unknown data.dataset {dataset!r}: use one of {', '.join(DATASET_KINDS)}")
    table = _Table.load(path)
    fields = {"text": text_field, "question": question_field, "answer": answer_field}
    if dataset == "phonebook":
        records = _phonebook(table, fields)
    elif dataset == "counterfact":
        records = _counterfact(table, fields)
    elif dataset == "text":
        texts = table.strings(text_field, "data.text_field")
        records = [Record(kind="text", text=t) for t in texts]
    else:
        questions = table.strings(question_field, "data.question_field")
        answers = table.strings(answer_field, "data.answer_field")
        records = [
            Record(kind="qa", question=q, answer=a) for q, a in zip(questions, answers, strict=True)
        ]
    if document_field is None:
        return records
    documents = table.strings(document_field, "data.document_field")
    return [dataclasses.replace(r, document=d) for r, d in zip(records, documents, strict=True)]


def read_table(path: str | Path) -> _Table:
    """The columns of a csv/json/jsonl file (or hub dataset), with row-pointing errors."""
    return _Table.load(path)


class _Table:
    """Columns of one loaded file, with errors that point at the file and the row."""

    def __init__(self, name: str, columns: dict[str, list[Any]], path: Path | None):
        self.name, self.columns, self.path = name, columns, path
        self.num_rows = len(next(iter(columns.values()))) if columns else 0

    @classmethod
    def load(cls, path: str | Path) -> _Table:
        import datasets

        p = Path(path).expanduser()
        if p.is_file():
            builder = _BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise DataError(
                    f"unsupported data file extension {p.suffix or '(none)'!r} for {p}: "
                    "use a .csv, .json or .jsonl file in data.path"
                )
            if not p.read_bytes().strip():
                raise DataError(f"data file {p} is empty: point data.path at a file with rows")
            kwargs = {"na_filter": False} if builder == "csv" else {}
            try:
                with quiet():
                    ds = datasets.load_dataset(builder, data_files=str(p), split="train", **kwargs)
            except Exception as e:
                if "corresponds to no data" in str(e):  # a header or `[]` and nothing else
                    raise DataError(
                        f"data file {p} has no rows: point data.path at a file with rows"
                    ) from e
                raise DataError(f"cannot read {p} as {builder}: {first_line(e)}") from e
            name, local = str(p), p
        elif p.exists():
            raise DataError(f"data.path {p} is a directory: point it at a .csv/.json/.jsonl file")
        elif _HUB_ID.fullmatch(str(path)) and p.suffix.lower() not in _BUILDERS:
            try:
                with quiet():
                    ds = datasets.load_dataset(str(path), split="train")
            except Exception as e:
                raise DataError(
                    f"data.path {path!r} is not a local file and could not be loaded from the "
                    f"hub: {first_line(e)}"
                ) from e
            name, local = str(path), None
        else:
            raise DataError(
                f"data file not found: {p} (set data.path to an existing .csv/.json/.jsonl file "
                "or a hub dataset id org/name)"
            )
        if ds.num_rows == 0:
            raise DataError(f"data file {name} has no rows: point data.path at a file with rows")
        return cls(name, {c: list(ds[c]) for c in ds.column_names}, local)

    def has(self, column: str) -> bool:
        return column in self.columns

    def missing(self, column: str, key: str) -> DataError:
        found = ", ".join(self.columns) or "none"
        return DataError(
            f"{self.name} has no column {column!r} (columns found: {found}): set {key} to one of them"
        )

    def strings(self, column: str, key: str) -> list[str]:
        """The column as non-empty strings (numbers read by the CSV parser become text)."""
        if column not in self.columns:
            raise self.missing(column, key)
        out = []
        for i, v in enumerate(self.columns[column]):
            if v is None or (isinstance(v, str) and not v.strip()):
                raise DataError(
                    f"{self.name} row {i} has an empty {column!r}: remove the row or fill it in"
                )
            if isinstance(v, dict | list):
                raise DataError(
                    f"{self.name} row {i}: {column!r} is a {type(v).__name__}, not text: "
                    f"set {key} to a text column"
                )
            out.append(str(v))
        return out


def _phonebook(table: _Table, fields: dict[str, str]) -> list[Record]:
    lower = {c.lower(): c for c in table.columns}
    if "name" in lower and "phone" in lower:
        names = table.strings(lower["name"], "data.text_field")
        phones = table.strings(lower["phone"], "data.text_field")
        for i, phone in enumerate(phones):
            if not re.fullmatch(_PHONE_CHARS, phone.strip()):
                raise DataError(
                    f"{table.name} row {i}: phone {phone!r} is not a phone number like 603-556-7631"
                )
        return [phonebook_record(n.strip(), p.strip()) for n, p in zip(names, phones, strict=True)]
    if table.has(fields["text"]):
        records = []
        for i, text in enumerate(table.strings(fields["text"], "data.text_field")):
            m = _PB_ROW.fullmatch(text.strip())
            if m is None:
                raise DataError(
                    f"{table.name} row {i} is not a phonebook row {_PB_FORMAT}: {text[:80]!r}"
                )
            records.append(phonebook_record(m["name"], m["phone"]))
        return records
    if table.has(fields["question"]) and table.has(fields["answer"]):
        questions = table.strings(fields["question"], "data.question_field")
        answers = table.strings(fields["answer"], "data.answer_field")
        records = []
        for i, (q, a) in enumerate(zip(questions, answers, strict=True)):
            m = _PB_QUESTION.fullmatch(q.strip())
            if m is None or not re.fullmatch(_PHONE_CHARS, a.strip()):
                raise DataError(
                    f"{table.name} row {i} is not a phonebook question "
                    f"'What is the phone number of NAME?' with a phone answer: {q[:80]!r}"
                )
            records.append(phonebook_record(m["name"], a.strip()))
        return records
    found = ", ".join(table.columns)
    raise DataError(
        f"{table.name} is not a phonebook (columns found: {found}): expected a {fields['text']!r} "
        f"column of rows {_PB_FORMAT}, 'Name,Phone' columns, or question/answer fields "
        "(set data.text_field, data.question_field, data.answer_field)"
    )


def _counterfact(table: _Table, fields: dict[str, str]) -> list[Record]:
    if table.has("requested_rewrite"):
        return [_rome_case(table, i, rw) for i, rw in enumerate(table.columns["requested_rewrite"])]
    if table.has(fields["question"]) and table.has(fields["answer"]):
        questions = table.strings(fields["question"], "data.question_field")
        answers = table.strings(fields["answer"], "data.answer_field")
        return [row_record(q, a) for q, a in zip(questions, answers, strict=True)]
    if not table.has(fields["text"]):
        found = ", ".join(table.columns)
        raise DataError(
            f"{table.name} is not a CounterFact file (columns found: {found}): expected ROME's "
            f"'requested_rewrite', question/answer fields, or a {fields['text']!r} column "
            "(set data.text_field, data.question_field, data.answer_field)"
        )
    texts = table.strings(fields["text"], "data.text_field")
    splits = _sibling_eval_qa(table.path)
    subjects = _sibling_subjects(table.path, len(texts))
    records = []
    for i, text in enumerate(texts):
        subject = subjects[i] if subjects else None
        if text in splits:
            q, a = splits[text]
            records.append(row_record(q, a, subject=subject))
        else:
            records.append(Record(kind="row", text=text, subject=subject))
    return records


def _rome_case(table: _Table, i: int, rewrite: Any) -> Record:
    try:
        prompt, subject = rewrite["prompt"], rewrite["subject"]
        new, true = rewrite["target_new"]["str"], rewrite["target_true"]["str"]
    except (KeyError, TypeError) as e:
        raise DataError(
            f"{table.name} row {i}: requested_rewrite lacks {e} (expected prompt, subject, "
            "target_new.str, target_true.str as in ROME's counterfact.json)"
        ) from e
    if "{}" not in prompt:
        raise DataError(f"{table.name} row {i}: requested_rewrite.prompt {prompt!r} has no '{{}}'")
    return row_record(prompt.replace("{}", subject), new, target_true=true, subject=subject)


def _sibling_eval_qa(path: Path | None) -> dict[str, tuple[str, str]]:
    """text -> (question, answer) from a `counterfact_eval_qa.json` beside the file."""
    sibling = path.with_name("counterfact_eval_qa.json") if path else None
    if sibling is None or not sibling.is_file():
        return {}
    items = read_json(sibling)
    if not isinstance(items, list):
        raise DataError(f"{sibling} must be a JSON list of {{question, answer}} items")
    out = {}
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("question"), str):
            q, a = item["question"], str(item.get("answer", ""))
            out[f"{q} {a}"] = (q, a)
    return out


def _sibling_subjects(path: Path | None, n_rows: int) -> list[str] | None:
    """The `subjects` list of `<stem>_meta.json` beside the file, one per row, if present."""
    sibling = path.with_name(f"{path.stem}_meta.json") if path else None
    if sibling is None or not sibling.is_file():
        return None
    meta = read_json(sibling)
    subjects = meta.get("subjects") if isinstance(meta, dict) else None
    if subjects is None:
        return None
    if not isinstance(subjects, list) or len(subjects) != n_rows:
        count = len(subjects) if isinstance(subjects, list) else "no"
        raise DataError(
            f"{sibling} lists {count} subjects but {path} has {n_rows} rows: "
            "fix or remove the metadata file"
        )
    return [str(s) for s in subjects]


def jsonl_objects(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line of a jsonl file; a line that is not a
    JSON object is an error naming the file and the line."""
    p = Path(path)
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{p} line {n} is not JSON: {first_line(e)}") from None
            if not isinstance(row, dict):
                raise DataError(f"{p} line {n} is not a JSON object")
            yield n, row


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} as JSON: {first_line(e)}") from e


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence `datasets` progress bars for small local files, restoring the user's setting."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()
