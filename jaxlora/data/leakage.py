"""Leakage guard: training records checked against the evaluation questions.

The study trained on evaluation questions when a path was unset and on QA written from the
summaries the test questions came from (docs/study.md §7); synthetic QA made from the same
document as the evaluation set can also restate an evaluation question almost word for word.
This guard finds such records before training. A hit is an error (`policy="error"`, one line
naming the record, the question and the fix) or the record is dropped and counted
(`policy="drop"`).

What is compared. Text is normalised (NFKC, casefolded, the study's paper-ID prefixes and
"Question:" labels removed, split into alphanumeric words). An evaluation question is compared
with *question-like spans* of each record: its `question` field (qa and row records) and every
sentence of its text or answer that ends with "?". Comparing with whole texts instead would
flag the document itself: evaluation questions are written from it and quote its phrases (on
the study's PaperQA data a level-1 question shares 73% of its word trigrams with a window of
its own introduction), which is the knowledge being taught, not a leak.

Two tests:
- exact: the normalised question equals a span, or (questions of at least `min_words` words)
  occurs as a contiguous word sequence anywhere in the record (a question planted in a text);
- near-duplicate: Dice similarity of the word LCS, 2·LCS(q, s) / (|q| + |s|) >= `threshold`
  (default 0.8), for questions of at least `min_words` words.

Why LCS-Dice and 0.8. A paraphrase "by a few words" keeps the question's frame and its order;
word n-gram containment does not survive that on short questions (two substitutions in a
12-word question can break every word 5-gram), while the LCS loses only the edited words: two
substitutions in a 10-word question give 0.8, one in 12 words 0.92. Order matters, so a
same-topic question that shares the topic words but asks something else scores low. Measured
on the study's PaperQA data (450 evaluation questions x 600 of its synthetic training QA from
the same introductions): pairs at >= 0.8 restate the same question ("What is the primary goal
of the study described in the text?" / "What is the goal of the study described in the
text"), pairs below start asking something else ("...selective refusal of prompts?" /
"...selective modification of responses", 0.78). The guard flags the study's own set: use
`policy="drop"` to train on the rest. Short questions (< `min_words` words, e.g. "Who is
Mark?") count only when exactly equal to a training question: one word is a different
question there, and a story's dialogue may contain them.

Cost: spans sharing too few words to reach the threshold are skipped with a vectorised
bound (LCS <= the multiset word overlap) before any LCS is computed; the contiguous test scans
each text's words once against the questions' first `min_words` words.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from jaxlora.data.records import Record
from jaxlora.errors import DataError

Policy = Literal["error", "drop"]
POLICIES: tuple[str, ...] = ("error", "drop")
DEFAULT_THRESHOLD = 0.8
DEFAULT_MIN_WORDS = 6

_LABELS = re.compile(
    r"^\s*(?:\[paper id:[^\]]*\]|in the paper id [^,]*,|this paper \S+ discusses:"
    r"|question\s*[:.]|q\s*[:.])\s*"
)
_WORD = re.compile(r"[^\W_]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]*]*\s+|\n+")
_QUESTION_END = re.compile(r"\?[\"'”’)\]*]*$")

__all__ = [
    "DEFAULT_MIN_WORDS",
    "DEFAULT_THRESHOLD",
    "POLICIES",
    "LeakageHit",
    "LeakageResult",
    "find_leaks",
    "guard",
    "normalize_words",
    "similarity",
]


@dataclasses.dataclass(frozen=True)
class LeakageHit:
    record: int  # index of the training record
    question: str  # id of the evaluation question
    kind: Literal["exact", "near"]
    similarity: float
    span: str  # the training text that matched, as found


@dataclasses.dataclass(frozen=True)
class LeakageResult:
    records: list[Record]  # the records kept
    hits: list[LeakageHit]
    dropped: int  # records removed (each may hit several questions)


def normalize_words(text: str) -> tuple[str, ...]:
    """Casefolded alphanumeric words of `text`, without leading ID prefixes and Q labels."""
    t = unicodedata.normalize("NFKC", text).casefold()
    while True:  # "Question: [Paper ID: 3] ..." carries two labels
        stripped = _LABELS.sub("", t, count=1)
        if stripped == t:
            break
        t = stripped
    return tuple(_WORD.findall(t))


def similarity(a: Sequence[str], b: Sequence[str]) -> float:
    """2 * LCS(a, b) / (|a| + |b|) over words: 1 for equal sequences, 0 for disjoint ones."""
    if not a or not b:
        return 0.0
    return 2.0 * _lcs(a, b) / (len(a) + len(b))


def guard(
    records: Sequence[Record],
    questions: Sequence[Any],
    *,
    policy: Policy = "error",
    threshold: float = DEFAULT_THRESHOLD,
    min_words: int = DEFAULT_MIN_WORDS,
) -> LeakageResult:
    """Records with no leak of `questions` (strings, or objects with `query`/`question` and
    `id`, such as `EvalQuestion`); with `policy="error"` the first hit raises a DataError."""
    if policy not in POLICIES:
        raise DataError(f"unknown data.leakage {policy!r}: use one of {', '.join(POLICIES)}")
    hits = find_leaks(records, questions, threshold=threshold, min_words=min_words)
    if hits and policy == "error":
        h = hits[0]
        asked = _text_of(
            questions[[_id_of(q, i) for i, q in enumerate(questions)].index(h.question)]
        )
        what = "exact" if h.kind == "exact" else f"near-duplicate, similarity {h.similarity:.2f}"
        others = f" and {len(hits) - 1} more hit(s)" if len(hits) > 1 else ""
        raise DataError(
            f"training record {h.record} ({_clip(h.span)}) leaks evaluation question {h.question} "
            f"({_clip(asked)}; {what}){others}: remove it from the training data, or set "
            "data.leakage: drop to train without such records"
        )
    bad = {h.record for h in hits}
    kept = [r for i, r in enumerate(records) if i not in bad]
    return LeakageResult(kept, hits, len(bad))


def find_leaks(
    records: Sequence[Record],
    questions: Sequence[Any],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    min_words: int = DEFAULT_MIN_WORDS,
) -> list[LeakageHit]:
    """Every (record, question) leak, at most one hit per pair (exact before near), in record
    then question order."""
    if not 0.0 < threshold <= 1.0:
        raise DataError(f"data.leakage_threshold must lie in (0, 1]; got {threshold}")
    if min_words < 1:
        raise DataError(f"data.leakage_min_words must be at least 1; got {min_words}")
    qids = [_id_of(q, i) for i, q in enumerate(questions)]
    qwords = [normalize_words(_text_of(q)) for q in questions]
    found: dict[tuple[int, int], LeakageHit] = {}

    def hit(r: int, q: int, kind: str, sim: float, span: str) -> None:
        if (r, q) not in found or (found[(r, q)].kind == "near" and kind == "exact"):
            found[(r, q)] = LeakageHit(r, qids[q], kind, sim, span)  # type: ignore[arg-type]

    spans = [
        (r, text, normalize_words(text), field)
        for r, rec in enumerate(records)
        for text, field in _spans(rec)
    ]
    _span_matches(spans, qwords, threshold, min_words, hit)
    _contiguous_matches(records, qwords, min_words, hit)
    return [found[k] for k in sorted(found)]


def _span_matches(spans, qwords, threshold, min_words, hit) -> None:
    """Exact and near-duplicate matches of each question against the question-like spans."""
    if not spans:
        return
    by_words: dict[tuple[str, ...], list[int]] = {}
    for s, (_, _, w, _) in enumerate(spans):
        by_words.setdefault(w, []).append(s)
    # Inverted index: word -> (span ids, counts), for the LCS <= multiset-overlap bound.
    vocab: dict[str, int] = {}
    cols: dict[int, tuple[list[int], list[int]]] = {}
    for s, (_, _, w, _) in enumerate(spans):
        for word, c in Counter(w).items():
            ids, counts = cols.setdefault(vocab.setdefault(word, len(vocab)), ([], []))
            ids.append(s)
            counts.append(c)
    postings = {k: (np.asarray(a, np.int64), np.asarray(b, np.int64)) for k, (a, b) in cols.items()}
    lengths = np.asarray([len(w) for _, _, w, _ in spans], np.float64)
    for q, words in enumerate(qwords):
        if not words:
            continue
        for s in by_words.get(words, ()):
            # A short question counts only against a training question field: one word is a
            # different question there, and a story's dialogue may ask it too.
            if len(words) >= min_words or spans[s][3]:
                hit(spans[s][0], q, "exact", 1.0, spans[s][1])
        if len(words) < min_words:
            continue
        bound = np.zeros(len(spans), np.float64)
        for word, c in Counter(words).items():
            if word in vocab:
                ids, counts = postings[vocab[word]]
                bound[ids] += np.minimum(counts, c)
        m = len(words)
        for s in np.flatnonzero(2.0 * bound >= threshold * (m + lengths) - 1e-9):
            r, text, w, _ = spans[s]
            sim = similarity(words, w)
            if sim >= threshold:
                hit(r, q, "exact" if sim == 1.0 else "near", sim, text)


def _contiguous_matches(records, qwords, min_words, hit) -> None:
    """Questions of >= min_words words found as contiguous word runs inside any record."""
    heads: dict[tuple[str, ...], list[int]] = {}
    for q, words in enumerate(qwords):
        if len(words) >= min_words:
            heads.setdefault(words[:min_words], []).append(q)
    if not heads:
        return
    k = min_words
    for r, rec in enumerate(records):
        words = normalize_words(rec.knowledge_text)
        for i in range(len(words) - k + 1):
            qs = heads.get(words[i : i + k])
            if qs is None:
                continue
            for q in qs:
                m = len(qwords[q])
                if words[i : i + m] == qwords[q]:
                    hit(r, q, "exact", 1.0, " ".join(words[i : i + m]))


def _spans(rec: Record) -> list[tuple[str, bool]]:
    """The question-like texts of a record, each with whether it is the record's question
    field: the field itself, then every sentence of the rest that ends with "?"."""
    out = [(rec.question, True)] if rec.question else []
    if rec.kind == "qa" or (rec.kind == "row" and rec.question and rec.answer is not None):
        body = rec.answer or ""  # a split row's text is question + answer: the question is in
    else:
        body = rec.text
    for sentence in _SENTENCE_END.split(body):
        s = sentence.strip()
        if s and _QUESTION_END.search(s):
            out.append((s, False))
    return out


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _text_of(q: Any) -> str:
    if isinstance(q, str):
        return q
    text = getattr(q, "query", None) or getattr(q, "question", None)
    if not isinstance(text, str):
        raise DataError(f"evaluation question {q!r} has no question text")
    return text


def _id_of(q: Any, i: int) -> str:
    qid = None if isinstance(q, str) else getattr(q, "id", None)
    return str(qid) if qid is not None else str(i)


def _clip(text: str, n: int = 60) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= n else flat[: n - 1] + "…")
