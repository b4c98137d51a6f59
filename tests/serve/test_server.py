"""The HTTP server: predictions equal ``recast predict``, bad input answers 4xx, live task changes."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import torch

from recast import RecastModel
from recast.cli import main as cli_main
from recast.client import AsyncClient, Client, ServeError, parse_server_timing
from recast.format import CONFIG_FILE
from recast.io import atomic_write_json, read_json
from tests.serve.conftest import CLASSES, png_bytes


def _predict_cli(model_dir: Path, task: str, paths: list[Path], capsys: pytest.CaptureFixture) -> list[dict]:
    capsys.readouterr()
    assert cli_main(["predict", str(model_dir), "--task", task, "--top-k", "3", "--json", *map(str, paths)]) == 0
    return json.loads(capsys.readouterr().out)


def test_predictions_equal_recast_predict(server, model_dir, tmp_path, capsys) -> None:
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.png")
        paths[-1].write_bytes(png_bytes(i, mode="RGB" if i else "L"))
    with Client(server) as client:
        for task in CLASSES:
            served = client.predict(task, paths, top_k=3)
            expected = _predict_cli(model_dir, task, paths, capsys)
            assert len(served) == len(expected) == 3
            for got, want in zip(served, expected, strict=True):
                assert [t["label"] for t in got["top"]] == [t["label"] for t in want["top"]]
                assert all(abs(a["probability"] - b["probability"]) < 1e-5 for a, b in zip(got["top"], want["top"], strict=True))
                assert got["top"][0]["label"] in CLASSES[task]


def test_an_answer_says_where_its_server_time_went(server) -> None:
    response = httpx.post(f"{server}/v1/predict", data={"task": "digits"}, files=[("image", ("a.png", png_bytes(1), "image/png"))])
    stages = parse_server_timing(response.headers["server-timing"])
    assert list(stages) == ["read", "decode", "queue", "forward", "answer", "total"]
    assert all(value >= 0 for value in stages.values()) and stages["forward"] > 0
    parts = sum(v for k, v in stages.items() if k != "total")
    assert parts == pytest.approx(stages["total"], abs=0.05)  # the stages tile the request's time (2-decimal rounding)


def test_server_timing_parsing_skips_entries_without_a_duration() -> None:
    assert parse_server_timing("read;dur=1.5, cache;desc=hit, forward ; dur=2,bad;dur=x") == {"read": 1.5, "forward": 2.0}
    assert parse_server_timing("") == {}


def test_concurrent_requests_of_mixed_tasks_are_batched(server) -> None:
    async def drive() -> list[list[dict]]:
        async with AsyncClient(server) as client:
            calls = [client.predict(("digits", "shapes")[i % 2], [png_bytes(10 + i)], top_k=1) for i in range(12)]
            return await asyncio.gather(*calls)

    answers = asyncio.run(drive())
    with Client(server) as client:
        for i, answer in enumerate(answers):
            alone = client.predict(("digits", "shapes")[i % 2], [png_bytes(10 + i)], top_k=1)
            assert answer[0]["top"][0]["label"] == alone[0]["top"][0]["label"]
            assert abs(answer[0]["top"][0]["probability"] - alone[0]["top"][0]["probability"]) < 1e-5
        text = client.metrics()
    sizes = [line for line in text.splitlines() if line.startswith("recast_batch_size_count")]
    total = [line for line in text.splitlines() if line.startswith("recast_batch_size_sum")]
    assert float(sizes[0].split()[-1]) < float(total[0].split()[-1])  # some forward held several images
    assert 'recast_requests_total{endpoint="/v1/predict",status="200"}' in text
    assert "recast_request_latency_seconds_bucket" in text and "recast_tasks_loaded" in text


@pytest.mark.parametrize(
    ("request_kwargs", "status", "words"),
    [
        ({"data": {"task": "nope"}, "files": {"image": ("a.png", png_bytes(1))}}, 404, ["no task named 'nope'", "digits"]),
        ({"data": {"task": "digits"}, "files": {"image": ("bad.png", b"not an image")}}, 400, ["'bad.png'", "decoded"]),
        ({"data": {"task": "digits"}, "files": {"image": ("big.png", png_bytes(2, size=300))}}, 413, ["limit", "60000"]),
        ({"json": {"task": "digits"}}, 415, ["multipart/form-data", "application/json"]),
        ({"data": {"task": "digits"}, "files": {"other": ("x.txt", b"hi")}}, 400, ["'image'"]),
        ({"files": {"image": ("a.png", png_bytes(1))}}, 400, ["'task'"]),
        ({"data": {"task": "digits", "top_k": "-2"}, "files": {"image": ("a.png", png_bytes(1))}}, 400, ["top_k"]),
        ({"data": {"task": "digits"}, "files": [("image", (f"{i}.png", png_bytes(i))) for i in range(5)]}, 400, ["files"]),
    ],
    ids=["unknown-task", "undecodable", "oversized", "content-type", "no-image", "no-task", "top-k", "too-many"],
)
def test_bad_input_gets_a_clear_4xx(server, request_kwargs, status, words) -> None:
    response = httpx.post(f"{server}/v1/predict", **request_kwargs)
    assert response.status_code == status
    message = response.json()["error"]["message"]
    for word in words:
        assert word in message
    health = httpx.get(f"{server}/healthz").json()
    assert health["status"] == "ok" and health["torch_threads"] >= 1  # still serving, threads recorded


def test_client_raises_serve_error(server) -> None:
    with Client(server) as client, pytest.raises(ServeError) as info:
        client.predict("nope", [png_bytes(0)])
    assert info.value.status == 404 and "known tasks" in info.value.message


def _wait_for(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_task_saved_while_serving_becomes_visible_and_removed_task_answers_404(server, model_dir) -> None:
    writer = RecastModel.from_pretrained(model_dir)
    writer.add_task("fresh", 4, class_names=["a", "b", "c", "d"])
    with torch.no_grad():
        writer.head.per_task["fresh"].bias.copy_(torch.tensor([0.0, 0.0, 9.0, 0.0]))
    writer.save_task(model_dir, "fresh")
    with Client(server) as client:
        _wait_for(lambda: "fresh" in [t["name"] for t in client.tasks()])
        assert client.predict("fresh", [png_bytes(3)])[0]["top"][0]["label"] == "c"
        record = read_json(model_dir / CONFIG_FILE)  # a commit that drops the task
        record["tasks"] = [t for t in record["tasks"] if t != "fresh"]
        del record["task_records"]["fresh"]
        atomic_write_json(model_dir / CONFIG_FILE, record)
        _wait_for(lambda: "fresh" not in [t["name"] for t in client.tasks()])
        with pytest.raises(ServeError) as info:
            client.predict("fresh", [png_bytes(3)])
        assert info.value.status == 404


def test_sigterm_ends_the_server_cleanly(model_dir, tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys

    from tests.serve.conftest import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "recast", "serve", str(model_dir), "--port", str(port), "--threads", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        def up() -> bool:
            assert process.poll() is None, process.stdout.read()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            except httpx.TransportError:
                return False

        _wait_for(up, seconds=60)
        with Client(f"http://127.0.0.1:{port}") as client:
            assert client.predict("digits", [png_bytes(4)])[0]["top"][0]["label"] in CLASSES["digits"]
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    # uvicorn shuts down gracefully, then re-raises the signal so the exit says "ended by SIGTERM"
    assert process.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in output and "Traceback" not in output


def test_uncommitted_or_broken_tasks_are_never_served(server, model_dir) -> None:
    tasks_dir = model_dir / "tasks"
    (tasks_dir / "ghost.safetensors").write_bytes((tasks_dir / "digits.safetensors").read_bytes())
    (tasks_dir / "ghost.json").write_text((tasks_dir / "digits.json").read_text())  # files, but no commit
    good = read_json(model_dir / CONFIG_FILE)
    record = read_json(model_dir / CONFIG_FILE)
    record["task_records"]["broken"] = {**record["task_records"]["digits"], "task": "broken", "sha256": "0" * 64}
    record["tasks"].append("broken")
    atomic_write_json(model_dir / CONFIG_FILE, record)  # a commit pinning a file that is not there
    time.sleep(0.5)  # several reload intervals
    with Client(server) as client:
        names = [t["name"] for t in client.tasks()]
        assert "ghost" not in names and "broken" not in names and "digits" in names
        for task in ("ghost", "broken"):
            with pytest.raises(ServeError) as info:
                client.predict(task, [png_bytes(1)])
            assert info.value.status == 404
        assert client.predict("digits", [png_bytes(1)])[0]["top"]
    atomic_write_json(model_dir / CONFIG_FILE, good)  # leave the shared directory as it was


def test_chunked_oversized_upload_and_cli_errors(server, tmp_path) -> None:
    def body():  # no Content-Length: the limit is enforced while reading
        yield b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for _ in range(8):
            yield b"\0" * 10_000
        yield b"\r\n--xyz--\r\n"

    response = httpx.post(f"{server}/v1/predict", content=body(),
                          headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]
    assert cli_main(["serve", str(tmp_path / "missing")]) == 2
    assert cli_main(["serve", str(tmp_path), "--workers", "0"]) == 2
