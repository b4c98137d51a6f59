"""Micro-batching: requests of any tasks gathered into one forward on one worker thread.

Every model access (forwards and task reloads) happens on a single thread, so the model is never
changed while it runs. The first request of a batch waits at most ``max_wait_ms`` for others; a
batch holds at most ``max_batch`` images (a larger request runs alone). In ``per-request`` mode
(the comparison baseline) batches are gathered the same way, then run as one ``set_task`` and
forward per task: requests of one task share a forward, tasks are never mixed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from recast.errors import TaskError
from recast.serve.engine import Engine

LOG = logging.getLogger("recast.serve")


def _set_threads(threads: int) -> None:
    """On the worker thread: use ``threads`` torch threads (0: leave torch's default)."""
    if threads:
        torch.set_num_threads(threads)


@dataclass
class Job:
    """One request: its task, its images, where its per-image probabilities go, and when it was queued,
    its forward began and ended (``time.perf_counter`` seconds; ``Server-Timing`` reports them)."""

    task: str
    images: list[Tensor]
    future: asyncio.Future = field(repr=False)
    queued: float = 0.0
    forward_start: float = 0.0
    forward_end: float = 0.0


class Batcher:
    """Owns the worker thread; :meth:`submit` returns each image's probabilities over the task's classes."""

    def __init__(self, engine: Engine, on_batch: Callable[[int], None] | None = None) -> None:
        self.engine = engine
        self.options = engine.options
        self.on_batch = on_batch  # called with the number of images of each forward (metrics)
        self._queue: asyncio.Queue[Job | None] = asyncio.Queue()
        # torch's intra-op thread count is set on the model's own thread too: the forward runs there
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recast-serve",
                                        initializer=_set_threads, initargs=(self.options.threads,))
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finish queued requests, then stop the loop and the worker thread."""
        if self._task is not None:
            await self._queue.put(None)
            await self._task
        self._pool.shutdown(wait=True)

    async def submit(self, task: str, images: list[Tensor]) -> list[Tensor]:
        """Queue one request and wait for its probabilities; ``TaskError`` if its task went away."""
        return (await self.submit_timed(task, images))[0]

    async def submit_timed(self, task: str, images: list[Tensor]) -> tuple[list[Tensor], Job]:
        """As :meth:`submit`, with the finished ``Job`` (its queue and forward times)."""
        job = Job(task, images, asyncio.get_running_loop().create_future(), queued=time.perf_counter())
        await self._queue.put(job)
        return await job.future, job

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function`` on the model's thread (for task reloads and listings that must not race)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    async def torch_threads(self) -> int:
        """The torch thread count the forwards run with (read on the model's thread)."""
        return await self.run(torch.get_num_threads)

    async def _loop(self) -> None:
        while True:
            try:
                first = await asyncio.wait_for(self._queue.get(), timeout=self.options.reload_interval_s)
            except asyncio.TimeoutError:
                await self._refresh()
                continue
            if first is None:
                return
            jobs, stop = await self._gather(first)
            await self._refresh()
            await self._execute(jobs)
            if stop:
                return

    async def _gather(self, first: Job) -> tuple[list[Job], bool]:
        """``first`` plus whatever arrives within ``max_wait_ms`` while the batch has room."""
        jobs, size = [first], len(first.images)
        deadline = time.monotonic() + self.options.max_wait_ms / 1000
        while size < self.options.max_batch:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), timeout=left)
                except asyncio.TimeoutError:
                    break
            if job is None:
                return jobs, True
            if size + len(job.images) > self.options.max_batch:
                self._queue.put_nowait(job)  # too big for this batch: first of the next
                break
            jobs.append(job)
            size += len(job.images)
        return jobs, False

    async def _refresh(self) -> None:
        try:
            await self.run(self.engine.refresh)
        except Exception:  # a broken commit must not stop serving the tasks already loaded
            LOG.exception("reloading tasks failed")

    async def _execute(self, jobs: list[Job]) -> None:
        known = set(self.engine.model.tasks)
        for job in [j for j in jobs if j.task not in known]:
            job.future.set_exception(TaskError(self.engine.unknown_task_message(job.task)))
        jobs = [j for j in jobs if j.task in known]
        if not jobs:
            return
        if self.options.mode == "per-request":  # one set_task and forward per task, in order of arrival
            by_task: dict[str, list[Job]] = {}
            for job in jobs:
                by_task.setdefault(job.task, []).append(job)
            batches = list(by_task.values())
        else:
            batches = [jobs]
        for batch in batches:
            started = time.perf_counter()
            try:
                results = await self.run(self._forward, batch)
            except Exception as exc:  # answered as a 500 for these requests; the server keeps going
                LOG.exception("forward failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            ended = time.perf_counter()
            for job, probs in zip(batch, results, strict=True):
                job.forward_start, job.forward_end = started, ended
                if not job.future.done():  # the client may have gone away
                    job.future.set_result(probs)

    def _forward(self, jobs: list[Job]) -> list[list[Tensor]]:
        """On the worker thread: one forward over the jobs' images; per job, per image probabilities."""
        tasks = [job.task for job in jobs for _ in job.images]
        x = torch.stack([image for job in jobs for image in job.images])
        if self.options.mode == "per-request":
            logits = self.engine.forward_one(x, jobs[0].task)
        else:
            logits = self.engine.forward_mixed(x, tasks)
        if self.on_batch is not None:
            self.on_batch(len(tasks))
        probs = self.engine.probabilities(logits, tasks)
        out, start = [], 0
        for job in jobs:
            out.append(probs[start : start + len(job.images)])
            start += len(job.images)
        return out
