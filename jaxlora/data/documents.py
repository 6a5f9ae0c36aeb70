"""Document-knowledge datasets: PaperQA, NarrativeQA and QuALITY as `Record`s plus questions.

Each reader returns a `Corpus`: one whole `text` record per document (`document` set) and the
dataset's EVALUATION questions as `EvalQuestion`s (id, document, question as asked, the bare
question for routers and the leakage guard, reference answers, and the dataset's extras: the
PaperQA level, the QuALITY options, gold index and `hard` flag). Documents are never cut here:
chunking is `jaxlora/data/units.py` (`chunks`, `windows`), so a long book is one record and a
budget or a chunker decides what happens to it, never a silent truncation (docs/study.md §7).

Schemas (what each reader expects; errors name the columns found):

- PaperQA `paperQA.json` (the study's release, checked on `../shared/data/paper_dataset`): a
  JSON list of papers `{id, link, conference, title, introduction, QA: [{level, question,
  answer}]}`, 30 QA per paper, level 1 recall / 2 comprehension / 3 logical structure. The
  questions carry no paper ID; the study asked them with its ID prefix, kept here as an option
  (`question_prefix`), because the true ID in the prompt is a hint retrieval must not get.
- PaperQA training sets (the study's `paperqa_train/`): jsonl rows `{question, answer}` (QA) or
  `{text}` (introductions), per paper (`paper_{id}_qa.jsonl`, `paper_{id}_introduction.jsonl`)
  or concatenated (one `{text}` holding every introduction behind its ID header; QA rows whose
  question starts with the ID prefix). The paper comes from the file name, else the header.
- NarrativeQA, hub `deepmind/narrativeqa` (schema from the card's `dataset_info` and its loader
  script `narrativeqa.py`, also listed in the TFDS community catalog): one row per question,
  `document: {id, kind ("gutenberg" | "movie"), url, file_size, word_count, start, end,
  summary: {text, tokens, url, title}, text}`, `question: {text, tokens}`, `answers: [{text,
  tokens}]` (two references); splits train / validation / test. `text` is the raw download:
  Gutenberg header and licence footer included, movie scripts as HTML.
- QuALITY, hub `emozilla/quality` (parquet, splits train 2,523 / validation 2,086 rows, as
  the hub's file listing shows; the card's text could not be read from this project's
  sandbox, so the fields were checked against several public loaders of that id, which all
  read them the same way): one row per question, `article` (str),
  `question` (str), `options` (list of 4 str), `answer` (int, 0-based index into `options`;
  the upstream QuALITY `gold_label` is 1-based, so a value equal to the option count is
  refused rather than guessed), `hard` (bool). There is no article id: documents are named by
  a hash of the article text, stable across splits and subsets.

A source is a local file (`.parquet`, `.json`, `.jsonl`: one split), a local directory (a
`save_to_disk` copy, or a snapshot of the hub repo with `data/{split}-*.parquet`) or a hub id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import re
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from jaxlora.data.readers import first_line, jsonl_objects, quiet, read_json
from jaxlora.data.records import Record, row_record
from jaxlora.errors import DataError

Header = Literal["bracket", "natural", "none"]
QATurns = Literal["assistant", "user"]

# The study's ID headers (docs/study.md §4), as format strings of the paper id and its introduction.
ID_HEADERS: dict[str, str] = {
    "bracket": "[Paper ID: {id}]\n\n{text}",
    "natural": "This paper {id} discusses:\n\n{text}",
    "none": "{text}",
}
QUESTION_PREFIXES: dict[str, str] = {
    "bracket": "[Paper ID: {id}] ",
    "natural": "In the Paper ID {id}, ",
    "none": "",
}
OPTION_LETTERS = "ABCDEFGHIJ"
_HEADER_RE = re.compile(
    r"^(?:\[Paper ID: (?P<b>[^\]\n]+)\]|This paper (?P<n>\S+) discusses:)\n\n", re.M
)
_PREFIX_RE = re.compile(r"^(?:\[Paper ID: (?P<b>[^\]\n]+)\] ?|In the Paper ID (?P<n>[^,\n]+), ?)")
_PAPER_FILE = re.compile(r"paper_(?P<id>[^_]+)_")
_LOCAL_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

__all__ = [
    "ID_HEADERS",
    "OPTION_LETTERS",
    "QUESTION_PREFIXES",
    "Corpus",
    "EvalQuestion",
    "has_id_header",
    "load_split",
    "paperqa_corpus",
    "read_narrativeqa",
    "read_paperqa",
    "read_paperqa_training",
    "read_quality",
    "story_text",
    "write_questions",
]


@dataclasses.dataclass(frozen=True)
class EvalQuestion:
    """One evaluation question. `question` is what the model is asked; `query` the bare
    question (no paper-ID prefix) that routers search with and the leakage guard checks."""

    id: str
    document: str
    question: str
    answers: tuple[str, ...]
    query: str = ""
    level: int | None = None  # PaperQA 1-3
    options: tuple[str, ...] = ()  # QuALITY, in letter order
    gold: int | None = None  # QuALITY: index of the correct option
    hard: bool | None = None  # QuALITY

    def __post_init__(self) -> None:
        if not self.query:
            object.__setattr__(self, "query", self.question)

    @property
    def answer(self) -> str:
        """The first reference: what single-reference metrics (BLEU, ROUGE-L, judge) use."""
        return self.answers[0]

    @property
    def gold_letter(self) -> str | None:
        return None if self.gold is None else OPTION_LETTERS[self.gold]

    def record(self) -> Record:
        """The question as a `qa` record of its document (the evaluators' input)."""
        return Record("qa", question=self.question, answer=self.answer, document=self.document)

    def to_row(self) -> dict[str, Any]:
        """A JSON row readable as `memory.questions` (question, answer, document columns)."""
        row: dict[str, Any] = {
            "id": self.id,
            "document": self.document,
            "question": self.question,
            "answer": self.answer,
            "answers": list(self.answers),
            "query": self.query,
        }
        if self.level is not None:
            row["level"] = self.level
        if self.options:
            row.update(options=list(self.options), gold=self.gold, hard=self.hard)
        return row


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Whole documents (one `text` record each) and the evaluation questions about them."""

    name: str
    documents: tuple[Record, ...]
    questions: tuple[EvalQuestion, ...]
    titles: dict[str, str] = dataclasses.field(default_factory=dict)

    def questions_of(self, document: str) -> list[EvalQuestion]:
        return [q for q in self.questions if q.document == document]


def write_questions(path: str | Path, questions: Iterable[EvalQuestion]) -> None:
    """Questions as jsonl (`EvalQuestion.to_row`), written atomically."""
    from jaxlora.fsutil import atomic_write

    atomic_write(
        path, "".join(json.dumps(q.to_row(), ensure_ascii=False) + "\n" for q in questions)
    )


# ----------------------------------------------------------------------------- PaperQA


def read_paperqa(
    path: str | Path,
    *,
    header: Header = "bracket",
    question_prefix: Header = "bracket",
    papers: Collection[str] | None = None,
) -> Corpus:
    """Introductions (behind the `header` ID header) and the 30 evaluation questions per paper.

    `question_prefix` is what the question is asked with ("none": the bare question, as a
    retrieval setting must ask it); `EvalQuestion.query` is always bare."""
    for key, value in (("header", header), ("question_prefix", question_prefix)):
        if value not in ID_HEADERS:
            raise DataError(f"unknown PaperQA {key} {value!r}: use one of {', '.join(ID_HEADERS)}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"PaperQA file not found: {p} (the study's paper_dataset/paperQA.json)")
    return paperqa_corpus(
        read_json(p), p, header=header, question_prefix=question_prefix, papers=papers
    )


def paperqa_corpus(
    items: Any,
    p: str | Path,
    *,
    header: Header = "bracket",
    question_prefix: Header = "bracket",
    papers: Collection[str] | None = None,
) -> Corpus:
    """`read_paperqa` of papers already read (`items`: the paperQA.json list; `p` names them
    in errors), e.g. the generated corpus of `jaxlora.data.docsets.generate_paperqa`."""
    for key, value in (("header", header), ("question_prefix", question_prefix)):
        if value not in ID_HEADERS:
            raise DataError(f"unknown PaperQA {key} {value!r}: use one of {', '.join(ID_HEADERS)}")
    if not isinstance(items, list) or not items:
        raise DataError(f"{p} is not a paperQA.json list of papers {{id, introduction, QA}}")
    documents, questions, titles = [], [], {}
    for i, paper in enumerate(items):
        missing = [
            k for k in ("id", "introduction", "QA") if not isinstance(paper, dict) or k not in paper
        ]
        if missing:
            raise DataError(
                f"{p} paper {i} lacks {missing[0]!r}: each paper needs id, introduction, QA"
            )
        pid = str(paper["id"])
        if pid in titles:
            raise DataError(f"{p} has two papers with id {pid}: paper ids must be unique")
        titles[pid] = str(paper.get("title", ""))
        if papers is not None and pid not in papers:
            continue
        intro = str(paper["introduction"]).strip()
        if not intro:
            raise DataError(f"{p} paper {pid} has an empty introduction: fill it in or remove it")
        documents.append(
            Record("text", ID_HEADERS[header].format(id=pid, text=intro), document=pid)
        )
        prefix = QUESTION_PREFIXES[question_prefix].format(id=pid)
        for j, qa in enumerate(paper["QA"]):
            q, a, level = (
                qa.get(k) if isinstance(qa, dict) else None for k in ("question", "answer", "level")
            )
            if not (isinstance(q, str) and q.strip() and isinstance(a, str) and a.strip()):
                raise DataError(f"{p} paper {pid} QA {j} needs a non-empty question and answer")
            if level not in (1, 2, 3):
                raise DataError(f"{p} paper {pid} QA {j} has level {level!r}: levels are 1, 2, 3")
            questions.append(
                EvalQuestion(
                    f"{pid}.{j:02d}", pid, prefix + q.strip(), (a.strip(),), q.strip(), level
                )
            )
    if papers is not None and len(documents) != len(set(papers)):
        found = {d.document for d in documents}
        absent = sorted(set(papers) - found)
        raise DataError(
            f"{p} has no paper {absent[0]!r}: paper ids are {', '.join(str(x['id']) for x in items)}"
        )
    kept = {d.document for d in documents}
    return Corpus(
        "paperqa",
        tuple(documents),
        tuple(questions),
        {k: v for k, v in titles.items() if k in kept},
    )


def has_id_header(text: str) -> bool:
    """Whether `text` starts with one of the study's ID headers (bracket or natural)."""
    return _HEADER_RE.match(text) is not None


def read_paperqa_training(path: str | Path, *, qa_turns: QATurns = "assistant") -> list[Record]:
    """The study's PaperQA training jsonl (a file, or a directory of them) as records.

    QA rows become `qa` records (question as the user turn, answer as the assistant turn, EOS
    trained); `qa_turns="user"` keeps the study's variant, question and answer together in the
    user turn (a `row` record). `{text}` rows are introductions, split at ID headers."""
    if qa_turns not in ("assistant", "user"):
        raise DataError(f"unknown qa_turns {qa_turns!r}: use 'assistant' or 'user' (the study's)")
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.jsonl"), key=_paper_order)
        if not files:
            raise DataError(
                f"{p} holds no .jsonl files: point it at the study's paperqa_train sets"
            )
    elif p.is_file():
        files = [p]
    else:
        raise DataError(f"PaperQA training data not found: {p}")
    records: list[Record] = []
    for f in files:
        m = _PAPER_FILE.match(f.name)
        file_paper = m["id"] if m else None
        for n, row in jsonl_objects(f):
            records.extend(_training_row(f, n, row, file_paper, qa_turns))
    return records


def _training_row(f: Path, n: int, row: dict, paper: str | None, qa_turns: str) -> list[Record]:
    where = f"{f} line {n}"
    if isinstance(row.get("question"), str) and "answer" in row:
        q, a = row["question"].strip(), str(row["answer"]).strip()
        m = _PREFIX_RE.match(q)
        doc = paper or (m and (m["b"] or m["n"]).strip())
        if not doc:
            raise DataError(
                f"{where}: no paper ID (file name paper_ID_*.jsonl or a question prefix)"
            )
        if qa_turns == "user":
            return [dataclasses.replace(row_record(q, a), document=doc)]
        return [Record("qa", question=q, answer=a, document=doc)]
    if isinstance(row.get("text"), str):
        text = row["text"]
        heads = list(_HEADER_RE.finditer(text))
        if not heads:
            if paper is None:
                raise DataError(
                    f"{where}: no paper ID (file name paper_ID_*.jsonl or an ID header)"
                )
            return [Record("text", text.strip(), document=paper)]
        if heads[0].start() != 0 and text[: heads[0].start()].strip():
            raise DataError(f"{where}: text before the first ID header belongs to no paper")
        ends = [h.start() for h in heads[1:]] + [len(text)]
        return [
            Record("text", text[h.start() : e].strip(), document=(h["b"] or h["n"]).strip())
            for h, e in zip(heads, ends, strict=True)
        ]
    keys = ", ".join(row)
    raise DataError(f"{where} has {keys}: expected {{question, answer}} or {{text}} rows")


def _paper_order(f: Path) -> tuple[int, str]:
    m = _PAPER_FILE.match(f.name)
    return (int(m["id"]) if m and m["id"].isdigit() else 1 << 30, f.name)


# ----------------------------------------------------------------------------- hub datasets


def load_split(source: str | Path, split: str) -> Any:
    """A `datasets.Dataset`: a local file (its one split), a local directory or a hub id."""
    import datasets

    p = Path(source).expanduser()
    try:
        with quiet():
            if p.is_file():
                builder = _LOCAL_BUILDERS.get(p.suffix.lower())
                if builder is None:
                    raise DataError(f"unsupported file {p}: use .parquet, .json or .jsonl")
                return datasets.load_dataset(builder, data_files=str(p), split="train")
            if p.is_dir():
                if (p / "dataset_dict.json").exists():
                    return datasets.load_from_disk(str(p))[split]
                if (p / "state.json").exists():
                    return datasets.load_from_disk(str(p))
                return datasets.load_dataset(str(p), split=split)
            if not _HUB_ID.fullmatch(str(source)) or p.suffix.lower() in _LOCAL_BUILDERS:
                raise DataError(
                    f"dataset not found: {p} is no file or directory, nor a hub id org/name"
                )
            return datasets.load_dataset(str(source), split=split)
    except DataError:
        raise
    except KeyError as e:
        raise DataError(f"{source} has no split {split!r}: {first_line(e)}") from e
    except Exception as e:
        raise DataError(f"cannot load {source} (split {split!r}): {first_line(e)}") from e


def _columns(ds: Any, name: str, needed: Sequence[str], hub: str) -> None:
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{name} has no column {missing[0]!r} (columns found: {', '.join(ds.column_names)}): "
            f"it must be in the {hub} schema"
        )


# ----------------------------------------------------------------------------- NarrativeQA

_GUT_START = re.compile(
    r"^[^\n]*\*{3}\s*START OF (?:THIS|THE) PROJECT GUTENBERG E-?(?:BOOK|TEXT)[^\n]*\n"
    r"|^[^\n]*\*END\*THE SMALL PRINT[^\n]*\n",
    re.I | re.M,
)
_GUT_END = re.compile(
    r"^[^\n]*(?:\*{3}\s*END OF (?:THIS|THE) PROJECT GUTENBERG"
    r"|End of (?:the )?Project Gutenberg(?:'s)? (?:E-?Book|E-?text))",
    re.I | re.M,
)


def story_text(text: str, start: str = "", end: str = "", kind: str = "gutenberg") -> str:
    """A NarrativeQA story as plain text, whole: from the dataset's `start` marker through its
    `end` marker when both are found in order (where the story begins and ends inside the
    download; when they are not found the text is kept and only the boilerplate goes), then
    without any Project Gutenberg header or licence footer left; movie scripts lose their
    HTML tags. Line endings become "\\n"; a Gutenberg book's hard-wrapped lines are joined
    into paragraphs (blank-line separated, runs of spaces made one), so chunks cut by tokens
    read as prose."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    a = text.find(start.strip()) if start.strip() else -1
    b = text.rfind(end.strip()) if end.strip() else -1
    if a >= 0 and b >= a:
        text = text[a : b + len(end.strip())]
    m = _GUT_START.search(text)
    if m:
        text = text[m.end() :]
    m = _GUT_END.search(text)
    if m:
        text = text[: m.start()]
    if kind == "movie":
        text = re.sub(r"(?is)<(script|style)\b.*?</\1\s*>", "", text)
        text = html.unescape(re.sub(r"<[^>]+>", "", text))
        lines = [line.rstrip() for line in text.split("\n")]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    paragraphs = re.split(r"\n[ \t]*\n+", text)
    joined = (" ".join(para.split()) for para in paragraphs)  # one line, single spaces
    return "\n\n".join(p for p in joined if p)


def read_narrativeqa(
    source: str | Path,
    *,
    split: str = "test",
    kinds: Collection[str] | None = ("gutenberg",),
    documents: Collection[str] | None = None,
    normalize: bool = True,
) -> Corpus:
    """NarrativeQA (the `deepmind/narrativeqa` schema): whole stories and their questions,
    each with both reference answers. `kinds` keeps books only by default (the study used
    Gutenberg books); `documents` keeps those ids. The Wikipedia summaries are not returned:
    the questions were written from them, so training on them would leak (docs/study.md §7)."""
    ds = load_split(source, split)
    name = str(source)
    _columns(ds, name, ("document", "question", "answers"), "deepmind/narrativeqa")
    docs: dict[str, Record] = {}
    titles: dict[str, str] = {}
    questions: list[EvalQuestion] = []
    counts: dict[str, int] = {}
    for i, row in enumerate(ds.select_columns(["document", "question", "answers"])):
        doc, q, answers = row["document"], row["question"], row["answers"]
        try:
            did, kind = str(doc["id"]), str(doc["kind"])
            question = str(q["text"]).strip()
            refs = tuple(str(a["text"]).strip() for a in answers)
        except (KeyError, TypeError) as e:
            raise DataError(
                f"{name} row {i} lacks {e} (expected document.id/kind/text, question.text, "
                "answers[].text as in deepmind/narrativeqa)"
            ) from e
        if (kinds is not None and kind not in kinds) or (
            documents is not None and did not in documents
        ):
            continue
        if not question or not refs or not all(refs):
            raise DataError(f"{name} row {i}: an empty question or answer: fix or drop the row")
        if did not in docs:
            raw = str(doc.get("text") or "")
            text = (
                story_text(raw, str(doc.get("start") or ""), str(doc.get("end") or ""), kind)
                if normalize
                else raw
            )
            if not text.strip():
                raise DataError(f"{name} document {did} has no text: drop it with `documents`")
            docs[did] = Record("text", text, document=did)
            summary = doc.get("summary") or {}
            titles[did] = str(summary.get("title") or "") if isinstance(summary, dict) else ""
        j = counts[did] = counts.get(did, -1) + 1
        questions.append(EvalQuestion(f"{did}.{j:03d}", did, question, refs))
    if not docs:
        raise DataError(
            f"{name} split {split!r} has no document of kinds {sorted(kinds or [])} / ids asked for"
        )
    if documents is not None and len(docs) != len(set(documents)):
        absent = sorted(set(documents) - set(docs))
        raise DataError(
            f"{name} split {split!r} has no document {absent[0]!r} (of the kinds asked for)"
        )
    return Corpus("narrativeqa", tuple(docs.values()), tuple(questions), titles)


# ----------------------------------------------------------------------------- QuALITY


def article_id(article: str) -> str:
    """A QuALITY article's name: a short hash of its text (the hub set has no article id)."""
    return hashlib.sha1(article.encode("utf-8")).hexdigest()[:12]


def read_quality(
    source: str | Path,
    *,
    split: str = "validation",
    documents: Collection[str] | None = None,
) -> Corpus:
    """QuALITY (the `emozilla/quality` schema): whole articles and their multiple-choice
    questions (options in letter order, 0-based gold, `hard` flag); the gold option's text is
    the reference answer. `documents` keeps those article ids (`article_id`)."""
    ds = load_split(source, split)
    name = str(source)
    _columns(ds, name, ("article", "question", "options", "answer", "hard"), "emozilla/quality")
    docs: dict[str, Record] = {}
    questions: list[EvalQuestion] = []
    counts: dict[str, int] = {}
    for i, row in enumerate(
        ds.select_columns(["article", "question", "options", "answer", "hard"])
    ):
        article, question, options = row["article"], row["question"], row["options"]
        gold, hard = row["answer"], row["hard"]
        if not (
            isinstance(article, str)
            and article.strip()
            and isinstance(question, str)
            and question.strip()
        ):
            raise DataError(f"{name} row {i}: an empty article or question: fix or drop the row")
        if not isinstance(options, list) or not 2 <= len(options) <= len(OPTION_LETTERS):
            raise DataError(
                f"{name} row {i}: options must be a list of 2-{len(OPTION_LETTERS)} strings"
            )
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
            raise DataError(
                f"{name} row {i}: answer {gold!r} is not a 0-based index into its {len(options)} "
                "options (emozilla/quality schema; upstream gold_label is 1-based)"
            )
        if not isinstance(hard, bool):
            raise DataError(f"{name} row {i}: hard is {hard!r}, not a bool")
        did = article_id(article)
        if documents is not None and did not in documents:
            continue
        docs.setdefault(did, Record("text", article.strip(), document=did))
        j = counts[did] = counts.get(did, -1) + 1
        opts = tuple(str(o).strip() for o in options)
        questions.append(
            EvalQuestion(
                f"{did}.{j:03d}",
                did,
                question.strip(),
                (opts[gold],),
                options=opts,
                gold=gold,
                hard=hard,
            )
        )
    if not docs:
        raise DataError(f"{name} split {split!r} has no article asked for")
    if documents is not None and len(docs) != len(set(documents)):
        absent = sorted(set(documents) - set(docs))
        raise DataError(f"{name} split {split!r} has no article {absent[0]!r}")
    return Corpus("quality", tuple(docs.values()), tuple(questions))
