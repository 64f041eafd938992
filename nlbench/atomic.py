"""Whole-or-nothing file writes: a hidden temp file beside the target, fsynced, then
`os.replace`d over it, so a crash or a concurrent reader sees the old file or the new one, never
a torn one (checkpoints, pretrained weights, configs, results on a local disk)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "umask"]


def umask() -> int:
    """The process umask, read without changing it (``os.umask`` swaps it, racing other threads)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], *, private: bool = False,
                 sync_dir: bool = False) -> None:
    """Create `path`'s folder, call `write(f)` on a temp file beside it, fsync, replace `path`.

    The file takes the umask's mode, as `open()` would give it; private=True keeps it 0o600 (a
    run's checkpoint). sync_dir: also fsync the folder, so the rename itself survives a power
    loss. The temp file is removed when anything fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if not private:
            os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_dir:
        with contextlib.suppress(OSError):  # some filesystems cannot open or fsync a directory
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, **kw) -> None:
    atomic_write(path, lambda f: f.write(data), **kw)


def atomic_write_text(path: str | os.PathLike, text: str, **kw) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), **kw)
