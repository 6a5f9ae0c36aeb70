"""Scoring rules of the study, as pure functions of strings, numbers and token ids.

Nothing here runs a model: decoding and log-probabilities are computed elsewhere (batched over
adapters) and handed to these functions, so each rule can be tested on hand-written cases.

- PhoneBook: the FIRST `\\d{3}-\\d{3}-\\d{4}` in the model output is the prediction and its
  digits are compared with the answer's digits (`phonebook_correct`). The study's regex needs
  dashes: "603.556.7631" or "(603) 556-7631" count as no answer, and digits glued to a match
  ("1603-556-76310") do not stop it from matching. We keep that rule so numbers are comparable
  with the paper's.
- CounterFact efficacy: P(first token of target_new) > P(first token of target_true) after the
  prompt (`efficacy`). The token is the first token of the target *as it follows the prompt
  and a space* (`first_target_token`); the study took the first token of the target tokenized
  alone, which for byte-level BPE is usually a different, no-leading-space token that the model
  would rarely emit there. That variant stays available as `leading_space=False`.
- Documents (PaperQA and friends): sentence BLEU from sacrebleu (0-100) and ROUGE-L F-measure
  from rouge-score with the Porter stemmer (0-1), the study's two libraries and settings;
  PaperQA's per-level breakdown (`per_level`).
- NarrativeQA: ROUGE-1/2/L/Lsum, best over the references (`rouge_multi`), averaged per
  document and then over documents (`mean_per_document`).
- QuALITY: accuracy and hard-subset accuracy (`choice_accuracy`) of a strictly parsed letter
  (`parse_choice`) or of the option with the highest log-likelihood (`loglik_choice`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

from jaxlora.errors import DataError, JaxloraError

PHONE_RE = re.compile(r"\d{3}-\d{3}-\d{4}")
_NON_DIGIT_RE = re.compile(r"\D")


# ----------------------------------------------------------------------------- PhoneBook


def extract_phone(text: str) -> str | None:
    """The first dash-separated phone number in `text`, or None when there is none."""
    match = PHONE_RE.search(text)
    return match.group(0) if match else None


def phonebook_correct(prediction: str, answer: str) -> bool:
    """Whether the first phone number in `prediction` has the same digits as `answer`.

    Only the first match counts, so an output listing several numbers is judged on the first,
    as in the study. Digits are compared rather than strings, so the answer's own separators
    do not matter.
    """
    answer_digits = _NON_DIGIT_RE.sub("", answer)
    if not answer_digits:
        raise DataError(
            f"PhoneBook answer {answer!r} has no digits; answers must be numbers like 603-556-7631"
        )
    phone = extract_phone(prediction)
    return phone is not None and _NON_DIGIT_RE.sub("", phone) == answer_digits


# ----------------------------------------------------------------------------- generic


def _normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


def exact_match(prediction: str, answer: str, normalize: bool = True) -> bool:
    """String equality; with `normalize`, after stripping, collapsing whitespace and casefolding."""
    if normalize:
        return _normalize(prediction) == _normalize(answer)
    return prediction == answer


def summarize(values: Iterable[float | bool]) -> dict[str, Any]:
    """`{"mean": ..., "n": ...}` of per-example scores (bools count as 0/1; mean None if empty)."""
    xs = [float(v) for v in values]
    return {"mean": math.fsum(xs) / len(xs) if xs else None, "n": len(xs)}


# ----------------------------------------------------------------------------- CounterFact


def efficacy(logprobs_new: float, logprobs_true: float) -> bool:
    """Whether the new target is strictly more likely than the true one (a tie is a failure).

    Arguments are log-probabilities (or probabilities: the order is the same) of the first
    target tokens chosen with `first_target_token`. NaN compares False, so a broken score never
    counts as a success.
    """
    return bool(logprobs_new > logprobs_true)


def target_token_context(
    tokenizer: Any, prompt: str, target: str, leading_space: bool = True
) -> tuple[list[int], int]:
    """`(context_ids, target_id)`: score `target_id` as the next token after `context_ids`.

    With `leading_space`, `prompt + " " + target` is tokenized once (no special tokens) and the
    target's first token is the first token whose character span reaches past the target's
    first character: a token that straddles the boundary (" Italian" as one "ĠItalian" token)
    is taken whole, and when the space is a token of its own it stays in the context. The
    context is every token before it, so the caller scores exactly the split the model sees.
    Without `leading_space` (the study's variant), the context is the prompt tokenized alone and
    the target token is the first token of `target` tokenized alone.

    Special tokens (BOS, chat template) are the caller's to prepend to the context.
    """
    if not target.strip():
        raise DataError(f"empty CounterFact target {target!r}; every fact needs a target string")
    if not leading_space:
        context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return list(context), int(tokenizer(target, add_special_tokens=False)["input_ids"][0])

    text = f"{prompt} {target}"
    target_start = len(prompt) + 1
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:  # slow (Python) tokenizers have no offsets
        raise JaxloraError(
            f"tokenizer {type(tokenizer).__name__} gives no character offsets; load a fast "
            "tokenizer (use_fast=True)"
        ) from e
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    for i, (start, end) in enumerate(offsets):
        # Tokens come in text order, so the first one ending past the target's start either
        # covers its first character or is the first to start inside it.
        if end > start and end > target_start:
            return list(ids[:i]), int(ids[i])
    raise DataError(f"no token covers target {target!r} after prompt {prompt!r}")


def first_target_token(tokenizer: Any, prompt: str, target: str, leading_space: bool = True) -> int:
    """Id of the first token of `target` as it appears after `prompt` (see `target_token_context`).

    With `leading_space=False`, the first token of `target` tokenized alone: the study's flawed
    variant, kept only to reproduce its numbers.
    """
    return target_token_context(tokenizer, prompt, target, leading_space)[1]


# ----------------------------------------------------------------------------- documents


def bleu(prediction: str, reference: str) -> float:
    """Sentence BLEU of one prediction against one reference, 0-100 (sacrebleu defaults)."""
    import sacrebleu  # deferred: only document evaluation needs it

    return float(sacrebleu.sentence_bleu(prediction, [reference]).score)


@functools.cache
def _rouge_scorer() -> Any:
    # Built once: the scorer loads the stemmer and tokenizer, too slow to redo per example.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of stemmed, lowercased words), 0-1."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


# ----------------------------------------------------------------------------- ROUGE, references
#
# NarrativeQA gives two reference answers per question. Each ROUGE type is the F-measure of the
# best-matching reference, chosen per type (rouge-score's `score_multi`), so the numbers equal
# rouge-score's own multi-reference rule. Aggregation follows the study: the mean within each
# document, then the mean over documents, so a book with many questions does not outweigh one
# with few (`mean_per_document`).

ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@functools.cache
def _multi_rouge_scorer(use_stemmer: bool) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)


def rouge_multi(
    prediction: str, references: Sequence[str], *, use_stemmer: bool = True
) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F-measures (0-1) of `prediction`, each the best over `references`.

    Stemmed by default, as `rouge_l`; rougeLsum splits sentences at newlines (rouge-score)."""
    if isinstance(references, str) or not references:
        raise DataError("ROUGE needs a non-empty list of reference answers (not one string)")
    scores = _multi_rouge_scorer(use_stemmer).score_multi(list(references), prediction)
    return {k: float(scores[k].fmeasure) for k in ROUGE_TYPES}


def mean_by(values: Sequence[float], groups: Sequence[Hashable]) -> dict[Hashable, float]:
    """The mean of `values` within each group, groups in order of first appearance."""
    if len(values) != len(groups):
        raise DataError(f"{len(values)} values but {len(groups)} group labels: pass one per value")
    sums: dict[Hashable, list[float]] = {}
    for v, g in zip(values, groups, strict=True):
        sums.setdefault(g, []).append(float(v))
    return {g: math.fsum(xs) / len(xs) for g, xs in sums.items()}


def mean_per_document(
    scores: Sequence[Mapping[str, float]], documents: Sequence[str]
) -> dict[str, Any]:
    """Per metric, the mean over each document's questions, then the mean over documents
    (NarrativeQA); `n` questions and `n_documents` come with it. Empty input gives None."""
    if len(scores) != len(documents):
        raise DataError(f"{len(scores)} scores but {len(documents)} documents: one per question")
    keys = list(scores[0]) if scores else []
    out: dict[str, Any] = {}
    for k in keys:
        per_doc = mean_by([s[k] for s in scores], documents)
        out[k] = math.fsum(per_doc.values()) / len(per_doc)
    out["n"] = len(scores)
    out["n_documents"] = len(set(documents))
    return out


# ----------------------------------------------------------------------------- PaperQA levels


PAPERQA_LEVELS: tuple[int, ...] = (1, 2, 3)


def per_level(
    scores: Sequence[Mapping[str, float]], levels: Sequence[int]
) -> dict[str, dict[str, Any]]:
    """`{"level_1": {metric: mean, ..., "n": k}, ..., "all": {...}}` for PaperQA's levels 1-3
    (1 recall, 2 comprehension, 3 logical structure); a level without questions has n 0 and
    its metrics None."""
    if len(scores) != len(levels):
        raise DataError(f"{len(scores)} scores but {len(levels)} levels: one per question")
    bad = [lv for lv in levels if lv not in PAPERQA_LEVELS]
    if bad:
        raise DataError(f"PaperQA level {bad[0]!r} is not one of 1, 2, 3: check the question file")
    keys = list(scores[0]) if scores else []

    def block(rows: list[Mapping[str, float]]) -> dict[str, Any]:
        out: dict[str, Any] = {k: summarize(r[k] for r in rows)["mean"] for k in keys}
        out["n"] = len(rows)
        return out

    table = {
        f"level_{lv}": block([s for s, l2 in zip(scores, levels, strict=True) if l2 == lv])
        for lv in PAPERQA_LEVELS
    }
    table["all"] = block(list(scores))
    return table


# ----------------------------------------------------------------------------- QuALITY
#
# The study's parser took the first A-D letter anywhere in the output, so "The correct..."
# read as C. `parse_choice` accepts only a letter that is clearly an answer:
# - at the start of the output (or alone on a line): "C", "C.", "C)", "C:", "(C)", "[C]",
#   "C - text", "Option C", "(C) text" - a bare letter followed by a word is not one ("A man");
# - after an answer cue anywhere: "Answer: C", "The (correct|right|best|final) answer/option/
#   choice is C", "answer would be (C)", "\boxed{C}" - the letter must not start a word
#   ("Answer: Certainly" is no answer);
# and gives None when there is none or when the accepted letters disagree or hedge
# ("A or B", "C/D", "A. ... the answer is B"). `choice_accuracy` counts the Nones.
# Scoring by log-likelihood (`loglik_choice`) needs no parsing at all: the option with the
# highest summed log-probability given the prompt is the answer.

OPTION_LETTERS = "ABCDEFGHIJ"
_CUE = (
    r"(?i:\b(?:(?:the\s+)?(?:correct|right|best|final)\s+(?:answer|option|choice)"
    r"|answer(?:\s+(?:choice|option))?)\b"
    r"(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?)\s*[:=\-]?\s*"
)


@functools.cache
def _choice_patterns(n_options: int) -> tuple[re.Pattern[str], ...]:
    L = OPTION_LETTERS[:n_options]
    # "Option C", "(C)", "[C]" or a bare "C" ending the output or followed by ".", ":", ")",
    # ",", ";" or a dash; never a letter that starts a word ("A man", "C.S. Lewis").
    bare = (
        rf"(?:(?i:option|choice)\s+)?(?:[\(\[](?P<p>[{L}])[\)\]]"
        rf"|(?P<b>[{L}])(?=\s*$|\.(?![A-Za-z])|[:)\],;]|\s+[-\u2013\u2014]))"
    )
    return (
        re.compile(rf"^\s*{bare}"),  # start of the output
        re.compile(rf"^\s*[\(\[]?(?P<b>[{L}])[\)\]]?[.:]?\s*$", re.M),  # a line of its own
        re.compile(rf"{_CUE}[\(\[]?(?P<b>[{L}])[\)\]]?(?![\w'])"),  # after an answer cue
        re.compile(rf"\\boxed\{{\s*\(?(?P<b>[{L}])\)?\s*\}}"),
        re.compile(  # a hedge between two letters: "A or B", "C/D", "A, B"
            rf"(?<![\w'])[\(\[]?(?P<b>[{L}])[\)\]]?\s*(?:,|/|\bor\b|&)\s*"
            rf"[\(\[]?(?P<c>[{L}])[\)\]]?(?![\w'])"
        ),
    )


def parse_choice(text: str, n_options: int = 4) -> str | None:
    """The option letter a model output states, or None when it states none or several
    (see the section comment for the accepted forms)."""
    if not 2 <= n_options <= len(OPTION_LETTERS):
        raise DataError(f"n_options must be 2-{len(OPTION_LETTERS)}; got {n_options}")
    start, alone, cue, boxed, hedge = _choice_patterns(n_options)
    t = text.replace("*", "").replace("`", "")  # markdown emphasis around the letter
    found: set[str] = set()
    m = start.match(t)
    if m:
        found.add(m["p"] or m["b"])
    for pattern in (alone, cue, boxed):
        found.update(m["b"] for m in pattern.finditer(t))
    for m in hedge.finditer(t):
        if m["b"] != m["c"]:
            return None
    return found.pop() if len(found) == 1 else None


def loglik_choice(logprobs: Sequence[float], lengths: Sequence[int] | None = None) -> int | None:
    """The index of the most likely option from each option's summed log-probability given
    the prompt; with `lengths` (tokens or characters per option) the mean per unit instead.
    NaN or -inf never wins; None when no option is finite or the best ones tie exactly."""
    import numpy as np

    s = np.asarray(logprobs, np.float64)
    if s.ndim != 1 or s.size < 2:
        raise DataError(f"loglik_choice needs one score per option (2 or more); got {s.shape}")
    if lengths is not None:
        n = np.asarray(lengths, np.float64)
        if n.shape != s.shape or (n <= 0).any():
            raise DataError("lengths must give a positive length for every option")
        s = s / n
    s = np.where(np.isnan(s), -np.inf, s)
    best = s.max()
    if not np.isfinite(best) or (s == best).sum() > 1:
        return None
    return int(np.argmax(s))


def choice_accuracy(
    predicted: Sequence[int | str | None],
    gold: Sequence[int | str],
    hard: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Accuracy (an unanswered None counts as wrong), its `hard`-subset accuracy, and the
    counts: `n`, `n_hard`, `unanswered`. Predictions and gold are letters or 0-based indices."""
    if len(predicted) != len(gold) or (hard is not None and len(hard) != len(gold)):
        raise DataError("predicted, gold and hard must have one entry per question")

    def index(x: int | str | None) -> int | None:
        if x is None:
            return None
        if isinstance(x, str):
            if len(x) != 1 or x.upper() not in OPTION_LETTERS:
                raise DataError(f"option {x!r} is not a letter A-{OPTION_LETTERS[-1]}")
            return OPTION_LETTERS.index(x.upper())
        return int(x)

    right = [
        index(p) is not None and index(p) == index(g) for p, g in zip(predicted, gold, strict=True)
    ]
    out: dict[str, Any] = {
        "accuracy": summarize(right)["mean"],
        "n": len(right),
        "unanswered": sum(p is None for p in predicted),
    }
    if hard is not None:
        on_hard = [r for r, h in zip(right, hard, strict=True) if h]
        out["hard_accuracy"] = summarize(on_hard)["mean"]
        out["n_hard"] = len(on_hard)
    return out
