"""Helpers for the LLM tests: two tiny PEFT adapters with random non-zero weights, a backend
that counts the requests it forwards, and a real `jaxlora serve` subprocess on a free port of
127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import jaxlora
from jaxlora import lora

API_KEY = "test-key"


def make_adapters(model, out: Path) -> dict[str, Path]:
    """Two adapters of different ranks and targets, B random (not PEFT's zero init), so each
    visibly changes the base model's output."""
    configs = [lora.LoRAConfig(rank=4), lora.LoRAConfig(rank=8, targets="attention")]
    stack = lora.init_adapters(model, configs, [1, 2], ["fact-a", "fact-b"])
    rng = np.random.default_rng(0)

    def fill(path, var):
        if path[-1] != "lora_b":
            return var
        x = var.get_value()
        return var.replace(jax.numpy.asarray(rng.normal(0, 0.5, x.shape), np.float32))

    stack = lora.AdapterStack(
        nnx.map_state(fill, stack.weights), stack.consts, stack.configs, stack.names
    )
    dirs = {}
    for i, name in enumerate(stack.names):
        dirs[name] = jaxlora.save_peft(model, stack, i, out / name)
    return dirs


class Counting:
    """Forwards every call to a real backend and counts the requests (not a mock)."""

    def __init__(self, backend):
        self.backend, self.name, self.requests = backend, backend.name, 0

    def chat(self, conversations, params):
        self.requests += len(conversations)
        return self.backend.chat(conversations, params)

    def complete(self, prompts, params):
        self.requests += len(prompts)
        return self.backend.complete(prompts, params)


class Server:
    """`jaxlora serve` in a subprocess; `url` is its /v1 base URL. Without `warm_up` it starts
    with --no-warmup: tests pay compilation only for the programs they use."""

    def __init__(
        self,
        args: list[str],
        timeout: float = 120.0,
        warm_up: bool = False,
        env: dict | None = None,
    ):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
        args = [*args, *(() if warm_up else ("--no-warmup",))]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jaxlora.cli", "serve", *args, "--port", "0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        ready = threading.Event()

        def read():  # drain stderr so the server never blocks on a full pipe
            for line in self.proc.stderr:
                self.lines.append(line)
                if "serving http://" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("jaxlora serve did not start:\n" + "".join(self.lines))
        line = next(x for x in self.lines if "serving http://" in x)
        self.url = line.split("serving ", 1)[1].split()[0]

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
