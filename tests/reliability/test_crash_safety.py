"""Concurrent writers take turns; a SIGKILL anywhere in ``save_pretrained`` leaves the old or new state.

Both run for RECAST and for the baselines (LoRA, full fine-tuning): they share one store.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from recast.format import leftover_files, verify_model_dir
from recast.format.locking import DirectoryLockedError, is_locked, lock_directory
from recast.methods import load_method
from recast.protocol import TaskModel
from tests.reliability.common import nudge, outputs, same, tiny_method

WRITERS = 6
TASKS_PER_WRITER = 2
KILLS = 20
METHODS = ("recast", "lora", "full")


def _add_writer_tasks(model: TaskModel, index: int) -> list[str]:
    """The tasks writer ``index`` adds, deterministic so the parent can rebuild them."""
    names = []
    for k in range(TASKS_PER_WRITER):
        name = f"w{index}t{k}"
        torch.manual_seed(1000 + 10 * index + k)  # the new head's initial values
        model.add_task(name, 2 + k)
        nudge(model, name, seed=1000 + 10 * index + k)
        names.append(name)
    return names


def _writer(method: str, directory: str, index: int, barrier: multiprocessing.synchronize.Barrier) -> None:
    """One process: add tasks one by one with save_task, then save the whole model."""
    torch.set_num_threads(1)
    model = tiny_method(method)
    barrier.wait(timeout=60)
    for k, name in enumerate(_add_writer_tasks(model, index)):
        model.save_task(directory, name, meta={"writer": index, "step": k})
    model.save_pretrained(directory)


@pytest.mark.parametrize("method", METHODS)
def test_concurrent_writers_all_succeed_and_nothing_is_lost(tmp_path, method):
    tiny_method(method).save_pretrained(tmp_path)
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(WRITERS)
    workers = [context.Process(target=_writer, args=(method, str(tmp_path), i, barrier)) for i in range(WRITERS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0] * WRITERS
    expected = tiny_method(method)
    for index in range(WRITERS):
        _add_writer_tasks(expected, index)
    loaded = load_method(tmp_path)
    assert sorted(loaded.tasks) == sorted(expected.tasks)  # base, a and all 12 writer tasks
    assert same(outputs(loaded), outputs(expected))
    assert verify_model_dir(tmp_path) == []


def test_lock_waits_then_says_who_holds_it(tmp_path):
    with lock_directory(tmp_path):
        assert is_locked(tmp_path)
        message = rf"locked by another writer \(process {os.getpid()}\)"
        with pytest.raises(DirectoryLockedError, match=message), lock_directory(tmp_path, timeout=0.2):
            pass
    assert not is_locked(tmp_path)
    with lock_directory(tmp_path, timeout=0.2):  # released on exit, and after a crash by the kernel
        pass


def _two_states(method: str) -> list[TaskModel]:
    """Old state: tasks base, a. New state: another backbone, a changed, one more task."""
    old, new = tiny_method(method), tiny_method(method, seed=1)
    nudge(new, "a", seed=11)
    new.add_task("extra", 4)
    nudge(new, "extra", seed=12)
    return [old, new]


def _save_in_child_then_kill(model: TaskModel, directory: Path, delay: float) -> None:
    """Fork a child that runs save_pretrained; SIGKILL it ``delay`` seconds after it starts."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: signal the start, save, exit without running pytest's teardown
        try:
            os.close(read_end)
            os.write(write_end, b"go")
            model.save_pretrained(directory)
        finally:
            os._exit(0)
    os.close(write_end)
    os.read(read_end, 2)
    os.close(read_end)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


@pytest.mark.parametrize("method", METHODS)
def test_sigkill_at_random_points_of_save_pretrained_leaves_old_or_new_state(tmp_path, method):
    states = _two_states(method)
    expected = [outputs(s) for s in states]
    directory = tmp_path / "model"
    states[0].save_pretrained(directory)
    start = time.perf_counter()
    states[1].save_pretrained(tmp_path / "probe")
    duration = time.perf_counter() - start
    rng, current, seen = random.Random(0), 0, {"old": 0, "new": 0, "interrupted": 0}
    for _ in range(KILLS):
        target = 1 - current
        _save_in_child_then_kill(states[target], directory, rng.uniform(0.0, 1.2 * duration))
        seen["interrupted"] += bool(leftover_files(directory))
        loaded = outputs(load_method(directory))
        if same(loaded, expected[target]):
            current, seen["new"] = target, seen["new"] + 1
        else:
            assert same(loaded, expected[current]), "a killed save left neither the old nor the new state"
            seen["old"] += 1
    print(f"{KILLS} kills over {duration * 1000:.0f} ms saves: {seen}")
    assert seen["old"] + seen["new"] == KILLS
    states[current].save_pretrained(directory)
    problems = verify_model_dir(directory)  # only the JSON of "extra", which the old state does not list
    assert all(p.status == "warning" and "not listed" in p.message for p in problems)
