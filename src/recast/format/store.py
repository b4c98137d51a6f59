"""``ModelStore``: the one place that reads and writes a model directory.

Writes are transactions under the directory lock: new file versions are staged under names that
carry their checksum, then ``recast_config.json`` (which pins every file's sha256) is replaced in
one rename, the commit point, then the staged files are moved into place ("settled"). A SIGKILL
before the commit leaves the previous state; after it, the new one, because readers find staged
files by checksum. Readers take no lock: every byte they use is checked against a pinned sha256,
and :mod:`recast.format.reading` starts a read over when a commit raced it.

A write that fails (disk full, I/O error) is cleaned up before its error is raised, still under the
lock: staged and temporary files the committed config does not pin are removed, pinned ones are
promoted, so the directory holds exactly one committed state and no leftovers. The error is a
``DiskError`` naming the file, saying whether the save was committed and what to do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor

from recast.errors import FileFormatError
from recast.format.locking import DirectoryLockedError, lock_directory
from recast.format.names import BACKBONE_FILE, CONFIG_FILE, TASKS_DIR, check_task_name, is_task_name, task_path
from recast.format.quantize import DTYPES, dequantize_tensors
from recast.format.reading import consistent_read
from recast.format.records import (
    check_backbone_header,
    check_config_record,
    check_task_header,
    check_task_record,
    decode,
    is_pinned,
    task_record_problems,
)
from recast.format.staging import promote, read_checked, staged_path, write_staged
from recast.format.verify import leftover_files, pinned_names
from recast.io import atomic_write_json, disk_error, read_json

TaskBlob = tuple[bytes, dict[str, Any]]  # a task file's bytes and the record that pins them


class ModelStore:
    """A model directory: its config, backbone and task files (see :mod:`recast.format.names`)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_FILE

    @property
    def backbone_path(self) -> Path:
        return self.directory / BACKBONE_FILE

    def task_file(self, name: str) -> Path:
        """``tasks/<name>.safetensors`` (the name checked against the rule first)."""
        return task_path(self.directory, name, ".safetensors")

    # ------------------------------------------------------------------------------------ reading
    def read_config(self) -> dict[str, Any]:
        """The checked ``recast_config.json`` (any layout this library reads)."""
        record = read_json(self.config_path)
        check_config_record(self.config_path, record)
        return record

    def committed(self) -> dict[str, Any] | None:
        """The config when it is valid and pins its files by sha256, else ``None``."""
        if not self.config_path.is_file():
            return None
        try:
            record = self.read_config()
        except FileFormatError:
            return None
        return record if is_pinned(record) else None

    def task_records(self, config: dict[str, Any] | None = None) -> dict[str, Any]:
        """Every task the directory holds, in order, name -> record (not yet checked).

        The committed config's records when it pins them; for older directories, the tasks the
        config lists followed by any other ``tasks/*.json``.
        """
        config = config if config is not None else self.read_config()
        if is_pinned(config):
            return dict(config["task_records"])
        on_disk = self._task_names_on_disk()
        order = [t for t in config.get("tasks", []) if t in on_disk]
        order += [t for t in on_disk if t not in order]
        return {name: read_json(task_path(self.directory, name, ".json")) for name in order}

    def _task_names_on_disk(self) -> list[str]:
        folder = self.directory / TASKS_DIR
        return sorted(p.stem for p in folder.glob("*.json") if is_task_name(p.stem)) if folder.is_dir() else []

    def task_record(self, name: str) -> tuple[Any, Path]:
        """Task ``name``'s record and the file it came from (the config when it pins the task)."""
        check_task_name(name)
        committed = self.committed()
        if committed is not None and name in committed["task_records"]:
            return committed["task_records"][name], self.config_path
        path = task_path(self.directory, name, ".json")
        return read_json(path), path

    def read_task(self, name: str, record: Any, source: Path, fingerprint: str) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, str]]:
        """Checked record, tensors and header of task ``name`` for the backbone ``fingerprint``.

        Packed files (``dtype`` fp16 or int8 in their metadata) come back dequantised to float32.
        """
        record = check_task_record(source, record, fingerprint)
        path = self.task_file(name)
        tensors, header = decode(path, read_checked(path, record["sha256"]))
        check_task_header(path, header, fingerprint)
        dtype = header.get("dtype", "fp32")
        if dtype not in DTYPES:
            raise FileFormatError(f"{path}: stored in dtype {dtype!r}, this library reads {', '.join(DTYPES)}")
        if dtype != "fp32":
            try:
                tensors = dequantize_tensors(tensors)
            except FileFormatError as exc:
                raise FileFormatError(f"{path}: {exc}") from None
        return record, tensors, header

    def read_backbone(self, config: dict[str, Any]) -> dict[str, Tensor]:
        """The tensors of ``backbone.safetensors``, checked against the config's sha256 and fingerprint."""
        path = self.backbone_path
        pinned = config.get("backbone_file")
        if pinned:
            data = read_checked(path, pinned["sha256"])
        else:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise FileFormatError(f"{path}: file not found") from None
        tensors, header = decode(path, data)
        check_backbone_header(path, header, config["fingerprint"])
        return tensors

    # ------------------------------------------------------------------------------------ writing
    def write_model(self, backbone: bytes, tasks: dict[str, TaskBlob], config: dict[str, Any]) -> None:
        """Commit a whole model: backbone, ``tasks`` and ``config`` (which gets the file pins).

        Tasks already in the directory that this model does not hold are kept when they fit its
        fingerprint (``config["fingerprint"]``).
        """
        with self._transaction():
            previous = self.committed()
            if previous is not None:
                self._settle(previous)
            pinned = {"name": BACKBONE_FILE, "sha256": write_staged(self.backbone_path, backbone), "bytes": len(backbone)}
            records = {}
            for name, (data, record) in tasks.items():
                write_staged(self.task_file(name), data)
                records[name] = record
            kept = self._kept_records(previous, config["fingerprint"])
            records.update({k: v for k, v in kept.items() if k not in records})
            record = {**config, "tasks": list(records), "backbone_file": pinned, "task_records": records}
            atomic_write_json(self.config_path, record)
            self._settle(record)

    def write_task(self, name: str, blob: TaskBlob, fingerprint: str) -> None:
        """Commit one task. In a model directory the config is rewritten under the lock, so
        concurrent writers each add their task; without a config the task's JSON is the commit.
        Refused when the directory holds another backbone: the task could never load there.
        """
        data, record = blob
        path = self.task_file(name)
        with self._transaction():
            committed = self.committed()
            if committed is None:
                write_staged(path, data)
                atomic_write_json(path.with_suffix(".json"), record)
                promote(path, record["sha256"])
                return
            self._settle(committed)
            if committed.get("fingerprint") != fingerprint:
                raise FileFormatError(
                    f"{self.config_path}: this directory holds another backbone (fingerprint "
                    f"{str(committed.get('fingerprint'))[:12]}..., this model's is {fingerprint[:12]}...); "
                    "save the task next to the backbone it was trained on, or save_pretrained to a new directory"
                )
            write_staged(path, data)
            committed["task_records"][name] = record
            committed["tasks"] = [*[t for t in committed.get("tasks", []) if t != name], name]
            atomic_write_json(self.config_path, committed)
            self._settle(committed)

    def delete_task(self, name: str) -> bool:
        """Remove task ``name`` from the directory (committed in one rename); False when it holds none.

        The config without the task is the commit; the task's files are removed after it, so a
        crash in between leaves only files the config no longer lists (``recast verify`` warns).
        """
        path = self.task_file(name)
        with self._transaction():
            committed = self.committed()
            if committed is None:
                found = path.with_suffix(".json").is_file()
                path.with_suffix(".json").unlink(missing_ok=True)
            else:
                self._settle(committed)
                found = name in committed["task_records"]
                if found:
                    del committed["task_records"][name]
                    committed["tasks"] = [t for t in committed.get("tasks", []) if t != name]
                    if committed.get("active") == name:
                        committed["active"] = next(iter(committed["tasks"]), None)
                    try:
                        atomic_write_json(self.config_path, committed)
                    finally:  # also when the write failed after its commit (a directory fsync)
                        self._drop_files_unless_listed(name)
            path.unlink(missing_ok=True)
            return found

    def _drop_files_unless_listed(self, name: str) -> None:
        """Remove task ``name``'s files when the committed config does not list it (any more)."""
        committed = self.committed()
        if committed is not None and name not in committed["task_records"]:
            for suffix in (".json", ".safetensors"):
                task_path(self.directory, name, suffix).unlink(missing_ok=True)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """Hold the write lock; on a failed write, tidy up and raise a ``DiskError`` that says what was kept."""
        locked, before = False, None
        try:
            with lock_directory(self.directory):
                locked, before = True, self._config_bytes()
                try:
                    yield
                except OSError:
                    self._recover()
                    raise
        except DirectoryLockedError:
            raise
        except OSError as exc:
            committed = locked and self._config_bytes() != before
            kept = (f"The change was committed ({self.directory} loads the new state), but finishing it failed; "
                    "the next save to it completes it" if committed else
                    f"Nothing was saved: {self.directory} still holds its previous state, unchanged")
            raise disk_error(exc, exc.filename or self.directory, kept) from exc

    def _config_bytes(self) -> bytes | None:
        """The config as it is on disk now (``None`` when there is none): what a commit changes."""
        try:
            return self.config_path.read_bytes()
        except OSError:
            return None

    def _recover(self) -> None:
        """After a failed write: drop staged files no commit pins, then finish the committed state.

        Best effort (the disk may still be failing): removing files needs no space, so the
        leftovers go first; promoting and rewriting task JSONs may fail again, and then the
        next save finishes them (the directory loads either way).
        """
        try:
            committed = self.committed()
            keep = pinned_names(committed) if committed is not None else self._pinned_without_config()
            for leftover in leftover_files(self.directory):
                if leftover.name not in keep:
                    leftover.unlink(missing_ok=True)
            if committed is not None:
                self._settle(committed)
            else:
                for name, record in self._task_json_records().items():
                    promote(self.task_file(name), record["sha256"])
        except (OSError, FileFormatError):
            pass

    def _task_json_records(self) -> dict[str, dict[str, Any]]:
        """The usable ``tasks/*.json`` records of a directory without a config (their JSON is their commit)."""
        records = {}
        for name in self._task_names_on_disk():
            try:
                record = read_json(task_path(self.directory, name, ".json"))
            except FileFormatError:
                continue
            if isinstance(record, dict) and not task_record_problems(record):
                records[name] = record
        return records

    def _pinned_without_config(self) -> set[str]:
        """Staged file names that task JSONs pin, in a directory without a config."""
        return {staged_path(self.task_file(n), r["sha256"]).name for n, r in self._task_json_records().items()}

    def _settle(self, record: dict[str, Any]) -> None:
        """Finish a committed write: promote staged files, refresh task JSONs, drop leftovers.

        Safe to repeat: a writer runs it after its commit, and the next writer runs it again first
        in case the previous one was killed half-way through it.
        """
        promote(self.backbone_path, record["backbone_file"]["sha256"])
        for name, task_record in record["task_records"].items():
            path = self.task_file(name)
            promote(path, task_record["sha256"])
            json_path = path.with_suffix(".json")
            try:
                current = read_json(json_path)
            except FileFormatError:
                current = None
            if current != task_record:
                atomic_write_json(json_path, task_record)
        for leftover in leftover_files(self.directory):
            leftover.unlink(missing_ok=True)

    def _kept_records(self, previous: dict[str, Any] | None, fingerprint: str) -> dict[str, dict[str, Any]]:
        """Task records already in the directory that fit the backbone ``fingerprint``."""
        candidates = previous["task_records"] if previous is not None else self._task_json_records()
        return {
            name: record for name, record in candidates.items()
            if is_task_name(name) and isinstance(record, dict) and not task_record_problems(record)
            and record.get("fingerprint") == fingerprint
        }


@consistent_read
def task_records(directory: str | Path) -> dict[str, Any]:
    """The tasks a model directory holds, name -> record, as its config lists them (for ``recast tasks``)."""
    return ModelStore(directory).task_records()


def is_model_directory(directory: str | Path) -> bool:
    """True when ``directory`` holds a model's config (it may still fail the checks on load)."""
    return ModelStore(directory).config_path.is_file()
