"""Atomic file writes and small JSON helpers used by every module that writes to disk."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    The bytes go to a temporary file in the same directory, are fsynced, then renamed over the
    target; the directory is fsynced too so the rename survives a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Flush a directory entry (a no-op where the platform cannot open directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as sorted, indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, turning a missing or malformed file into a clear ``FileFormatError``."""
    from recast.errors import FileFormatError

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileFormatError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"{path}: not valid JSON ({exc})") from None


def sha256_hex(data: bytes) -> str:
    """The sha256 of ``data`` as 64 hex digits: the identity of a file's content."""
    return hashlib.sha256(data).hexdigest()


def staged_path(path: str | os.PathLike[str], sha256: str) -> Path:
    """Where a new version of ``path`` waits before it replaces it: ``NAME.<sha12>.SUFFIX``.

    The name carries the content's checksum, so a reader that knows the checksum finds the
    content under either name, whichever step of a write a crash stopped at.
    """
    path = Path(path)
    return path.with_name(f"{path.stem}.{sha256[:12]}{path.suffix}")


def write_staged(path: str | os.PathLike[str], data: bytes) -> str:
    """Write ``data`` as the staged version of ``path`` (atomically); returns its sha256.

    Nothing is written when ``path`` already holds exactly these bytes. The file at ``path`` is
    left untouched: it is replaced by :func:`promote` only once the new version is committed.
    """
    digest = sha256_hex(data)
    path = Path(path)
    if not (path.is_file() and path.stat().st_size == len(data) and sha256_hex(path.read_bytes()) == digest):
        atomic_write_bytes(staged_path(path, digest), data)
    return digest


def promote(path: str | os.PathLike[str], sha256: str) -> None:
    """Move the staged version with checksum ``sha256`` over ``path``, if it is still waiting."""
    path = Path(path)
    staged = staged_path(path, sha256)
    if staged.is_file():
        os.replace(staged, path)
        _fsync_dir(path.parent)


def read_checked(path: str | os.PathLike[str], sha256: str) -> bytes:
    """The bytes of ``path`` (or of its staged version) whose sha256 is ``sha256``.

    Tries ``path``, then the staged name, then ``path`` again (a writer may have promoted the
    staged file in between). Raises ``FileFormatError`` naming ``path`` when neither holds it.
    """
    from recast.errors import FileFormatError

    path = Path(path)
    found = False
    for candidate in (path, staged_path(path, sha256), path):
        try:
            data = candidate.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            continue
        found = True
        if sha256_hex(data) == sha256:
            return data
    if not found:
        raise FileFormatError(f"{path}: file not found")
    raise FileFormatError(
        f"{path}: checksum mismatch (the file is truncated, corrupt or was changed after saving); "
        "restore it from a good copy or save the model again"
    )
