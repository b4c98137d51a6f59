"""A full or failing disk at every single write point of every writer leaves a loadable, clean state.

How coverage is counted: each operation first runs once under :class:`WritePoints` without a
fault, which counts every system call through which the library writes (``os.open`` with a write
or create flag, ``os.write``, ``os.pwrite``, ``os.ftruncate``, ``os.fsync``, ``os.replace``,
``os.rename``, ``os.mkdir``); writes that bypass them (``open(..., "w")``, safetensors'
``save_file``) fail the test. The operation then runs again from its starting state once per
(write point, errno) pair, ENOSPC and EIO, with exactly that call raising. After each run:

(a) the directory loads either its previous committed state unchanged or, when the failure came
    after the commit point, the new one, and nothing else;
(b) no temporary or staged file is left behind (only the committed files and the lock);
(c) the error is a ``DiskError`` (a ``RecastError`` and ``OSError``) naming a file of the target,
    saying the disk is full and to free space (ENOSPC) or that an I/O error occurred there (EIO);
(d) ``recast verify`` finds nothing wrong with a model directory.

Each run starts from a copy of a saved starting directory, and ``os.fsync`` is counted (and
failed) but not performed: what is tested is what a failed call leaves, not durability, and the
hundreds of runs stay fast.

Each test prints and asserts how many write points it covered.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import io
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

from recast.cli import main as cli_main
from recast.edge.pack import write_packed_task
from recast.errors import DiskError, RecastError
from recast.format import ModelStore, is_model_directory, leftover_files, verify_model_dir
from recast.io import atomic_write_json, disk_error, read_json
from recast.methods import load_method
from recast.protocol import TaskModel
from recast.train.checkpoint import LoopState, Trainer, load_checkpoint, save_checkpoint
from recast.train.config import TrainConfig
from tests.reliability.common import nudge, tiny_method

pytestmark = pytest.mark.filterwarnings("ignore:Adapter task__:UserWarning")  # PEFT, on deleting the active adapter

ERRNOS = (errno.ENOSPC, errno.EIO)
CALLS = ("open", "write", "pwrite", "ftruncate", "fsync", "replace", "rename", "mkdir")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT


class UncoveredWrite(AssertionError):
    """The library wrote through a call the fault injection does not see."""


class WritePoints:
    """Patches the ``os`` calls that write; counts them, and raises ``OSError(code)`` at call ``fail_at``."""

    def __init__(self, fail_at: int | None = None, code: int = errno.ENOSPC) -> None:
        self.fail_at, self.code = fail_at, code
        self.calls: list[str] = []
        self.fired = False

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if name == "open" and not (args[1] if len(args) > 1 else kwargs.get("flags", 0)) & WRITE_FLAGS:
                return real(*args, **kwargs)  # opening to read (or a folder to fsync) writes nothing
            index = len(self.calls)
            self.calls.append(name)
            if index == self.fail_at:
                self.fired = True
                target = args[0] if args and isinstance(args[0], (str, os.PathLike)) else None
                raise OSError(self.code, os.strerror(self.code), *([os.fspath(target)] if target else []))
            return None if name == "fsync" else real(*args, **kwargs)
        return wrapper

    @contextmanager
    def active(self) -> Iterator[WritePoints]:
        """Patch for the ``with`` block; writes through ``open()`` or ``save_file`` raise ``UncoveredWrite``."""
        saved = {name: getattr(os, name) for name in CALLS}
        real_open, real_save_file = builtins.open, safetensors.torch.save_file

        def guarded_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if any(c in mode for c in "wax+"):
                raise UncoveredWrite(f"open({file!r}, {mode!r}) bypasses the counted write calls")
            return real_open(file, mode, *args, **kwargs)

        def guarded_save_file(*args: Any, **kwargs: Any) -> None:
            raise UncoveredWrite("safetensors.torch.save_file bypasses the counted write calls")

        for name, real in saved.items():
            setattr(os, name, self._wrap(name, real))
        builtins.open, safetensors.torch.save_file = guarded_open, guarded_save_file
        try:
            yield self
        finally:
            for name, real in saved.items():
                setattr(os, name, real)
            builtins.open, safetensors.torch.save_file = real_open, real_save_file


def run_with_faults(name: str, setup: Callable[[Path], Any], operation: Callable[[Path], None],
                    check: Callable[[Path, DiskError | None], str], root: Path) -> dict[str, int]:
    """Count ``operation``'s write points, then fail each one with each errno; returns outcome counts.

    ``setup(dir)`` builds the starting state; ``check(dir, error)`` asserts (a), (b) and (d) and
    returns ``"old"`` or ``"new"``; (c) is asserted here.
    """
    setup_dir = root / "count"
    setup(setup_dir)
    counting = WritePoints()
    with counting.active():
        operation(setup_dir)
    assert check(setup_dir, None) == "new"
    points = len(counting.calls)
    print(f"{name}: {points} write points ({', '.join(f'{c} x{counting.calls.count(c)}' for c in CALLS if c in counting.calls)}), "
          f"{points * len(ERRNOS)} faults injected")
    assert points > 0, f"{name}: no write point found; the counting wrapper does not see this writer"
    outcomes = {"old": 0, "new": 0, "raised": 0}
    for code in ERRNOS:
        for index in range(points):
            directory = root / f"{errno.errorcode[code]}-{index}"
            setup(directory)
            fault = WritePoints(index, code)
            error = None
            with fault.active():
                try:
                    operation(directory)
                except DiskError as exc:
                    error = exc
            assert fault.fired, f"{name}: write point {index} was not reached the second time: {fault.calls} vs {counting.calls}"
            if error is not None:
                outcomes["raised"] += 1
                check_message(error, code, directory)
            outcomes[check(directory, error)] += 1
            shutil.rmtree(directory, ignore_errors=True)
    assert outcomes["raised"] > 0
    return outcomes


def check_message(error: DiskError, code: int, directory: Path) -> None:
    """(c): a RecastError and OSError with the errno, naming a file under ``directory``, saying what to do."""
    message = str(error)
    assert isinstance(error, RecastError) and isinstance(error, OSError) and error.errno == code
    assert error.filename and Path(error.filename).is_relative_to(directory) and error.filename in message
    if code == errno.ENOSPC:
        assert "the disk is full" in message and re.search(r"[Ff]ree some space", message) and "retry" in message
    else:
        assert f"an I/O error occurred at {error.filename}" in message


# ------------------------------------------------------------------------------------ model directories
def model_state(directory: Path) -> dict[str, Any] | None:
    """What a directory loads as: fingerprint, active task and every task's tensors (None: no model)."""
    if not is_model_directory(directory):
        return None
    model = load_method(directory)
    return {"fingerprint": model.fingerprint, "active": model.active_task,
            "tasks": {t: model.task_tensors(t) for t in model.tasks}}


_LOADED: dict[str, dict[str, Any] | None] = {}


def loaded_state(directory: Path) -> dict[str, Any] | None:
    """:func:`model_state`, loaded once per distinct directory content (file names and bytes, lock aside).

    Hundreds of faulted directories hold one of two contents; identical bytes load identically.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != ".lock"):
        digest.update(f"{path.relative_to(directory)}\0".encode() + hashlib.sha256(path.read_bytes()).digest())
    key = digest.hexdigest()
    if key not in _LOADED:
        _LOADED[key] = model_state(directory)
    return _LOADED[key]


def same_state(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a["fingerprint"], a["active"], list(a["tasks"])) == (b["fingerprint"], b["active"], list(b["tasks"])) and all(
        a["tasks"][t].keys() == b["tasks"][t].keys() and all(torch.equal(a["tasks"][t][k], b["tasks"][t][k]) for k in a["tasks"][t])
        for t in a["tasks"])


def no_leftovers(directory: Path) -> None:
    """(b): only committed files and the lock: no temporary, staged or stray file anywhere."""
    assert leftover_files(directory) == []
    stray = [p for p in directory.rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    assert stray == []


def model_check(old: dict[str, Any] | None, new: dict[str, Any]) -> Callable[[Path, DiskError | None], str]:
    """A ``check`` for a model directory whose states before and after the operation are ``old``/``new``."""
    def check(directory: Path, error: DiskError | None) -> str:
        no_leftovers(directory)
        loaded = loaded_state(directory)
        if loaded is not None:
            assert verify_model_dir(directory) == []  # no error and no warning either
            with contextlib.redirect_stdout(io.StringIO()) as report:
                assert cli_main(["verify", str(directory)]) == 0  # `recast verify DIR` passes
            assert "all files good" in report.getvalue()
            if error is not None and same_state(loaded, new):
                assert "was committed" in str(error) and "Nothing was saved" not in str(error)
        if same_state(loaded, new):
            return "new"
        assert same_state(loaded, old), "the directory loads neither its previous state nor the new one"
        assert error is not None, "the operation reported success but the old state is still there"
        assert loaded is not None or not [p for p in directory.rglob("*") if p.is_file() and p.name != ".lock"]
        return "old"
    return check


def two_task_model(method: str) -> TaskModel:
    return tiny_method(method, tasks=("a", "b"))


@pytest.fixture(scope="module")
def models() -> dict[str, TaskModel]:
    torch.set_num_threads(1)
    changed = two_task_model("recast")
    nudge(changed, "a", seed=41)
    changed.add_task("c", 4)
    lora = two_task_model("lora")
    nudge(lora, "b", seed=43)
    return {"old": two_task_model("recast"), "changed": changed, "lora_old": two_task_model("lora"), "lora": lora}


MODEL_OPERATIONS: dict[str, tuple[str, Callable[[dict[str, TaskModel], Path], None]]] = {
    # name: (starting model, operation)
    "save_pretrained over a model": ("old", lambda m, d: m["changed"].save_pretrained(d)),
    "save_pretrained into a new folder": ("", lambda m, d: m["changed"].save_pretrained(d)),
    "save_task replacing a task": ("old", lambda m, d: m["changed"].save_task(d, "a")),
    "save_task adding an int8 task": ("old", lambda m, d: m["changed"].save_task(d, "c", dtype="int8")),
    "ModelStore.delete_task": ("old", lambda m, d: ModelStore(d).delete_task("b")),
    "LoRA save_pretrained": ("lora_old", lambda m, d: m["lora"].save_pretrained(d)),
    "LoRA save_task": ("lora_old", lambda m, d: m["lora"].save_task(d, "b")),
}


@pytest.mark.parametrize("name", list(MODEL_OPERATIONS))
def test_model_directory_writes_survive_a_fault_at_every_write_point(tmp_path, models, name):
    start, operation = MODEL_OPERATIONS[name]

    template = tmp_path / "start"
    if start:
        models[start].save_pretrained(template)

    def setup(directory: Path) -> None:
        if start:
            shutil.copytree(template, directory)

    scratch = tmp_path / "expected"
    setup(scratch)
    old = model_state(scratch)
    operation(models, scratch)
    new = model_state(scratch)
    assert not same_state(old, new)
    outcomes = run_with_faults(name, setup, lambda d: operation(models, d), model_check(old, new), tmp_path)
    print(f"{name}: {outcomes}")
    assert outcomes["old"] > 0 and outcomes["new"] > 0  # faults before and after the commit point were covered


# ------------------------------------------------------------------------------------- other writers
def tiny_trainer(seed: int) -> Trainer:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return Trainer(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1), None)


def train_step(trainer: Trainer) -> None:
    loss = trainer.model(torch.ones(2, 4)).square().sum()
    loss.backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    trainer.scheduler.step()


def test_training_checkpoint_survives_a_fault_at_every_write_point(tmp_path):
    config = TrainConfig(epochs=3)
    trainer = tiny_trainer(0)
    train_step(trainer)
    first = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    train_step(trainer)
    second = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    def setup(directory: Path) -> None:
        directory.mkdir(parents=True)
        trainer.model.load_state_dict(first)
        save_checkpoint(directory, trainer, LoopState(epoch=1, step=1), config)

    def operation(directory: Path) -> None:
        trainer.model.load_state_dict(second)
        save_checkpoint(directory, trainer, LoopState(epoch=2, step=2), config)

    def check(directory: Path, error: DiskError | None) -> str:
        fresh = tiny_trainer(1)
        loaded = load_checkpoint(directory, fresh, config)
        expected = {1: first, 2: second}[loaded.epoch]
        assert all(torch.equal(v, expected[k]) for k, v in fresh.model.state_dict().items())
        assert sorted(p.name for p in directory.iterdir()) == sorted(["checkpoint.json", f"epoch-{loaded.epoch}.safetensors"])
        return "new" if loaded.epoch == 2 else "old"

    outcomes = run_with_faults("save_checkpoint", setup, operation, check, tmp_path)
    print(f"save_checkpoint: {outcomes}")
    assert outcomes["old"] > 0


def single_file_check(path_of: Callable[[Path], Path], old: bytes, new: bytes) -> Callable[[Path, DiskError | None], str]:
    """A ``check`` for a writer of one file: it holds the old or the new bytes, and nothing else is there."""
    def check(directory: Path, error: DiskError | None) -> str:
        data = path_of(directory).read_bytes()
        assert data in (old, new)
        assert [p.name for p in directory.iterdir()] == [path_of(directory).name]
        return "new" if data == new else "old"
    return check


def test_result_json_survives_a_fault_at_every_write_point(tmp_path):
    before, after = {"accuracy": 0.5, "seed": 42}, {"accuracy": 0.75, "seed": 42, "epochs": 3}

    def setup(directory: Path) -> None:
        atomic_write_json(directory / "result.json", before)

    def operation(directory: Path) -> None:
        atomic_write_json(directory / "result.json", after)

    scratch = tmp_path / "expected"
    setup(scratch)
    old = (scratch / "result.json").read_bytes()
    operation(scratch)
    new = (scratch / "result.json").read_bytes()
    assert read_json(scratch / "result.json") == after
    outcomes = run_with_faults("atomic_write_json", setup, operation,
                               single_file_check(lambda d: d / "result.json", old, new), tmp_path)
    print(f"atomic_write_json: {outcomes}")


def test_packed_task_file_survives_a_fault_at_every_write_point(tmp_path, models):
    def setup(directory: Path) -> None:
        write_packed_task(models["old"], "a", "int8", directory / "a.safetensors")

    def operation(directory: Path) -> None:
        write_packed_task(models["changed"], "a", "int8", directory / "a.safetensors")

    scratch = tmp_path / "expected"
    setup(scratch)
    old = (scratch / "a.safetensors").read_bytes()
    operation(scratch)
    new = (scratch / "a.safetensors").read_bytes()
    assert old != new
    outcomes = run_with_faults("write_packed_task", setup, operation,
                               single_file_check(lambda d: d / "a.safetensors", old, new), tmp_path)
    print(f"write_packed_task: {outcomes}")


@pytest.mark.parametrize(("code", "wording"), [
    (errno.ENOSPC, "the disk is full: cannot write {path}"), (errno.EDQUOT, "the disk is full: cannot write {path}"),
    (errno.EIO, "an I/O error occurred at {path}"), (errno.EACCES, "no permission to write {path}"),
    (errno.EROFS, "no permission to write {path}"), (errno.ENAMETOOLONG, "cannot write {path}"),
])
def test_one_rule_words_every_disk_error(tmp_path, code, wording):
    path = tmp_path / "out.json"
    error = disk_error(OSError(code, os.strerror(code)), path, "Kept as it was")
    assert isinstance(error, DiskError) and isinstance(error, RecastError) and isinstance(error, OSError)
    assert error.errno == code and error.filename == str(path)
    assert str(error).startswith(wording.format(path=path)) and "Kept as it was." in str(error)
    assert str(error).endswith("retry.")
