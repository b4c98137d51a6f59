"""A small HTTP client for ``recast serve``: :class:`Client` (sync) and :class:`AsyncClient` (httpx).

    with Client("http://127.0.0.1:8000") as client:
        client.predict("flowers", ["rose.jpg"], top_k=3)   # one result per image

Errors the server reports (unknown task, bad image, ...) raise :class:`ServeError` with its status
and message.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from recast.errors import RecastError

ImageInput = str | Path | bytes | tuple[str, bytes]


class ServeError(RecastError):
    """An error answer from the server (``status``, ``message``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"server answered {status}: {message}")
        self.status, self.message = status, message


def _files(images: Sequence[ImageInput]) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart ``image`` parts from paths, raw bytes or ``(filename, bytes)`` pairs."""
    parts = []
    for i, image in enumerate(images):
        if isinstance(image, tuple):
            name, data = image
        elif isinstance(image, bytes):
            name, data = f"image{i}", image
        else:
            name, data = Path(image).name, Path(image).read_bytes()
        parts.append(("image", (name, data, "application/octet-stream")))
    return parts


def _form(task: str, top_k: int | None) -> dict[str, str]:
    return {"task": task} if top_k is None else {"task": task, "top_k": str(top_k)}


def _answer(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        message = body["error"]["message"] if isinstance(body, dict) and "error" in body else response.text
        raise ServeError(response.status_code, message)
    return body


class Client:
    """Synchronous client."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 60.0) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout)

    def predict(self, task: str, images: Sequence[ImageInput], top_k: int | None = None) -> list[dict[str, Any]]:
        """Top labels of each image for ``task``: ``[{"image", "top": [{"label", "index", "probability"}]}]``."""
        return _answer(self._http.post("/v1/predict", data=_form(task, top_k), files=_files(images)))["predictions"]

    def tasks(self) -> list[dict[str, Any]]:
        """The tasks the server holds, with their classes."""
        return _answer(self._http.get("/v1/tasks"))["tasks"]

    def health(self) -> dict[str, Any]:
        return _answer(self._http.get("/healthz"))

    def metrics(self) -> str:
        """The Prometheus text."""
        response = self._http.get("/metrics")
        response.raise_for_status()
        return response.text

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_server_timing(value: str) -> dict[str, float]:
    """``{stage: ms}`` from a ``Server-Timing`` header (``name;dur=1.5, ...``); entries without a duration are skipped."""
    stages: dict[str, float] = {}
    for entry in value.split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        for param in params:
            key, _, number = param.partition("=")
            if key == "dur" and name:
                try:
                    stages[name] = float(number)
                except ValueError:
                    continue
    return stages


class AsyncClient:
    """Asynchronous client (one connection pool for many concurrent requests).

    For load from many concurrent workers, give each worker its own client (``max_connections=1``):
    64 workers sharing one pool of 64 connections saw some requests held in the pool for 5-12 s
    while connections sat idle. ``recast serve-bench`` drives its servers that way.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 60.0, max_connections: int = 100) -> None:
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits)

    async def predict(self, task: str, images: Sequence[ImageInput], top_k: int | None = None) -> list[dict[str, Any]]:
        """As :meth:`Client.predict`."""
        return (await self.predict_timed(task, images, top_k))[0]

    async def predict_timed(
        self, task: str, images: Sequence[ImageInput], top_k: int | None = None
    ) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """As :meth:`predict`, with the server's time per stage in ms (its ``Server-Timing`` header)."""
        response = await self._http.post("/v1/predict", data=_form(task, top_k), files=_files(images))
        return _answer(response)["predictions"], parse_server_timing(response.headers.get("server-timing", ""))

    async def tasks(self) -> list[dict[str, Any]]:
        return _answer(await self._http.get("/v1/tasks"))["tasks"]

    async def health(self) -> dict[str, Any]:
        return _answer(await self._http.get("/healthz"))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
