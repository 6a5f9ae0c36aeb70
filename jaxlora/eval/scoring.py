"""Per-dataset scoring: one question's metrics, and a group of questions' summary row.

The seam between the evaluators (`jaxlora/evaluate.py`, `jaxlora/memory/evaluate.py`) and the
study's metrics (`metrics.py`). The evaluators decode; these two functions say what a dataset
counts:

- `paperqa`: exact match, BLEU-4 (sacrebleu) and ROUGE-L against the reference answer, and the
  same per level (`bleu_level1`, ..., `n_level3`: recall, comprehension, logical structure).
- `narrativeqa`: ROUGE-1/2/L/Lsum, each the best over the two references, averaged within
  each document and then over documents (`n_documents`).
- `quality`: the strictly parsed option letter (`choice`; no letter inside a word) against the
  gold one: `accuracy`, `hard_accuracy` on the `hard` questions (`n_hard`), and `unanswered`
  (outputs stating no letter, or several; they count as wrong). When the evaluator also scored
  every option by its log-likelihood (`loglik_score`), `loglik_accuracy` and
  `loglik_hard_accuracy` from the most likely option (no parsing; an exact tie is wrong).
- anything else: the mean of each per-question metric (the evaluators' rule before).

`questions` are `EvalQuestion`s (`jaxlora/data/documents.py`); None for a question that has
none (a question file), which the document rules cannot score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from jaxlora.errors import DataError
from jaxlora.eval import metrics

DOCUMENT_METRICS = ("paperqa", "narrativeqa", "quality")


def score_question(dataset: str, prediction: str, question: Any) -> dict[str, Any]:
    """The metrics of one answer to one `EvalQuestion` of a document dataset."""
    if dataset == "narrativeqa":
        return metrics.rouge_multi(prediction, list(question.answers))
    if dataset == "quality":
        choice = metrics.parse_choice(prediction, len(question.options))
        return {"accuracy": float(choice == question.gold_letter), "choice": choice}
    if dataset == "paperqa":
        answer = question.answer
        return {
            "accuracy": float(metrics.exact_match(prediction, answer)),
            "bleu": metrics.bleu(prediction, answer),
            "rouge_l": metrics.rouge_l(prediction, answer),
        }
    raise DataError(f"no document metrics for dataset {dataset!r}: use one of {DOCUMENT_METRICS}")


def loglik_score(logprobs: Sequence[float], question: Any) -> dict[str, Any]:
    """A multiple-choice question scored by log-likelihood: `logprobs` holds each option's
    summed log-probability as the answer; `loglik_choice` is the most likely option's letter
    (None on an exact tie or when no option is finite)."""
    if len(logprobs) != len(question.options):
        raise DataError(
            f"question {question.id}: {len(logprobs)} option scores for "
            f"{len(question.options)} options"
        )
    best = metrics.loglik_choice(logprobs)
    choice = None if best is None else metrics.OPTION_LETTERS[best]
    return {
        "loglik_accuracy": float(choice is not None and choice == question.gold_letter),
        "loglik_choice": choice,
    }


def aggregate(
    dataset: str, scores: Sequence[dict[str, Any]], questions: Sequence[Any] | None = None
) -> dict[str, Any]:
    """One summary row of per-question `scores` (see the module docstring)."""
    if dataset in DOCUMENT_METRICS and questions is not None and all(questions):
        if len(questions) != len(scores):
            raise DataError(f"{len(scores)} scores but {len(questions)} questions")
        if dataset == "narrativeqa":
            out = metrics.mean_per_document(scores, [q.document for q in questions])
            out.pop("n")
            return out
        if dataset == "quality":
            gold, hard = [q.gold for q in questions], [q.hard for q in questions]
            out = metrics.choice_accuracy([s["choice"] for s in scores], gold, hard)
            out.pop("n")
            if scores and all("loglik_choice" in s for s in scores):
                ll = metrics.choice_accuracy([s["loglik_choice"] for s in scores], gold, hard)
                out["loglik_accuracy"] = ll["accuracy"]
                out["loglik_hard_accuracy"] = ll["hard_accuracy"]
            return out
        return _paperqa(scores, [q.level for q in questions])
    return _means(scores)


def _means(scores: Sequence[dict[str, Any]]) -> dict[str, float]:
    keys = dict.fromkeys(k for s in scores for k, v in s.items() if _number(v))
    return {
        k: math.fsum(s[k] for s in scores if k in s) / sum(k in s for s in scores) for k in keys
    }


def _paperqa(scores: Sequence[dict[str, Any]], levels: Sequence[int | None]) -> dict[str, Any]:
    out: dict[str, Any] = _means(scores)
    if any(lv is None for lv in levels):  # a question file without levels
        return out
    table = metrics.per_level(scores, levels)
    for lv in metrics.PAPERQA_LEVELS:
        block = table[f"level_{lv}"]
        for k in ("bleu", "rouge_l"):
            out[f"{k}_level{lv}"] = block[k]
        out[f"n_level{lv}"] = block["n"]
    return out


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def judge_per_level(
    rows: Sequence[dict[str, Any]],
    predictions: Sequence[dict[str, Any]],
    key: Any,
    prediction_key: Any,
) -> None:
    """PaperQA: each row gains `judge_level1..3`, the judge's mean over its predictions of that
    level (failures excluded, as in the overall `judge`), after `judge_results` has run."""
    by: dict[Any, dict[int, list[float]]] = {}
    for p in predictions:
        if p.get("level") is not None and p.get("judge") is not None:
            by.setdefault(prediction_key(p), {}).setdefault(p["level"], []).append(p["judge"])
    if not by:
        return
    for row in rows:
        levels = by.get(key(row), {})
        for lv in metrics.PAPERQA_LEVELS:
            xs = levels.get(lv, [])
            row[f"judge_level{lv}"] = math.fsum(xs) / len(xs) if xs else None
