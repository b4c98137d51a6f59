"""Staged writes and checksummed reads: how a model directory changes without ever being half-written.

A new version of a file is first written under a staged name that carries its checksum; the
config, which pins every file's sha256, is then replaced in one rename (the commit); only then are
staged files moved into place. A reader that knows the checksum finds the content under either
name, whichever step a crash stopped at.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from recast.errors import FileFormatError
from recast.io import atomic_write_bytes, fsync_dir


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
        fsync_dir(path.parent)


def read_checked(path: str | os.PathLike[str], sha256: str) -> bytes:
    """The bytes of ``path`` (or of its staged version) whose sha256 is ``sha256``.

    Tries ``path``, then the staged name, then ``path`` again (a writer may have promoted the
    staged file in between). Raises ``FileFormatError`` naming ``path`` when neither holds it.
    """
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
