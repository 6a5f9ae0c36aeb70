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
  from rouge-score with the Porter stemmer (0-1), the study's two libraries and settings.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
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
