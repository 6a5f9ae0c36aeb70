"""The command line as a user meets it: a declared dependency for every import, and any bad
input -- a config mutated at random, an odd flag value -- either runs or stops with one line on
stderr, exit status 2, and the file system as it was."""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib.metadata
import io
import re
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxlora.cli import main
from jaxlora.config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]


def _declared_distributions() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}


def test_every_import_of_the_package_is_a_declared_runtime_dependency():
    """Each third-party module that jaxlora/ imports belongs to a distribution listed in
    [project].dependencies (a module that arrives only through the test extra breaks the main
    job on a fresh install; CI also runs the main job without the test extra)."""
    providers = importlib.metadata.packages_distributions()
    declared = _declared_distributions()
    missing = {}
    for path in (ROOT / "jaxlora").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "jaxlora":
                    continue
                dists = {d.lower().replace("_", "-") for d in providers.get(top, [top])}
                if not dists & declared:
                    missing[top] = str(path.relative_to(ROOT))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


# ---------------------------------------------------------------------------------------------
# one line, exit 2, nothing written


def run_cli(argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of `jaxlora ARGV` in this process; argparse's exits included."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def assert_refused(code: int, err: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("jaxlora") and ": error: " in lines[0], err
    assert "Traceback" not in err


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# A valid one-adapter job that trains in about a second once its program is compiled.
VALID = {
    "model": {"path": "tiny-llama"},
    "lora": {"rank": 2, "dropout": 0.0},
    "data": {"dataset": "phonebook", "size_tokens": 40, "max_length": 64},
    "training": {"steps": 2, "batch_size": 2, "log_every": 1},
    "mesh": {"adapter": -1},
    "checkpoint": {"every_steps": 2, "keep": 1},
}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (
            ["train", "{cfg}", "--out", "{out}", "--cpu-devices", "-2"],
            "--cpu-devices: must be >= 0",
        ),
        (["train", "{cfg}", "--out", "{out}", "--cpu-devices", "two"], "expected an integer"),
        (["train", "{cfg}", "--out", "{out}", "--num-processes", "0"], "must be >= 1"),
        (["train", "{cfg}", "--out", "{out}", "--process-id", "-1"], "must be >= 0"),
        (["train", "{cfg}"], "the following arguments are required: --out"),
        (["train", "{cfg}", "--out", "{out}", "--coordinator", "h:1"], "needs --num-processes"),
        (
            [
                "train",
                "{cfg}",
                "--out",
                "{out}",
                "--coordinator",
                "h:1",
                "--num-processes",
                "2",
                "--process-id",
                "2",
            ],
            "out of range",
        ),
        (["plan", "{cfg}", "--devices", "0"], "--devices: must be >= 1"),
        (["plan", "{cfg}", "--devices", "8", "--mfu", "1.5"], "must be in (0, 1]"),
        (["plan", "{cfg}", "--devices", "8", "--device-memory", "-80"], "must be a finite number"),
        (["report", "{out}", "--tau", "nan"], "must be a finite number"),
        (["trian", "{cfg}"], "invalid choice: 'trian'"),
        (["train", "{empty}", "--out", "{out}"], "the config is empty"),
    ],
)
def test_bad_flags_and_files_are_one_line(tmp_path, argv, needle):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(VALID))
    (tmp_path / "empty.yaml").write_text("# to be written\n")
    names = {"cfg": cfg, "out": tmp_path / "run", "empty": tmp_path / "empty.yaml"}
    before = tree(tmp_path)
    code, err = run_cli([a.format(**names) for a in argv])
    assert_refused(code, err)
    assert needle in err
    assert tree(tmp_path) == before


def test_a_bad_environment_variable_is_one_line(tmp_path, monkeypatch):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(VALID))
    monkeypatch.setenv("JAXLORA_CPU_DEVICES", "-3")
    code, err = run_cli(["train", str(cfg), "--out", str(tmp_path / "run")])
    assert_refused(code, err)
    assert "JAXLORA_CPU_DEVICES: must be >= 0" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# property: mutated configs and flags

FIELDS = [(s, f) for s, cls in SECTIONS.items() for f in cls.yaml_fields()]
# VALID evaluated after training, with few new tokens: a successful run writes results.csv,
# predictions.jsonl and report.md, which the property then checks.
EVALUATED = {**VALID, "eval": {"max_new_tokens": 4, "batch_size": 4}}
# Small values only: a mutation that happens to be valid must still be a short run (no
# steps=10**6), and the train step's shapes come from few values, so compiled programs repeat.
ODD_VALUES = st.sampled_from(
    [None, -1, 0, 1, 3, 2.5, 0.5, 1e-3, "", "abc", "-1", True, [], [1], {}, {"x": 1}, float("nan")]
)


def _misspell(word: str, i: int) -> str:
    i %= len(word)
    return word[:i] + word[i + 1 :] if len(word) > 1 else word + "x"


@st.composite
def mutations(draw) -> tuple[dict, list[str]]:
    raw = copy.deepcopy(EVALUATED)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["drop", "retype", "misspell", "section", "set", "flag"]))
        section, field = draw(st.sampled_from(FIELDS))
        if kind == "drop":
            raw.get(section, {}).pop(field, None)
        elif kind == "retype":
            raw.setdefault(section, {})[field] = draw(ODD_VALUES)
        elif kind == "misspell":
            value = raw.get(section, {}).pop(field, 1)
            raw.setdefault(section, {})[_misspell(field, draw(st.integers(0, 20)))] = value
        elif kind == "section":
            name = draw(st.sampled_from([*SECTIONS, "sweep"]))
            raw[_misspell(name, draw(st.integers(0, 20)))] = raw.pop(name, {})
        elif kind == "set":
            value = yaml.safe_dump(draw(ODD_VALUES), default_flow_style=True).strip()
            value = value.removesuffix("\n...").removesuffix("...").strip()
            raw.setdefault("__set__", []).append(f"{section}.{field}={value}")
        else:
            flag = draw(st.sampled_from(["--cpu-devices", "--num-processes", "--process-id"]))
            value = draw(st.sampled_from(["-2", "0", "x", "1.5", "", "8"]))
            raw.setdefault("__flags__", []).extend([flag, value])
    sets = [a for s in raw.pop("__set__", []) for a in ("--set", s)]
    return raw, sets + raw.pop("__flags__", [])


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same examples on every machine: CI never fails at random
    database=None,  # and writes no example database into the checkout
    suppress_health_check=[HealthCheck.too_slow],
)
@given(mutations())
def test_a_mutated_config_runs_or_stops_with_one_line(mutation):
    raw, extra = mutation
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = root / "run.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        before = tree(root)
        code, err = run_cli(
            ["train", str(cfg), "--out", str(root / "run"), "--no-progress", *extra]
        )
        if code == 0:
            _check_outputs(root / "run")
            assert {k: v for k, v in tree(root).items() if not k.startswith("run/")} == before
        else:
            assert_refused(code, err)
            assert tree(root) == before


def _check_outputs(run: Path) -> None:
    """A run that succeeded trained and evaluated every adapter it names: one results row per
    adapter of train_summary.csv, with finite metrics in range, its predictions and report."""
    import csv
    import json
    import math

    with (run / "train_summary.csv").open(newline="") as f:
        trained = list(csv.DictReader(f))
    with (run / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert trained and [r["name"] for r in rows] == [r["name"] for r in trained]
    for row in rows:
        assert row["rank"] and int(row["n_facts"]) > 0 and int(row["trainable_params"]) > 0
        assert 0 <= float(row["accuracy"]) <= 1  # a NaN fails both comparisons
        for column in ("group_eval_seconds", "group_compile_seconds"):
            assert math.isfinite(float(row[column])) and float(row[column]) >= 0
    predictions = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == sum(int(r["n_facts"]) for r in rows)
    assert all(isinstance(p["prediction"], str) for p in predictions)
    report = (run / "report.md").read_text()
    assert all(f"| {r['rank']} |" in report for r in rows)


def test_verbose_train_prints_the_auto_choices(tmp_path):
    """`jaxlora train` prints only warnings; `--verbose` adds what the job chose for its
    `auto` settings, one `jaxlora: key=auto: ...` line each."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(VALID))
    argv = ["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress", "--overwrite"]
    code, quiet = run_cli(argv)
    assert code == 0 and "=auto:" not in quiet, quiet
    code, verbose = run_cli([*argv, "--verbose"])
    assert code == 0, verbose
    lines = verbose.splitlines()
    for key in ("training.layout", "training.adapters_per_pass", "training.packing"):
        assert any(line.startswith(f"jaxlora: {key}=auto: ") for line in lines), verbose
