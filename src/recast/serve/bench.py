"""The serving benchmark: load test, memory per task (:mod:`recast.serve.memory`), micro-benchmark.

The load test builds the shipped ``recast-vit32`` with ``tasks`` tasks **cloned from one task with
perturbed coefficients and heads** (and PEFT LoRA r=8 with as many perturbed adapters): they
measure speed, not accuracy. Each server runs in its own process on 127.0.0.1 only, with the same
micro-batching options (``max_batch``, ``max_wait_ms``) and torch threads, and is driven by
:class:`recast.client.AsyncClient` at each concurrency with the same sequence of (task, image)
requests, a uniform random task each. The ``set_task`` server gathers micro-batches like the
mixed one but runs one ``set_task`` and forward per task of each (no mixing). Every phase is
bounded in time; a server is always stopped, also when a phase fails.
"""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
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
from recast.serve.memory import memory_test

SERVERS = (("recast-mixed", "recast", "mixed"), ("recast-set-task", "recast", "per-request"), ("lora-mixed", "lora", "mixed"))
HOST = "127.0.0.1"  # the load test never listens on another interface
MAX_BATCH, MAX_WAIT_MS = 64, 2.0  # the same micro-batching options for every server


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
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _image_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class Server:
    """``recast serve`` in a subprocess on a free 127.0.0.1 port, healthy on entry, stopped on exit.

    Its log goes to a temporary file (a pipe nobody reads could fill and block the server); the
    tail is in the error raised when it does not come up.
    """

    def __init__(self, directory: Path, mode: str, threads: int, startup_s: float = 300.0) -> None:
        self.directory, self.mode, self.threads, self.startup_s = directory, mode, threads, startup_s
        self.url = ""
        self.process: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in __exit__)

    def __enter__(self) -> Server:
        port = _free_port()
        src = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
        command = [sys.executable, "-m", "recast", "serve", str(self.directory), "--host", HOST, "--port", str(port),
                   "--mode", self.mode, "--threads", str(self.threads), "--max-batch", str(MAX_BATCH),
                   "--max-wait-ms", str(MAX_WAIT_MS), "--max-images", str(MAX_BATCH), "--log-level", "warning"]
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        self.url = f"http://{HOST}:{port}"
        try:
            self._wait_healthy()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server ({self.mode}) exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError(f"server ({self.mode}) did not come up within {self.startup_s:.0f} s: {self.log_tail()}")

    def log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-2000:]

    def __exit__(self, *exc: object) -> None:
        """SIGTERM, then wait for the graceful end (killed after 60 s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def request_plan(tasks: list[str], requests: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """The (task, PNG) sequence every server gets: uniform random tasks, 16 distinct images."""
    rng = random.Random(seed)
    images = [_image_bytes(i) for i in range(16)]
    return [(rng.choice(tasks), images[i % 16]) for i in range(requests)]


async def drive(url: str, tasks: list[str], concurrency: int, requests: int, seed: int = 0,
                limit_s: float = 600.0) -> dict[str, Any]:
    """``requests`` predict calls of one image each, ``concurrency`` workers at a time (each with its own
    connection), uniform random tasks.

    Requests still unanswered after ``limit_s`` seconds are cancelled and counted as failed.
    """
    plan = request_plan(tasks, requests, seed)
    latencies: list[float] = []
    stages: list[dict[str, float]] = []
    failures: list[str] = []
    cursor = iter(plan)

    async def worker(client: AsyncClient) -> None:
        for task, image in cursor:
            started = time.perf_counter()
            try:
                _, timing = await client.predict_timed(task, [("image.png", image)], top_k=1)
                latencies.append(time.perf_counter() - started)
                stages.append({**timing, "outside_server": 1000 * latencies[-1] - timing.get("total", 0.0)})
            except Exception as exc:  # counted, reported: the load test never stops on a failed request
                failures.append(f"{type(exc).__name__}: {exc}"[:200])

    # One client and connection per concurrent worker, as concurrent users have. Sharing one httpx pool of
    # 64 connections among 64 workers starved some requests in the pool for 5-12 s while their
    # connections sat idle (the server's keep-alive timeout then closed them): a client-side tail.
    clients = [AsyncClient(url, timeout=min(120.0, limit_s), max_connections=1) for _ in range(concurrency)]
    try:
        warm = [plan[i % len(plan)] for i in range(len(clients))]  # warm-up, not timed: opens each connection
        await asyncio.gather(*(c.predict(task, [("image.png", image)]) for c, (task, image) in zip(clients, warm, strict=True)))
        started = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.gather(*(worker(c) for c in clients)), timeout=limit_s)
        except asyncio.TimeoutError:
            failures.append(f"timed out after {limit_s:.0f} s")
        wall = time.perf_counter() - started
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    failed = requests - len(latencies)
    return {"concurrency": concurrency, "requests": requests, "completed": len(latencies), "failed": failed,
            "failures": failures[:5], "seconds": wall, "throughput_rps": len(latencies) / wall if wall else 0.0,
            **_percentiles(latencies), "stages_ms": _stage_percentiles(stages)}


def _client_process_setup() -> None:
    """In the load client's process: one torch thread, so the client never competes with the server's."""
    torch.set_num_threads(1)


def drive_in_process(url: str, tasks: list[str], concurrency: int, requests: int, seed: int = 0,
                     limit_s: float = 600.0) -> dict[str, Any]:
    """:func:`drive` in a fresh process of its own (the client shares no interpreter or threads with the
    benchmark's models); the process is bounded by ``limit_s`` plus a margin for its start."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_client_process_setup) as pool:
        future = pool.submit(_drive_sync, url, tasks, concurrency, requests, seed, limit_s)
        return future.result(timeout=limit_s + 120)


def _drive_sync(url: str, tasks: list[str], concurrency: int, requests: int, seed: int, limit_s: float) -> dict[str, Any]:
    return asyncio.run(drive(url, tasks, concurrency, requests, seed, limit_s))


def default_server_threads() -> int:
    """Torch threads for each server: all cores but one, which is left to the load client."""
    return max(1, (os.cpu_count() or 2) - 1)


def _percentiles(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    ordered = sorted(latencies)
    pick = lambda q: 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_ms": 1000 * statistics.median(ordered), "p95_ms": pick(0.95), "p99_ms": pick(0.99)}


def _stage_percentiles(stages: list[dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """p50/p95/p99 in ms of each server stage (``Server-Timing``) and of the time outside the server."""
    names = dict.fromkeys(name for entry in stages for name in entry)
    return {name: _percentiles([entry[name] / 1000 for entry in stages if name in entry]) for name in names}


def load_test(tasks: int = 100, concurrency: tuple[int, ...] = (1, 8, 64), requests: int = 400,
              threads: int = 0, seed: int = 0, limit_s: float = 600.0, progress: Any = None) -> dict[str, Any]:
    """Each server of ``SERVERS`` under the same load; throughput and latency per concurrency."""
    say = progress or (lambda _: None)
    threads = threads or default_server_threads()
    results: dict[str, Any] = {
        "tasks": tasks, "tasks_note": "cloned from one task with perturbed coefficients/heads (a speed test)",
        "backbone": "recast-vit32", "host": HOST, "max_batch": MAX_BATCH, "max_wait_ms": MAX_WAIT_MS,
        "threads": threads, "client": "its own process (spawn), one torch thread, one connection per concurrent worker", "requests_per_level": requests, "servers": {}}
    with tempfile.TemporaryDirectory(prefix="recast-serve-bench-") as tmp:
        dirs = {}
        for method in dict.fromkeys(s[1] for s in SERVERS):
            say(f"load: building recast-vit32 as {method} with {tasks} cloned tasks")
            dirs[method] = build_served_model(method, tasks, Path(tmp) / method, seed)
        names = [f"clone{i:04d}" for i in range(tasks)]
        for label, method, mode in SERVERS:
            say(f"load: starting {label} ({method}, mode {mode})")
            runs = []
            with Server(dirs[method], mode, threads) as server:
                health = httpx.get(f"{server.url}/healthz", timeout=30).json()
                for level in concurrency:
                    run = drive_in_process(server.url, names, level, requests, seed, limit_s)
                    run["server_torch_threads"] = health.get("torch_threads")
                    runs.append(run)
                    say(f"load: {label} concurrency {level}: {run['throughput_rps']:.1f} req/s, "
                        f"p50 {_ms(run['p50_ms'])} p99 {_ms(run['p99_ms'])}, {run['failed']} failed")
            results["servers"][label] = {"method": method, "mode": mode, "runs": runs}
    results["failed_total"] = sum(r["failed"] for v in results["servers"].values() for r in v["runs"])
    top = max(concurrency)
    rate = {k: next(r["throughput_rps"] for r in v["runs"] if r["concurrency"] == top) for k, v in results["servers"].items()}
    results["ratios_at_max_concurrency"] = {
        "concurrency": top,
        "recast_mixed_over_set_task": rate["recast-mixed"] / rate["recast-set-task"] if rate["recast-set-task"] else None,
        "recast_mixed_over_lora_mixed": rate["recast-mixed"] / rate["lora-mixed"] if rate["lora-mixed"] else None,
    }
    return results


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


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
    times: dict[str, list[float]] = {label: [] for label in cases}
    with torch.no_grad():
        for model, tasks, batching in cases.values():
            mixed_forward(model, x, tasks, batching)  # warm-up (and weight caches)
        for _ in range(repeats):  # interleaved rounds: a slow spell of the machine hits every case alike
            for label, (model, tasks, batching) in cases.items():
                started = time.perf_counter()
                mixed_forward(model, x, tasks, batching)
                times[label].append(time.perf_counter() - started)
    timings = {label: {"median_s": statistics.median(ts), "images_per_s": batch / statistics.median(ts)}
               for label, ts in times.items()}
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
PARTS = ("micro", "memory", "load")


def run_all(out: str | Path, *, tasks: int = 100, concurrency: list[int] | tuple[int, ...] = (1, 8, 64),
            requests: int = 400, memory_tasks: list[int] | tuple[int, ...] = (10, 100, 1000), micro_batch: int = 32,
            micro_repeats: int = 10, micro_size: int = 224, skip: set[str] | None = None, seed: int = 0,
            limit_s: float = 600.0, progress: Any = None) -> dict[str, Any]:
    """Every part not in ``skip`` (``micro``, ``memory``, ``load``); one JSON file each under ``out``."""
    out, skip = Path(out), skip or set()
    say = progress or (lambda _: None)
    meta = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "device": "cpu",
            "note": "the load test runs client and server on one machine; tasks are clones, not trained"}
    summary: dict[str, Any] = {}
    parts = {"micro": lambda: micro_benchmark(micro_batch, micro_repeats, micro_size, seed),
             "memory": lambda: memory_test(tuple(memory_tasks), progress=say),
             "load": lambda: load_test(tasks, tuple(concurrency), requests, seed=seed, limit_s=limit_s, progress=say)}
    chosen = [name for name in PARTS if name not in skip]
    say(f"serve-bench: parts {', '.join(chosen) or 'none'}; JSON under {out}")
    for name in chosen:
        started = time.perf_counter()
        say(f"{name}: started")
        result = {**meta, **parts[name]()}
        atomic_write_json(out / f"{name}.json", result)
        say(f"{name}: done in {time.perf_counter() - started:.0f} s, wrote {out / f'{name}.json'}")
        summary[name] = {k: v for k, v in result.items() if k in ("ratios", "ratios_at_max_concurrency", "per_task",
                                                                   "failed_total")}
    return summary
