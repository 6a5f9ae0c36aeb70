"""Small training configs and the helpers that run and compare them (shared by the tests)."""

from __future__ import annotations

import json
import socket
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


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def max_diff_all(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(max_diff(a[k], b[k]) for k in a)


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
