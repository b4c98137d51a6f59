"""Consistent reads of a model directory while writers commit: the old state or the new, never a mix.

A read takes several steps (the config, then the files it pins by sha256), and a writer may commit
between them and move new content over a file whose old checksum the reader holds. Nothing wrong
can load, because every byte is checked against the pinned sha256 (:mod:`recast.format.staging`);
the reader gets a ``FileFormatError`` instead. :func:`consistent_read` turns that race into a
retry: when a read fails *and* the directory's commit changed while it ran, the read starts over
from the new config. Readers so take no lock and never wait for a writer. After
``OPTIMISTIC_TRIES`` such races in a row (writers committing faster than one read) the last try
holds the shared directory lock, which no writer can commit through. A failure while the commit
stayed the same is a real problem with the files and is raised at once.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

from recast.errors import FileFormatError
from recast.format.locking import shared_lock
from recast.format.names import CONFIG_FILE, TASKS_DIR

OPTIMISTIC_TRIES = 4

P = ParamSpec("P")
R = TypeVar("R")
_active = threading.local()  # inside a consistent read on this thread: inner ones just run


def commit_stamp(directory: str | os.PathLike[str]) -> tuple[object, ...]:
    """What changes whenever a writer commits to ``directory``.

    A commit is a rename: of ``recast_config.json`` (a new inode), or, in a directory without a
    config, of a task's JSON into ``tasks/`` (the folder's modification time).
    """
    stamp: list[object] = []
    for path in (Path(directory) / CONFIG_FILE, Path(directory) / TASKS_DIR):
        try:
            stat = path.stat()
        except OSError:
            stamp.append(None)
            continue
        stamp.append((stat.st_ino, stat.st_mtime_ns, stat.st_size))
    return tuple(stamp)


def read_consistently(directory: str | os.PathLike[str], read: Callable[[], R]) -> R:
    """``read()``, started over while it fails because a writer committed to ``directory`` meanwhile."""
    for _ in range(OPTIMISTIC_TRIES):
        before = commit_stamp(directory)
        try:
            return read()
        except FileFormatError:
            if commit_stamp(directory) == before:
                raise
    with shared_lock(directory):
        return read()


def consistent_read(func: Callable[P, R]) -> Callable[P, R]:
    """Decorate a reader whose argument ``directory`` is a model directory: it sees one commit.

    Readers that call other decorated readers run them as part of their own (one retry loop).
    """
    signature = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if getattr(_active, "depth", 0):
            return func(*args, **kwargs)
        directory = signature.bind(*args, **kwargs).arguments["directory"]
        _active.depth = 1
        try:
            return read_consistently(directory, lambda: func(*args, **kwargs))
        finally:
            _active.depth = 0

    return wrapper
