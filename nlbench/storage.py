"""Where OUT lives: a local directory or an object-store prefix (docs/ARCHITECTURE.md, "Results store").

``location(uri)`` resolves ``--out`` / report inputs / checkpoint locations given as a plain path,
``file://…``, ``s3://bucket/prefix`` (pyarrow's URI options, e.g.
``?endpoint_override=127.0.0.1:9000&scheme=http``, and the standard AWS environment variables) or
``gs://bucket/prefix`` through :func:`pyarrow.fs.FileSystem.from_uri`. Every write is whole-object:

- local: a hidden temp file in the same directory (``.<name>.<random>.tmp``; listings skip names
  starting with ``.``), fsynced, ``os.replace``d over the old file, the directory fsynced. The file
  gets the mode the umask gives a new file (``mkstemp``'s 0600 would hide results from teammates).
- object stores: the bytes are serialized in memory first, then sent in one upload, which the
  store makes visible only when complete; an error before that leaves the old object.

Writing the same name twice replaces the object, so re-runs are idempotent.
:func:`check_writable` proves a location accepts writes before any compute is spent on it.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from nlbench.atomic import atomic_write_bytes

__all__ = [
    "Location", "StorageError", "check_writable", "delete_blob", "is_uri", "local_dir", "location", "read_blob", "write_blob",
]

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
REMOTE_SCHEMES = ("s3", "gs", "gcs")


class StorageError(ValueError):
    """A location that cannot be resolved, read or written (the message names it and why)."""


def is_uri(value) -> bool:
    """``scheme://…`` (as opposed to a plain path)."""
    return isinstance(value, str) and bool(_SCHEME_RE.match(value))


@dataclass(frozen=True)
class Location:
    """A directory-like root: ``fs`` (pyarrow filesystem) and ``root`` (its path inside ``fs``).

    Names passed to the methods are ``/``-separated, relative to the root. ``uri`` is what the
    user gave (for messages); ``local`` says whether the root is a directory on this machine.
    """

    uri: str
    fs: object
    root: str
    local: bool

    def join(self, *parts: str) -> str:
        """The filesystem path of ``parts`` under the root."""
        rel = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def display(self, *parts: str) -> str:
        """How to name ``parts`` to a user: a local path, or the URI with the key appended."""
        if self.local:
            return self.join(*parts)
        base = self.uri.split("?", 1)[0].rstrip("/")
        return "/".join([base, *(p.strip("/") for p in parts if p)])

    def child(self, *parts: str) -> "Location":
        """The location of a sub-directory (same filesystem)."""
        base, _, query = self.uri.partition("?")
        uri = "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)]) + (f"?{query}" if query else "")
        return Location(uri=uri if not self.local else self.join(*parts), fs=self.fs, root=self.join(*parts),
                        local=self.local)

    # ------------------------------------------------------------------ objects

    def write(self, name: str, data: bytes) -> str:
        """Replace object ``name`` with ``data`` as a whole; returns its display name."""
        path = self.join(name)
        if self.local:
            _write_local(path, data)
        else:
            self._write_remote(path, data)
        return self.display(name)

    def _write_remote(self, path: str, data: bytes):
        try:
            with self.fs.open_output_stream(path) as f:
                f.write(data)
        except OSError as e:
            raise StorageError(f"cannot write {self._name(path)}: {e}") from e

    def read(self, name: str) -> bytes:
        """The bytes of object ``name``; :class:`FileNotFoundError` when absent."""
        path = self.join(name)
        if self.local:
            return Path(path).read_bytes()
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(self._name(path))
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except OSError as e:
            raise StorageError(f"cannot read {self._name(path)}: {e}") from e

    def delete(self, name: str) -> bool:
        """Remove object ``name``; False when it was not there."""
        path = self.join(name)
        if self.local:
            try:
                os.unlink(path)
                return True
            except FileNotFoundError:
                return False
        import pyarrow.fs as pafs

        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return False
        self.fs.delete_file(path)
        return True

    def exists(self, name: str = "") -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.join(name)).type != pafs.FileType.NotFound

    def is_dir(self, name: str = "") -> bool:
        """A directory (object stores: a prefix holding at least one object)."""
        import pyarrow.fs as pafs

        if self.local:
            return os.path.isdir(self.join(name))
        return bool(self.list(name)) or self.fs.get_file_info(self.join(name)).type == pafs.FileType.Directory

    def list(self, name: str = "") -> list[str]:
        """Base names of the files directly under ``name`` (sorted); [] when there is none."""
        import pyarrow.fs as pafs

        path = self.join(name)
        if self.local:
            if not os.path.isdir(path):
                return []
            return sorted(e.name for e in os.scandir(path) if e.is_file())
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
        except OSError as e:
            raise StorageError(f"cannot list {self._name(path)}: {e}") from e
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def _name(self, path: str) -> str:
        if self.local:
            return path
        rel = path[len(self.root):].lstrip("/") if path.startswith(self.root) else path
        return self.display(rel)


def _write_local(path: str, data: bytes):
    """Atomically (nlbench.atomic: hidden temp file, fsync, os.replace, fsync dir), umask's mode."""
    try:
        atomic_write_bytes(path, data, sync_dir=True)
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e.strerror or e}") from e


def location(uri: str | os.PathLike) -> Location:
    """Resolve a plain path, ``file://``, ``s3://`` or ``gs://`` URI (see the module docstring)."""
    if isinstance(uri, Location):
        return uri
    if isinstance(uri, os.PathLike) or not is_uri(str(uri)):
        import pyarrow.fs as pafs

        path = os.path.abspath(os.fspath(uri))
        return Location(uri=path, fs=pafs.LocalFileSystem(), root=path, local=True)
    text = str(uri)
    scheme = _SCHEME_RE.match(text).group(1).lower()
    if scheme not in ("file", *REMOTE_SCHEMES):
        raise StorageError(
            f"{text!r}: unsupported storage scheme {scheme!r}; use a path, file://, s3://bucket/prefix "
            f"(options as ?endpoint_override=host:port&scheme=http) or gs://bucket/prefix."
        )
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(text)
    except (OSError, ValueError, TypeError) as e:  # pyarrow raises ArrowInvalid (a ValueError) on bad URIs
        raise StorageError(f"cannot open storage location {text!r}: {e}") from e
    if scheme == "file":
        return Location(uri=root, fs=fs, root=root, local=True)
    if not root.strip("/"):
        raise StorageError(f"{text!r} names no bucket; use {scheme}://bucket/prefix.")
    return Location(uri=text, fs=fs, root=root.rstrip("/"), local=False)


def local_dir(out: str | os.PathLike | Location, name: str) -> str:
    """A directory on this machine for ``OUT/name`` (checkpoints, pretrained weights).

    A local OUT gives ``OUT/name``. An object-store OUT gives a per-location cache directory under
    the temp dir (``nlbench-<name>/<hash of the URI>``): it is on the driver's machine only, so
    with a remote OUT these files do not follow a run to another node.
    """
    loc = location(out)
    if loc.local:
        return loc.join(name)
    import hashlib

    key = hashlib.sha256(loc.uri.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"nlbench-{name}", key)


def check_writable(uri: str | os.PathLike) -> Location:
    """Prove that ``uri`` accepts writes, before any compute: write and delete a probe object.

    Raises :class:`StorageError` naming the location and the reason (a path under a file, no
    permission, no such bucket, an unreachable endpoint, …). Creates a local directory if needed.
    """
    loc = location(uri)
    if loc.local and os.path.exists(loc.root) and not os.path.isdir(loc.root):
        raise StorageError(f"output location {loc.root} is a file, not a directory; give --out a directory.")
    probe = f".nlbench-write-probe-{uuid.uuid4().hex}"
    try:
        loc.write(probe, b"")
        loc.delete(probe)
    except StorageError as e:
        raise StorageError(f"output location {loc.display()} is not writable: {e}") from e
    except OSError as e:
        raise StorageError(f"output location {loc.display()} is not writable: {e.strerror or e}") from e
    return loc


def write_blob(out: str | os.PathLike | Location, name: str, data: bytes) -> str:
    """Replace ``OUT/name`` with ``data`` (whole object, never partial); returns its display name."""
    return location(out).write(name, data)


def read_blob(out: str | os.PathLike | Location, name: str) -> bytes:
    """The bytes of ``OUT/name``; :class:`FileNotFoundError` when absent."""
    return location(out).read(name)


def delete_blob(out: str | os.PathLike | Location, name: str) -> bool:
    """Remove ``OUT/name``; False when it was not there."""
    return location(out).delete(name)
