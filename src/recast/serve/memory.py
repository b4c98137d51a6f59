"""Memory per task loaded: RECAST-Att against PEFT LoRA r=8 on ViT-S, heads counted fairly.

Each method runs in a fresh process (:func:`memory_probe`): ViT-S/16 at 224 px (random weights:
memory does not depend on their values) is rewritten as ``recast`` (target ``att``), ``lora``
(r=8 on the fused qkv, PEFT) or ``linear`` (heads only), then tasks with 10-class heads are added
one by one and the process is measured at each count. All three carry the same head per task, so
``linear`` measures what the heads alone cost and the difference is what the method adds.

Two figures per count: resident memory (``/proc/self/statm``, the figure that counts) and the
bytes the C allocator has handed out (glibc ``mallinfo2``, where available: tensors and larger
Python objects, but not the small objects Python keeps in arenas it maps itself). Before each
reading, Python's garbage is collected and glibc returns free pages to the system
(``malloc_trim``): otherwise memory freed while the model was built (the source network) is
reused by the tasks without growing the resident set, and the per-task figure reads low.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch

from recast.methods import build_method

METHODS = {"recast": {"target": "att"}, "lora": {"rank": 8}, "linear": {}}
MODEL = "vit_small_patch16_224"
NUM_CLASSES = 10


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _libc() -> ctypes.CDLL | None:
    """glibc, when this process runs on it (``malloc_trim`` and ``mallinfo2`` exist); else ``None``."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):
        return None


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc``; elsewhere the peak from ``resource``)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource  # deferred: only where /proc is missing

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def settled_reading(libc: ctypes.CDLL | None) -> dict[str, int | None]:
    """Resident and allocated bytes after collecting garbage and trimming the C heap."""
    gc.collect()
    allocated = None
    if libc is not None:
        libc.malloc_trim(0)
        info = libc.mallinfo2()
        allocated = int(info.uordblks + info.hblkhd)
    return {"rss": resident_bytes(), "allocated": allocated}


def memory_probe(method: str, counts: list[int]) -> dict[str, Any]:
    """In this (fresh) process: memory of ViT-S as ``method`` before and after 1..max(counts) tasks."""
    torch.manual_seed(0)
    libc = _libc()
    base = timm.create_model(MODEL, pretrained=False, num_classes=NUM_CLASSES).eval()
    model = build_method(method, base, **METHODS[method])
    del base
    start = settled_reading(libc)
    started, rows, added = time.perf_counter(), [], 0
    for count in sorted(counts):
        while added < count:
            model.add_task(f"t{added:05d}", NUM_CLASSES)
            added += 1
        reading = settled_reading(libc)
        rows.append({"tasks": count, **{f"{k}_delta": _delta(reading[k], start[k]) for k in reading},
                     "seconds": time.perf_counter() - started})
    task = f"t{0:05d}"
    counts_by_kind = model.task_parameters(task)
    return {"method": method, "options": METHODS[method], "start": start, "rows": rows,
            "numbers_per_task": counts_by_kind, "tensor_bytes_per_task": 4 * sum(counts_by_kind.values()),
            "tensor_bytes_per_task_without_head": 4 * (sum(counts_by_kind.values()) - counts_by_kind.get("head", 0))}


def _delta(now: int | None, before: int | None) -> int | None:
    return None if now is None or before is None else now - before


def memory_test(counts: tuple[int, ...] = (10, 100, 1000), progress: Any = None) -> dict[str, Any]:
    """:func:`memory_probe` of every method in a fresh process; bytes per task with and without heads."""
    src = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    probes = {}
    for method in METHODS:
        if progress is not None:
            progress(f"memory: {method} on {MODEL}, adding {max(counts)} tasks in a fresh process")
        code = f"import json; from recast.serve.memory import memory_probe; print(json.dumps(memory_probe({method!r}, {list(counts)!r})))"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"memory probe of {method} failed: {out.stderr[-2000:]}")
        probes[method] = json.loads(out.stdout.strip().splitlines()[-1])
    return {"model": f"{MODEL} (random weights), {NUM_CLASSES}-class heads", "counts": list(counts),
            "probes": probes, "per_task": per_task_figures(probes)}


def per_task_figures(probes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Bytes per task at the largest count (delta / tasks), with heads and without (minus ``linear``)."""
    figures: dict[str, Any] = {}
    for measure in ("rss", "allocated"):
        last = {m: p["rows"][-1] for m, p in probes.items()}
        with_heads = {m: _per(row, measure) for m, row in last.items()}
        heads = with_heads.get("linear")
        without = {m: (v - heads if v is not None and heads is not None else None)
                   for m, v in with_heads.items() if m != "linear"}
        figures[measure] = {
            "tasks": last["recast"]["tasks"],
            "with_heads": with_heads,
            "heads_alone": heads,
            "without_heads": without,
            "lora_over_recast_with_heads": _ratio(with_heads.get("lora"), with_heads.get("recast")),
            "lora_over_recast_without_heads": _ratio(without.get("lora"), without.get("recast")),
        }
    return figures


def _per(row: dict[str, Any], measure: str) -> float | None:
    value = row.get(f"{measure}_delta")
    return None if value is None else value / row["tasks"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None
