"""Where built-in datasets live on disk, and how their arrays are written and read.

Arrays are stored as ``.npz`` files (a zip of ``.npy`` members, deflate-compressed). The zip is
written by hand with fixed member timestamps so that the same arrays always give the same bytes:
a rebuild on another machine can be compared by checksum. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np

from recast.io import atomic_write_bytes

_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def data_home() -> Path:
    """The cache directory of built-in datasets: ``$RECAST_DATA`` or ``~/.cache/recast/data``."""
    configured = os.environ.get("RECAST_DATA")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "recast" / "data"


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Serialise ``arrays`` as a deterministic, compressed ``.npz`` (loadable by ``np.load``)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_FIXED_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """Write ``arrays`` atomically to ``path``; returns the file's sha256."""
    data = npz_bytes(arrays)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Read every array of an ``.npz`` written by :func:`write_npz` (never unpickles)."""
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
