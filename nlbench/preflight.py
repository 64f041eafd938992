"""Checks that run before any compute, so a mistake costs seconds, not a sweep: the output
folder can be written, and a cluster answers at the address given. They create nothing."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

from nlbench.errors import UserError

ADDRESS_TIMEOUT_S = 5.0


def check_writable(path: str | os.PathLike, what: str = "--out") -> None:
    """Raise UserError unless `path` is, or can be created as, a folder this process can write.

    A URI (`s3://…`, `file://…`) goes to nlbench.storage's check when that module exists. For a
    local path: walk up to the nearest existing ancestor; it must be a folder, and a temporary
    file must be creatable in it (the probe also catches read-only file systems, which
    `os.access` misses when running as root). Nothing is left behind.
    """
    text = os.fspath(path)
    if "://" in text:
        try:
            from nlbench.storage import check_writable as check_uri
        except ImportError:
            return
        check_uri(text)
        return
    p = Path(text).absolute()
    cur = p
    while not cur.exists():
        if cur.is_symlink():
            raise UserError(f"{what} '{text}': '{cur}' is a dangling symbolic link; remove it or choose another folder.")
        cur = cur.parent
    if not cur.is_dir():
        where = "is a file" if cur == p else f"lies under '{cur}', which is a file"
        raise UserError(f"{what} '{text}' {where}, not a folder; choose a folder path (nothing was run or written).")
    try:
        with tempfile.TemporaryFile(dir=cur, prefix=".nlbench-write-check-"):
            pass
    except OSError as e:
        raise UserError(f"{what} '{text}' cannot be written: creating a file in '{cur}' failed "
                        f"({e.strerror or e}); choose a writable folder (nothing was run or written).") from None


def parse_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a 'HOST:PORT' or 'ray://HOST:PORT' address; None for 'auto'. Raise
    UserError naming the accepted forms for anything else."""
    forms = ("'auto', 'HOST:PORT' of a cluster's head (e.g. 127.0.0.1:6379) or 'ray://HOST:PORT' "
             "(Ray Client, e.g. ray://head:10001)")
    if address == "auto":
        return None
    if address.startswith(("http://", "https://")):
        raise UserError(f"--address {address!r} is a dashboard (Job Submission) URL; run, tune and bench join a "
                        f"cluster at {forms}. To hand a job to that dashboard use "
                        f"`nlbench submit CONFIG --address {address}`.")
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or any(c.isspace() or c in "/@?#" for c in host) or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise UserError(f"--address {address!r} is not an address; give {forms}.")
    return host, int(port)


def check_address(address: str | None, timeout: float = ADDRESS_TIMEOUT_S) -> None:
    """Fail fast, naming the address, when nothing accepts a TCP connection there (ray.init
    would otherwise retry for minutes). None (embedded Ray) and 'auto' are not checked here."""
    if address is None:
        return
    target = parse_address(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=timeout).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise UserError(f"no Ray cluster answers at --address {address!r} ({reason}; a TCP connection was tried for at most {timeout:g} s); "
                        f"start one there (`ray start --head`) or leave out --address to use an embedded Ray on "
                        f"this machine.") from None
