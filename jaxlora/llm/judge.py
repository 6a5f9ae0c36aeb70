"""The LLM judge: the study's 0-10 rubric over (question, gold answer, candidate answer).

The default prompt (`prompts/judge.txt`) is the study's rubric (docs/study.md §5): Factual
Alignment, Completeness and Relevance; 10 perfect, 7-9 mostly correct, 4-6 partially correct,
1-3 on topic but wrong, 0 nonsensical; `[QUESTION]`, `[GOLD ANSWER]` and `[CANDIDATE ANSWER]`
blocks; the reply `{"score": <int 0-10>, "rationale": "<one sentence>"}`. It is asked at
temperature 0 with 256 tokens and JSON mode (backends that have none ignore it).

Parsing is strict. The reply must hold a JSON object (the whole reply, a ```json fence, or the
first balanced `{...}` that parses) whose `score` is an integer 0-10: a JSON integer, a float
with an integral value (7.0) or a string of digits ("7"). Anything else -- no object, no
`score`, 7.5, "seven", true, 11, -1, or a request the backend gave up on -- is a *judge
failure*: counted as `judge_failed` and left out of the mean. The study scored failures 0,
which cannot be told apart from a wrong answer and drags the mean down by the failure rate
(docs/study.md §7). With no score at all, the mean is None, not 0.

Results are cached by request (`common.CachedBackend`), so judging the same predictions again,
or after an interruption, costs nothing. `judge_file` checks every record and the template, and
asks the backend's `preflight` whether every prompt plus `max_tokens` fits (the local model's
positions), before it creates the cache or sends anything: a rubric too long for the model is
one error, not N failed requests. The summary counts failures by reason ("request failed:
HTTP 400: ..." keeps the server's words, so an HTTP context overflow is named too).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxlora.data.readers import jsonl_objects
from jaxlora.errors import ConfigError, DataError
from jaxlora.llm.common import CachedBackend, ResultCache, extract_json, render_template

if TYPE_CHECKING:
    from jaxlora.llm.backends import Backend, GenParams

__all__ = [
    "Verdict",
    "judge_params",
    "judge_predictions",
    "parse_verdict",
    "read_predictions",
    "summarize_verdicts",
]

SCORE_MIN, SCORE_MAX = 0, 10


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One judged prediction: a score, or `error` saying why the judge failed."""

    score: int | None
    rationale: str | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.score is None


def parse_verdict(text: str) -> Verdict:
    """The verdict a judge's reply holds, under the strict rules of the module docstring."""
    obj = extract_json(text, want=dict)
    if obj is None:
        return Verdict(None, error="no JSON object in the reply")
    if "score" not in obj:
        return Verdict(None, error="the JSON object has no 'score'")
    score = _integer(obj["score"])
    if score is None:
        return Verdict(None, error=f"score {obj['score']!r} is not an integer")
    if not SCORE_MIN <= score <= SCORE_MAX:
        return Verdict(None, error=f"score {score} is outside {SCORE_MIN}-{SCORE_MAX}")
    rationale = obj.get("rationale")
    return Verdict(score, rationale if isinstance(rationale, str) else None)


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):  # a bool is an int to Python, never a score
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str):
        s = value.strip()
        return int(s) if s.lstrip("+-").isdigit() and s.isascii() else None
    return None


def judge_params(**overrides: Any) -> GenParams:
    """The study's judge settings (temperature 0, 256 tokens, JSON mode) with overrides."""
    from jaxlora.llm.backends import GenParams

    return GenParams(**{"max_tokens": 256, "temperature": 0.0, "json_mode": True, **overrides})


def judge_messages(
    question: str, gold: str, candidate: str, template: str, system: str | None = None
) -> list[dict[str, str]]:
    user = render_template(template, {"question": question, "gold": gold, "candidate": candidate})
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]


def judge_predictions(
    records: Sequence[Mapping[str, Any]],
    backend: Backend,
    params: GenParams | None = None,
    *,
    template: str | None = None,
    system: str | None = None,
    cache: ResultCache | str | Path | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[list[Verdict], dict[str, Any]]:
    """Judge every record (`question` or `prompt`, `answer`, `prediction`, as evaluate.py's
    predictions.jsonl has them); returns one verdict per record and `summarize_verdicts`.

    `template` is the user prompt's text (`{question}`, `{gold}`, `{candidate}`), by default the
    study's rubric; `cache` a `ResultCache` or the path of one (None: no cache)."""
    from jaxlora.llm.common import load_template

    params = params or judge_params()
    template = template if template is not None else load_template("judge")
    conversations = judge_conversations(records, template, system)
    if isinstance(cache, str | Path):
        cache = ResultCache(cache)
    llm = backend if isinstance(backend, CachedBackend) else CachedBackend(backend, cache)
    verdicts: list[Verdict] = []
    bar = _bar(len(conversations), "judge", progress)
    try:
        for start in range(0, len(conversations), batch_size):
            batch = conversations[start : start + batch_size]
            for out in llm.chat(batch, params):
                if isinstance(out, str):
                    verdicts.append(parse_verdict(out))
                else:  # LLMFailure: the backend gave up on the request after its retries
                    verdicts.append(Verdict(None, error=f"request failed: {out.error}"))
            bar.update(len(batch))
    finally:
        bar.close()
    return verdicts, summarize_verdicts(verdicts)


def judge_conversations(
    records: Sequence[Mapping[str, Any]], template: str, system: str | None = None
) -> list[list[dict[str, str]]]:
    """The judge's messages for every record; a bad template or record is a DataError/ConfigError
    (nothing is created or sent before this passes)."""
    absent = [k for k in ("question", "gold", "candidate") if "{" + k + "}" not in template]
    if absent:
        raise ConfigError(
            f"the judge template has no {', '.join('{' + k + '}' for k in absent)}: it needs "
            "{question}, {gold} and {candidate}"
        )
    triples = [_fields(r, i) for i, r in enumerate(records)]
    return [judge_messages(q, g, c, template, system) for q, g, c in triples]


def metric_judge(llm: Any) -> Backend:
    """The judge of an evaluator (`eval.judge`, `memory.judge`) from the config's `llm:`
    section, checked before any evaluation: the study's rubric with empty fields plus the
    reply's 256 tokens must fit the judge model (`preflight`: the local model's positions),
    else one error now rather than a failed request per prediction once the answers exist."""
    from jaxlora.llm.backends import LLMConfig, LLMError, make_backend
    from jaxlora.llm.common import load_template

    backend = make_backend(LLMConfig.from_dict(llm.to_dict()))
    preflight = getattr(backend, "preflight", None)  # a backend that cannot know: None
    bare = judge_messages("", "", "", load_template("judge"))
    if preflight is not None and (why := preflight([bare], judge_params())) is not None:
        raise LLMError(
            f"the judge's rubric cannot fit its model {llm.model!r} with no question or answer "
            f"in it: {why.removeprefix('item 0: ')}; use a judge model with a longer context "
            "(llm.model) or an endpoint (llm.backend: openai)"
        )
    return backend


def judge_results(
    rows: Sequence[dict[str, Any]],
    predictions: Sequence[dict[str, Any]],
    key: Callable[[Mapping[str, Any]], Any],
    prediction_key: Callable[[Mapping[str, Any]], Any],
    llm: Any,
    cache: str | Path | None = None,
    progress: bool = False,
    backend: Backend | None = None,
) -> None:
    """The judge as a metric of an evaluator: every prediction gains `judge` (its 0-10 score,
    None when the judge failed) and every result row its predictions' `judge` mean (failures
    excluded), `judge_failed` and `judge_failure_rate`. `llm` is the config's `llm:` section
    (`backend`: the judge `metric_judge` made of it, checked); rows and predictions are matched
    by `key` and `prediction_key`."""
    backend = backend if backend is not None else metric_judge(llm)
    verdicts, _ = judge_predictions(predictions, backend, cache=cache, progress=progress)
    groups: dict[Any, list[Verdict]] = {}
    for p, v in zip(predictions, verdicts, strict=True):
        p["judge"] = v.score
        groups.setdefault(prediction_key(p), []).append(v)
    for row in rows:
        summary = summarize_verdicts(groups.get(key(row), []))
        row["judge"] = summary["mean"]
        row["judge_failed"] = summary["judge_failed"]
        row["judge_failure_rate"] = summary["failure_rate"]


def _fields(record: Mapping[str, Any], i: int) -> tuple[str, str, str]:
    question = record.get("question", record.get("prompt"))
    missing = [
        name
        for name, v in (
            ("question (or prompt)", question),
            ("answer", record.get("answer")),
            ("prediction", record.get("prediction")),
        )
        if not isinstance(v, str)
    ]
    if missing:
        found = ", ".join(record) or "none"
        raise DataError(
            f"prediction {i} lacks {' and '.join(missing)} as text (fields found: {found}): "
            "each record needs question, answer (the gold answer) and prediction"
        )
    return question, record["answer"], record["prediction"]


def summarize_verdicts(verdicts: Iterable[Verdict]) -> dict[str, Any]:
    """mean, std (population), min, max over the scored; n scored, judge_failed, failure rate,
    and the count of each failure reason. Statistics of nothing are None."""
    verdicts = list(verdicts)
    scores = [v.score for v in verdicts if v.score is not None]
    failed = len(verdicts) - len(scores)
    return {
        "mean": statistics.fmean(scores) if scores else None,
        "std": statistics.pstdev(scores) if scores else None,
        "min": min(scores) if scores else None,
        "max": max(scores) if scores else None,
        "n": len(scores),
        "judge_failed": failed,
        "total": len(verdicts),
        "failure_rate": failed / len(verdicts) if verdicts else None,
        "failures": dict(Counter(_reason(v.error) for v in verdicts if v.error)),
    }


def _reason(error: str) -> str:
    """A failure's kind without its value ("score 11 is outside 0-10" -> "score outside 0-10")."""
    if error.startswith("request failed"):
        # the backend's own words name the cause (HTTP 400: prompt too long, a timeout, ...),
        # with its numbers (token counts) as N and no attempt count, so that one cause is one
        # count however long each prompt was; each record's judge_error keeps the numbers
        head, rest = re.match(r"(request failed: (?:HTTP \d{3}\b:? ?)?)(.*)", error, re.S).groups()
        return head + re.sub(r"\d+", "N", rest.split(" (after ", 1)[0])[:160]
    if "outside" in error:
        return f"score outside {SCORE_MIN}-{SCORE_MAX}"
    if "not an integer" in error:
        return "score not an integer"
    return error


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The records of a predictions jsonl file, with errors naming the line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"predictions file not found: {p}")
    records = [record for _, record in jsonl_objects(p)]
    if not records:
        raise DataError(f"{p} has no predictions")
    return records


def judge_file(
    path: str | Path,
    backend: Backend,
    *,
    out: str | Path | None = None,
    cache: str | Path | None = None,
    template: str | None = None,
    params: GenParams | None = None,
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Judge a predictions file; writes OUT (each record with `judge_score`, `judge_rationale`,
    `judge_error`) and OUT's `.summary.json` (overall, and per adapter when records name one)."""
    from jaxlora.fsutil import atomic_write
    from jaxlora.llm.backends import LLMError
    from jaxlora.llm.common import load_template

    records = read_predictions(path)
    params = params or judge_params()
    conversations = judge_conversations(records, template or load_template("judge"))
    preflight = getattr(backend, "preflight", None)  # a backend that cannot know: None
    if preflight is not None and (why := preflight(conversations, params)) is not None:
        raise LLMError(
            f"the judge prompt of prediction {why.removeprefix('item ')}: pass --max-tokens "
            "lower, a shorter --template, or a judge model with a longer context"
        )
    src = Path(path).expanduser()
    out = Path(out).expanduser() if out else src.with_name(f"{src.stem}.judged.jsonl")
    cache_path = Path(cache).expanduser() if cache else out.with_suffix(".cache.sqlite")
    result_cache = ResultCache(cache_path)
    try:
        verdicts, summary = judge_predictions(
            records, backend, params, template=template, cache=result_cache, progress=progress
        )
    finally:
        result_cache.close()
    lines = []
    for r, v in zip(records, verdicts, strict=True):
        row = {**r, "judge_score": v.score, "judge_rationale": v.rationale, "judge_error": v.error}
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    if any("adapter" in r for r in records):
        groups: dict[str, list[Verdict]] = {}
        for r, v in zip(records, verdicts, strict=True):
            groups.setdefault(str(r.get("adapter")), []).append(v)
        summary["by_adapter"] = {k: summarize_verdicts(vs) for k, vs in groups.items()}
    summary["backend"] = backend.name
    atomic_write(out, "".join(lines))
    atomic_write(out.with_suffix(".summary.json"), json.dumps(summary, indent=2) + "\n")
    return out, summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """One line for the terminal."""
    rate = summary["failure_rate"]
    failed = f"judge_failed {summary['judge_failed']}/{summary['total']} ({rate:.1%})"
    if summary["failures"]:
        reasons = sorted(summary["failures"].items(), key=lambda kv: -kv[1])
        failed += " -- " + "; ".join(f"{n} x {why}" for why, n in reasons)
    if summary["mean"] is None:
        return f"no prediction could be scored; {failed}"
    return (
        f"judge score mean {summary['mean']:.2f} (std {summary['std']:.2f}, "
        f"min {summary['min']}, max {summary['max']}) over n={summary['n']}; {failed}"
    )


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=not enabled, leave=False)


def run_judge(
    path: str | Path,
    *,
    out: str | Path | None = None,
    config: str | Path | None = None,
    llm: Mapping[str, Any] | None = None,
    cache: str | Path | None = None,
    template: str | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """`jaxlora judge`: the backend from `config`'s `llm:` section and/or `llm` settings;
    `template` a preset name or a file; `max_tokens` the reply's budget (default 256)."""
    from jaxlora.llm.backends import make_llm, read_yaml_section
    from jaxlora.llm.common import load_template

    read_predictions(path)  # a bad file fails before a model is loaded
    section = read_yaml_section(config, "llm") if config else None
    text = load_template(template) if template else None
    params = judge_params(**({} if max_tokens is None else {"max_tokens": max_tokens}))
    backend = make_llm(section, dict(llm or {}))
    return judge_file(
        path, backend, out=out, cache=cache, template=text, params=params, progress=progress
    )
