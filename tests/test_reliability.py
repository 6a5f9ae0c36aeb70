"""Grids that survive preemption, a diverging cell, a typo and a crash: signals, NaN isolation,
the bad-input matrix, atomic outputs, run locks and determinism."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxlora.cli import main as cli
from jaxlora.config import load_config
from jaxlora.errors import JaxloraError
from jaxlora.fsutil import RunLock
from tests.runs import (
    adapters,
    assert_equal_to_rounding,
    assert_identical,
    jaxlora_cmd,
    rounding_bound,
    run,
    write_config,
)

# 24 steps, a synchronous checkpoint every 4: a signal after step 6 always lands between two.
LONG = {"training.steps": 24, "checkpoint.every_steps": 4, "checkpoint.async": False}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """(config file, run dir) of an uninterrupted run, trained by the CLI in a subprocess."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = write_config(tmp / "long.yaml", **LONG)
    out = tmp / "run"
    subprocess.run(
        jaxlora_cmd("train", cfg, "--out", out, "--no-progress"), check=True, capture_output=True
    )
    return cfg, out


def start_training(cfg: Path, out: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(
            jaxlora_cmd("train", cfg, "--out", out, "--no-progress"),
            stdout=subprocess.DEVNULL,
            stderr=f,
        )


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + 300
    while not condition():
        assert proc.poll() is None, f"training ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def resume(cfg: Path, out: Path) -> None:
    subprocess.run(
        jaxlora_cmd("train", cfg, "--out", out, "--resume", "--no-progress"),
        check=True,
        capture_output=True,
    )


def assert_finished_like(reference_run: Path, out: Path) -> None:
    assert_identical(adapters(reference_run), adapters(out))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, LONG["training.steps"] + 1))


# ---------------------------------------------------------------------------------------------
# preemption


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_0_and_resumes_exactly(reference, tmp_path):
    cfg, ref_run = reference
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    proc = start_training(cfg, out, log)
    wait_for(lambda: logged_steps(out) >= 6, proc, "step 6")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, log.read_text()[-2000:]
    err = log.read_text()
    line = next(ln for ln in err.splitlines() if "checkpoint saved at step" in ln)
    step = int(line.split("checkpoint saved at step ")[1].split(";")[0])
    assert 6 <= step < LONG["training.steps"]
    assert f"resume with: jaxlora train {out / 'config.yaml'} --out {out} --resume" in line
    assert (out / "checkpoints" / str(step)).is_dir() and not (out / "adapters").exists()
    assert not (out / ".lock").exists()
    resume(cfg, out)
    assert_finished_like(ref_run, out)


@pytest.mark.slow
def test_a_second_signal_stops_at_once_and_the_last_checkpoint_survives(reference, tmp_path):
    cfg, ref_run = reference
    for attempt in range(3):  # the second signal must arrive before the graceful stop ends
        out, log = tmp_path / f"run{attempt}", tmp_path / f"stderr{attempt}.txt"
        proc = start_training(cfg, out, log)
        wait_for(lambda out=out: logged_steps(out) >= 6, proc, "step 6")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda log=log: "SIGINT received" in log.read_text(), proc, "the first SIGINT")
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=300)
        if code != 0:
            break
    assert code == 128 + signal.SIGINT, log.read_text()[-2000:]
    assert "stopping now" in log.read_text()
    assert not (out / "adapters").exists()
    resume(cfg, out)
    assert_finished_like(ref_run, out)


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(reference, tmp_path):
    cfg, ref_run = reference
    out = tmp_path / "killed"
    proc = start_training(cfg, out, tmp_path / "stderr.txt")
    wait_for(lambda: logged_steps(out) >= 6, proc, "step 6")
    proc.kill()
    proc.wait()
    assert not (out / "adapters").exists()
    assert (out / "checkpoints" / "4").exists() and not (out / "checkpoints" / "24").exists()
    resume(cfg, out)  # also takes over the lock the killed process left behind
    assert_finished_like(ref_run, out)


def test_an_unreadable_checkpoint_falls_back_to_the_previous_step(reference, tmp_path):
    cfg, ref_run = reference
    out = tmp_path / "run"
    shutil.copytree(ref_run, out, ignore=shutil.ignore_patterns("adapters"))
    last = LONG["training.steps"]
    (out / "checkpoints" / str(last) / "state" / "manifest.ocdbt").write_bytes(b"garbage")
    done = subprocess.run(
        jaxlora_cmd("train", cfg, "--out", out, "--resume", "--no-progress"),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"checkpoint step {last} is unreadable" in done.stderr
    assert f"removing unreadable checkpoint step {last}; training resumes at {last - 4}" in (
        done.stderr
    )
    assert_identical(adapters(ref_run), adapters(out))


# ---------------------------------------------------------------------------------------------
# divergence


def test_a_diverging_adapter_is_frozen_flagged_and_leaves_the_others_unchanged(
    reference, tmp_path, capsys
):
    """lr 1e6 next to the reference's lr 1e-3: the big one turns NaN, the small one is the
    reference adapter (trained alone) to float32 rounding (a stack of two compiles to other
    kernels than a stack of one)."""
    cfg, ref_run = reference
    config = load_config(cfg, ["sweep.training.lr=[1.0e-3, 1.0e6]"])
    out = tmp_path / "run"
    result = run(config, out, progress=True)
    bar = capsys.readouterr().err
    with open(out / "train_summary.csv") as f:
        rows = {r["training.lr"]: r for r in csv.DictReader(f)}
    bad, good = rows["1000000.0"], rows["0.001"]
    assert bad["status"] == "diverged" and 0 <= int(bad["diverged_at_step"]) < 24
    assert good["status"] == "ok" and good["diverged_at_step"] == ""
    assert np.isfinite(float(good["final_loss"]))
    assert "diverged=1" in bar
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["diverged"] == [
        bad["name"]
    ]
    (ref,) = adapters(ref_run).values()
    good_adapter = {"good": adapters(out)[good["name"]]}
    assert_equal_to_rounding(good_adapter, {"good": ref}, rounding_bound(config))
    assert all(np.isfinite(v).all() for v in adapters(out)[bad["name"]].values())
    assert len(result["summary"]) == 2


def test_same_config_same_machine_is_bit_identical(reference, tmp_path):
    """The reference was trained by another process; this one trains in the test process."""
    cfg, ref_run = reference
    run(load_config(cfg), tmp_path / "again")
    assert_identical(adapters(ref_run), adapters(tmp_path / "again"))


# ---------------------------------------------------------------------------------------------
# the bad-input matrix: one line, exit 2, nothing written


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root, with a digest of each file's bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def yaml_case(text: str, *extra: str) -> Callable:
    def setup(tmp: Path, **_) -> list[str]:
        (tmp / "c.yaml").write_text(text)
        return ["train", str(tmp / "c.yaml"), "--out", str(tmp / "run"), *extra]

    return setup


# In-process commands see the test session's 8 CPU devices: the mesh takes them all.
ANY_DEVICES = {"mesh.adapter": -1}


def config_case(*extra: str, **changes) -> Callable:
    def setup(tmp: Path, **_) -> list[str]:
        cfg = write_config(tmp / "c.yaml", **{**ANY_DEVICES, **changes})
        return ["train", str(cfg), "--out", str(tmp / "run"), *extra]

    return setup


QA = "question,answer\nWho wrote Hamlet?,Shakespeare\nWhat is the capital of Peru?,Lima\n"


def data_case(content: str | None, **changes) -> Callable:
    def setup(tmp: Path, **_) -> list[str]:
        if content is not None:
            (tmp / "facts.csv").write_text(content)
        data = {"dataset": "qa", "path": str(tmp / "facts.csv"), "max_length": 64}
        cfg = write_config(tmp / "c.yaml", data={**data, **changes}, **ANY_DEVICES)
        return ["train", str(cfg), "--out", str(tmp / "run")]

    return setup


def model_case(make: Callable[[Path, Callable], Path]) -> Callable:
    def setup(tmp: Path, hf_checkpoint, **_) -> list[str]:
        model = make(tmp, hf_checkpoint)
        cfg = write_config(tmp / "c.yaml", **{"model.path": str(model)}, **ANY_DEVICES)
        return ["train", str(cfg), "--out", str(tmp / "run")]

    return setup


def big_vocab_tokenizer(tmp: Path, hf_checkpoint) -> Path:
    return hf_checkpoint("llama", vocab=256)  # its tokenizer has 512 tokens


def gpt2(tmp: Path, hf_checkpoint) -> Path:
    (tmp / "gpt2").mkdir()
    (tmp / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    return tmp / "gpt2"


def not_a_checkpoint(tmp: Path, hf_checkpoint) -> Path:
    (tmp / "notes").mkdir()
    (tmp / "notes" / "README.txt").write_text("not a model")
    return tmp / "notes"


def finished_run(tmp: Path, reference) -> Path:
    shutil.copytree(reference[1], tmp / "run")
    return tmp / "run"


def resume_changed(tmp: Path, reference, **_) -> list[str]:
    out = finished_run(tmp, reference)
    cfg = str(out / "config.yaml")
    return ["train", cfg, "--out", str(out), "--resume", "--set", "training.lr=0.5"]


def resume_without_checkpoint(tmp: Path, reference, **_) -> list[str]:
    (tmp / "run").mkdir()
    shutil.copy(reference[1] / "config.yaml", tmp / "run" / "config.yaml")
    return ["train", str(tmp / "run" / "config.yaml"), "--out", str(tmp / "run"), "--resume"]


def peft_shapes_mismatch(tmp: Path, reference, **_) -> list[str]:
    out = finished_run(tmp, reference)
    (adapter,) = (out / "adapters").iterdir()
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file(
        {k: np.concatenate([v, v], axis=-1) for k, v in tensors.items()},
        str(adapter / "adapter_model.safetensors"),
    )
    return ["eval", str(out), "--set", "mesh.adapter=-1"]


def plan_does_not_fit(tmp: Path, **_) -> list[str]:
    cfg = write_config(
        tmp / "c.yaml",
        **{"model.path": "llama-3.1-8b-shape"},
        sweep={"lora.rank": [8, 16, 32, 64], "data.size_tokens": [1000, 2000]},
    )
    return ["plan", str(cfg), "--devices", "1", "--device", "tpu-v5e"]


MATRIX = {
    "malformed-yaml": (yaml_case("model: {path: tiny-llama\nlora: [\n"), "YAML"),
    "unknown-key": (config_case(**{"lora.rnak": 4}), "did you mean lora.rank"),
    "wrong-type": (config_case(**{"training.lr": "fast"}), "training.lr"),
    "rank-zero": (config_case(**{"lora.rank": 0}), "lora.rank"),
    "rank-above-layer-dims": (config_case(**{"lora.rank": 100_000}), "rank"),
    "alpha-zero": (config_case(**{"lora.alpha": 0}), "lora.alpha"),
    "empty-sweep-list": (config_case(sweep={"lora.rank": []}), "lora.rank"),
    "unknown-sweep-key": (config_case(sweep={"lora.rnak": [2, 4]}), "lora.rnak"),
    "missing-data-file": (data_case(None), "facts.csv"),
    "empty-data-file": (data_case(""), "facts.csv"),
    "csv-without-column": (data_case("q,a\nwho?,me\n"), "question"),
    "size-above-dataset": (data_case(QA, size_tokens=100_000), "size_tokens"),
    "size-above-phonebook": (config_case(**{"data.size_tokens": 10**9}), "phonebook file"),
    "tokenizer-vocab-mismatch": (model_case(big_vocab_tokenizer), "vocab"),
    "unsupported-architecture": (model_case(gpt2), "gpt2"),
    "not-a-checkpoint": (model_case(not_a_checkpoint), "notes"),
    "resume-without-checkpoint": (resume_without_checkpoint, "no checkpoint"),
    "resume-with-changed-config": (resume_changed, "training.lr"),
    "peft-shapes-mismatch": (peft_shapes_mismatch, "base model it was trained on"),
    "mesh-not-dividing-devices": (config_case(**{"mesh.adapter": 3}), "mesh"),
    "plan-does-not-fit": (plan_does_not_fit, "GiB per device"),
}


@pytest.mark.parametrize("case", MATRIX, ids=list(MATRIX))
def test_bad_input_stops_with_one_line_exit_2_and_writes_nothing(
    case, tmp_path, capsys, hf_checkpoint, reference
):
    setup, needle = MATRIX[case]
    work = tmp_path / "work"
    work.mkdir()
    argv = setup(work, hf_checkpoint=hf_checkpoint, reference=reference)
    capsys.readouterr()
    before = snapshot(work)
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxlora: error:") and "\n" not in err, err
    assert needle in err, err
    assert snapshot(work) == before


# ---------------------------------------------------------------------------------------------
# atomic outputs and locks

WRITER = """
import sys
from pathlib import Path
from jaxlora.fsutil import atomic_write, staged_dir
path, payloads = Path(sys.argv[1]), [b"a" * 4_000_000, b"b" * 6_000_000]
print("ready", flush=True)
i = 0
while True:
    atomic_write(path / "results.csv", payloads[i % 2])
    with staged_dir(path / "adapter", overwrite=True) as d:
        (d / "adapter_model.safetensors").write_bytes(payloads[i % 2])
        (d / "adapter_config.json").write_bytes(payloads[i % 2][:10])
    i += 1
"""


@pytest.mark.parametrize("delay", [0.05, 0.13, 0.31])
def test_a_killed_writer_leaves_the_old_file_or_the_new_one(tmp_path, delay):
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "ready\n"
    time.sleep(delay)
    proc.kill()
    proc.wait()
    whole = {b"a" * 4_000_000, b"b" * 6_000_000}
    if (tmp_path / "results.csv").exists():
        assert (tmp_path / "results.csv").read_bytes() in whole
    if (tmp_path / "adapter").exists():
        weights = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
        assert weights in whole
        assert (tmp_path / "adapter" / "adapter_config.json").read_bytes() == weights[:10]


def test_a_run_dir_in_use_is_neither_overwritten_nor_evaluated(reference, tmp_path, capsys):
    cfg, _ = reference
    out = finished_run(tmp_path, reference)
    (out / ".lock").write_text(f"{socket.gethostname()} {os.getpid()}")  # a live process
    before = snapshot(out)
    train = subprocess.run(
        jaxlora_cmd("train", cfg, "--out", out, "--overwrite", "--no-progress"),
        capture_output=True,
        text=True,
    )
    assert train.returncode == 2 and "in use by another job" in train.stderr, train.stderr
    assert cli(["eval", str(out), "--set", "mesh.adapter=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxlora: error:") and "in use by another job" in err, err
    assert snapshot(out) == before


def test_a_stale_lock_is_taken_over_and_a_live_one_is_respected(tmp_path, caplog):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    lock_file = tmp_path / ".lock"
    lock_file.write_text(f"{socket.gethostname()} {dead.stdout.strip()}")
    with caplog.at_level(logging.WARNING), RunLock(tmp_path):
        assert "stale lock" in caplog.text
        assert lock_file.read_text() == f"{socket.gethostname()} {os.getpid()}"
        with pytest.raises(JaxloraError, match=f"in use by another job \\(process {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert not lock_file.exists()
