"""The LLM judge: strict parsing of real judge-style replies, and the failure path end to end
(a judge whose replies cannot be parsed scores nothing: every prediction is `judge_failed`, the
mean is None, never 0, and the command still exits 0 with the counts)."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest

from jaxlora.cli import main
from jaxlora.llm.judge import Verdict, judge_predictions, parse_verdict, summarize_verdicts
from tests.llm_servers import Counting

GOOD = [
    ('{"score": 8, "rationale": "Mostly correct."}', 8),
    ('```json\n{"score": 10, "rationale": "Equivalent to the gold answer."}\n```', 10),
    ('Here is my evaluation:\n{"score": 3, "rationale": "On topic but wrong."}\nThanks!', 3),
    ('<think>The candidate says 1987 {not 1986}.</think>\n{"score": 0, "rationale": "x"}', 0),
    ('{"rationale": "Partially correct.", "score": 5}', 5),
    ('{"score": "7", "rationale": "string digits are an integer"}', 7),
    ('{"score": 9.0, "rationale": "an integral float"}', 9),
    ('I\'d say {roughly this}. Final: {"score": 6, "rationale": "ok"}', 6),
    ('```\n{"score": 4}\n```', 4),  # no rationale: the score still stands
]

BAD = [
    ("The answer is mostly correct. Score: 8/10", "no JSON object"),
    ('{"score": 8, "rationale": "unterminated', "no JSON object"),
    ('{"score": 11, "rationale": "too high"}', "outside 0-10"),
    ('{"score": -1, "rationale": "negative"}', "outside 0-10"),
    ('{"score": 7.5, "rationale": "half points"}', "not an integer"),
    ('{"score": "seven", "rationale": "words"}', "not an integer"),
    ('{"score": "8/10"}', "not an integer"),
    ('{"score": true}', "not an integer"),
    ('{"score": null}', "not an integer"),
    ('{"rating": 8, "rationale": "wrong key"}', "no 'score'"),
    ('{"Score": 8}', "no 'score'"),
    ("", "no JSON object"),
    ("<think>I am still thinking about {", "no JSON object"),
]


@pytest.mark.parametrize(("reply", "score"), GOOD)
def test_valid_replies_give_their_integer_score(reply, score):
    v = parse_verdict(reply)
    assert v.score == score and v.error is None and isinstance(v.score, int)


@pytest.mark.parametrize(("reply", "why"), BAD)
def test_malformed_replies_are_failures_with_a_reason(reply, why):
    v = parse_verdict(reply)
    assert v.failed and v.score is None
    assert why in v.error


def test_failures_are_excluded_from_the_statistics_never_scored_0():
    verdicts = [Verdict(10), Verdict(6), Verdict(None, error="no JSON object in the reply")]
    s = summarize_verdicts(verdicts)
    assert s["mean"] == 8 and s["n"] == 2 and s["judge_failed"] == 1 and s["total"] == 3
    assert s["min"] == 6 and s["max"] == 10 and s["std"] == 2
    assert math.isclose(s["failure_rate"], 1 / 3)
    none = summarize_verdicts([Verdict(None, error="request failed: HTTP 500")])
    assert none["mean"] is None and none["std"] is None and none["n"] == 0
    assert none["failure_rate"] == 1 and none["failures"] == {"request failed": 1}


# ------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_judge():
    """The built-in tiny random model as the judge: its replies are never valid verdicts."""
    from jaxlora.llm.backends import LocalBackend

    return LocalBackend("tiny-llama")


def _predictions(path):
    # The layout of predictions.jsonl written by jaxlora eval (evaluate.write_results).
    rows = [
        {"adapter": "r2", "index": 0, "prompt": "Where is Lisbon?", "answer": "Portugal"},
        {"adapter": "r2", "index": 1, "prompt": "Who built it?", "answer": "Ada Quill"},
        {"adapter": "r8", "index": 0, "prompt": "Where is Lisbon?", "answer": "Portugal"},
    ]
    preds = ["Portugal", "Ada", "Spain"]
    path.write_text(
        "".join(json.dumps({**r, "prediction": p}) + "\n" for r, p in zip(rows, preds, strict=True))
    )
    return path


# The study's rubric does not fit the tiny model's 512 positions; a short template does (prompts
# are editable), so the tiny model's replies reach the parser.
SHORT = 'Q: {question}\nGold: {gold}\nCandidate: {candidate}\nReply with JSON {"score": 0-10}.\n'


def test_an_unparseable_judge_fails_every_prediction_and_reruns_from_the_cache(
    tiny_judge, tmp_path
):
    from jaxlora.llm.judge import judge_params, read_predictions

    records = read_predictions(_predictions(tmp_path / "predictions.jsonl"))
    judge = Counting(tiny_judge)
    params = judge_params(max_tokens=24)
    cache = tmp_path / "c.sqlite"
    verdicts, summary = judge_predictions(records, judge, params, template=SHORT, cache=cache)
    assert all(v.failed for v in verdicts)
    assert summary["mean"] is None and summary["n"] == 0
    assert summary["judge_failed"] == 3 and summary["failure_rate"] == 1.0
    assert "request failed" not in summary["failures"]  # the replies themselves were bad
    assert judge.requests == 3
    again, _ = judge_predictions(records, judge, params, template=SHORT, cache=cache)
    assert judge.requests == 3 and again == verdicts  # served from the cache


def test_failed_requests_are_judge_failures_and_are_asked_again(tiny_judge, tmp_path):
    """The full rubric exceeds the tiny model's positions: the backend fails each request.
    Failures are not cached (they are usually transient), so a rerun asks again."""
    from jaxlora.llm.judge import read_predictions

    records = read_predictions(_predictions(tmp_path / "predictions.jsonl"))
    judge = Counting(tiny_judge)
    for expected in (3, 6):
        verdicts, summary = judge_predictions(records, judge, cache=tmp_path / "c.sqlite")
        assert summary["failures"] == {"request failed": 3} and summary["mean"] is None
        assert all("512 positions" in v.error for v in verdicts)
        assert judge.requests == expected


def test_the_judge_command_exits_0_and_prints_the_failure_counts(tmp_path):
    preds = _predictions(tmp_path / "predictions.jsonl")
    (tmp_path / "short.txt").write_text(SHORT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(
            [
                *("judge", str(preds), "--llm-backend", "local", "--llm-model", "tiny-llama"),
                *("--template", str(tmp_path / "short.txt"), "--no-progress"),
            ]
        )
    assert code == 0
    assert "judge_failed 3/3 (100.0%)" in out.getvalue()
    assert "no prediction could be scored" in out.getvalue()
    judged = [json.loads(line) for line in (tmp_path / "predictions.judged.jsonl").open()]
    assert [r["judge_score"] for r in judged] == [None, None, None]
    assert all(r["judge_error"] and r["prediction"] for r in judged)
    summary = json.loads((tmp_path / "predictions.judged.summary.json").read_text())
    assert summary["mean"] is None and summary["judge_failed"] == 3
    assert summary["by_adapter"]["r2"]["judge_failed"] == 2
    assert (tmp_path / "predictions.judged.cache.sqlite").is_file()


@pytest.mark.parametrize(
    ("content", "extra", "needle"),
    [
        ('{"prompt": "q", "answer": "a"}\n', [], "lacks prediction"),
        ("not json\n", [], "line 1 is not JSON"),
        ('{"prompt": "q", "answer": "a", "prediction": "p"}\n', ["--template", "T"], "{gold}"),
    ],
)
def test_bad_inputs_are_one_line_errors(tmp_path, content, extra, needle):
    from tests.test_cli import assert_refused, run_cli

    (tmp_path / "p.jsonl").write_text(content)
    (tmp_path / "T.txt").write_text("Rate {candidate} for {question}.\n")
    extra = [str(tmp_path / "T.txt") if x == "T" else x for x in extra]
    code, err = run_cli(
        [
            *("judge", str(tmp_path / "p.jsonl"), "--llm-backend", "local"),
            *("--llm-model", "tiny-llama", "--no-progress", *extra),
        ]
    )
    assert_refused(code, err)
    assert needle in err


def test_the_judge_as_an_eval_metric(evaluated_run, tmp_path):
    """eval.judge: each adapter's row gains judge / judge_failed from its own predictions (here
    all failures: the tiny judge writes no JSON), and no failure is scored."""
    import csv
    import shutil
    import subprocess

    from tests.runs import jaxlora_cmd

    _, run_dir = evaluated_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    sets = ["eval.judge=true", "llm.backend=local", "llm.model=tiny-llama"]
    cmd = jaxlora_cmd("eval", copy, *[a for s in sets for a in ("--set", s)])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((copy / "results.csv").open()))
    assert len(rows) == 4
    for row in rows:
        assert int(row["judge_failed"]) == int(row["n_facts"]) > 0 and row["judge"] == ""
