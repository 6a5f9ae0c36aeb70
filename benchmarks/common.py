"""Shared benchmark helpers: the machine and versions a figure was measured on, and timing."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora.train import GroupState, Hyper

# The study's optimizer numbers, for the benchmarks that compile a training step.
STEP_HYPER = dict(
    lr=5e-5,
    warmup_ratio=0.0,
    weight_decay=0.01,
    clip_norm=1.0,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    lr_ratio=1.0,
)


def zero_group(w_abs, c_abs, n: int) -> GroupState:
    """A training group of `n` adapters with zero factors of the abstract LoRA weights and
    constants `w_abs`, `c_abs`: under `jax.eval_shape`, the group's shapes for a compile."""
    weights = jax.tree.map(lambda s: jnp.zeros((n, *s.shape), jnp.float32), w_abs)
    consts = jax.tree.map(lambda s: jnp.zeros((n, *s.shape), jnp.float32), c_abs)
    hyper = Hyper.stack([STEP_HYPER] * n)
    keys = jnp.stack([jax.random.key_data(jax.random.key(i)) for i in range(n)])
    live = jnp.ones((n,), bool)
    return GroupState.create(weights, consts, hyper, keys, live, "cosine", 1500)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Where and with what a benchmark ran (printed with every result)."""
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "transformers", "peft", "torch"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    devices = jax.devices()
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "accelerator": f"{len(devices)} x {devices[0].device_kind}"
        if devices[0].platform != "cpu"
        else "none (CPU)",
        "python": platform.python_version(),
        **versions,
    }


def timed(fn: Callable[[], Any], repeat: int = 3) -> float:
    """Median wall seconds of `fn()` (which must block until its result is ready)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_ceiling(dtype: str = "float32", n: int | None = None) -> float:
    """FLOP/s of a large square matmul on the default device: the machine's practical ceiling."""
    import jax.numpy as jnp

    on_cpu = jax.devices()[0].platform == "cpu"
    n = n or (2048 if on_cpu else 8192)
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), dtype)
    b = jax.random.normal(key_b, (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    return 2 * n**3 / timed(lambda: jax.block_until_ready(matmul(a, b)), repeat=5)


def peft_library(model, stack, tmp: Path):
    """The jaxlora base and every adapter of `stack` as a PyTorch PEFT model (adapters named
    a0, a1, ...), written through PEFT's own files: the study's side of a comparison."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import jaxlora

    model.save_hf(tmp / "base")
    for a in range(len(stack)):
        jaxlora.save_peft(model, stack, a, tmp / f"a{a}")
    hf = AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(hf, tmp / "a0", adapter_name="a0")
    for a in range(1, len(stack)):
        peft_model.load_adapter(tmp / f"a{a}", adapter_name=f"a{a}")
    return peft_model


def report(name: str, results: dict[str, Any]) -> None:
    """Print the machine and the measured results, human-readable then as one JSON line."""
    info = machine()
    print(f"== {name} ==")
    for k, v in {**info, **results}.items():
        print(f"  {k}: {v}")
    print("JSON " + json.dumps({"benchmark": name, **info, **results}))
