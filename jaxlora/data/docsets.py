"""Document datasets in the pipeline: training records and evaluation questions from one reader,
with the leakage guard between them.

`data.dataset: paperqa | narrativeqa | quality` is read through `jaxlora/data/documents.py`
into a `DocumentSet`: the training records (each carrying its document, so `data.units:
documents` gives one adapter per paper and `chunks` cuts windows within each book or article)
and the dataset's evaluation questions (each with its document). The evaluators ask those
questions, never the training records, so what is trained and what is asked cannot be mixed up
(docs/study.md §7: the releases trained on evaluation questions when a path was unset).

Training formats (`data.format`):
- `text`: the documents themselves. PaperQA introductions behind the study's ID header
  (`data.paper_header`: bracket `[Paper ID: {id}]`, natural `This paper {id} discusses:`), or
  the `{text}` rows of `data.train_path`; NarrativeQA stories (Gutenberg boilerplate removed)
  and QuALITY articles whole, to be chunked.
- `qa`: the QA rows of `data.train_path` (the study's `paperqa_train/*_qa_*` sets): question as
  the user turn, answer as the assistant turn, EOS trained.
- `qa_user`: the study's variant, question and answer together in the user turn.
- `text_qa`: the two together, the documents' text and the QA rows (a mix of formats).
- with `data.path: null` and no train_path, the generated PaperQA corpus trains `qa`,
  `qa_user` and `text_qa` on its generated training QA (`jaxlora/data/generated.py`: 8 per
  paper, asked differently from the evaluation questions).
- with `data.train_path` a `jaxlora synth` output directory (it has `synth_report.json` and one
  `{format}.jsonl` per format and mix; `jaxlora/llm/synth.py`): any format or mix written there
  (`qa`, `summary`, `rewrite`, `paraphrase`, `facts`, a mix name, ...). Each record trains for
  the unit its `unit_id` names: a document, or a chunk of one (`DOC.N`, as `data.units: chunks`
  names it; a `UnitRecord` that `units.synth_chunks` gives to that chunk's adapter alone, and to
  its document's under `units: documents` or `none`). A unit_id that is neither is an error.
  Records with `question`/`answer` are dialogue turns (EOS trained; `qa_user` reads `qa.jsonl`
  with both in the user turn), the others text, which for PaperQA carries the introductions' ID
  header (`data.paper_header`; `none`: no header). `text` still means the documents
  themselves, so one directory serves a whole `sweep: {data.format: [text, qa, summary]}`.

Leakage guard (`jaxlora/data/leakage.py`): every training record is checked against the
evaluation questions before anything is trained. `data.leakage: error` (the default) stops the
job with one line naming the record and the question; `drop` trains without the leaking records,
logs how many, and the job writes them to `RUN/leakage.json` (12 of the study's 600 PaperQA
training QA restate evaluation questions). The run's questions go to `RUN/questions.jsonl`.

`data.path: null` reads a generated corpus (`jaxlora/data/generated.py`, seeded by
`data.seed`): fictional papers in the paperQA.json layout whose introductions state the answers
to their 2 questions per level, and stories in the hub schemas of NarrativeQA and QuALITY, read
by the same readers, so the tiny twins run in CI with nothing downloaded.

Selection by length (`data.document_tokens: [MIN, MAX]`, bounds inclusive, either null): the
documents whose text has MIN..MAX tokens under the run's tokenizer (`select_documents`, applied
before the budget, so `size_rows: 35` then keeps the first 35 of them: the study's 35 books of
10-19K tokens). The log says how many were kept; keeping none is an error naming the lengths.

Reading is cached per data section (minus the unit, budget and selection), so a job's many
cells, the evaluators and the run-directory writer share one read and one guard pass.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import tempfile
from pathlib import Path
from typing import Any

from jaxlora.data import documents as docs
from jaxlora.data.budget import count_tokens, take_budget
from jaxlora.data.documents import EvalQuestion
from jaxlora.data.generated import generate_paperqa, generate_paperqa_training, write_generated
from jaxlora.data.leakage import LeakageHit, guard
from jaxlora.data.readers import jsonl_objects, read_json
from jaxlora.data.records import Record, UnitRecord, row_record, unit_name
from jaxlora.errors import DataError

log = logging.getLogger(__name__)

DOCUMENT_DATASETS: tuple[str, ...] = ("paperqa", "narrativeqa", "quality")
FORMATS: tuple[str, ...] = ("text", "qa", "qa_user", "text_qa")
DEFAULT_SPLITS = {"narrativeqa": "test", "quality": "validation"}
SYNTH_REPORT = "synth_report.json"  # what marks a `jaxlora synth` output directory
QUALITY_INSTRUCTION = "Answer with the letter of the correct option:"

__all__ = [
    "DOCUMENT_DATASETS",
    "FORMATS",
    "DocumentSet",
    "ask_record",
    "budgeted",
    "is_document_dataset",
    "is_synth_dir",
    "load_document_set",
    "load_questions",
    "select_documents",
    "synth_source",
]


@dataclasses.dataclass(frozen=True)
class DocumentSet:
    """Training records (after the leakage guard) and the evaluation questions of a dataset."""

    name: str
    records: tuple[Record, ...]
    questions: tuple[EvalQuestion, ...]
    checked: int  # training records the guard saw
    hits: tuple[LeakageHit, ...]  # what it found (dropped with data.leakage: drop)
    dropped: int
    documents: tuple[Record, ...] = ()  # the documents themselves (what chunks are cut from)
    titles: dict[str, str] = dataclasses.field(default_factory=dict)

    def leakage_report(self, data: Any) -> dict[str, Any]:
        """What `RUN/leakage.json` says about this set: the policy, the counts and every hit."""
        return {
            "dataset": self.name,
            "format": data.format,
            "train_path": data.train_path,
            "policy": data.leakage,
            "records": self.checked,
            "dropped": self.dropped,
            "hits": [dataclasses.asdict(h) for h in self.hits],
        }


def is_document_dataset(data: Any) -> bool:
    return data.dataset in DOCUMENT_DATASETS


def load_document_set(data: Any) -> DocumentSet:
    """The `DocumentSet` of a data section (cached; see the module docstring)."""
    return _load(*_key(data))


def _key(data: Any) -> tuple:
    if not is_document_dataset(data):
        raise DataError(f"data.dataset {data.dataset!r} is not one of {DOCUMENT_DATASETS}")
    return (
        data.dataset,
        None if data.path is None else str(data.path),
        data.format,
        data.paper_header,
        data.question_prefix,
        data.train_path,
        data.split,
        data.leakage,
        int(data.seed or 0),
    )


def select_documents(records: list[Record], data: Any, tokenizer) -> list[Record]:
    """The records of the documents `data.document_tokens` keeps (all when it is null or the
    dataset has no documents): those whose text has MIN..MAX tokens, bounds inclusive."""
    if getattr(data, "document_tokens", None) is None or not is_document_dataset(data):
        return list(records)
    low, high = data.document_tokens
    kept = _selection(_key(data), low, high, tokenizer)
    return [r for r in records if r.document in kept]


def budgeted(records: list[Record], data: Any, tokenizer) -> list[Record]:
    """`data.document_tokens`, then the budget. For document datasets `size_rows` counts
    documents (the records of the first N), so that a format with many records per document
    (QA, synthesised formats) keeps the same documents as `text` does."""
    records = select_documents(records, data, tokenizer)
    if data.size_rows is None or not is_document_dataset(data):
        return take_budget(
            records, tokenizer, size_tokens=data.size_tokens, size_rows=data.size_rows
        )
    order = list(dict.fromkeys(r.document for r in records))
    if data.size_rows > len(order):
        raise DataError(
            f"data.size_rows={data.size_rows} but {data.dataset} has only {len(order)} documents "
            "(size_rows counts documents for document datasets): lower data.size_rows"
        )
    keep = set(order[: data.size_rows])
    return [r for r in records if r.document in keep]


@functools.lru_cache(maxsize=8)
def _selection(key: tuple, low: int | None, high: int | None, tokenizer) -> frozenset[str]:
    """The documents within [low, high] tokens (computed, and logged, once per corpus)."""
    docset = _load(*key)
    # One document at a time: a whole split of books at once is millions of ids in memory.
    lengths = [int(count_tokens([d], tokenizer)[0]) for d in docset.documents]
    within = [(low is None or n >= low) and (high is None or n <= high) for n in lengths]
    span = f"data.document_tokens [{_bound(low)}, {_bound(high)}]"
    if not any(within):
        raise DataError(
            f"{span} keeps no document of {docset.name}: its {len(lengths)} documents have "
            f"{_lengths(lengths)} tokens; widen the range"
        )
    shorter = sum(low is not None and n < low for n in lengths)
    log.warning(
        "%s keeps %d of %d documents of %s (dropped %d shorter, %d longer)",
        span,
        sum(within),
        len(lengths),
        docset.name,
        shorter,
        len(lengths) - sum(within) - shorter,
    )
    return frozenset(d.document for d, ok in zip(docset.documents, within, strict=True) if ok)


def _bound(n: int | None) -> str:
    return "null" if n is None else str(n)


def _lengths(lengths: list[int]) -> str:
    xs = sorted(lengths)
    if len(xs) <= 8:
        return ", ".join(map(str, xs))
    return f"{xs[0]} to {xs[-1]} (median {xs[len(xs) // 2]})"


def load_questions(data: Any) -> list[EvalQuestion]:
    """The evaluation questions of a document dataset (each with its document)."""
    return list(load_document_set(data).questions)


def ask_record(q: EvalQuestion) -> Record:
    """How a question is asked: a `qa` record of its document. A multiple-choice question
    lists its options and asks for the letter, as the study's QuALITY prompt does."""
    text = q.question
    if q.options:
        letters = docs.OPTION_LETTERS
        options = "\n".join(f"{letters[i]}: {o}" for i, o in enumerate(q.options))
        text = f"{q.question}\n{options}\n\n{QUALITY_INSTRUCTION}"
    return Record("qa", question=text, answer=q.answer, document=q.document)


@functools.lru_cache(maxsize=16)
def _load(
    dataset: str,
    path: str | None,
    fmt: str,
    header: str,
    prefix: str,
    train_path: str | None,
    split: str | None,
    policy: str,
    seed: int,
) -> DocumentSet:
    if dataset == "paperqa":
        if path is None:
            corpus = docs.paperqa_corpus(
                generate_paperqa(seed=seed),
                f"the generated PaperQA corpus (seed {seed})",
                header=header,  # type: ignore[arg-type]
                question_prefix=prefix,  # type: ignore[arg-type]
            )
        else:
            corpus = docs.read_paperqa(path, header=header, question_prefix=prefix)  # type: ignore[arg-type]
    elif path is None:  # the generated set, through the hub-schema reader like any file
        with tempfile.TemporaryDirectory() as tmp:
            rows = write_generated(dataset, Path(tmp) / f"{dataset}.jsonl", seed=seed)
            corpus = dataclasses.replace(
                _read(dataset, str(rows), split),
                name=f"the generated {dataset} set (seed {seed})",
            )
    else:
        corpus = _read(dataset, path, split)
    if train_path is not None and is_synth_dir(train_path):
        records = _synth_records(
            corpus, fmt, train_path, header if dataset == "paperqa" else "none"
        )
    elif train_path is not None and dataset != "paperqa":
        raise DataError(
            f"data.train_path {train_path} is not a jaxlora synth output directory (no "
            f"{SYNTH_REPORT}): {dataset} trains on its documents or on jaxlora synth formats"
        )
    else:
        generated_seed = seed if dataset == "paperqa" and path is None else None
        records = _training_records(corpus, fmt, train_path, generated_seed)
    result = guard(records, corpus.questions, policy=policy)  # type: ignore[arg-type]
    if result.dropped:
        log.warning(
            "leakage guard: dropped %d of %d training records that restate an evaluation "
            "question (data.leakage: drop; listed in the run's leakage.json)",
            result.dropped,
            len(records),
        )
    if not result.records:
        raise DataError("the leakage guard dropped every training record: check data.train_path")
    return DocumentSet(
        corpus.name,
        tuple(result.records),
        corpus.questions,
        len(records),
        tuple(result.hits),
        result.dropped,
        corpus.documents,
        corpus.titles,
    )


def _read(dataset: str, path: str, split: str | None) -> docs.Corpus:
    split = split or DEFAULT_SPLITS[dataset]
    if dataset == "narrativeqa":
        return docs.read_narrativeqa(path, split=split)
    return docs.read_quality(path, split=split)


def is_synth_dir(path: str | Path) -> bool:
    """Whether `path` is a `jaxlora synth` output directory (it holds synth_report.json)."""
    return (Path(path).expanduser() / SYNTH_REPORT).is_file()


def synth_source(train_path: str | Path | None) -> dict[str, Any]:
    """What a synth directory's units were (`units_from` of its synth_report.json: the run
    config, model, unit kind and chunk settings they were cut with); {} when it does not say."""
    if train_path is None or not is_synth_dir(train_path):
        return {}
    report = read_json(Path(train_path).expanduser() / SYNTH_REPORT)
    source = report.get("units_from") if isinstance(report, dict) else None
    return source if isinstance(source, dict) else {}


def _synth_records(corpus: docs.Corpus, fmt: str, train_path: str, header: str) -> list[Record]:
    """The records of one format or mix of a `jaxlora synth` directory, each for the unit its
    `unit_id` names (a document, or a chunk as a `UnitRecord`); text records of PaperQA behind
    the ID `header`. `text` is the documents themselves (see the module docstring)."""
    if fmt == "text":
        return list(corpus.documents)
    root = Path(train_path).expanduser()
    path = root / f"{'qa' if fmt == 'qa_user' else fmt}.jsonl"
    if not path.is_file():
        have = ", ".join(sorted(p.stem for p in root.glob("*.jsonl"))) or "none"
        raise DataError(
            f"data.format: {fmt}: {root} has no {path.name} (jaxlora synth wrote: {have}); "
            "use one of those or text"
        )
    known = [d.document for d in corpus.documents]
    named = {unit_name(d): d for d in known} | {d: d for d in known}  # unit id -> document
    records: list[Record] = []
    for n, row in jsonl_objects(path):
        where = f"{path} line {n}"
        uid = row.get("unit_id")
        if isinstance(uid, int) and not isinstance(uid, bool):
            uid = str(uid)
        if not isinstance(uid, str) or not uid:
            raise DataError(f"{where} has no unit_id: expected a jaxlora synth record")
        stem, dot, j = uid.rpartition(".")
        chunk = uid not in named and bool(dot) and j.isdigit() and stem in named
        if uid not in named and not chunk:
            raise DataError(
                f"{where}: unit_id {uid!r} is neither a document of {corpus.name} nor a chunk "
                f"of one (DOCUMENT.N; documents: {_listing(sorted(known))}): synthesize from "
                "this corpus's documents or chunks"
            )
        doc = named[stem if chunk else uid]
        q, a = row.get("question"), row.get("answer")
        if isinstance(q, str) and isinstance(a, str):
            if fmt == "qa_user":
                record = dataclasses.replace(row_record(q, a), document=doc)
            else:
                record = Record("qa", question=q, answer=a, document=doc)
        elif isinstance(row.get("text"), str) and row["text"].strip():
            record = Record("text", _headed(row["text"].strip(), doc, header), document=doc)
        else:
            raise DataError(f"{where} has neither question/answer nor text")
        if chunk:
            digest = row.get("unit_hash")
            record = UnitRecord(
                **dataclasses.asdict(record),
                unit=uid,
                unit_hash=digest if isinstance(digest, str) else None,
            )
        records.append(record)
    if not records:
        raise DataError(f"{path} has no records: rerun jaxlora synth or pick another format")
    return records


def _headed(text: str, paper: str, header: str) -> str:
    """PaperQA text behind its ID header, as the introductions are trained (once: a synth
    `original` of a headed introduction already has it)."""
    if header == "none" or docs.has_id_header(text):
        return text
    return docs.ID_HEADERS[header].format(id=paper, text=text)


def _listing(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _training_records(
    corpus: docs.Corpus, fmt: str, train_path: str | None, generated_seed: int | None
) -> list[Record]:
    """The records of `fmt`: from the study's training layout in `train_path`, or with no
    train_path from the documents and, for the generated PaperQA corpus (`generated_seed`),
    its generated training QA."""
    if fmt not in FORMATS:
        raise DataError(
            f"data.format: {fmt} is a jaxlora synth format, but data.train_path "
            f"{train_path} is not a synth output directory (no {SYNTH_REPORT})"
        )
    qa_turns = "user" if fmt == "qa_user" else "assistant"
    if train_path is not None:
        rows = docs.read_paperqa_training(train_path, qa_turns=qa_turns)
        source = f"data.train_path {train_path}"
    elif fmt == "text":
        return list(corpus.documents)
    elif generated_seed is None:
        raise DataError(f"data.format: {fmt} needs data.train_path (the training QA)")
    else:
        qa = generate_paperqa_training(seed=generated_seed)
        if qa_turns == "user":
            qa = [
                dataclasses.replace(row_record(r.question, r.answer), document=r.document)
                for r in qa
            ]
        rows = [*corpus.documents, *qa]
        source = corpus.name
    kinds = {"text": ("text",), "qa": ("qa",), "qa_user": ("row",), "text_qa": ("text", "qa")}
    records = [r for r in rows if r.kind in kinds[fmt]]
    found = {r.kind for r in rows}
    if not set(kinds[fmt]) <= found:
        raise DataError(
            f"{source} has no {fmt} rows (found {', '.join(sorted(found))}): "
            "set data.format to match the file"
        )
    known = {d.document for d in corpus.documents}
    strays = [r.document for r in records if r.document not in known]
    if strays:
        raise DataError(
            f"data.train_path {train_path} trains paper {strays[0]!r}, which data.path does not "
            f"have (papers: {', '.join(sorted(known))})"
        )
    return records
