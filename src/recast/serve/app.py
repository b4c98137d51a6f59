"""The HTTP application: ``POST /v1/predict``, ``GET /v1/tasks``, ``GET /healthz``, ``GET /metrics``.

Every bad request is answered with a 4xx status and ``{"error": {"status", "message"}}`` saying
what was wrong; an unexpected failure is a 500 with the same shape, and the server keeps running.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from recast.errors import TaskError
from recast.serve.batcher import Batcher
from recast.serve.engine import BadImage, Engine, ServeOptions, top_k

LOG = logging.getLogger("recast.serve")
OPTIONS_ENV = "RECAST_SERVE_OPTIONS"  # JSON {"directory": ..., "options": {...}} for worker processes


class ApiError(Exception):
    """A request problem answered with ``status`` and ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Metrics:
    """The server's Prometheus metrics, in their own registry (several apps may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("recast_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.batch_size = Histogram("recast_batch_size", "images per forward", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.latency = Histogram("recast_request_latency_seconds", "time to answer a predict request",
                                 registry=self.registry)
        self.tasks = Gauge("recast_tasks_loaded", "tasks that can be served", registry=self.registry)


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI application over a loaded ``engine``."""
    metrics = Metrics()
    batcher = Batcher(engine, on_batch=metrics.batch_size.observe)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="recast", lifespan=lifespan)
    app.state.engine, app.state.batcher, app.state.metrics = engine, batcher, metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(request, metrics, exc.status, exc.message)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        LOG.exception("unexpected error on %s", request.url.path)
        return _error(request, metrics, 500, f"internal error ({type(exc).__name__}); the server keeps running")

    @app.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        started = time.perf_counter()
        task, uploads, k = await _read_predict_form(request, engine)
        read = time.perf_counter()
        try:
            images = await run_in_threadpool(lambda: [engine.decode(data, name) for name, data in uploads])
        except BadImage as exc:
            raise ApiError(400, str(exc)) from None
        try:
            probs, job = await batcher.submit_timed(task, images)
        except TaskError:
            raise ApiError(404, engine.unknown_task_message(task)) from None
        info = engine.model.tasks.get(task)
        class_names = info.class_names if info is not None else None
        body = {"task": task, "predictions": [
            {"image": name, "top": top_k(p, class_names, k)} for (name, _), p in zip(uploads, probs, strict=True)]}
        done = time.perf_counter()
        metrics.latency.observe(done - started)
        metrics.requests.labels("/v1/predict", "200").inc()
        stages = {"read": read - started, "decode": job.queued - read, "queue": job.forward_start - job.queued,
                  "forward": job.forward_end - job.forward_start, "answer": done - job.forward_end, "total": done - started}
        return JSONResponse(body, headers={"Server-Timing": server_timing(stages)})

    @app.get("/v1/tasks")
    async def tasks() -> JSONResponse:
        listing = await batcher.run(lambda: [engine.describe(t) for t in engine.task_names()])
        metrics.requests.labels("/v1/tasks", "200").inc()
        return JSONResponse({"tasks": listing})

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        metrics.requests.labels("/healthz", "200").inc()
        threads = await batcher.torch_threads()
        return JSONResponse({"status": "ok", "tasks": len(engine.served), "mode": engine.options.mode,
                             "torch_threads": threads})

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.tasks.set(len(engine.served))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def server_timing(stages: dict[str, float]) -> str:
    """A ``Server-Timing`` header value (W3C): each stage's duration in milliseconds.

    A predict answer says where its time went on the server: reading the form, decoding the
    images, waiting for a batch, the batch's forward, and answering (wake-up and JSON).
    """
    return ", ".join(f"{name};dur={1000 * seconds:.2f}" for name, seconds in stages.items())


def _error(request: Request, metrics: Metrics, status: int, message: str) -> JSONResponse:
    metrics.requests.labels(request.url.path if request.url.path.startswith("/v1/") else "other", str(status)).inc()
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status)


async def _read_predict_form(request: Request, engine: Engine) -> tuple[str, list[tuple[str, bytes]], int]:
    """The predict form's ``task``, uploaded ``image`` files and ``top_k``, or an ``ApiError``."""
    options = engine.options
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(415, f"content type must be multipart/form-data with fields 'task' and 'image', "
                            f"got {content_type or 'none'!r}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > options.max_upload_bytes:
        raise ApiError(413, f"upload of {int(declared)} bytes is over the limit of {options.max_upload_bytes} bytes")
    parser = MultiPartParser(request.headers, _capped(request, options.max_upload_bytes),
                             max_files=options.max_images, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"malformed multipart form ({exc})") from None
    task = form.get("task")
    if not isinstance(task, str) or not task:
        raise ApiError(400, "form field 'task' is missing: name the task to predict with")
    files = [f for f in form.getlist("image") if isinstance(f, UploadFile)]
    if not files:
        raise ApiError(400, "no file in form field 'image': upload one or more images")
    if task not in engine.served:
        raise ApiError(404, engine.unknown_task_message(task))
    uploads = [(f.filename or f"image{i}", await f.read()) for i, f in enumerate(files)]
    return task, uploads, _top_k(form.get("top_k"))


def _top_k(value: Any) -> int:
    if value is None or value == "":
        return 5
    if not isinstance(value, str) or not value.strip().isdigit() or int(value) < 1:
        raise ApiError(400, f"top_k must be a positive integer, got {value!r}")
    return int(value)


async def _capped(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body, stopped with a 413 once it passes ``limit`` bytes (chunked uploads too)."""
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"upload is over the limit of {limit} bytes")
        yield chunk


def app_from_environment() -> FastAPI:
    """Factory for uvicorn worker processes: the directory and options come from ``RECAST_SERVE_OPTIONS``."""
    settings = json.loads(os.environ[OPTIONS_ENV])
    return create_app(Engine(settings["directory"], ServeOptions(**settings["options"])))
