"""Atomic file writes, the one rule for disk-error messages, and small JSON helpers.

Every module that writes to disk goes through :func:`atomic_write_bytes` (or the JSON form), whose
only system calls are ``os.open`` / ``os.write`` / ``os.fsync`` / ``os.replace`` / ``os.mkdir``;
a failure of any of them becomes a :class:`~recast.errors.DiskError` from :func:`disk_error`,
which names the file, says what was kept and what to do. Model directories add staging and
checksums on top of these (:mod:`recast.format.staging`).
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from recast.errors import DiskError, FileFormatError

NOT_WRITTEN = "It was not written; the previous version of the file, if any, is unchanged"
NOT_FLUSHED = "The new version is in place, but its folder could not be flushed, so a power cut may undo it"


def disk_error(exc: OSError, path: str | os.PathLike[str], consequence: str = NOT_WRITTEN) -> DiskError:
    """``exc`` (a failed write of ``path``) as a ``DiskError`` that says what happened and what to do.

    The one place disk-error messages are worded: ENOSPC / EDQUOT say the disk is full and to free
    space then retry; EIO says an I/O error occurred at the path; permission errors say where to
    write instead. ``consequence`` says what the failed operation left (the caller knows).
    """
    if isinstance(exc, DiskError) and isinstance(exc.__cause__, OSError):
        exc = exc.__cause__  # re-worded by a caller that knows more of what was kept: start from the cause
    code = exc.errno if isinstance(exc.errno, int) else errno.EIO
    reason = exc.strerror or os.strerror(code)
    if code in (errno.ENOSPC, errno.EDQUOT):
        cause, advice = f"the disk is full: cannot write {path} (no space left on device)", \
            "Free some space on that disk (or choose a folder on another disk), then retry"
    elif code == errno.EIO:
        cause, advice = f"an I/O error occurred at {path} ({reason})", \
            "Check the disk (for example with dmesg), or write to another disk, then retry"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        cause, advice = f"no permission to write {path} ({reason})", \
            "Write to a folder you may write to, or fix its permissions, then retry"
    else:
        cause, advice = f"cannot write {path} ({reason})", "Fix the cause, then retry"
    return DiskError(code, f"{cause}. {consequence}. {advice}.", str(path))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    The bytes go to a temporary file in the same directory, are fsynced, then renamed over the
    target; the directory is fsynced too so the rename survives a power cut. On any failure the
    temporary file is removed and a ``DiskError`` naming ``path`` is raised.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise disk_error(exc, path) from exc
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise disk_error(exc, path) from exc
        raise
    try:
        fsync_dir(path.parent)
    except OSError as exc:
        raise disk_error(exc, path, NOT_FLUSHED) from exc


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a write may take fewer than it was given)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "the write made no progress")
        view = view[written:]


def fsync_dir(directory: Path) -> None:
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
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileFormatError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"{path}: not valid JSON ({exc})") from None
