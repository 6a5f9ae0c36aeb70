"""A process's runtime set-up, done once by an entry point before any computation: jaxlora's
log handler, the persistent compilation cache, and JAX's devices and processes (simulated CPU
devices, multi-process jobs)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from jaxlora.errors import JaxloraError


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever `sys.stderr` is when a record is emitted (a caller that
    redirects stderr gets jaxlora's messages too)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


class _Format(logging.Formatter):
    """`jaxlora: LEVEL: message` (no level for info records), a traceback after it if any."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        return f"jaxlora: {level}{record.message}"


def setup_logging(verbose: bool = False) -> None:
    """jaxlora's own warnings, once each, as `jaxlora: WARNING: ...`, and with `verbose` its
    info records too (the settings a job chose for `auto`, a resume) as `jaxlora: ...`. The
    handler goes on the `jaxlora` logger, which stops there: the root logger may carry a handler
    that a library put there on import (orbax does), and libraries with handlers of their own
    (huggingface_hub, transformers) would print every record twice through a root handler of
    ours."""
    log = logging.getLogger("jaxlora")
    if not log.handlers:
        handler = _Stderr()
        handler.setFormatter(_Format())
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if verbose else logging.WARNING)


def setup_compilation_cache() -> None:
    """Keep compiled programs across runs (a rerun of the same job skips compilation).

    JAX's own JAX_COMPILATION_CACHE_DIR wins; JAXLORA_COMPILATION_CACHE picks another directory
    or, set to "off", disables the cache."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    where = os.environ.get("JAXLORA_COMPILATION_CACHE", "~/.cache/jaxlora/xla")
    if where == "off":
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(where).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _int_env(env: str, low: int) -> int | None:
    """An integer environment variable (None when unset), at least `low`."""
    text = os.environ.get(env)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise JaxloraError(f"{env}: expected an integer, got {text!r}") from None
    if value < low:
        raise JaxloraError(f"{env}: must be >= {low}, got {value}")
    return value


def setup_distributed(
    cpu_devices: int | None = None,
    coordinator: str | None = None,
    auto: bool = False,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Initialise JAX before any computation: simulated CPU devices and multi-process. Each
    setting is the command's flag, else its environment variable (JAXLORA_CPU_DEVICES,
    JAXLORA_COORDINATOR, JAXLORA_DISTRIBUTED=auto, JAXLORA_NUM_PROCESSES, JAXLORA_PROCESS_ID)."""
    import jax

    if cpu_devices is None:
        cpu_devices = _int_env("JAXLORA_CPU_DEVICES", 0)
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    coordinator = coordinator or os.environ.get("JAXLORA_COORDINATOR")
    if auto or os.environ.get("JAXLORA_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
    elif coordinator:
        num = num_processes if num_processes is not None else _int_env("JAXLORA_NUM_PROCESSES", 1)
        pid = process_id if process_id is not None else _int_env("JAXLORA_PROCESS_ID", 0)
        if num is None or pid is None:
            raise JaxloraError(
                "--coordinator needs --num-processes and --process-id (or "
                "JAXLORA_NUM_PROCESSES / JAXLORA_PROCESS_ID)"
            )
        if pid >= num:
            raise JaxloraError(
                f"--process-id {pid} is out of range for --num-processes {num}: use 0..{num - 1}"
            )
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise JaxloraError(f"--coordinator {coordinator!r}: expected HOST:PORT")
        # Only the CPU backend reads this (GPU/TPU use their own collectives); it must be set
        # before the backend starts, so it cannot depend on which backend that will be.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num, process_id=pid
        )
