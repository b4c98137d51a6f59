"""The serving benchmark: load test, resident memory per task, and the mixed-batch micro-benchmark.

The load test builds the shipped ``recast-vit32`` with ``tasks`` tasks **cloned from one task with
perturbed coefficients and heads** (and PEFT LoRA r=8 with as many perturbed adapters): they
measure speed, not accuracy. Each server runs in its own process on 127.0.0.1 and is driven by
:class:`recast.client.AsyncClient` at each concurrency with a uniform random task per request.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

from recast.backbones import load_backbone
from recast.client import AsyncClient
from recast.io import atomic_write_json
from recast.methods import build_method
from recast.serve.engine import mixed_forward

SERVERS = (("recast-mixed", "recast", "mixed"), ("recast-set-task", "recast", "per-request"), ("lora-mixed", "lora", "mixed"))


# ------------------------------------------------------------------------------------ models
def clone_tasks(model: nn.Module, count: int, num_classes: int = 10, seed: int = 0) -> list[str]:
    """Add ``count`` tasks, each the first one's state plus noise (clearly not trained tasks)."""
    generator = torch.Generator().manual_seed(seed)
    names = [f"clone{i:04d}" for i in range(count)]
    for name in names:
        model.add_task(name, num_classes, class_names=[f"class{c}" for c in range(num_classes)])
    with torch.no_grad():
        for task in names:
            for tensor in _task_parameters(model, task):
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
    return names


def _task_parameters(model: nn.Module, task: str) -> list[torch.Tensor]:
    """The tensors that belong to ``task`` alone (coefficients, head, LoRA matrices)."""
    if hasattr(model, "adapter_name"):
        adapter = model.adapter_name(task)
        own = [p for n, p in model.net.named_parameters() if f".{adapter}." in n]
        return own + list(model.head.per_task[task].parameters())
    return [p for _, module in model.task_modules() for p in module.per_task[task].parameters()]


def build_served_model(method: str, tasks: int, directory: Path, seed: int = 0) -> Path:
    """``recast-vit32`` as ``method`` (``recast``: RECAST-Att; ``lora``: PEFT LoRA r=8) with cloned tasks, saved."""
    model = build_method(method, load_backbone("recast-vit32"), **({"rank": 8} if method == "lora" else {}))
    clone_tasks(model, tasks, seed=seed)
    model.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------------- load test
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _image_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def start_server(directory: Path, mode: str, threads: int, max_batch: int = 64) -> tuple[subprocess.Popen, str]:
    """``recast serve`` in a subprocess on a free 127.0.0.1 port; returns it and its URL once healthy."""
    port = _free_port()
    src = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    command = [sys.executable, "-m", "recast", "serve", str(directory), "--host", "127.0.0.1", "--port", str(port),
               "--mode", mode, "--threads", str(threads), "--max-batch", str(max_batch), "--max-wait-ms", "2",
               "--log-level", "warning"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not come up within 300 s")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM, then wait for the graceful end."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


async def drive(url: str, tasks: list[str], concurrency: int, requests: int, seed: int = 0) -> dict[str, Any]:
    """``requests`` predict calls of one image each, ``concurrency`` at a time, uniform random tasks."""
    rng = random.Random(seed)
    plan = [(rng.choice(tasks), _image_bytes(i % 16)) for i in range(requests)]
    latencies: list[float] = []
    failures: list[str] = []
    cursor = iter(plan)

    async def worker(client: AsyncClient) -> None:
        for task, image in cursor:
            started = time.perf_counter()
            try:
                await client.predict(task, [("image.png", image)], top_k=1)
                latencies.append(time.perf_counter() - started)
            except Exception as exc:  # counted, reported: the load test never stops on a failed request
                failures.append(f"{type(exc).__name__}: {exc}"[:200])

    async with AsyncClient(url, timeout=120, max_connections=concurrency) as client:
        for task, image in plan[: min(8, requests)]:  # warm-up, not timed
            await client.predict(task, [("image.png", image)])
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": requests, "completed": len(latencies), "failed": len(failures),
            "failures": failures[:5], "seconds": wall, "throughput_rps": len(latencies) / wall if wall else 0.0,
            **_percentiles(latencies)}


def _percentiles(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    ordered = sorted(latencies)
    pick = lambda q: 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_ms": 1000 * statistics.median(ordered), "p95_ms": pick(0.95), "p99_ms": pick(0.99)}


def load_test(tasks: int = 100, concurrency: tuple[int, ...] = (1, 8, 64), requests: int = 400,
              threads: int = 0, seed: int = 0) -> dict[str, Any]:
    """Each server of ``SERVERS`` under the same load; throughput and latency per concurrency."""
    results: dict[str, Any] = {"tasks": tasks, "tasks_note": "cloned from one task with perturbed coefficients/heads",
                               "servers": {}}
    with tempfile.TemporaryDirectory(prefix="recast-serve-bench-") as tmp:
        dirs = {m: build_served_model(m, tasks, Path(tmp) / m, seed) for m in {s[1] for s in SERVERS}}
        names = [f"clone{i:04d}" for i in range(tasks)]
        for label, method, mode in SERVERS:
            process, url = start_server(dirs[method], mode, threads)
            try:
                runs = [asyncio.run(drive(url, names, c, requests, seed)) for c in concurrency]
            finally:
                stop_server(process)
            results["servers"][label] = {"method": method, "mode": mode, "runs": runs}
    top = max(concurrency)
    rate = {k: next(r["throughput_rps"] for r in v["runs"] if r["concurrency"] == top) for k, v in results["servers"].items()}
    results["ratios_at_max_concurrency"] = {
        "recast_mixed_over_set_task": rate["recast-mixed"] / rate["recast-set-task"] if rate["recast-set-task"] else None,
        "recast_mixed_over_lora_mixed": rate["recast-mixed"] / rate["lora-mixed"] if rate["lora-mixed"] else None,
    }
    return results


# ------------------------------------------------------------------------------------- memory
def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc``; elsewhere the peak from ``resource``)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource  # deferred: only where /proc is missing

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_probe(method: str, tasks: int) -> dict[str, Any]:
    """In this (fresh) process: RSS of ``recast-vit32`` as ``method`` before and after adding ``tasks`` tasks."""
    model = build_method(method, load_backbone("recast-vit32"), **({"rank": 8} if method == "lora" else {}))
    gc.collect()
    before = resident_bytes()
    clone_tasks(model, tasks)
    gc.collect()
    after = resident_bytes()
    floats = sum(t.numel() for t in _task_parameters(model, "clone0000"))
    head = sum(t.numel() for t in model.head.per_task["clone0000"].parameters())
    return {"method": method, "tasks": tasks, "rss_before": before, "rss_after": after,
            "rss_per_task": (after - before) / tasks, "tensor_bytes_per_task": 4 * floats,
            "tensor_bytes_per_task_without_head": 4 * (floats - head)}


def memory_test(counts: tuple[int, ...] = (10, 100, 1000)) -> dict[str, Any]:
    """``memory_probe`` in a fresh process per method and count; bytes per additional task."""
    src = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    probes = []
    for method in ("recast", "lora"):
        for count in counts:
            code = f"import json; from recast.serve.bench import memory_probe; print(json.dumps(memory_probe({method!r}, {count})))"
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            probes.append(json.loads(out.stdout.strip().splitlines()[-1]))
    per_task = {}
    for method in ("recast", "lora"):
        rows = sorted((p for p in probes if p["method"] == method), key=lambda p: p["tasks"])
        low, high = rows[0], rows[-1]
        span = high["tasks"] - low["tasks"]
        per_task[method] = (high["rss_after"] - high["rss_before"] - (low["rss_after"] - low["rss_before"])) / span if span else None
    ratio = per_task["lora"] / per_task["recast"] if per_task["recast"] else None
    return {"probes": probes, "rss_per_additional_task": per_task, "lora_over_recast": ratio}


# --------------------------------------------------------------------------------------- micro
def micro_benchmark(batch: int = 32, repeats: int = 10, size: int = 224, seed: int = 0) -> dict[str, Any]:
    """ViT-S ``att`` (random weights) at ``batch``: throughput of mixed and single-task batches.

    Cases: one task; ``batch`` distinct tasks through the template path, grouping and the cost
    model's choice; PEFT LoRA r=8 on the fused qkv with ``batch`` adapters, one adapter and mixed.
    """
    torch.manual_seed(seed)
    base = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=size, num_classes=10).eval()
    x = torch.randn(batch, 3, size, size)
    recast = build_method("recast", base, target="att").eval()
    lora = build_method("lora", base, rank=8).eval()
    names = {"recast": clone_tasks(recast, batch, seed=seed), "lora": clone_tasks(lora, batch, seed=seed)}
    cases = {
        "recast_one_task": (recast, [names["recast"][0]] * batch, "auto"),
        "recast_distinct_template": (recast, names["recast"], "template"),
        "recast_distinct_grouped": (recast, names["recast"], "group"),
        "recast_distinct_auto": (recast, names["recast"], "auto"),
        "lora_one_adapter": (lora, [names["lora"][0]] * batch, "auto"),
        "lora_distinct_mixed": (lora, names["lora"], "auto"),
    }
    timings = {}
    with torch.no_grad():
        for label, (model, tasks, batching) in cases.items():
            mixed_forward(model, x, tasks, batching)  # warm-up (and weight caches)
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                mixed_forward(model, x, tasks, batching)
                times.append(time.perf_counter() - started)
            median = statistics.median(times)
            timings[label] = {"median_s": median, "images_per_s": batch / median}
    rate = {k: v["images_per_s"] for k, v in timings.items()}
    return {"model": "vit_small_patch16_224 (random weights)", "target": "att", "batch": batch, "size": size,
            "repeats": repeats, "threads": torch.get_num_threads(), "cases": timings, "ratios": {
                "distinct_template_over_one_task": rate["recast_distinct_template"] / rate["recast_one_task"],
                "distinct_grouped_over_one_task": rate["recast_distinct_grouped"] / rate["recast_one_task"],
                "distinct_auto_over_one_task": rate["recast_distinct_auto"] / rate["recast_one_task"],
                "distinct_template_over_lora_mixed": rate["recast_distinct_template"] / rate["lora_distinct_mixed"],
                "distinct_auto_over_lora_mixed": rate["recast_distinct_auto"] / rate["lora_distinct_mixed"],
            }}


# ----------------------------------------------------------------------------------------- all
def run_all(out: str | Path, *, tasks: int = 100, concurrency: list[int] | tuple[int, ...] = (1, 8, 64),
            requests: int = 400, memory_tasks: list[int] | tuple[int, ...] = (10, 100, 1000), micro_batch: int = 32,
            micro_repeats: int = 10, micro_size: int = 224, skip: set[str] | None = None, seed: int = 0) -> dict[str, Any]:
    """Every part not in ``skip`` (``load``, ``memory``, ``micro``); one JSON file each under ``out``."""
    out, skip = Path(out), skip or set()
    meta = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "device": "cpu",
            "note": "the load test runs client and server on one machine; tasks are clones, not trained"}
    summary: dict[str, Any] = {}
    parts = {"micro": lambda: micro_benchmark(micro_batch, micro_repeats, micro_size, seed),
             "memory": lambda: memory_test(tuple(memory_tasks)),
             "load": lambda: load_test(tasks, tuple(concurrency), requests, seed=seed)}
    for name, run in parts.items():
        if name in skip:
            continue
        result = {**meta, **run()}
        atomic_write_json(out / f"{name}.json", result)
        summary[name] = {k: v for k, v in result.items() if k in ("ratios", "ratios_at_max_concurrency",
                                                                   "rss_per_additional_task", "lora_over_recast")}
    return summary
