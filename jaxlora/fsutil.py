"""Outputs that are either whole or absent: files and directories are built under a temporary
sibling name and renamed into place, so a crash never leaves a half-written result."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from jaxlora.errors import JaxloraError


def check_new_dir(path: Path, *, overwrite: bool, flag: str = "--overwrite") -> None:
    """Refuse to replace a non-empty directory unless asked to."""
    if path.exists() and not path.is_dir():
        raise JaxloraError(f"{path} exists and is not a directory; choose another output path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise JaxloraError(
            f"{path} already exists and is not empty; pass {flag} to replace it "
            "or choose another output path"
        )


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `final` only if the block succeeds."""
    final = Path(final)
    check_new_dir(final, overwrite=overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a file through a temporary name and an atomic rename."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunLock:
    """An exclusive lock on a run directory: `RUN_DIR/.lock` holds "host pid".

    A second job on the same directory stops with a one-line error naming the holder. A lock
    left by a process that no longer exists on this host (a crash, a SIGKILL) is stale: it is
    taken over with a warning. Locks held from other hosts cannot be checked and are respected.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / ".lock"
        self.held = False

    def acquire(self) -> RunLock:
        here = socket.gethostname()
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.path.read_text().strip() if self.path.exists() else ""
                host, _, pid = holder.partition(" ")
                if host == here and pid.isdigit() and not _alive(int(pid)):
                    logging.getLogger(__name__).warning(
                        "removing the stale lock of process %s (no longer running) on %s",
                        pid,
                        self.path.parent,
                    )
                    self.path.unlink(missing_ok=True)
                    continue
                raise JaxloraError(
                    f"{self.path.parent} is in use by another job (process {pid or '?'} on "
                    f"{host or '?'}); wait for it to finish, or delete {self.path} if it is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{here} {os.getpid()}")
            self.held = True
            return self
        raise JaxloraError(f"could not lock {self.path.parent}; delete {self.path} and retry")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
