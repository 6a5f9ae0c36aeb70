"""Outputs that are either whole or absent: files and directories are built under a temporary
sibling name and renamed into place, so a crash never leaves a half-written result."""

from __future__ import annotations

import contextlib
import os
import shutil
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
