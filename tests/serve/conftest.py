"""A tiny model directory and a real server on a free port, shared by the serving tests."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from recast import RecastConfig, RecastModel
from recast.serve.app import create_app
from recast.serve.engine import Engine, ServeOptions
from tests.helpers import tiny_vit

CLASSES = {"digits": ["zero", "one", "two"], "shapes": ["circle", "square", "star", "ring", "cross"]}


def make_model_dir(directory: Path) -> Path:
    """A RECAST tiny ViT with two perturbed tasks of different head sizes, saved to ``directory``."""
    model = RecastModel.from_base(tiny_vit(), RecastConfig(target="att", groups=2)).eval()
    generator = torch.Generator().manual_seed(5)
    for name, classes in CLASSES.items():
        model.add_task(name, len(classes), class_names=classes)
        for _, module in model.task_modules():
            with torch.no_grad():
                for tensor in module.parameters_of(name):
                    tensor.add_(0.5 * torch.randn(tensor.shape, generator=generator))
    model.save_pretrained(directory)
    return directory


def png_bytes(seed: int, size: int = 20, mode: str = "RGB") -> bytes:
    """A random image encoded as PNG."""
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[str]:
    """A uvicorn server in a thread over ``model_dir``; yields its base URL."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    options = ServeOptions(max_batch=8, max_wait_ms=20, max_upload_bytes=60_000, max_images=4, reload_interval_s=0.1)
    port = free_port()
    config = uvicorn.Config(create_app(Engine(model_dir, options)), host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=30)
    torch.set_num_threads(threads)
