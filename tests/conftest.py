"""Shared fixtures: tiny checkpoints are written once per session and reused."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# One fresh compilation cache per test process (each pytest-xdist worker has its own), shared
# with the jaxlora subprocesses it starts: the same programs (a job, its resume, its
# multi-process twin) compile once. Workers do not share one: two processes writing one cache
# need its whole-cache file lock (jax_compilation_cache_max_size), and the one trial of that
# ran the suite slower (24.7 min on 2 cores against 17.8 without; another job shared the cores
# for 2 of those minutes).
os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxlora-tests-xla-")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
# The suite's time is mostly XLA:CPU compiling tiny programs that then run for milliseconds:
# without LLVM's optimisation passes (the tests and their subprocesses; the library's own
# defaults are untouched) two heavy groups of tests ran in 101 s against 123 s and 114 s
# against 144 s, one after the other on 2 cores. Semantics do not change: XLA's own passes
# still run, and without fast-math LLVM does not reorder float arithmetic at any level.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()

import jax
import pytest
from filelock import FileLock

# Eight CPU devices for the mesh tests; everything else runs on device 0.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

import yaml  # noqa: E402

from tests.hf_factory import make_hf_checkpoint  # noqa: E402


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """`pytest -n auto`: one worker per core, at most one per 5 GiB of memory (the largest
    process of a 2-worker run peaked at 4.3-4.6 GiB, by /usr/bin/time in three runs) and at
    most 8 (the session-wide fixtures are built once, but each worker loads its own copies)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(cores or 1, memory // (5 << 30), 8))


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A directory `build(path)` fills once per test session, copied into this process's own
    temporary directory: pytest-xdist's workers share one build (under a file lock, in the
    base directory they share) and each gets a private copy its tests may write into, as a
    single process would."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    built = shared / f"{name}-built"
    with FileLock(str(shared / f"{name}.lock")):
        if not (built / ".complete").exists():
            shutil.rmtree(built, ignore_errors=True)
            build(built)
            (built / ".complete").touch()
    own = tmp_path_factory.mktemp(name)
    shutil.copytree(built, own, dirs_exist_ok=True)
    (own / ".complete").unlink()
    return own


@pytest.fixture(autouse=True, scope="module")
def _compiled_programs_released():
    """Each test module's compiled programs are dropped when it ends (later modules load theirs
    from the session's compilation cache): one process runs the whole suite, and holding every
    executable of ~950 tests at once is what the process's memory should not have to do."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True)
def _cli_logging_restored():
    """`jaxlora.cli.main` sets up process-wide logging, as an entry point does; tests that call
    it in process must not take jaxlora's records away from later tests' caplog."""
    yield
    log = logging.getLogger("jaxlora")
    for handler in log.handlers[:]:
        log.removeHandler(handler)
    log.propagate = True
    log.setLevel(logging.NOTSET)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """make(family, **config) -> path of a tiny random transformers checkpoint (cached)."""
    made: dict[tuple, object] = {}

    def make(family: str = "llama", **kw):
        key = (family, tuple(sorted(kw.items())))
        if key not in made:
            name = "-".join([family, *(f"{k}{v}" for k, v in sorted(kw.items()))])
            made[key] = make_hf_checkpoint(tmp_path_factory.mktemp(name), family, **kw)
        return made[key]

    return make


# A tiny PhoneBook grid (2 ranks x 2 sizes) that learns something in 250 steps: shared by the
# evaluation, report and notebook tests.
RUN = {
    "model": {"path": "tiny-llama"},
    "lora": {"rank": 8, "dropout": 0.0},
    "data": {
        "dataset": "phonebook",
        "size_tokens": 125,
        "loss_mask": "completion_only",
        "max_length": 64,
    },
    "training": {"steps": 250, "batch_size": 8, "lr": 1.0e-2, "weight_decay": 0.0, "log_every": 50},
    "mesh": {"adapter": 1},
    "checkpoint": {"every_steps": 1000},
    "eval": {"max_new_tokens": 16, "batch_size": 4},
    "sweep": {"lora.rank": [2, 16], "data.size_tokens": [125, 250]},
}


def _train(spec: dict, where: Path) -> None:
    from jaxlora.config import load_config
    from jaxlora.sweep import SweepJob

    where.mkdir(parents=True)
    (where / "run.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    config = load_config(where / "run.yaml")
    SweepJob(config, where / "run", progress=False, devices=jax.devices()[:1]).run()


@pytest.fixture(scope="session")
def evaluated_run(tmp_path_factory):
    from jaxlora.config import load_config

    tmp = built_once(tmp_path_factory, "evalrun", lambda where: _train(RUN, where))
    return load_config(tmp / "run.yaml"), tmp / "run"


# A 4-sector PhoneBook library trained briefly (adapters that differ) with its memory evaluated
# after training: shared by the memory and notebook tests.
MEMORY_RUN = {
    "model": {"path": "tiny-llama"},
    "lora": {"rank": 8, "dropout": 0.0},
    "data": {
        "dataset": "phonebook",
        "size_tokens": 250,
        "units": "sectors",
        "unit_count": 4,
        "loss_mask": "completion_only",
        "max_length": 64,
    },
    "training": {"steps": 60, "batch_size": 8, "lr": 1.0e-2, "weight_decay": 0.0, "log_every": 30},
    "mesh": {"adapter": 1},
    "checkpoint": {"every_steps": 1000},
    "memory": {"methods": ["base", "bm25", "bm25@2/ties"], "max_new_tokens": 12},
}


@pytest.fixture(scope="session")
def memory_run(tmp_path_factory):
    return (
        built_once(tmp_path_factory, "memoryrun", lambda where: _train(MEMORY_RUN, where)) / "run"
    )
