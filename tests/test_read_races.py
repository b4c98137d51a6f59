"""Readers racing a writer see the directory's old committed state or its new one, never an error or a mix.

How interleavings are counted. Deterministic part: the writer (``save_pretrained``,
``save_task`` replacing or adding a task, ``ModelStore.delete_task``) runs in a thread that stops
before each of its write calls (``os.open`` for writing, ``os.write``, ``os.fsync``,
``os.replace``, ...). At every stop ``k`` a full read runs; and, once per read point ``j`` of
the reader (each file it reads), another read runs that lets the writer take its next step just
before that file is read, so the writer changes the directory in the middle of the read. Each
such read is one interleaving: (operation, reader, k) plus (operation, reader, j, k). The
readers are ``load_method`` (config, backbone, every task), ``load_task`` of a task the writer
changes, and the task listing. Every read must equal what the reader returns on the old or on the
new directory. Stress part: a forked process rewrites the directory between two states as fast as
it can while this process reads it; every read must be one of the two. The test asserts at least
1,000 interleavings in all and prints the counts. ``os.fsync`` is skipped (not what is tested).
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import pathlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from recast.errors import FileFormatError
from recast.format import ModelStore, reading, task_records
from recast.io import atomic_write_bytes
from recast.protocol import TaskModel
from tests.reliability.common import nudge, tiny_method
from tests.test_disk_faults import CALLS, WRITE_FLAGS, model_state, same_state

pytestmark = pytest.mark.filterwarnings("ignore:Adapter task__:UserWarning")

MIN_INTERLEAVINGS = 1000
# Steps the writer takes in the middle of a read: 1, and enough to pass a commit (replace the config,
# flush its folder) and then move a staged file over the one the reader is about to read.
SPANS = (1, 3, 6)
STRESS_SECONDS = 2.0


class SteppedWriter:
    """Runs ``operation`` in a thread that stops before each write call until :meth:`advance` is called."""

    def __init__(self, operation: Callable[[], None]) -> None:
        self.operation = operation
        self.steps = 0
        self.done = False
        self.error: BaseException | None = None
        self._go, self._paused = threading.Semaphore(0), threading.Semaphore(0)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.operation()
        except BaseException as exc:  # reported by finish()
            self.error = exc
        finally:
            self.done = True
            self._paused.release()

    def before_write(self) -> None:
        """Called on the writer thread before each write call: stop until told to go on."""
        if threading.current_thread() is self._thread:
            self._paused.release()
            self._go.acquire()

    def start(self) -> None:
        self._thread.start()
        assert self._paused.acquire(timeout=30)

    def advance(self, steps: int = 1) -> None:
        """Let the writer make ``steps`` write calls and stop before the next (or finish)."""
        for _ in range(steps):
            if self.done:
                return
            self.steps += 1
            self._go.release()
            assert self._paused.acquire(timeout=30), "the writer did not reach its next write call"

    def finish(self) -> None:
        while not self.done:
            self.advance()
        self._thread.join(timeout=30)
        if self.error is not None:
            raise self.error


@contextmanager
def stepping(writer: SteppedWriter) -> Iterator[None]:
    """Route the write calls through ``writer.before_write`` (skipping ``os.fsync``) for the block."""
    saved = {name: getattr(os, name) for name in CALLS}

    def wrap(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if name != "open" or (args[1] if len(args) > 1 else kwargs.get("flags", 0)) & WRITE_FLAGS:
                writer.before_write()
            return None if name == "fsync" else real(*args, **kwargs)
        return wrapper

    for name, real in saved.items():
        setattr(os, name, wrap(name, real))
    try:
        yield
    finally:
        for name, real in saved.items():
            setattr(os, name, real)


@contextmanager
def read_points(on_read: Callable[[int], None]) -> Iterator[None]:
    """Call ``on_read(index)`` on this thread before each file it reads (``Path.read_bytes`` / ``read_text``)."""
    reader = threading.current_thread()
    real_bytes, real_text = pathlib.Path.read_bytes, pathlib.Path.read_text
    count = [0]

    def hook() -> None:
        if threading.current_thread() is reader:
            on_read(count[0])
            count[0] += 1

    def read_bytes(self: Path) -> bytes:
        hook()
        return real_bytes(self)

    def read_text(self: Path, *args: Any, **kwargs: Any) -> str:
        hook()
        return real_text(self, *args, **kwargs)

    pathlib.Path.read_bytes, pathlib.Path.read_text = read_bytes, read_text
    try:
        yield
    finally:
        pathlib.Path.read_bytes, pathlib.Path.read_text = real_bytes, real_text


# ------------------------------------------------------------------------------------------ readers
def read_all(directory: Path, models: dict[str, TaskModel]) -> Any:
    return model_state(directory)


def read_task_a(directory: Path, models: dict[str, TaskModel]) -> Any:
    model = models["reader"]
    model.load_task(directory, "a", replace=True)
    return {k: v.clone() for k, v in model.task_tensors("a").items()}


def read_listing(directory: Path, models: dict[str, TaskModel]) -> Any:
    return task_records(directory)


def equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and "fingerprint" in a:
        return same_state(a, b)
    if isinstance(a, dict) and a and all(isinstance(v, torch.Tensor) for v in a.values()):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return a == b


READERS: dict[str, Callable[[Path, dict[str, TaskModel]], Any]] = {
    "load_method": read_all, "load_task": read_task_a, "task listing": read_listing,
}

OPERATIONS: dict[str, Callable[[dict[str, TaskModel], Path], None]] = {
    "save_pretrained": lambda m, d: m["changed"].save_pretrained(d),
    "save_task replacing": lambda m, d: m["changed"].save_task(d, "a"),
    "save_task adding": lambda m, d: m["changed"].save_task(d, "c"),
    "delete_task": lambda m, d: ModelStore(d).delete_task("b"),
}


def method_models(method: str) -> dict[str, TaskModel]:
    """The starting model, the changed one the writer saves, and one the ``load_task`` reader loads into."""
    changed = tiny_method(method, tasks=("a", "b"))
    nudge(changed, "a", seed=41)
    changed.add_task("c", 4)
    return {"old": tiny_method(method, tasks=("a", "b")), "changed": changed,
            "reader": tiny_method(method, tasks=("a", "b"))}


@pytest.fixture(scope="module")
def models() -> dict[str, dict[str, TaskModel]]:
    torch.set_num_threads(1)
    return {"recast": method_models("recast")}


# (method, operation): every operation on a RECAST model. Baselines (PEFT LoRA) go through the same store
# and the same retrying readers (load_method, load_task); their loads are slower, so they are left out here.
CASES = [("recast", op) for op in OPERATIONS]


def interleave(operation: str, models: dict[str, TaskModel], root: Path, tolerate_errors: bool = False) -> tuple[int, int]:
    """Every (reader, stop k) and (reader, read point j, stop k) interleaving of one operation.

    Returns (consistent reads, reads that raised ``FileFormatError``); the latter are allowed only
    with ``tolerate_errors`` (to show what happens without the retry).
    """
    template = root / "start"
    models["old"].save_pretrained(template)
    scratch = root / "expected"
    shutil.copytree(template, scratch)
    old = {name: read(scratch, models) for name, read in READERS.items()}
    OPERATIONS[operation](models, scratch)
    new = {name: read(scratch, models) for name, read in READERS.items()}
    points = {}
    for name, read in READERS.items():
        seen: list[int] = []
        with read_points(seen.append):
            read(scratch, models)
        points[name] = len(seen)
    count = errors = 0
    # (None, 0): a whole read at each stop; (j, span): the writer takes ``span`` steps just before read point j
    runs = [(None, 0), *((j, span) for j in range(max(points.values())) for span in SPANS)]
    for j, span in runs:
        directory = root / f"run-{j}-{span}"
        shutil.copytree(template, directory)
        writer = SteppedWriter(lambda d=directory: OPERATIONS[operation](models, d))
        with stepping(writer):
            writer.start()
            while True:
                for name, read in READERS.items():
                    if j is not None and j >= points[name]:
                        continue
                    try:
                        with read_points(lambda index, w=writer, j=j, n=span: w.advance(n) if index == j else None):
                            result = read(directory, models)
                    except FileFormatError:
                        if not tolerate_errors:
                            raise
                        errors += 1
                        continue
                    assert equal(result, old[name]) or equal(result, new[name]), \
                        f"{operation}: {name} saw a mix after writer step {writer.steps} (read point {j}, span {span})"
                    count += 1
                if writer.done:
                    break
                writer.advance()
            writer.finish()
        assert equal(read_all(directory, models), new["load_method"])
        shutil.rmtree(directory)
    return count, errors


def test_readers_see_old_or_new_state_at_every_interleaving(tmp_path, models):
    counts = {f"{method} {op}": interleave(op, models[method], tmp_path / f"{method}-{op.replace(' ', '_')}")[0]
              for method, op in CASES}
    stress = stress_reads(tmp_path / "stress", models["recast"])
    total = sum(counts.values()) + stress
    print(f"interleavings: {counts}, stress reads {stress}, total {total}", flush=True)
    assert total >= MIN_INTERLEAVINGS
    assert stress > 0


def test_the_interleavings_do_race_without_the_retry(tmp_path, models, monkeypatch):
    """The same interleavings with the retry switched off: readers do hit a moved file (so the test bites)."""
    monkeypatch.setattr(reading, "read_consistently", lambda directory, read: read())
    consistent, errors = interleave("save_task replacing", models["recast"], tmp_path, tolerate_errors=True)
    print(f"without the retry: {errors} of {consistent + errors} reads failed")
    assert errors > 0


# ------------------------------------------------------------------------------------------ stress
def _rewrite_forever(directory: str, first: TaskModel, second: TaskModel, stop: Any) -> None:
    """Child process: save the two models in turn (whole model, then one task) until ``stop`` is set."""
    torch.set_num_threads(1)
    os.fsync = lambda fd: None  # speed; durability is not what is tested
    while not stop.is_set():
        for model in (first, second):
            model.save_pretrained(directory)
            model.save_task(directory, "a")


def stress_reads(directory: Path, models: dict[str, TaskModel]) -> int:
    """Read ``directory`` for ``STRESS_SECONDS`` while a child process rewrites it; returns the read count."""
    first = tiny_method("recast", tasks=("a", "b"))
    first.add_task("c", 4)
    second = models["changed"]
    states = []
    for model in (first, second):
        scratch = directory.parent / f"state-{len(states)}"
        model.save_pretrained(scratch)
        states.append(model_state(scratch))
    first.save_pretrained(directory)
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    child = context.Process(target=_rewrite_forever, args=(str(directory), first, second, stop))
    child.start()
    reads = 0
    try:
        deadline = time.monotonic() + STRESS_SECONDS
        while time.monotonic() < deadline:
            loaded = model_state(directory)
            assert any(same_state(loaded, state) for state in states), "a reader saw a mix of two saves"
            reads += 1
    finally:
        stop.set()
        child.join(timeout=30)
    assert child.exitcode == 0
    return reads


# ------------------------------------------------------------------------------------ the retry itself
def test_a_read_is_retried_only_while_commits_race_it_then_runs_under_the_shared_lock(tmp_path, models):
    models["recast"]["old"].save_pretrained(tmp_path)
    config = tmp_path / "recast_config.json"
    attempts: list[bool] = []

    def racing_read() -> str:
        """Fails like a read a commit overtook (and commits again) until it runs under the shared lock."""
        fd = os.open(tmp_path / ".lock", os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            locked = False
        except BlockingIOError:
            locked = True  # a reader holds the shared lock: no writer could get the exclusive one
        finally:
            os.close(fd)
        attempts.append(locked)
        if not locked:
            atomic_write_bytes(config, config.read_bytes())  # a commit: same bytes, a new inode
            raise FileFormatError("checksum mismatch")
        return "read"

    assert reading.read_consistently(tmp_path, racing_read) == "read"
    assert attempts == [False] * reading.OPTIMISTIC_TRIES + [True]

    calls = []

    def corrupt_read() -> None:
        calls.append(1)
        raise FileFormatError("checksum mismatch")

    with pytest.raises(FileFormatError):  # nothing committed meanwhile: a real problem, raised at once
        reading.read_consistently(tmp_path, corrupt_read)
    assert calls == [1]
