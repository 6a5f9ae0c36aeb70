"""Shared fixtures: tiny checkpoints are written once per session and reused."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax
import pytest

# Eight CPU devices for the mesh tests; everything else runs on device 0.
jax.config.update("jax_num_cpu_devices", 8)

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
