"""Stopping and resuming a training run.

`Interrupts` turns SIGTERM / SIGINT into a checkpoint at a step boundary (a second signal
exits at once), agreed by every process; `result_fingerprint` is what a resumed run's config
must share with the run's own: every key but those that do not change the adapters
(`RESUME_NEUTRAL`: checkpointing, the mesh, evaluation, logging, ...).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlora.config import Config

# Keys that may differ between a run and its resume: they do not change the adapters.
RESUME_NEUTRAL = (
    "checkpoint",
    "mesh",
    "eval",
    "memory",
    "llm",
    "training.log_every",
    "training.adapters_per_pass",
)


def result_fingerprint(config: Config) -> dict[str, Any]:
    """The config keys that determine the adapters (everything but RESUME_NEUTRAL)."""
    flat = _flatten(config.to_dict())
    return {
        k: v
        for k, v in flat.items()
        if not any(k == n or k.startswith(n + ".") for n in RESUME_NEUTRAL)
    }


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "sweep":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Interrupts:
    """SIGTERM / SIGINT during training: the first asks for a checkpoint at a step boundary,
    the second exits at once. `agreed(step)` is the stop decision. With several processes it is
    collective, so every process stops (and saves) at the same step; it is taken every `every`
    steps (the logging steps, where the processes synchronise anyway) rather than at every
    step, which would stall the asynchronous dispatch of the steps on a host round trip."""

    def __init__(self, every: int):
        self.every = every
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            print(
                f"jaxlora: second {name}: stopping now; the last saved checkpoint is intact",
                file=sys.stderr,
                flush=True,
            )
            os._exit(128 + signum)
        self.requested, self.signal_name = True, name
        print(
            f"jaxlora: {name} received: saving a checkpoint after this step "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def agreed(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        if step % self.every:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))
