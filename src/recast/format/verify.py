"""Checking a model directory file by file (``recast verify``), and naming crash leftovers.

A model directory is consistent when ``recast_config.json`` parses, the backbone and every task
file have the sha256 the config pins, their metadata names this format, version and bank
fingerprint, and no writer is half-way through. :func:`check_model_dir` reports on each file;
:func:`verify_model_dir` keeps only what is wrong.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from recast.bank import fingerprint
from recast.config import RecastConfig
from recast.errors import ConfigError, FileFormatError, RecastError
from recast.format.locking import is_locked
from recast.format.names import BACKBONE_FILE, CONFIG_FILE, MODEL_FORMAT, TASKS_DIR
from recast.format.records import (
    check_backbone_header,
    check_config_record,
    check_task_header,
    decode,
    is_pinned,
    task_record_problems,
)
from recast.format.staging import read_checked, staged_path
from recast.io import read_json

_STAGED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*\.[0-9a-f]{12}\.safetensors$")
_TEMP = re.compile(r"^\.[A-Za-z0-9][A-Za-z0-9_.-]*\.(json|safetensors)\.[A-Za-z0-9_]+\.tmp$")


@dataclass(frozen=True)
class Finding:
    """The verdict on one file: ``status`` is ``ok``, ``warning`` (loads fine) or ``error``."""

    path: str
    status: str
    message: str

    def to_dict(self) -> dict[str, str]:
        """A JSON-ready dict."""
        return asdict(self)


Problem = Finding  # what verify_model_dir returns: findings whose status is not "ok"


def leftover_files(directory: str | Path) -> list[Path]:
    """Temporary and staged files that an interrupted write left in a model directory.

    Only meaningful while no writer holds the directory lock (writers call it under the lock,
    after promoting the staged files the config pins).
    """
    directory = Path(directory)
    found = []
    for folder in (directory, directory / TASKS_DIR):
        if folder.is_dir():
            found += [p for p in sorted(folder.iterdir()) if p.is_file() and (_STAGED.match(p.name) or _TEMP.match(p.name))]
    return found


def verify_model_dir(path: str | Path) -> list[Finding]:
    """Everything wrong with the model directory ``path`` (empty when every file is good)."""
    return [f for f in check_model_dir(path) if f.status != "ok"]


def check_model_dir(path: str | Path) -> list[Finding]:
    """A finding for every file of the model directory ``path``: config, backbone, tasks, leftovers, lock."""
    directory = Path(path)
    if not directory.is_dir():
        return [Finding(str(directory), "error", "not a directory")]
    findings: list[Finding] = []
    record = _check(findings, directory / CONFIG_FILE, lambda p: _config(p))
    pins = pinned_names(record)
    _check(findings, directory / BACKBONE_FILE, lambda p: _backbone(p, record))
    findings += _task_findings(directory, record)
    for leftover in leftover_files(directory):
        status = "pending" if leftover.name in pins else "leftover"
        message = ("staged file of a committed save (an interrupted write); the model loads, the next save "
                   "moves it into place") if status == "pending" else "left by an interrupted write; harmless, " \
            "removed by the next save"
        findings.append(Finding(str(leftover), "warning", message))
    if is_locked(directory):
        findings.append(Finding(str(directory / ".lock"), "warning", "a writer holds the directory lock right now"))
    return findings


def _check(findings: list[Finding], path: Path, check: Any) -> Any:
    """Run ``check(path)``, recording ok or its error; returns its result (``None`` on error)."""
    try:
        result = check(path)
    except RecastError as exc:
        findings.append(Finding(str(path), "error", _reason(exc, path)))
        return None
    findings.append(Finding(str(path), "ok", result[1] if isinstance(result, tuple) else "ok"))
    return result[0] if isinstance(result, tuple) else result


def _reason(exc: Exception, path: Path) -> str:
    """An error message without the leading file name (the report already shows it)."""
    return str(exc).removeprefix(f"{path}: ")


def _config(path: Path) -> tuple[dict[str, Any], str]:
    record = read_json(path)
    check_config_record(path, record)
    if record["format"] == MODEL_FORMAT:
        try:
            RecastConfig.from_dict(record["config"])
        except ConfigError as exc:
            raise FileFormatError(f"{path}: invalid config ({exc})") from None
    if not is_pinned(record):
        return record, "ok (older layout: files are not pinned by sha256; save the model again to pin them)"
    return record, f"ok ({len(record['task_records'])} tasks pinned by sha256)"


def pinned_names(record: dict[str, Any] | None) -> set[str]:
    """Staged file names the config's checksums point at (present only after an interrupted save).

    These hold committed content: a cleanup must promote them, never delete them.
    """
    if not record or not is_pinned(record):
        return set()
    names = {staged_path(BACKBONE_FILE, record["backbone_file"]["sha256"]).name}
    names |= {staged_path(f"{n}.safetensors", r["sha256"]).name for n, r in record["task_records"].items()}
    return names


def _backbone(path: Path, record: dict[str, Any] | None) -> tuple[None, str]:
    """Checksum, metadata and bank fingerprint of ``backbone.safetensors``."""
    pinned = (record or {}).get("backbone_file")
    data = read_checked(path, pinned["sha256"]) if pinned else _read_bytes(path)
    tensors, header = decode(path, data)
    expected = record["fingerprint"] if record else header.get("fingerprint", "")
    check_backbone_header(path, header, expected)
    banks = [(k.removeprefix("banks.").removesuffix(".templates"), t) for k, t in tensors.items() if k.startswith("banks.")]
    actual = fingerprint(banks) if banks else fingerprint(tensors.items())
    if actual != expected:
        raise FileFormatError(f"{path}: its banks hash to {actual[:12]}..., its metadata says {expected[:12]}...")
    checked = "sha256 and fingerprint match" if pinned else "fingerprint matches (no sha256 pinned)"
    return None, f"ok ({len(tensors)} tensors, {len(data)} bytes; {checked})"


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileFormatError(f"{path}: file not found") from None


def _task_findings(directory: Path, record: dict[str, Any] | None) -> list[Finding]:
    """One finding per task tensor file and per task JSON."""
    findings: list[Finding] = []
    tasks_dir = directory / TASKS_DIR
    fingerprint = (record or {}).get("fingerprint")
    records = (record or {}).get("task_records")
    on_disk = sorted(p.stem for p in tasks_dir.glob("*.json")) if tasks_dir.is_dir() else []
    if records is None:  # older layout: each task's JSON pins its tensor file
        records = {}
        for name in on_disk:
            records[name] = _check(findings, tasks_dir / f"{name}.json", lambda p: _read_record(p))
    else:
        for name in on_disk:
            findings.append(_sidecar(tasks_dir / f"{name}.json", records.get(name)))
    for name, task_record in records.items():
        if task_record is not None:
            _check(findings, tasks_dir / f"{name}.safetensors", lambda p, r=task_record: _task_file(p, r, fingerprint))
    return findings


def _read_record(path: Path) -> tuple[dict[str, Any], str]:
    record = read_json(path)
    if not isinstance(record, dict):
        raise FileFormatError(f"{path}: not a recast task record (expected a JSON object)")
    return record, "ok"


def _sidecar(path: Path, pinned: dict[str, Any] | None) -> Finding:
    """A task JSON next to a config that pins the tasks: it should be the pinned record."""
    if pinned is None:
        return Finding(str(path), "warning", "not listed in recast_config.json, so this task is not loaded")
    try:
        current = read_json(path)
    except FileFormatError as exc:
        return Finding(str(path), "warning", _reason(exc, path) + "; the config's copy is used, the next save rewrites it")
    if current != pinned:
        return Finding(str(path), "warning", "differs from the record in recast_config.json (which is used); "
                       "the next save rewrites it")
    return Finding(str(path), "ok", "ok")


def _task_file(path: Path, record: dict[str, Any], fingerprint: str | None) -> tuple[None, str]:
    """Record fields, checksum and metadata of one task tensor file."""
    problems = task_record_problems(record)
    if problems:
        raise FileFormatError(f"{path}: its record is not valid: " + "; ".join(problems))
    data = read_checked(path, record["sha256"])
    tensors, header = decode(path, data)
    expected = fingerprint or record.get("fingerprint")
    check_task_header(path, header, str(expected))
    if record.get("fingerprint", expected) != expected:
        raise FileFormatError(f"{path}: its record names another backbone (fingerprint "
                              f"{str(record.get('fingerprint'))[:12]}..., the backbone's is {str(expected)[:12]}...)")
    return None, f"ok ({len(tensors)} tensors, {len(data)} bytes; sha256 and fingerprint match)"
