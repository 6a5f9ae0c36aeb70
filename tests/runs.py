"""Small training configs and the helpers that run and compare them (shared by the tests)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import yaml
from safetensors.numpy import load_file

from jaxlora.sweep import SweepJob

BASE = {
    "model": {"path": "tiny-llama"},
    "lora": {"rank": 4, "dropout": 0.1},
    "data": {"dataset": "phonebook", "size_tokens": 200, "max_length": 64},
    "training": {"steps": 6, "batch_size": 4, "lr": 1.0e-3, "log_every": 1},
    "mesh": {"adapter": 1, "fsdp": 1, "tensor": 1},
    "checkpoint": {"every_steps": 3, "keep": 2},
}
GRID = {"lora.rank": [2, 8], "data.size_tokens": [150, 300], "training.lr": [1.0e-3, 3.0e-3]}


def write_config(path: Path, **changes) -> Path:
    """BASE with `section.field=value` (or whole `section=...`) changes, written as YAML."""
    raw = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[section] = value
    path.write_text(yaml.safe_dump(raw))
    return path


def run(config, out: Path, **kw):
    """Train `config` in this process, on one device unless `devices` says otherwise."""
    kw.setdefault("progress", False)
    return SweepJob(config, out, devices=kw.pop("devices", jax.devices()[:1]), **kw).run()


def adapters(run_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every exported adapter of a run: {name: {peft tensor name: array}}."""
    root = run_dir / "adapters"
    return {d.name: load_file(d / "adapter_model.safetensors") for d in sorted(root.iterdir())}


# float32 unit roundoff: every float32 operation is exact to within this fraction.
UNIT_ROUNDOFF = 2.0**-24


def rounding_bound(config) -> float:
    """How far two float32 runs of the same adapters may drift apart when they differ only in
    the order of their reductions (a split over fsdp or tensor devices, another stack size or
    layout, which XLA compiles to other kernels), as a fraction of each adapter's delta W.

    A sum of n float32 terms taken in another order changes by at most gamma_n = n u / (1 - n u)
    of the sum of its terms' magnitudes (Higham, Accuracy and Stability of Numerical
    Algorithms, 2nd ed., section 4.2). A LoRA gradient sums over the batch's
    n = batch_size x max_length positions, and that error passes through the forward and the
    backward of every layer (2L + 1 reductions in a chain). Adam scales each step to about lr
    whatever the gradient's size, so the steps' errors add up rather than compound:
    steps x (2L + 1) x gamma_n. A real difference (other data, a wrong shard) moves delta W
    by a fraction of order one."""
    from jaxlora.models.model import model_config

    layers = model_config(config.model.path).num_layers
    n = config.training.batch_size * config.data.max_length
    gamma = n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)
    return config.training.steps * (2 * layers + 1) * gamma


def delta_w(adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each adapted module's B @ A (the scale alpha / r is the same on both sides of a test)."""
    return {
        a.removesuffix(".lora_A.weight"): adapter[a.replace("lora_A", "lora_B")] @ adapter[a]
        for a in adapter
        if a.endswith(".lora_A.weight")
    }


def assert_equal_to_rounding(a: dict, b: dict, bound: float) -> None:
    """Every adapter of run `a` equals its namesake of run `b` to `bound`: per module,
    ||dW_a - dW_b||_F <= bound * ||dW_b||_F (see rounding_bound)."""
    assert a.keys() == b.keys()
    for name in a:
        wa, wb = delta_w(a[name]), delta_w(b[name])
        assert wa.keys() == wb.keys() and wa
        for module in wa:
            gap = np.linalg.norm(wa[module] - wb[module]) / np.linalg.norm(wb[module])
            assert gap <= bound, f"{name} {module}: relative difference {gap:.2e} > {bound:.2e}"


def assert_identical(a: dict, b: dict) -> None:
    """Bit-identical adapters (same names, same tensors)."""
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            np.testing.assert_array_equal(a[name][key], b[name][key], err_msg=f"{name} {key}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jaxlora_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "jaxlora.cli", *map(str, args)]


def optimised_env() -> dict[str, str]:
    """This process's environment without the suite's unoptimised XLA:CPU code generation
    (tests/conftest.py), for a subprocess whose time goes into running its programs, not
    compiling them."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    kept = [f for f in flags if not f.startswith("--xla_backend_optimization_level")]
    return {**os.environ, "XLA_FLAGS": " ".join(kept)}


def train_refuses(tmp_path: Path, raw: dict) -> str:
    """`jaxlora train` (a subprocess) on config `raw` stops with exit status 2 and writes no run
    directory; returns its stderr."""
    config, out = tmp_path / "run.yaml", tmp_path / "out"
    config.write_text(json.dumps(raw))
    proc = subprocess.run(
        jaxlora_cmd("train", config, "--out", out), capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert not out.exists()
    return proc.stderr
