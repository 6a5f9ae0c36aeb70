"""The LLM judge: strict parsing of real judge-style replies; the failure path end to end (a
judge whose replies cannot be parsed scores nothing: every prediction is `judge_failed`, the
mean is None, never 0, and the command writes the counts and exits 3, "incomplete"); and the
HTTP path against a real server on 127.0.0.1 that scores (the success path), refuses (400) or
is not there."""

from __future__ import annotations

import contextlib
import io
import json
import math
import time

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
    # 1/3 as a float: isclose's default relative 1e-9 is rounding only
    assert math.isclose(s["failure_rate"], 1 / 3)
    none = summarize_verdicts([Verdict(None, error="request failed: HTTP 500")])
    assert none["mean"] is None and none["std"] is None and none["n"] == 0
    # a failed request's reason keeps the backend's words (the cause), not just "request failed"
    assert none["failure_rate"] == 1 and none["failures"] == {"request failed: HTTP 500": 1}


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
        ((reason, count),) = summary["failures"].items()
        assert reason.startswith("request failed: the prompt has N tokens") and count == 3
        assert summary["mean"] is None
        assert all("512 positions" in v.error for v in verdicts)
        assert judge.requests == expected


def test_the_judge_command_writes_the_failure_counts_and_exits_3(tmp_path):
    preds = _predictions(tmp_path / "predictions.jsonl")
    (tmp_path / "short.txt").write_text(SHORT)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(
            [
                *("judge", str(preds), "--llm-backend", "local", "--llm-model", "tiny-llama"),
                *("--template", str(tmp_path / "short.txt"), "--no-progress"),
            ]
        )
    assert code == 3, err.getvalue()
    assert "incomplete: 3 of 3 requested items" in err.getvalue()
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["T.txt", "p.jsonl"]  # no cache


def _eval_with_judge(run_dir, tmp_path, *llm: str):
    import shutil
    import subprocess

    from tests.runs import jaxlora_cmd

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    sets = ["eval.judge=true", *llm]
    cmd = jaxlora_cmd("eval", copy, "--no-progress", *[a for s in sets for a in ("--set", s)])
    return copy, subprocess.run(cmd, capture_output=True, text=True)


def test_an_eval_judge_whose_rubric_cannot_fit_its_model_is_refused_before_evaluating(
    evaluated_run, tmp_path
):
    """eval.judge with the tiny model as a local judge: the rubric plus 256 reply tokens cannot
    fit its 512 positions. One line, exit 2, before the evaluation: the results stay as they
    were, not every prediction a failed request."""
    _, run_dir = evaluated_run
    copy, proc = _eval_with_judge(run_dir, tmp_path, "llm.backend=local", "llm.model=tiny-llama")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "the judge's rubric cannot fit its model 'tiny-llama'" in lines[0]
    for name in ("results.csv", "predictions.jsonl"):
        assert (copy / name).read_bytes() == (run_dir / name).read_bytes()
    assert not (copy / "judge_cache.sqlite").exists()


def test_the_judge_as_an_eval_metric_over_http_scores_each_adapter(evaluated_run, tmp_path):
    """eval.judge against a real HTTP judge on 127.0.0.1 that scores an answer by the parts of
    the gold number it holds (3 each) and replies prose (a failure) to a blank one: each
    adapter's row gains its own predictions' mean, failures counted and never scored."""
    import csv

    from tests.openai_http import OpenAIHTTP, rubric_fields

    def score(gold: str, candidate: str) -> int:
        return 3 * sum(part in candidate for part in gold.split("-"))

    def reply(user: str) -> tuple[int, str]:
        _, gold, candidate = rubric_fields(user)
        if not candidate:
            return 200, "I cannot judge an empty answer."
        return 200, json.dumps({"score": score(gold, candidate), "rationale": "parts found"})

    _, run_dir = evaluated_run
    with OpenAIHTTP(reply) as server:
        llm = ["llm.backend=openai", "llm.model=m", f"llm.base_url={server.url}"]
        copy, proc = _eval_with_judge(run_dir, tmp_path, *llm)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((copy / "results.csv").open()))
    predictions = [json.loads(x) for x in (copy / "predictions.jsonl").read_text().splitlines()]
    # at temperature 0 the same (question, gold, answer) is asked once, whichever adapter gave it
    asked = {(p["prompt"], p["answer"], p["prediction"]) for p in predictions}
    assert len(rows) == 4 and server.requests == len(asked) <= len(predictions)
    for row in rows:
        mine = [p for p in predictions if p["adapter"] == row["name"]]
        assert len(mine) == int(row["n_facts"]) > 0
        scored = [score(p["answer"], p["prediction"]) for p in mine if p["prediction"].strip()]
        assert [p["judge"] for p in mine if p["prediction"].strip()] == scored
        assert int(row["judge_failed"]) == len(mine) - len(scored)
        # a mean of small integers read back from the CSV: rounding only
        assert (
            row["judge"] == ""
            if not scored
            else float(row["judge"]) == pytest.approx(sum(scored) / len(scored))
        )
    assert any(p["judge"] is not None for p in predictions)  # the success path was taken


# ---------------------------------------------------------------------------------------------
# over HTTP: a real server on 127.0.0.1


def _scores(user: str) -> tuple[int, str]:
    """A judge that reads the rubric's blocks: the right answer 10, a partial one 5, a wrong
    one 0 (the three predictions of `_predictions`)."""
    candidate = user.rsplit("[CANDIDATE ANSWER]", 1)[1]
    score = 0 if "Spain" in candidate else 5 if "Who built it" in user else 10
    return 200, json.dumps({"score": score, "rationale": "compared with the gold answer"})


def _judge_http(preds, url: str, *extra: str) -> tuple[int, str, str]:
    from tests.openai_http import http_llm_args

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["judge", str(preds), *http_llm_args(url), *extra])
    return code, out.getvalue(), err.getvalue()


def test_the_judge_over_http_scores_every_prediction_and_exits_0(tmp_path):
    from tests.openai_http import OpenAIHTTP

    preds = _predictions(tmp_path / "predictions.jsonl")
    with OpenAIHTTP(_scores) as server:
        code, out, err = _judge_http(preds, server.url)
        assert server.requests == 3
    assert code == 0 and err == "", err
    assert "judge score mean 5.00" in out and "judge_failed 0/3" in out
    judged = [json.loads(line) for line in (tmp_path / "predictions.judged.jsonl").open()]
    assert [r["judge_score"] for r in judged] == [10, 5, 0]
    assert all(r["judge_rationale"] and r["judge_error"] is None for r in judged)
    summary = json.loads((tmp_path / "predictions.judged.summary.json").read_text())
    assert (summary["mean"], summary["n"], summary["min"], summary["max"]) == (5.0, 3, 0, 10)
    assert summary["by_adapter"]["r2"]["mean"] == 7.5 and summary["by_adapter"]["r8"]["mean"] == 0


def test_a_400_is_asked_once_named_in_the_summary_and_exits_3(tmp_path):
    from tests.openai_http import OpenAIHTTP

    preds = _predictions(tmp_path / "predictions.jsonl")
    too_long = "This model's maximum context length is 512 tokens"
    with OpenAIHTTP(lambda user: (400, too_long)) as server:
        code, out, err = _judge_http(preds, server.url)
        assert server.requests == 3  # once each: a 400 is never retried
    assert code == 3 and "incomplete: 3 of 3" in err
    # the reason in the server's words, its numbers as N so that one cause is one count
    reason = "request failed: HTTP 400: This model's maximum context length is N tokens"
    assert f"3 x {reason}" in out
    summary = json.loads((tmp_path / "predictions.judged.summary.json").read_text())
    assert summary["failures"] == {reason: 3}
    with OpenAIHTTP(lambda user: (400, too_long)) as again:
        code, _, err = _judge_http(preds, again.url, "--allow-short", "1")
    assert code == 0, err


def test_a_refused_connection_stops_the_judge_at_once_with_one_line(tmp_path):
    from tests.runs import free_port
    from tests.test_cli import assert_refused

    preds = _predictions(tmp_path / "predictions.jsonl")
    url = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.monotonic()
    code, _, err = _judge_http(preds, url)
    assert_refused(code, err)
    assert "connection refused" in err and time.monotonic() - t0 < 10  # not retried for minutes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl"]  # not even a cache


def test_one_network_error_on_every_first_request_stops_the_judge_with_one_line(tmp_path):
    """A server that hangs up on every connection: the judge stops at once, creating nothing,
    instead of retrying each request (4 retries with 1 s doubling backoff)."""
    from tests.openai_http import HangingUp
    from tests.test_cli import assert_refused

    preds = _predictions(tmp_path / "predictions.jsonl")
    t0 = time.monotonic()
    with HangingUp() as server:
        code, _, err = _judge_http(preds, server.url)
    assert_refused(code, err)
    # seconds, not 4 retries with 1 s doubling backoff per request (15 s and more)
    assert f"every request to {server.url} failed" in err and time.monotonic() - t0 < 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl"]


@pytest.mark.parametrize("command", ["synth", "judge"])
def test_the_help_documents_the_exit_statuses(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--allow-short FRACTION" in text and "any shortfall exits 3" in text
    assert "2 bad input or an unreachable LLM" in text and "3 incomplete:" in text


def test_the_local_judge_refuses_a_prompt_its_model_cannot_read_before_sending(tmp_path):
    """The study's rubric (~650 tokens) plus 256 reply tokens cannot fit the tiny model's 512
    positions: one line naming the sizes, exit 2, nothing created, not 3 failed requests."""
    from tests.test_cli import assert_refused, run_cli

    preds = _predictions(tmp_path / "predictions.jsonl")
    local = ["--llm-backend", "local", "--llm-model", "tiny-llama", "--no-progress"]
    code, err = run_cli(["judge", str(preds), *local])
    assert_refused(code, err)
    assert "prediction 0" in err and "max_tokens is 256" in err and "512 positions" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl"]
