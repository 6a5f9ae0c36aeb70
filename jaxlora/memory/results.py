"""Memory result sets: rows keyed by (library, method), merged and committed per method.

Layout. The default result set is the run directory itself; `jaxlora memory RUN --out NAME`
writes a separate one under `RUN/memory_sets/NAME/` and leaves the default set untouched:

    memory_results.csv         one row per (library, method), the columns below
    memory_predictions.jsonl   one line per question of each (library, method)
    memory_report.md, plots/memory_*.png|svg   the report (`jaxlora/memory/report.py`)

Merging (docs/design.md §2, "Results are keyed, not files"). A call evaluates some methods; each
(library, method) it finishes replaces that key's row and predictions, and every other key is
kept. A key is committed as soon as its method has finished: its predictions first, then the
results, each file written whole through a temporary name and a rename
(`jaxlora.fsutil.atomic_write`). `memory_results.csv` is the ledger: a key is done when its row
is there, so an interrupted call keeps every finished method, and a crash between the two writes
leaves that method to be evaluated again, never a row without its predictions. With `resume`
(`jaxlora memory --resume`) the keys already done on the same questions are not evaluated again.

Columns. `memory_results.csv` always has the columns of `columns(axes)`, in that order, whatever
methods or dataset ran; a cell is blank where its metric does not apply:

| columns | what |
|---|---|
| library | the library's label: its other sweep values as key=value (`objective=ntp`), or `units=...` for a run's only library (`memory.library.library_label`); never blank |
| one per sweep axis | the library's value of each sweep axis but `data.unit` (`lora.rank`, ...) |
| method, router, k, combiner, context | the method and its parts (`jaxlora.memory.compose`) |
| questions | `memory.questions` when given; blank: the library's own questions |
| accuracy, hard_accuracy, unanswered, n_hard | exact / option accuracy; QuALITY's hard subset |
| loglik_accuracy, loglik_hard_accuracy | QuALITY's options scored by likelihood (memory.loglik) |
| bleu, rouge_l, bleu_levelL, rouge_l_levelL, n_levelL | free-form answers; PaperQA per level |
| rouge1, rouge2, rougeL, rougeLsum, n_documents | NarrativeQA (best over references) |
| judge, judge_failed, judge_failure_rate, judge_levelL | memory.judge (0-10; failures apart) |
| routing_top1, routing_recall | routing agreement with the oracle (routed methods) |
| truncated, n_questions | contexts cut to the budget; questions asked |
| compile_seconds, questions_per_s | the method's JAX tracing and compiling; questions per second of the rest of its time (steady throughput, compilation excluded) |
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxlora.data.readers import jsonl_objects
from jaxlora.errors import DataError
from jaxlora.fsutil import atomic_write
from jaxlora.memory.compose import Method

log = logging.getLogger(__name__)

RESULTS, PREDICTIONS, REPORT = "memory_results.csv", "memory_predictions.jsonl", "memory_report.md"
SETS = "memory_sets"  # RUN/memory_sets/NAME: the result sets named by --out

_LEVELS = (1, 2, 3)  # PaperQA's levels (jaxlora.eval.metrics.PAPERQA_LEVELS)
# Before the sweep axes: the library; after them, in this order, everything else.
METHOD_COLUMNS = ("method", "router", "k", "combiner", "context", "questions")
METRIC_COLUMNS = (
    "accuracy",
    "hard_accuracy",
    "unanswered",
    "n_hard",
    "loglik_accuracy",
    "loglik_hard_accuracy",
    "bleu",
    "rouge_l",
    *(f"{m}_level{lv}" for m in ("bleu", "rouge_l", "n") for lv in _LEVELS),
    "rouge1",
    "rouge2",
    "rougeL",
    "rougeLsum",
    "n_documents",
    "judge",
    "judge_failed",
    "judge_failure_rate",
    *(f"judge_level{lv}" for lv in _LEVELS),
    "routing_top1",
    "routing_recall",
)
RUN_COLUMNS = ("truncated", "n_questions", "compile_seconds", "questions_per_s")


def columns(axes: Sequence[str]) -> tuple[str, ...]:
    """The columns of a run's memory_results.csv: fixed, but for the run's own sweep axes."""
    return ("library", *axes, *METHOD_COLUMNS, *METRIC_COLUMNS, *RUN_COLUMNS)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def set_dir(run_dir: Path, name: str | None) -> Path:
    """The directory of a run's result set: the run itself, or memory_sets/NAME (`--out`)."""
    if name is None:
        return run_dir
    if not _NAME.fullmatch(name):
        raise DataError(
            f"--out {name!r}: a result set name is letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return run_dir / SETS / name


def result_key(row: dict[str, Any]) -> tuple[str, str]:
    """A row's or a prediction's key: (library, method)."""
    return (str(row.get("library") or ""), str(row["method"]))


@dataclasses.dataclass
class ResultSet:
    """A result set read whole, updated one (library, method) at a time (module docstring)."""

    directory: Path
    fields: tuple[str, ...]
    rows: dict[tuple[str, str], dict[str, Any]]
    predictions: dict[tuple[str, str], list[dict[str, Any]]]

    @classmethod
    def open(cls, run_dir: Path, name: str | None, axes: Sequence[str]) -> ResultSet:
        """The set's current results and predictions, each checked; nothing is written."""
        directory = set_dir(run_dir, name)
        fields = columns(axes)
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        path = directory / RESULTS
        if path.is_file():
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                unknown = [c for c in reader.fieldnames or () if c not in fields]
                if unknown or "method" not in (reader.fieldnames or ()):
                    what = f"column {unknown[0]!r} is not" if unknown else "no 'method' column in"
                    raise DataError(
                        f"{path}: {what} the memory results of this run: move the file away, "
                        "or write a separate result set with --out NAME"
                    )
                for row in reader:
                    rows[result_key(row)] = row
        predictions: dict[tuple[str, str], list[dict[str, Any]]] = {}
        path = directory / PREDICTIONS
        if path.is_file():
            for n, p in jsonl_objects(path):
                if not isinstance(p.get("method"), str):
                    raise DataError(f"{path} line {n}: field 'method' is missing or not text")
                predictions.setdefault(result_key(p), []).append(p)
        return cls(directory, fields, rows, predictions)

    def done(self, library: str, method: str, questions: str) -> bool:
        """Whether (library, method) has its row, evaluated on the same `questions` column."""
        row = self.rows.get((library, method))
        return row is not None and (row.get("questions") or "") == questions

    def todo(self, library: str, methods: Sequence[Method], questions: str | None) -> list[Method]:
        """The methods not done on `questions` (`memory.questions`; None: the library's own),
        the ones `--resume` evaluates."""
        todo = [m for m in methods if not self.done(library, m.name, questions or "")]
        if len(todo) < len(methods):
            skipped = len(methods) - len(todo)
            log.info(
                "memory %s: %d of %d methods already in %s",
                library,
                skipped,
                len(methods),
                self.directory,
            )
        return todo

    def relabel(self, old: str, new: str) -> None:
        """Library `old`'s rows and predictions under the label `new`, in place (a set written
        before labels were key=value: `rank8-objectiventp`, or "" for a run's only library);
        written with the next commit. A key already under `new` wins over the old one."""
        if old == new:
            return
        for table in (self.rows, self.predictions):
            moved: dict[tuple[str, str], Any] = {}
            for (lib, method), value in table.items():
                if lib != old:
                    moved.setdefault((lib, method), value)
                elif (new, method) not in table:
                    moved[(new, method)] = (
                        {**value, "library": new}
                        if isinstance(value, dict)
                        else [{**p, "library": new} for p in value]
                    )
            table.clear()
            table.update(moved)

    def commit(self, row: dict[str, Any], predictions: Sequence[dict[str, Any]]) -> None:
        """Replace (or add) one key's row and predictions, predictions first (the ledger last).
        A replaced key keeps its place; a new one comes last."""
        unknown = [c for c in row if c not in self.fields]
        if unknown:  # a metric the schema does not name: a bug, caught at the first method
            raise ValueError(f"memory result column {unknown[0]!r} is not in results.columns")
        key = result_key(row)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.predictions[key] = list(predictions)
        lines = (
            json.dumps(p, ensure_ascii=False) + "\n" for ps in self.predictions.values() for p in ps
        )
        atomic_write(self.directory / PREDICTIONS, "".join(lines))
        self.rows[key] = row
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.fields, restval="")
        writer.writeheader()
        writer.writerows(self.rows.values())
        atomic_write(self.directory / RESULTS, buf.getvalue())


def question_fields(source: Any) -> dict[str, Any]:
    """A prediction's fields from a document question: its id, its PaperQA level, its QuALITY
    gold letter and hard flag (none for a question without a source)."""
    if source is None:
        return {}
    out: dict[str, Any] = {"id": source.id}
    if source.level is not None:
        out["level"] = source.level
    if source.options:
        out.update(gold=source.gold_letter, hard=source.hard)
    return out


__all__ = ["RESULTS", "ResultSet", "columns", "question_fields", "result_key", "set_dir"]
