"""The inputs of a memory evaluation, read and checked before any work or any write.

`jaxlora memory RUN` reads the run's `units.jsonl` (one row per adapter), the methods and an
optional questions file (`memory.questions`). Each is validated here in full first, so that a
bad line is one error naming the file, the line and the field (exit 2), and no result file is
touched by an evaluation that could not have finished.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxlora.data.readers import jsonl_objects, read_table
from jaxlora.errors import DataError
from jaxlora.memory.compose import Method, parse_method

# Fields of a units.jsonl row that the evaluator reads, all text (sweep.SweepJob._write_units).
UNIT_TEXT_FIELDS = ("adapter", "unit", "key", "text")


def read_units(path: Path) -> dict[str, dict[str, Any]]:
    """{adapter name: row} of a run's units.jsonl, every row checked (see the module docs)."""
    rows: dict[str, dict[str, Any]] = {}
    fix = "restore the file the run wrote, or retrain the run"
    for n, row in jsonl_objects(path):
        for field in UNIT_TEXT_FIELDS:
            if not isinstance(row.get(field), str):
                what = "is missing" if field not in row else "is not text"
                raise DataError(f"{path} line {n}: field {field!r} {what}: {fix}")
        if row.get("document") is not None and not isinstance(row["document"], str):
            raise DataError(f"{path} line {n}: field 'document' is not text or null: {fix}")
        questions = row.get("questions", [])
        if not isinstance(questions, list):
            raise DataError(f"{path} line {n}: field 'questions' is not a list: {fix}")
        for j, q in enumerate(questions):
            if not (
                isinstance(q, dict)
                and isinstance(q.get("question"), str)
                and isinstance(q.get("answer"), str)
            ):
                raise DataError(
                    f"{path} line {n}: field 'questions' item {j} is not "
                    f'{{"question": text, "answer": text}}: {fix}'
                )
        if row["adapter"] in rows:
            raise DataError(f"{path} line {n}: field 'adapter' {row['adapter']!r} repeats: {fix}")
        rows[row["adapter"]] = {**row, "document": row.get("document"), "questions": questions}
    if not rows:
        raise DataError(f"{path} has no rows: {fix}")
    return rows


def parse_methods(methods: Sequence[str]) -> list[Method]:
    """memory.methods parsed; an empty list is an error (it would evaluate, and write, nothing)."""
    if not methods:
        raise DataError(
            "memory.methods is empty: name at least one method, e.g. "
            "--set 'memory.methods=[oracle,bm25@3/ties]'"
        )
    return [parse_method(m) for m in methods]


@dataclasses.dataclass(frozen=True)
class QuestionRow:
    """One row of a memory.questions file; `where` is its "line N" (or "row N")."""

    where: str
    question: str
    answer: str
    unit: str | None
    document: str | None


def read_questions(
    path: str, question_field: str, answer_field: str, document_field: str | None
) -> list[QuestionRow]:
    """Every row of a memory.questions file (csv, jsonl, json or a hub dataset), checked.

    jsonl and csv errors name the line; json arrays and hub datasets name the row (0-based).
    """
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if not p.exists() and suffix in (".csv", ".json", ".jsonl"):
        raise DataError(f"memory.questions file not found: {p}")
    if p.is_file() and suffix == ".jsonl":
        raw = [(f"line {n}", row) for n, row in jsonl_objects(p)]
    elif p.is_file() and suffix == ".csv":
        with p.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            raw = [(f"line {reader.line_num}", row) for row in reader]
    else:  # json, a hub dataset id, or an error that read_table words (missing, directory)
        table = read_table(p if p.exists() else path)
        columns = table.columns
        raw = [(f"row {i}", {c: columns[c][i] for c in columns}) for i in range(table.num_rows)]
    if not raw:
        raise DataError(f"memory.questions {p} has no rows: point it at a file with questions")
    q_key, a_key = f"data.question_field={question_field}", f"data.answer_field={answer_field}"
    return [
        QuestionRow(
            where,
            _text(p, where, row, question_field, q_key),
            _text(p, where, row, answer_field, a_key),
            _text(p, where, row, "unit", None),
            _text(p, where, row, document_field or "document", None),
        )
        for where, row in raw
    ]


def _text(p: Path, where: str, row: dict, field: str, required_by: str | None) -> str | None:
    """The field as text; None when absent or blank and optional (`required_by` None)."""
    v = row.get(field)
    if v is None or (isinstance(v, str) and not v.strip()):
        if required_by is None:
            return None
        what = "is missing" if field not in row else "is empty"
        raise DataError(f"{p} {where}: field {field!r} {what} (memory.questions: {required_by})")
    if isinstance(v, dict | list):
        raise DataError(f"{p} {where}: field {field!r} is a {type(v).__name__}, not text")
    return str(v)


__all__ = ["QuestionRow", "parse_methods", "read_questions", "read_units"]
