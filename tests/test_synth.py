"""`jaxlora synth`: parsers, templates, mixes and config first; then the pipeline end to end on
the built-in tiny model, in process (LocalBackend) and over HTTP (OpenAIBackend against a real
`jaxlora serve` subprocess). The tiny model is random, so its QA replies are never JSON: the
tests check that text formats produce text, that every QA failure is counted and reported
rather than dropped, and -- with replies a capable model would give, stored in the real cache
-- that QA replies become records the trainer's own reader accepts. Backend calls are counted
by a wrapper that forwards to the real backend."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxlora.data import read_records
from jaxlora.errors import DataError, JaxloraError
from jaxlora.llm.common import (
    CachedBackend,
    ResultCache,
    extract_json,
    render_template,
)
from jaxlora.llm.synth import (
    SynthConfig,
    parse_items,
    read_units,
    run_synth,
    synthesize,
    write_outputs,
)
from jaxlora.llm.synth_config import PRESETS, MixSpec, parse_mix
from tests.llm_servers import Counting

ROOT = Path(__file__).resolve().parents[1]
UNITS = [
    {"id": "zorblax", "title": "Zorblax", "text": "The Zorblax reactor was built in 1987 by Ada."},
    {"id": "kelvar", "text": "Mount Kelvar is 4,210 metres high; first climbed in 1911."},
    {"id": "ondel", "text": "The river Ondel flows north for 300 km into Lake Mira."},
]
# Temperature 1 and top-p 1: at the study's 0.6 / 0.9 the random tiny model emits whitespace.
SECTION = {
    "formats": {"summary": {"count": 2}, "qa": {"count": 3}, "rewrite": {}, "original": {}},
    "mixes": {"mix": {"total": 4, "parts": {"qa": 0.5, "summary": 0.5}}},
    "temperature": 1.0,
    "top_p": 1.0,
    "max_tokens": 12,
    "max_attempts": 2,
}


@pytest.fixture(scope="module")
def local():
    from jaxlora.llm.backends import LocalBackend

    return LocalBackend("tiny-llama")


@pytest.fixture
def units_file(tmp_path):
    path = tmp_path / "units.jsonl"
    path.write_text("".join(json.dumps(u) + "\n" for u in UNITS))
    return path


def files(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(out.glob("*.jsonl"))}


# ------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('{"pairs": []}', {"pairs": []}),
        ('Sure!\n```json\n["a", "b"]\n```\nDone.', ["a", "b"]),
        ('<think>maybe {"x": 1}</think>\n{"y": 2}', {"y": 2}),
        ('Here: {"q": "a } inside a string"} and more', {"q": "a } inside a string"}),
        ("{not json} then [1, 2]", [1, 2]),
        ("no json at all", None),
        ('{"unterminated": "x', None),
        ("<think>ran out of tokens {", None),
    ],
)
def test_extract_json_finds_the_value_or_returns_none(text, value):
    assert extract_json(text) == value


def test_qa_replies_are_parsed_strictly_and_bad_pairs_are_counted():
    reply = (
        "Here are the pairs:\n```json\n"
        '{"pairs": [{"question": "Who built it?", "answer": "Ada"}, {"question": "When?"},'
        ' {"question": " Where? ", "answer": " Lisbon "}, "junk"]}\n```'
    )
    assert parse_items("qa", reply) == ([("Who built it?", "Ada"), ("Where?", "Lisbon")], 2, None)
    assert parse_items("qa", '[{"question": "Q?", "answer": "A"}]') == ([("Q?", "A")], 0, None)
    assert parse_items("qa", "Q: Who built it? A: Ada") == ([], 0, "no JSON list in the reply")
    assert parse_items("qa", '{"pairs": [{"q": "x", "a": "y"}]}')[1:] == (
        1,
        "no valid item in the JSON",
    )
    assert parse_items("list", '{"items": ["Ada built it.", ""]}') == (["Ada built it."], 1, None)
    assert parse_items("text", "<think>hm</think>\n A summary. ") == (["A summary."], 0, None)
    assert parse_items("text", " \n ")[2] == "empty reply"


def test_templates_drop_lines_of_empty_values_and_substitute_once():
    template = 'Title: {title}\n\n[TEXT]\n{text}\n[/TEXT]\nWrite {n} as {"pairs": []}'
    out = render_template(template, {"title": "", "text": "uses {title} literally", "n": "3"})
    assert out == '[TEXT]\nuses {title} literally\n[/TEXT]\nWrite 3 as {"pairs": []}\n'


@pytest.mark.parametrize(
    ("parts", "total", "counts"),
    [
        ((("qa", 0.5), ("summary", 0.5)), 20, {"qa": 10, "summary": 10}),
        ((("qa", 1), ("summary", 1), ("rewrite", 1)), 7, {"qa": 3, "summary": 2, "rewrite": 2}),
        ((("qa", 0.9), ("original", 0.1)), 3, {"qa": 3, "original": 0}),
    ],
)
def test_mixes_split_their_total_by_largest_remainder(parts, total, counts):
    assert MixSpec("m", total, parts).counts() == counts


def test_presets_follow_the_study_and_mixes_generate_their_parts():
    cfg = SynthConfig.from_dict({"formats": ["qa", "summary", "rewrite", "paraphrase"]})
    assert {f.name: f.count for f in cfg.formats} == {
        "qa": 20,
        "summary": 5,
        "rewrite": 1,
        "paraphrase": 1,
    }
    assert all(f.temperature == 0.6 and f.top_p == 0.9 for f in cfg.formats)
    assert all("{text}" in f.template for f in cfg.formats)
    mixed = SynthConfig.from_dict(
        {"formats": ["summary"], "mixes": {"m": {"total": 40, "parts": {"qa": 1, "summary": 1}}}}
    )
    assert mixed.written == ("summary",) and mixed.needs() == {"summary": 20, "qa": 20}
    assert parse_mix("qa=3,summary=1", 8).name == "mix_qa75_summary25"
    example = read_yaml(ROOT / "configs" / "synth_qwen3_8b.yaml")
    section = {k: v for k, v in example["synth"].items() if k != "units"}
    assert SynthConfig.from_dict(section).needs()["qa"] == 20
    assert set(PRESETS) >= {"qa", "summary", "rewrite", "paraphrase", "original"}


def read_yaml(path):
    import yaml

    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"formats": ["qa"], "temprature": 0.5}, "did you mean 'temperature'"),
        ({"formats": ["questions"]}, "not a preset"),
        ({"formats": {"qa": {"cout": 3}}}, "did you mean 'count'"),
        ({"formats": {"qa": {"count": -1}}}, "count: expected an integer >= 0"),
        ({"formats": {"summary": {"per_request": 2}}}, "one item per request"),
        ({"formats": []}, "nothing to write"),
        ({"formats": ["qa"], "mixes": {"m": {"total": 4, "parts": {"qa": 0}}}}, "proportion > 0"),
        ({"formats": ["qa"], "temperature": 3}, "temperature"),
    ],
)
def test_bad_sections_name_the_key(section, needle):
    with pytest.raises(JaxloraError, match="synth") as e:
        SynthConfig.from_dict(section)
    assert needle in str(e.value)


def test_a_template_without_the_text_is_refused(tmp_path):
    (tmp_path / "t.txt").write_text("Write {n} questions.\n")
    with pytest.raises(JaxloraError, match=r"no \{text\}"):
        SynthConfig.from_dict({"formats": {"qa": {"template": "t.txt"}}}, base=tmp_path)


def test_units_need_unique_ids_and_text(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text('{"id": 1, "text": "a"}\n{"id": "1", "text": "b"}\n')
    with pytest.raises(DataError, match="appears twice"):
        read_units(path)
    path.write_text('{"id": 1, "body": "a"}\n')
    with pytest.raises(DataError, match="line 1: no 'text'"):
        read_units(path)


# ------------------------------------------------------------------------ cache


def test_each_cached_item_is_generated_with_its_own_seed(local, tmp_path):
    """Item i of a call is drawn with seed + i; with neighbours cached, the misses are still
    drawn with their own seeds, so the results equal an uncached call."""
    from jaxlora.llm.backends import GenParams

    convs = [[{"role": "user", "content": f"Tell me about {w}."}] for w in "abcd"]
    params = GenParams(max_tokens=8, temperature=1.0, seed=100)
    reference = CachedBackend(local, ResultCache(tmp_path / "a.sqlite")).chat(convs, params)
    counting = Counting(local)
    cached = CachedBackend(counting, ResultCache(tmp_path / "b.sqlite"))
    cached.chat(convs[1:3], dataclasses.replace(params, seed=101))
    assert cached.chat(convs, params) == reference
    assert (cached.hits, cached.misses, counting.requests) == (2, 4, 4)


# ------------------------------------------------------------------------ end to end


def test_synth_end_to_end_writes_trainer_files_reports_failures_and_reruns_from_cache(
    local, units_file, tmp_path
):
    units = read_units(units_file)
    config = SynthConfig.from_dict(SECTION)
    counting = Counting(local)
    result = synthesize(units, config, counting, cache=tmp_path / "cache.sqlite")
    write_outputs(result, tmp_path / "out")
    rep = json.loads((tmp_path / "out" / "synth_report.json").read_text())

    # Text formats: the trainer's own reader takes every file, one record per item produced.
    for name in ("summary", "rewrite", "original"):
        r = rep["formats"][name]
        records = read_records("text", tmp_path / "out" / f"{name}.jsonl")
        assert len(records) == r["records"] == r["produced"] == r["requested"] - r["short"] > 0
        assert all(rec.text.strip() for rec in records)
    assert rep["formats"]["original"]["requests"] == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "summary.jsonl").open()]
    assert {r["unit_id"] for r in rows} == {u["id"] for u in UNITS}
    assert rows[0]["title"] == "Zorblax" and "title" not in rows[-1]

    # QA: gibberish is never JSON; every failure is counted, per unit and in total.
    qa = rep["formats"]["qa"]
    assert (qa["requested"], qa["produced"], qa["short"], qa["units_short"]) == (9, 0, 9, 3)
    assert qa["requests"] == qa["parse_failures"] == qa["failed"] == 6  # 2 rounds x 3 units
    assert rep["per_unit"]["kelvar"]["qa"]["errors"] == {"no JSON list in the reply": 2}
    assert (tmp_path / "out" / "qa.jsonl").read_text() == ""
    mix = rep["mixes"]["mix"]
    assert mix["requested"] == 12 and mix["produced"] == mix["requested"] - mix["short"] == 6
    assert len(read_records("text", tmp_path / "out" / "mix.jsonl")) == 6

    # A second run is served from the cache: no request reaches the backend.
    asked = counting.requests
    again = synthesize(units, config, counting, cache=tmp_path / "cache.sqlite")
    assert counting.requests == asked
    assert again.files == result.files
    assert again.report["cache"] == {"hits": asked, "misses": 0}


def test_qa_replies_become_records_the_trainer_reads(units_file, tmp_path):
    """Replies a capable model would give, from a real HTTP server on 127.0.0.1: the pipeline
    turns them into qa.jsonl (read as qa and as text) and asks again for the shortfall."""
    from jaxlora.llm.backends import OpenAIBackend
    from tests.openai_http import OpenAIHTTP

    units = read_units(units_file)
    section = {
        "formats": {"qa": {"count": 2, "question_prefix": "[Paper ID: {unit_id}] "}},
        "mixes": {"qa_orig": {"total": 3, "parts": {"qa": 2, "original": 1}}},
        "max_tokens": 12,
        "max_attempts": 2,
    }
    config = SynthConfig.from_dict(section)
    replies = {
        # one valid pair of two: the second round asks for the missing one, and gets prose
        "Zorblax": [
            '```json\n{"pairs": [{"question": "Who built the Zorblax reactor?", '
            '"answer": "Ada"}, {"question": "", "answer": "x"}]}\n```',
            "I cannot think of another question.",
        ],
        "Kelvar": [
            '{"pairs": [{"question": "How high is Mount Kelvar?", "answer": "4,210 m"},'
            ' {"question": "When was it first climbed?", "answer": "1911"}]}'
        ],
        "Ondel": [
            'Sure. [{"question": "Where does the Ondel end?", "answer": "Lake Mira"}, '
            '{"question": "How long is it?", "answer": "300 km"}]'
        ],
    }
    asked: dict[str, list[str]] = {name: [] for name in replies}

    def reply(user: str) -> tuple[int, str]:
        (name,) = [n for n in replies if n in user]  # the unit the prompt quotes
        asked[name].append(user)
        return 200, replies[name][len(asked[name]) - 1]

    with OpenAIHTTP(reply) as server:
        backend = OpenAIBackend("m", base_url=server.url, max_retries=0)
        result = synthesize(units, config, backend, cache=tmp_path / "cache.sqlite")
        write_outputs(result, tmp_path / "out")
        assert server.requests == 4  # a request per unit, then zorblax's second round

    qa = read_records("qa", tmp_path / "out" / "qa.jsonl")
    assert [(r.question, r.answer) for r in qa][:2] == [
        ("[Paper ID: zorblax] Who built the Zorblax reactor?", "Ada"),
        ("[Paper ID: kelvar] How high is Mount Kelvar?", "4,210 m"),
    ]
    assert len(qa) == 5 and len(read_records("text", tmp_path / "out" / "qa.jsonl")) == 5
    assert "write 2 question-answer pairs" in asked["Zorblax"][0]
    assert "write 1 question-answer pairs" in asked["Zorblax"][1]  # only the missing one
    z = result.report["per_unit"]["zorblax"]["qa"]
    assert (z["produced"], z["short"], z["invalid_items"], z["requests"]) == (1, 1, 1, 2)
    assert z["errors"] == {"no JSON list in the reply": 1}
    mix = read_records("text", tmp_path / "out" / "qa_orig.jsonl")
    assert len(mix) == 8 and mix[1].text == UNITS[0]["text"]  # 2 qa + 1 original per unit


def test_a_killed_run_resumes_and_writes_what_an_uninterrupted_run_writes(units_file, tmp_path):
    args = [
        *("--formats", "summary", "--count", "summary=6", "--temperature", "1", "--top-p", "1"),
        *("--max-tokens", "8", "--batch-size", "1", "--max-attempts", "1"),
        *("--llm-backend", "local", "--llm-model", "tiny-llama", "--no-progress"),
    ]
    # The uninterrupted reference (in process; it also compiles what the subprocess needs).
    ref, _ = run_synth(
        units_file,
        out=tmp_path / "ref",
        formats="summary",
        counts=["summary=6"],
        overrides={"temperature": 1.0, "top_p": 1.0, "max_tokens": 8},
        llm={"backend": "local", "model": "tiny-llama"},
        batch_size=1,
        max_attempts=1,
        progress=False,
    )
    out = tmp_path / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "jaxlora.cli", "synth", str(units_file), "--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    db, done = out / "cache.sqlite", 0
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        done = _rows(db)
        if done >= 3:
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    done = _rows(db)
    assert 3 <= done < 18, "the run must be interrupted midway"
    assert not (out / "summary.jsonl").exists()  # nothing half-written

    from jaxlora.cli import main

    assert main(["synth", str(units_file), "--out", str(out), *args]) == 0
    report = json.loads((out / "synth_report.json").read_text())
    assert report["cache"]["hits"] == done and report["cache"]["misses"] == 18 - done
    assert files(out) == files(ref)


def _rows(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])
    except sqlite3.Error:  # created but the table not yet
        return 0


def test_synth_over_http_to_jaxlora_serve_equals_the_local_backend(local, units_file, tmp_path):
    """A YAML config with llm: (openai, base_url of a real `jaxlora serve`) and synth:
    sections; the server's model is the local one and seeds travel per item, so the files
    are the ones the in-process backend writes."""
    from jaxlora.cli import main
    from tests.llm_servers import Server

    section = {**SECTION, "units": str(units_file), "out": str(tmp_path / "http")}
    server = Server(["tiny-llama"])
    try:
        llm = {"backend": "openai", "model": "tiny-llama", "base_url": server.url}
        config = tmp_path / "synth.yaml"
        config.write_text(json.dumps({"llm": llm, "synth": section}))  # JSON is YAML
        # 3, incomplete: the random tiny model's QA replies are never JSON (SECTION's qa)
        assert main(["synth", str(config), "--no-progress"]) == 3
        report = json.loads((tmp_path / "http" / "synth_report.json").read_text())
        assert report["backend"].startswith("openai:") and report["cache"]["hits"] == 0
        assert report["short"] == report["formats"]["qa"]["short"] + report["mixes"]["mix"]["short"]
        assert main(["synth", str(config), "--no-progress"]) == 3  # all from the cache
        again = json.loads((tmp_path / "http" / "synth_report.json").read_text())
        assert again["cache"]["misses"] == 0
    finally:
        assert server.stop() == 0
    local_run = synthesize(read_units(units_file), SynthConfig.from_dict(SECTION), local)
    write_outputs(local_run, tmp_path / "local")
    assert files(tmp_path / "http") == files(tmp_path / "local")
    assert len(read_records("text", tmp_path / "http" / "summary.jsonl")) > 0


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--formats", "qa"], "no output directory"),
        (["--formats", "quiz", "--out", "O"], "not a preset"),
        (["--formats", "qa", "--count", "summary=3", "--out", "O"], "--count 'summary=3'"),
        (["--formats", "qa", "--count", "qa=x", "--out", "O"], "not an integer"),
        (["--formats", "qa", "--mix", "qa:1", "--out", "O"], "FORMAT=PROPORTION"),
        (["--formats", "qa", "--out", "O", "--llm-backend", "local"], "llm.model: required"),
        (["--formats", "qa", "--out", "O"], "no LLM backend"),
        (["--formats", "qa", "--top-p", "2", "--out", "O"], "--top-p"),
    ],
)
def test_bad_synth_commands_are_one_line_errors(units_file, tmp_path, argv, needle):
    from tests.test_cli import assert_refused, run_cli

    argv = [str(tmp_path / "out") if a == "O" else a for a in argv]
    code, err = run_cli(["synth", str(units_file), *argv])
    assert_refused(code, err)
    assert needle in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# exit status: 0 only when everything asked for was written (or --allow-short covers it), 3
# ("incomplete") after writing what there is, 2 at once for a server that is not there


def _synth_http(units_file, out: Path, url: str, *extra: str) -> tuple[int, str, float]:
    from tests.openai_http import http_llm_args
    from tests.test_cli import run_cli

    t0 = time.monotonic()
    argv = ["synth", str(units_file), "--out", str(out), *http_llm_args(url), *extra]
    code, err = run_cli(argv)
    return code, err, time.monotonic() - t0


def test_synth_that_produced_everything_exits_0(units_file, tmp_path):
    from tests.openai_http import OpenAIHTTP

    with OpenAIHTTP(lambda user: (200, "A short summary.")) as server:
        code, err, _ = _synth_http(units_file, tmp_path / "out", server.url, "--formats", "summary")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "synth_report.json").read_text())
    assert report["short"] == 0 and report["requested"] == 5 * len(UNITS)  # 5 summaries a unit
    assert server.requests == 5 * len(UNITS)


def test_the_cache_answers_what_was_asked_before_and_only_that(units_file, tmp_path):
    """Runs against one server that counts requests: the same run again asks nothing; a change
    to anything that determines a generation (a sampling parameter, the seed, the model, the
    template, a unit's text) asks again, for the items it changes only."""
    from tests.openai_http import OpenAIHTTP

    n = 2 * len(UNITS)  # --count summary=2
    edited = tmp_path / "edited.jsonl"
    edited.write_text(units_file.read_text().replace("built in 1987", "built in 1988"))
    template = tmp_path / "summary.txt"
    template.write_text("Summarise this in one line:\n{text}\n")
    with OpenAIHTTP(lambda user: (200, "A short summary.")) as server:

        def asked(*extra: str, units: Path = units_file) -> int:
            before = server.requests
            code, err, _ = _synth_http(
                units, tmp_path / "out", server.url, "--formats", "summary", "--count",
                "summary=2", *extra,
            )  # fmt: skip
            assert code == 0, err
            return server.requests - before

        assert asked() == n
        assert asked() == 0  # every request from the cache
        assert asked("--temperature", "0.7") == n
        assert asked("--temperature", "0.7") == 0
        assert asked("--top-p", "0.5") == n
        assert asked("--max-tokens", "33") == n
        assert asked("--seed", "5") == n
        assert asked("--llm-model", "another") == n  # the last --llm-model wins
        assert asked("--template", f"summary={template}") == n
        assert asked(units=edited) == 2  # only the edited unit's two summaries
        assert asked() == 0  # the first run's answers are all still there
    assert len(read_records("text", tmp_path / "out" / "summary.jsonl")) == n


def test_transient_errors_are_retried_then_asked_again_in_the_next_round(units_file, tmp_path):
    """A server that answers one unit's requests 429, then 500, then 200: the backend retries
    the 429, gives up after its one retry (a failure counted for that unit), and synth's second
    round asks again and gets the summary; the other units are asked once."""
    from jaxlora.llm.backends import OpenAIBackend
    from tests.openai_http import OpenAIHTTP

    statuses = iter([(429, "slow down"), (500, "overloaded"), (200, "Mount Kelvar, 4,210 m.")])

    def reply(user: str) -> tuple[int, str]:
        return next(statuses) if "Kelvar" in user else (200, "A short summary.")

    config = SynthConfig.from_dict({"formats": {"summary": {"count": 1}}, "max_attempts": 2})
    with OpenAIHTTP(reply) as server:
        # backoff 10 ms: the test waits for no schedule, only for the order of the answers
        backend = OpenAIBackend("m", base_url=server.url, max_retries=1, backoff_s=0.01)
        result = synthesize(read_units(units_file), config, backend)
        assert server.requests == 2 + 3  # the two other units once, kelvar three times
    summary = result.report["formats"]["summary"]
    assert (summary["requested"], summary["produced"], summary["short"]) == (3, 3, 0)
    kelvar = result.report["per_unit"]["kelvar"]["summary"]
    assert kelvar["requests"] == 2  # synth's two rounds; the backend's retry is inside the first
    assert kelvar["errors"] == {"request failed: HTTP 500: overloaded (after 2 attempts)": 1}
    write_outputs(result, tmp_path / "out")
    texts = [r.text for r in read_records("text", tmp_path / "out" / "summary.jsonl")]
    assert "Mount Kelvar, 4,210 m." in texts and len(texts) == 3


def test_a_400_is_never_asked_again_and_the_shortfall_exits_3(units_file, tmp_path):
    """A prompt the server refuses (400) cannot succeed: one request per item, no retries, no
    second round; the files and the report are written, the status says incomplete."""
    from tests.openai_http import OpenAIHTTP

    refuse = lambda user: (400, "prompt too long: 9000 tokens > 4096")  # noqa: E731
    with OpenAIHTTP(refuse) as server:
        code, err, _ = _synth_http(
            units_file, tmp_path / "out", server.url, "--formats", "rewrite", "--max-attempts", "3"
        )
        assert server.requests == len(UNITS)  # the first round's only; 3 rounds allowed
    assert code == 3, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "incomplete: 3 of 3 requested items" in lines[0], err
    report = json.loads((tmp_path / "out" / "synth_report.json").read_text())
    assert report["formats"]["rewrite"]["errors"] == {
        "request failed: HTTP 400: prompt too long: 9000 tokens > 4096": 3
    }
    assert (tmp_path / "out" / "rewrite.jsonl").read_text() == ""
    # the shortfall accepted: the same run exits 0
    with OpenAIHTTP(refuse) as server:
        code, err, _ = _synth_http(
            units_file, tmp_path / "again", server.url, "--formats", "rewrite", "--allow-short", "1"
        )
    assert code == 0, err


def test_a_refused_connection_stops_synth_at_once_with_one_line(units_file, tmp_path):
    from tests.runs import free_port
    from tests.test_cli import assert_refused

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    code, err, seconds = _synth_http(units_file, tmp_path / "out", url, "--formats", "qa,summary")
    assert_refused(code, err)
    assert "connection refused" in err and url in err
    assert seconds < 10  # not 5 retries x 3 rounds of backoff per request
    assert not (tmp_path / "out").exists()  # no report, and no empty cache either


def test_one_network_error_on_every_first_request_stops_synth_with_one_line(units_file, tmp_path):
    """A server that hangs up on every connection: each first request fails the same way and
    none succeeds, so the run stops at once instead of retrying (4 retries x 3 rounds)."""
    from tests.openai_http import HangingUp
    from tests.test_cli import assert_refused

    with HangingUp() as server:
        code, err, seconds = _synth_http(
            units_file, tmp_path / "out", server.url, "--formats", "qa"
        )
    assert_refused(code, err)
    assert f"every request to {server.url} failed: APIConnectionError" in err
    assert seconds < 10  # not 4 retries x 3 rounds of backoff (1 s doubling) per request
    assert not (tmp_path / "out").exists()
