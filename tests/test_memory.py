"""The memory evaluator: methods parsed, routed, merged, mixed, with ICL/RAG contexts, in batch."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.config import MemorySection, load_config
from jaxlora.generate import DecodeSpec, eos_and_pad
from jaxlora.job import Job
from jaxlora.memory import compose
from jaxlora.memory.compose import MethodError, parse_method
from jaxlora.memory.evaluate import MemoryEvaluator, evaluate_memory
from jaxlora.memory.library import load_libraries
from tests.runs import jaxlora_cmd, optimised_env, train_refuses

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def library_run(memory_run):
    """The shared 4-sector library (tests/conftest.py), its job and its one library."""
    job = Job(load_config(memory_run / "config.yaml"), jax.devices()[:1])
    (library,) = load_libraries(job, memory_run)
    return job, library, memory_run


def _evaluator(library_run, **settings) -> MemoryEvaluator:
    job, library, run_dir = library_run
    section = MemorySection(**{"max_new_tokens": 12, **settings})
    return MemoryEvaluator(job, section, library, run_dir)


def _predictions(ev: MemoryEvaluator, methods: list[str]) -> dict[str, list[str]]:
    _, predictions = ev.run([parse_method(m) for m in methods], progress=False)
    out: dict[str, list[str]] = {}
    for p in predictions:
        out.setdefault(p["method"], []).append(p["prediction"])
    return out


def test_library_has_one_adapter_per_unit(library_run):
    _, library, run_dir = library_run
    assert library.units == ("0", "1", "2", "3") and len(library.stack) == 4
    rows = [json.loads(line) for line in (run_dir / "units.jsonl").read_text().splitlines()]
    assert [r["adapter"] for r in rows] == ["unit0", "unit1", "unit2", "unit3"]
    # Every question of a unit is one of its rows: the name is in the unit's text.
    for r in rows:
        assert r["questions"] and all(q["answer"] in r["text"] for q in r["questions"])


def test_batched_methods_equal_one_question_at_a_time(library_run):
    methods = ["oracle", "bm25@2/ties", "bm25@2/cat", "bm25@2/mixture", "base+rag@2", "oracle+icl"]
    batched = _predictions(_evaluator(library_run, batch_size=8), methods)
    alone = _predictions(_evaluator(library_run, batch_size=1), methods)
    assert batched == alone
    # The methods decode differently (a test of equality between identical outputs would pass
    # for a broken combiner too).
    assert len({tuple(v) for v in batched.values()}) >= 4


def test_icl_prefills_the_shared_book_once_and_answers_as_each_question_alone(
    library_run, monkeypatch
):
    """A pass whose prompts share a long start prefills it once and copies its cache to every
    row (`_generate_base`'s prefix): the answers equal each question decoded alone, in full."""
    from jaxlora.memory import evaluate

    monkeypatch.setattr(evaluate, "SHARED_PREFIX_MIN", 16)  # the test book is ~100 tokens
    ev = _evaluator(library_run, batch_size=8)
    prompts = ev.prompts(ev.contexts(parse_method("base+icl"))[0])
    assert evaluate.shared_start(prompts[:8]) >= 16  # the batched pass takes the prefix path
    batched = _predictions(ev, ["base+icl"])
    alone = _predictions(_evaluator(library_run, batch_size=1), ["base+icl"])
    assert batched == alone


def test_shared_start_leaves_each_prompt_a_token_of_its_own():
    from jaxlora.generate import shared_start

    assert shared_start([(1, 2, 3, 4), (1, 2, 5)]) == 2
    assert shared_start([(1, 2, 3), (1, 2, 3)]) == 2
    assert shared_start([(1, 2), (1, 2, 3, 4)]) == 1
    assert shared_start([(7, 2), (1, 2)]) == 0


def test_mixture_decodes_the_mean_of_the_members_distributions(library_run):
    job, library, _ = library_run
    model = job.model
    ev = _evaluator(library_run)
    prompts = ev.prompts([None] * len(ev.questions))[:3]
    tokens, mask = ev._pack(prompts, 64)
    _, pad = eos_and_pad(model.tokenizer, model.config)
    members = [[0, 2], [1, 3], [3, 0]]
    spec = DecodeSpec(6, (), pad)  # no EOS: six steps each, all compared
    flat = library.stack.select([i for row in members for i in row])
    got = compose.decode_mixture(
        model.graph(flat.placement), model.params, flat.weights, flat.consts, tokens, mask, spec, 2
    )
    # Reference: a full forward of the whole sequence by each member at every step, no cache.
    for q, row in enumerate(members):
        seq, m = np.asarray(tokens[q]), np.asarray(mask[q])
        stack = library.stack.select(row)
        for step in range(6):
            ids = jnp.asarray(np.broadcast_to(seq, (2, 1, len(seq))))
            am = jnp.asarray(np.broadcast_to(m, (2, 1, len(m))))
            logits = model(ids, am, adapters=stack)[:, 0, -1]
            probs = jax.nn.softmax(logits, axis=-1).mean(0)
            want = int(jnp.argmax(probs))
            assert int(got[q, step]) == want, (q, step)
            seq, m = np.append(seq, want), np.append(m, True)


def test_contexts_follow_the_budget(library_run):
    ev = _evaluator(library_run, context_tokens=20)
    icl = parse_method("base+icl")
    with pytest.raises(MethodError, match=r"over memory.context_tokens=20"):
        ev.contexts(icl)
    full = "\n\n".join(ev.lib.texts)
    for side in ("head", "tail"):
        ev = _evaluator(library_run, context_tokens=20, truncate=side)
        contexts, cut = ev.contexts(icl)
        assert cut == len(ev.questions)  # every truncation is counted
        n = len(ev.tok(contexts[0], add_special_tokens=False)["input_ids"])
        assert 18 <= n <= 20  # re-tokenizing a cut string may merge a token or two at the cut
        assert full.startswith(contexts[0]) if side == "head" else full.endswith(contexts[0])


def test_rag_context_holds_the_routed_units(library_run):
    ev = _evaluator(library_run)
    contexts, cut = ev.contexts(parse_method("base+rag@2"))
    route = ev.route("bm25", 2)
    assert cut == 0
    for ctx, row in zip(contexts, route.indices, strict=True):
        assert ctx == "\n\n".join(ev.lib.texts[i] for i in row)
    prompt = ev.tok.decode(ev.prompts(contexts)[0])
    assert "Based on the context below" in prompt and ev.questions[0].record.question in prompt


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bm25@3", "needs a combiner"),
        ("oracle@2/ties", "use oracle@1"),
        ("bm25@2/tie", "unknown combiner 'tie'"),
        ("lexical", "unknown router 'lexical'"),
        ("base+icl@2", "only rag takes a number"),
        ("base+memo", "unknown context 'memo'"),
    ],
)
def test_bad_methods(text, message):
    with pytest.raises(MethodError, match=message) as e:
        parse_method(text)
    assert "\n" not in str(e.value)


def test_template_must_have_both_slots():
    assert compose.template_text("paperqa").startswith("Context: {context}")
    with pytest.raises(MethodError, match=r"missing \{question\}"):
        compose.template_text("Context: {context}")


def _memory_cli(run_dir, *sets):
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run(
        jaxlora_cmd("memory", run_dir, "--no-progress", *args), capture_output=True, text=True
    )


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["memory.methods=[bm25@9/ties]"], "k=9 is larger than the library (4 units)"),
        (["memory.methods=[bm25@2/tie]"], "unknown combiner 'tie'"),
        (["memory.methods=[base+icl]", "memory.context_tokens=10"], "set memory.truncate"),
    ],
)
def test_cli_bad_input_writes_nothing(library_run, sets, message):
    _, _, run_dir = library_run
    before = sorted(p.name for p in run_dir.iterdir())
    proc = _memory_cli(run_dir, *sets)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_cli_needs_a_library(evaluated_run):
    _, run_dir = evaluated_run
    proc = _memory_cli(run_dir)
    assert proc.returncode == 2 and "data.units" in proc.stderr


def test_training_evaluates_the_memory_and_writes_its_report(memory_run):
    rows = list(csv.DictReader((memory_run / "memory_results.csv").open()))
    assert [r["method"] for r in rows] == ["base", "bm25", "bm25@2/ties"]
    header = list(rows[0])
    for column in ("method", "router", "k", "combiner", "context", "accuracy", "truncated"):
        assert column in header
    predictions = (memory_run / "memory_predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 3 * int(rows[0]["n_questions"])
    assert (memory_run / "memory_report.md").exists()
    for plot in ("memory_by_method", "memory_routing", "memory_vs_k"):
        assert (memory_run / "plots" / f"{plot}.png").exists()
    # BM25 with word pairs (the default) finds each question's own sector: the full name is in
    # its key.
    assert float(rows[1]["routing_top1"]) >= 0.95


def test_evaluate_memory_again_with_other_methods(library_run, tmp_path):
    job, _, run_dir = library_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    section = MemorySection(methods=("oracle", "bm25@2/linear"), max_new_tokens=12)
    rows = evaluate_memory(job, copy, section, progress=False)
    assert [r["method"] for r in rows] == ["oracle", "bm25@2/linear"]
    assert "routing_top1" not in rows[0]  # the oracle is the reference, not a router to score
    written = list(csv.DictReader((copy / "memory_results.csv").open()))
    # merged into training's results (tests/test_memory_results.py)
    assert [r["method"] for r in written] == [
        "base",
        "bm25",
        "bm25@2/ties",
        *[r["method"] for r in rows],
    ]


def test_served_memory_answers_like_the_routed_adapter(library_run):
    """`jaxlora serve RUN --memory bm25@2/ties+rag`: the openai client's completion equals local
    greedy generation with the merge of the question's BM25 top 2 and their text before it."""
    import openai

    from jaxlora.generate import generate_stack
    from jaxlora.memory import merge
    from tests.llm_servers import Server

    job, library, run_dir = library_run
    server = Server([str(run_dir), "--memory", "bm25@2/ties+rag"])
    try:
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)
        assert "memory" in [m.id for m in client.models.list().data]
        ev = _evaluator(library_run)
        question = ev.questions[5].record.question
        got = (
            client.completions.create(model="memory", prompt=question, max_tokens=8, temperature=0)
            .choices[0]
            .text
        )
    finally:
        assert server.stop() == 0
    route = ev.router("bm25").route([question], 2).indices
    merged = merge(job.model, library.stack, route.tolist(), [[1.0, 1.0]], "ties", density=0.5)
    template = compose.TEMPLATES["phonebook"]  # the dataset's preset, up to the question
    units = "\n\n".join(library.texts[i] for i in route[0])
    context = template[: template.index("{question}")].replace("{context}", units)
    ids = np.asarray([job.model.tokenizer(context + question)["input_ids"]])
    out = generate_stack(job.model, merged, ids[None], max_new_tokens=8)[0, 0].tolist()
    eos, _ = eos_and_pad(job.model.tokenizer, job.model.config)
    kept = list(itertools.takewhile(lambda t: t not in eos, out))
    assert got == job.model.tokenizer.decode(kept, skip_special_tokens=True)


def test_memory_quickstart_recalls_with_the_oracle_and_bm25_not_the_base(tmp_path):
    """The shipped memory quickstart, as the README runs it (its methods cut to three to save
    time): the oracle and BM25 top-1 recall far more than the base model, and BM25 finds each
    question's own sector."""
    out = tmp_path / "run"
    proc = subprocess.run(
        jaxlora_cmd(
            "train",
            REPO / "configs" / "memory_quickstart.yaml",
            "--out",
            out,
            "--no-progress",
            "--set",
            "memory.methods=[base,oracle,bm25]",
        ),
        capture_output=True,
        text=True,
        env=optimised_env(),  # 500 training steps: running, not compiling, is its time
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["method"]: r for r in csv.DictReader((out / "memory_results.csv").open())}
    base, oracle, bm25 = (float(rows[m]["accuracy"]) for m in ("base", "oracle", "bm25"))
    assert oracle >= 0.8 and bm25 >= 0.8 and base <= 0.1, rows
    assert float(rows["bm25"]["routing_top1"]) >= 0.95


def test_oracle_rag_with_more_units_takes_them_from_the_rag_router(library_run):
    ev = _evaluator(library_run, rag_router="bm25")
    contexts, _ = ev.contexts(parse_method("oracle+rag@2"))
    route = ev.route("bm25", 2)
    assert contexts[0] == "\n\n".join(ev.lib.texts[i] for i in route.indices[0])
    own, _ = ev.contexts(parse_method("oracle+rag"))  # k = 1: the question's own unit
    assert own[0] == ev.lib.texts[ev.questions[0].unit]


@pytest.mark.parametrize(
    ("memory", "message"),
    [
        ({"methods": ["bm25"]}, "memory: needs a library of units"),
        ({"template": "Q: {question}"}, "missing {context}"),
        ({"unit_format": "Paper {unit}"}, "has no {text}"),
    ],
)
def test_bad_memory_sections_fail_when_the_config_is_read(memory, message):
    from jaxlora.config import parse_config
    from jaxlora.errors import ConfigError

    data = {"units": "sectors", "unit_count": 2} if "methods" not in memory else {}
    with pytest.raises(ConfigError) as e:
        parse_config({"data": data, "memory": memory})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_memory_larger_than_the_library_fails_before_training(tmp_path):
    config = {
        "data": {"size_tokens": 200, "units": "sectors", "unit_count": 2, "max_length": 64},
        "training": {"steps": 2},
        "mesh": {"adapter": 1},
        "memory": {"methods": ["bm25@3/ties"]},
    }
    assert "k=3 is larger than the library (2 units)" in train_refuses(tmp_path, config)


def test_a_judge_that_cannot_fit_its_rubric_fails_before_training(tmp_path):
    """memory.judge with the tiny model as a local judge (512 positions for a ~650-token rubric
    and 256 reply tokens): refused in one line before a step is trained or a file written."""
    config = {
        "data": {"size_tokens": 200, "units": "sectors", "unit_count": 2, "max_length": 64},
        "training": {"steps": 2},
        "mesh": {"adapter": 1},
        "memory": {"methods": ["oracle"], "judge": True},
        "llm": {"backend": "local", "model": "tiny-llama"},
    }
    err = train_refuses(tmp_path, config).strip().splitlines()
    assert len(err) == 1 and "the judge's rubric cannot fit its model 'tiny-llama'" in err[0], err


def test_a_judge_whose_rubric_cannot_fit_its_model_is_refused_before_evaluating(
    library_run, tmp_path
):
    """memory.judge with the tiny model as a local judge: the rubric (~650 tokens) plus its
    256 reply tokens cannot fit 512 positions, so no prediction could ever be judged. One line,
    exit 2, before any method is evaluated or anything written."""
    _, _, run_dir = library_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = {str(p.relative_to(copy)): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    sets = ["memory.methods=[oracle]", "memory.judge=true", "llm.backend=local"]
    proc = _memory_cli(copy, *sets, "llm.model=tiny-llama")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "the judge's rubric cannot fit its model 'tiny-llama'" in lines[0]
    assert "max_tokens is 256" in lines[0] and "512 positions" in lines[0]
    after = {str(p.relative_to(copy)): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert after == before


def test_the_judge_as_a_memory_metric_over_http_scores_and_counts_failures(library_run, tmp_path):
    """memory.judge against a real HTTP judge on 127.0.0.1 that scores an answer by the parts
    of the gold number it holds (3 each), and replies prose (a judge failure) to a blank one:
    each method's mean over its scored answers, failures counted and excluded, never 0."""
    from tests.openai_http import OpenAIHTTP, rubric_fields

    def score(gold: str, candidate: str) -> int:
        return 3 * sum(part in candidate for part in gold.split("-"))

    def reply(user: str) -> tuple[int, str]:
        _, gold, candidate = rubric_fields(user)
        if not candidate:
            return 200, "I cannot judge an empty answer."
        return 200, json.dumps({"score": score(gold, candidate), "rationale": "parts found"})

    _, _, run_dir = library_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    with OpenAIHTTP(reply) as server:
        llm = ["llm.backend=openai", "llm.model=m", f"llm.base_url={server.url}"]
        proc = _memory_cli(copy, "memory.methods=[base,oracle]", "memory.judge=true", *llm)
        assert proc.returncode == 0, proc.stderr
    rows = {r["method"]: r for r in csv.DictReader((copy / "memory_results.csv").open())}
    predictions = [
        json.loads(x) for x in (copy / "memory_predictions.jsonl").read_text().splitlines()
    ]
    judged = [p for p in predictions if p["method"] in ("base", "oracle")]
    assert (
        server.requests
        == len(judged)
        == sum(int(rows[m]["n_questions"]) for m in ("base", "oracle"))
    )
    for method in ("base", "oracle"):
        mine = [p for p in judged if p["method"] == method]
        failed = [p for p in mine if not p["prediction"].strip()]
        scored = [score(p["answer"], p["prediction"]) for p in mine if p not in failed]
        assert [p["judge"] for p in mine if p not in failed] == scored
        assert all(p["judge"] is None for p in failed)
        row = rows[method]
        assert int(row["judge_failed"]) == len(failed)
        # means of small integers read back from the CSV: rounding only
        assert float(row["judge_failure_rate"]) == pytest.approx(len(failed) / len(mine))
        if scored:
            assert float(row["judge"]) == pytest.approx(sum(scored) / len(scored))
        else:  # nothing scored: blank, never 0
            assert row["judge"] == ""
    # Both outcomes occur: answers scored (the oracle's numbers) and answers failed (blanks).
    assert any(p["judge"] is None for p in judged) and any(p["judge"] for p in judged)


def test_the_judge_needs_an_llm_section():
    from jaxlora.config import parse_config
    from jaxlora.errors import ConfigError

    with pytest.raises(ConfigError, match=r"eval\.judge: the judge needs an llm: section"):
        parse_config({"eval": {"judge": True}})


# ---------------------------------------------------------------------------------------------
# inputs validated before any work: one line naming the file, the line and the field, exit 2,
# and every file of the run byte-identical afterwards


def _run_copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def _memory_main(run_dir: Path, *sets: str) -> tuple[int, list[str]]:
    """`jaxlora memory RUN --set ...` as a user runs it (one CPU device, as the run trained)."""
    proc = _memory_cli(run_dir, *sets)
    return proc.returncode, proc.stderr.strip().splitlines()


def _units_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "units.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        # a line cut short (a copy interrupted mid-write)
        (
            lambda lines: [*lines[:2], lines[2][: len(lines[2]) // 2], *lines[3:]],
            "line 3 is not JSON",
        ),
        (lambda lines: [*lines[:1], "[1, 2]", *lines[1:]], "line 2 is not a JSON object"),
        (lambda lines: [*lines[:3], _without(lines[3], "unit")], "line 4: field 'unit' is missing"),
        (lambda lines: [_without(lines[0], "key"), *lines[1:]], "line 1: field 'key' is missing"),
        (
            lambda lines: [*lines[:1], _without(lines[1], "text"), *lines[2:]],
            "line 2: field 'text'",
        ),
        (
            lambda lines: [*lines[:1], _with(lines[1], unit=7), *lines[2:]],
            "line 2: field 'unit' is not text",
        ),
    ],
    ids=["truncated", "not-an-object", "no-unit", "no-key", "no-text", "unit-not-text"],
)
def test_bad_units_jsonl_is_one_line_and_writes_nothing(library_run, tmp_path, damage, message):
    _, _, run_dir = library_run
    copy = _run_copy(run_dir, tmp_path)
    lines = (copy / "units.jsonl").read_text().splitlines()
    (copy / "units.jsonl").write_text("\n".join(damage(lines)) + "\n")
    before = _snapshot(copy)
    status, err = _memory_main(copy, "memory.methods=[oracle]")
    assert status == 2 and len(err) == 1, err
    assert f"{copy / 'units.jsonl'} {message}" in err[0], err
    assert _snapshot(copy) == before


def _without(line: str, field: str) -> str:
    row = json.loads(line)
    del row[field]
    return json.dumps(row)


def _with(line: str, **fields) -> str:
    return json.dumps({**json.loads(line), **fields})


def test_no_methods_is_an_error_that_truncates_nothing(library_run, tmp_path):
    _, _, run_dir = library_run
    copy = _run_copy(run_dir, tmp_path)
    before = _snapshot(copy)
    assert (copy / "memory_results.csv").stat().st_size > 0  # training's results are there
    status, err = _memory_main(copy, "memory.methods=[]")
    assert status == 2 and len(err) == 1 and "memory.methods is empty" in err[0], err
    assert _snapshot(copy) == before


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "q.jsonl",
            '{"question": "a", "answer": "b", "unit": "0"}\n{"question": "c"',
            "line 2 is not JSON",
        ),
        ("q.jsonl", '{"question": "a", "answer": "b"}\n"text"\n', "line 2 is not a JSON object"),
        (
            "q.jsonl",
            '{"question": "a", "answer": "b"}\n\n{"question": "c"}\n',
            "line 3: field 'answer' is missing",
        ),
        ("q.csv", "question,answer,unit\na,b,0\n c ,,1\n", "line 3: field 'answer' is empty"),
        ("q.csv", "question,answer,unit\na,b,9\n", "line 2: unit '9' is not in the library"),
        ("q.csv", "prompt,answer\na,b\n", "line 2: field 'question' is missing"),
        ("missing.csv", None, "memory.questions file not found"),
    ],
    ids=[
        "truncated",
        "not-an-object",
        "no-answer",
        "empty-answer",
        "unknown-unit",
        "no-question",
        "missing",
    ],
)
def test_bad_questions_file_is_one_line_and_writes_nothing(
    library_run, tmp_path, name, content, message
):
    _, _, run_dir = library_run
    copy = _run_copy(run_dir, tmp_path)
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    before = _snapshot(copy)
    status, err = _memory_main(copy, "memory.methods=[oracle]", f"memory.questions={path}")
    assert status == 2 and len(err) == 1 and message in err[0], err
    assert str(path) in err[0]
    assert _snapshot(copy) == before


def test_memory_questions_file_is_evaluated_end_to_end(library_run, tmp_path):
    """memory.questions (here a csv with a unit column) replaces the units' own questions: the
    results count its rows, and every prediction is of its question, with its unit."""
    _, _, run_dir = library_run
    copy = _run_copy(run_dir, tmp_path)
    units = _units_lines(copy)
    asked = [(u["unit"], q) for u in reversed(units) for q in u["questions"][:1]]
    path = tmp_path / "questions.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "answer", "unit"])
        writer.writerows([q["question"], q["answer"], unit] for unit, q in asked)
    status, err = _memory_main(copy, "memory.methods=[oracle,bm25]", f"memory.questions={path}")
    assert status == 0, err
    rows = list(csv.DictReader((copy / "memory_results.csv").open()))
    rows = [r for r in rows if r["questions"] == str(path)]  # merged with training's methods
    assert [r["method"] for r in rows] == ["bm25", "oracle"]  # bm25 replaced in its place
    assert all(int(r["n_questions"]) == len(asked) for r in rows)
    predictions = [
        json.loads(x) for x in (copy / "memory_predictions.jsonl").read_text().splitlines()
    ]
    for method in ("oracle", "bm25"):
        mine = [p for p in predictions if p["method"] == method]
        assert [(p["unit"], p["answer"]) for p in mine] == [(u, q["answer"]) for u, q in asked]
        # the file's question, as the unit trained on it (a phonebook row's continuation)
        assert all(
            q["question"].strip() in p["question"] for p, (_, q) in zip(mine, asked, strict=True)
        )
