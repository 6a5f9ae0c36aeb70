"""Shared fixtures: tiny checkpoints are written once per session and reused."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One fresh compilation cache per test session, shared with the jaxlora subprocesses it starts:
# the same programs (a job, its resume, its multi-process twin) compile once.
os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxlora-tests-xla-")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax
import pytest

# Eight CPU devices for the mesh tests; everything else runs on device 0.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

from tests.hf_factory import make_hf_checkpoint  # noqa: E402


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
