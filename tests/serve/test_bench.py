"""The serving benchmark's pieces on tiny settings: cloned tasks, PEFT mixed batches, the load driver."""

from __future__ import annotations

import asyncio

import torch

from recast.methods import build_method
from recast.serve.bench import _percentiles, clone_tasks, drive, drive_in_process
from recast.serve.engine import mixed_forward
from tests.helpers import tiny_vit


def test_cloned_tasks_differ_and_lora_mixed_batch_equals_per_adapter_forwards(one_thread) -> None:
    for method, options in (("recast", {"target": "att", "groups": 2}), ("lora", {"rank": 2})):
        model = build_method(method, tiny_vit(), **options).eval()
        names = clone_tasks(model, 3, num_classes=4)
        x = torch.randn(5, 3, 16, 16)
        tasks = [names[i % 3] for i in range(5)]
        with torch.no_grad():
            mixed = mixed_forward(model, x, tasks)
            singles = []
            for i, task in enumerate(tasks):
                model.set_task(task)
                singles.append(model(x[i : i + 1])[0])
        for i, single in enumerate(singles):
            assert (mixed[i] - single).abs().max().item() < 1e-5, method
        assert not torch.allclose(singles[0], singles[1]), method  # the clones are not the same task


def test_load_driver_counts_every_request(server) -> None:
    result = asyncio.run(drive(server, ["digits", "shapes"], concurrency=3, requests=9))
    assert result["completed"] == 9 and result["failed"] == 0
    assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert result["throughput_rps"] > 0
    stages = result["stages_ms"]  # from each answer's Server-Timing header
    assert set(stages) == {"read", "decode", "queue", "forward", "answer", "total", "outside_server"}
    assert 0 < stages["forward"]["p50_ms"] <= stages["total"]["p99_ms"] <= result["p99_ms"]


def test_load_driver_in_its_own_process(server) -> None:
    result = drive_in_process(server, ["digits", "shapes"], concurrency=2, requests=4, limit_s=60)
    assert result["completed"] == 4 and result["failed"] == 0


def test_percentiles() -> None:
    values = [i / 1000 for i in range(1, 101)]
    result = _percentiles(values)
    assert result["p50_ms"] == 50.5 and result["p95_ms"] == 96.0 and result["p99_ms"] == 100.0
    assert _percentiles([])["p99_ms"] is None
