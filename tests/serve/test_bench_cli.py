"""``recast bench --serve`` / ``--edge`` run the same code as the older commands; the set_task baseline
batches like the mixed server; a load-test server that cannot start is reported and stopped."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from recast.cli import edge, main, serve
from recast.serve.batcher import Batcher
from recast.serve.bench import Server, request_plan
from recast.serve.engine import ServeOptions


def _captured(monkeypatch: pytest.MonkeyPatch, module: object) -> list[argparse.Namespace]:
    calls: list[argparse.Namespace] = []
    monkeypatch.setattr(module, "run_bench", lambda args: calls.append(args) or 0)
    return calls


def test_bench_serve_is_serve_bench_with_the_same_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _captured(monkeypatch, serve)
    options = ["--tasks", "5", "--requests", "20", "--concurrency", "1", "4", "--memory-tasks", "5", "10",
               "--skip", "micro", "--out", str(tmp_path)]
    assert main(["bench", "--serve", *options]) == 0
    assert main(["serve-bench", *options]) == 0
    alias, original = ({k: v for k, v in vars(c).items() if k != "command"} for c in calls)
    assert alias == original and alias["tasks"] == 5 and alias["concurrency"] == [1, 4]


def test_bench_edge_is_edge_bench_with_the_same_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _captured(monkeypatch, edge)
    arguments = ["model_dir", "--batch-sizes", "1", "2", "--repeats", "3", "--sizes"]
    assert main(["bench", "--edge", *arguments]) == 0
    assert main(["edge-bench", *arguments]) == 0
    alias, original = ({k: v for k, v in vars(c).items() if k != "command"} for c in calls)
    assert alias == original and calls[0].directory == "model_dir" and calls[0].repeats == 3


def test_bench_aliases_help_and_misplaced_options(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--serve", "--help"])
    assert exit_info.value.code == 0 and "Sameas'recastserve-bench'" in "".join(capsys.readouterr().out.split())
    assert main(["bench", "--out", "elsewhere", "--serve"]) == 2
    assert "put the options of the serve benchmark after --serve" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "--serve" in capsys.readouterr().out


class _StubEngine:
    """Just enough of an Engine for the batcher: records every forward."""

    def __init__(self, mode: str) -> None:
        self.options = ServeOptions(mode=mode, max_batch=8, max_wait_ms=200, reload_interval_s=10)
        self.model = SimpleNamespace(tasks={"a": None, "b": None})
        self.forwards: list[tuple[str, int]] = []

    def refresh(self) -> bool:
        return False

    def forward_one(self, x: torch.Tensor, task: str) -> torch.Tensor:
        self.forwards.append((task, x.shape[0]))
        return torch.zeros(x.shape[0], 2)

    def forward_mixed(self, x: torch.Tensor, tasks: list[str]) -> torch.Tensor:
        self.forwards.append(("mixed", x.shape[0]))
        return torch.zeros(x.shape[0], 2)

    def probabilities(self, logits: torch.Tensor, tasks: list[str]) -> list[torch.Tensor]:
        return [row.softmax(-1) for row in logits]


@pytest.mark.parametrize(("mode", "expected"), [("per-request", [("a", 3), ("b", 1)]), ("mixed", [("mixed", 4)])])
def test_set_task_baseline_gathers_like_the_mixed_server(mode: str, expected: list[tuple[str, int]]) -> None:
    engine = _StubEngine(mode)

    async def scenario() -> list[list[torch.Tensor]]:
        batcher = Batcher(engine)
        await batcher.start()
        image = torch.zeros(3, 4, 4)
        try:
            return await asyncio.gather(batcher.submit("a", [image]), batcher.submit("b", [image]),
                                        batcher.submit("a", [image, image]))
        finally:
            await batcher.stop()

    answers = asyncio.run(scenario())
    assert [len(a) for a in answers] == [1, 1, 2]
    assert engine.forwards == expected  # one micro-batch; per task in the baseline, one forward when mixed


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    server = Server(tmp_path / "missing", "mixed", threads=1, startup_s=60)
    with pytest.raises(RuntimeError, match="not a recast model directory"):
        server.__enter__()
    assert server.process is not None and server.process.poll() is not None


def test_every_server_gets_the_same_requests() -> None:
    tasks = [f"clone{i:04d}" for i in range(100)]
    plan = request_plan(tasks, 50, seed=3)
    assert plan == request_plan(tasks, 50, seed=3)
    assert len({task for task, _ in plan}) > 30 and all(image.startswith(b"\x89PNG") for _, image in plan)
