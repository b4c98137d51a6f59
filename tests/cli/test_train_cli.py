"""``recast train / eval / tasks / predict``: end to end on a tiny ViT, kill and resume, torchrun."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from recast.errors import ConfigError, RecastError
from recast.methods import build_method
from recast.train import read_sequence
from test_train import COLOURS_A, COLOURS_B, colour_folder, tiny_base, tiny_model

# Runs the CLI in a child process: the full `recast` parser when every command module imports,
# else only the commands under test (other command modules may still be missing in a checkout).
LAUNCHER = """
import argparse, sys
from recast.errors import RecastError

def main(argv):
    try:
        from recast.cli import main as full
        from recast.cli import build_parser
        build_parser()
        return full(argv)
    except ModuleNotFoundError:
        from recast.cli import train
        parser = argparse.ArgumentParser(prog="recast")
        train.register(parser.add_subparsers())
        args = parser.parse_args(argv)
        try:
            return args.func(args)
        except RecastError as exc:
            print(f"recast: error: {exc}", file=sys.stderr)
            return 2

sys.exit(main(sys.argv[1:]))
"""


def cli(argv: list[str]) -> int:
    """Run ``recast ARGV`` in this process, as the entry point does (errors: message + exit code 2)."""
    from recast.cli import train

    parser = argparse.ArgumentParser(prog="recast")
    train.register(parser.add_subparsers())
    args = parser.parse_args([str(a) for a in argv])
    try:
        return int(args.func(args) or 0)
    except RecastError as exc:
        print(f"recast: error: {exc}", file=sys.stderr)
        return 2


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"a": colour_folder(root / "a", COLOURS_A), "b": colour_folder(root / "b", COLOURS_B)}


@pytest.fixture
def model_dir(tmp_path) -> Path:
    directory = tmp_path / "model"
    tiny_model().save_pretrained(directory)
    return directory


FAST = ["--epochs", "2", "--batch-size", "16", "--lr", "0.02", "--seed", "0", "--no-progress"]


def test_train_tasks_eval_predict(model_dir, data, tmp_path, capsys):
    assert cli(["train", model_dir, "--task", "a", "--data", f"imagefolder:{data['a']}", *FAST,
                "--log-csv", tmp_path / "a.csv", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["test_accuracy"] >= 0.9 and result["params"]["head"] == 3 * 32 + 3
    assert not (model_dir / "checkpoints" / "a").exists()
    assert (tmp_path / "a.csv").read_text().startswith("epoch,step,lr")
    record = json.loads((model_dir / "tasks" / "a.json").read_text())
    assert record["seed"] == 0 and record["train_config"]["epochs"] == 2 and record["method"] == "recast"

    assert cli(["tasks", model_dir, "--json"]) == 0
    listed = {row["task"]: row for row in json.loads(capsys.readouterr().out)["tasks"]}
    assert set(listed) == {"base", "a"} and listed["a"]["test_accuracy"] == result["metrics"]["test_accuracy"]
    assert cli(["tasks", model_dir]) == 0
    assert "backbone:" in capsys.readouterr().out

    assert cli(["eval", model_dir, "--task", "a", "--data", f"imagefolder:{data['a']}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == result["metrics"]["test_accuracy"]

    image = next((data["a"] / "green").glob("*.png"))
    assert cli(["predict", model_dir, image, "--task", "a", "--top-k", "2", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert len(top) == 2 and top[0]["label"] == "green"


def test_bad_input_errors(model_dir, data, tmp_path, capsys):
    assert cli(["eval", model_dir, "--task", "nope", "--data", f"imagefolder:{data['a']}"]) == 2
    assert "no task named 'nope'; existing tasks: base" in capsys.readouterr().err
    assert cli(["predict", model_dir, "x.png", "--task", "nope"]) == 2
    assert "existing tasks: base" in capsys.readouterr().err
    assert cli(["eval", model_dir, "--task", "base", "--data", f"imagefolder:{data['b']}"]) == 2
    assert "the data has 4 classes" in capsys.readouterr().err
    assert cli(["train", model_dir, "--task", "a", "--data", f"imagefolder:{data['a']}", *FAST]) == 0
    assert cli(["train", model_dir, "--task", "a", "--data", f"imagefolder:{data['b']}", *FAST]) == 2
    assert "task 'a' has a head of 3 classes" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    assert cli(["train", model_dir, "--task", "e", "--data", f"imagefolder:{empty}", *FAST]) == 2
    assert "has no images" in capsys.readouterr().err
    assert cli(["train", tmp_path / "none", "--task", "a", "--data", f"imagefolder:{data['a']}"]) == 2
    assert "--model SPEC" in capsys.readouterr().err
    assert cli(["train", model_dir, "--task", "a", "--data", f"imagefolder:{data['a']}", *FAST, "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_sequence_over_two_seeds(model_dir, data, tmp_path, capsys):
    sequence = tmp_path / "seq.json"
    sequence.write_text(json.dumps({"name": "colours", "tasks": [
        {"name": "a", "data": f"imagefolder:{data['a']}"}, {"name": "b", "data": f"imagefolder:{data['b']}"}]}))
    assert cli(["train", model_dir, "--sequence", sequence, "--seeds", "1,2", *FAST[:-3], "--no-progress",
                "--out", tmp_path / "results"]) == 0
    run = json.loads((tmp_path / "results" / "colours-recast-seed1.json").read_text())
    for key in ("method", "backbone", "suite", "seed", "tasks", "average_accuracy", "forgetting", "bwt", "versions"):
        assert key in run
    assert run["forgetting"] == 0.0 and run["bwt"] == 0.0
    task = run["tasks"][0]
    for key in ("name", "test_accuracy", "val_accuracy", "params", "bytes", "train_seconds", "peak_rss_mb"):
        assert key in task
    summary = json.loads((tmp_path / "results" / "colours-recast-summary.json").read_text())
    assert summary["seeds"] == [1, 2] and summary["summary"]["forgetting"] == {"mean": 0.0, "std": 0.0}
    assert summary["summary"]["average_accuracy"]["mean"] > 0.8
    assert sorted(p.stem for p in (model_dir / "tasks").glob("*.json")) == ["a", "b", "base"]


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def _run_terminating_on_timeout(command: list[str], timeout: float) -> tuple[int, str]:
    """Run a launcher; on timeout send SIGTERM (torchrun passes it on to its workers) so none is left behind."""
    process = subprocess.Popen(command, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        _, stderr = process.communicate(timeout=60)
        return -1, f"timed out after {timeout}s\n{stderr}"
    return process.returncode, stderr


def _coefficients(directory: Path, task: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(directory / "tasks" / f"{task}.safetensors")


def test_sigkill_then_resume_equals_uninterrupted_run(model_dir, data, tmp_path):
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    other = tmp_path / "straight"
    shutil.copytree(model_dir, other)
    args = ["--task", "a", "--data", f"imagefolder:{data['a']}", "--epochs", "6", "--batch-size", "8",
            "--seed", "5", "--no-progress"]
    child = subprocess.Popen([sys.executable, launcher, "train", model_dir, *args], env=_child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = model_dir / "checkpoints" / "a" / "checkpoint.json"
    deadline = time.time() + 60
    while not checkpoint.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # into the next epoch
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()
    epoch = json.loads(checkpoint.read_text())["epoch"]
    assert 1 <= epoch < 6 and not (model_dir / "tasks" / "a.json").exists()
    for path in model_dir.rglob("*"):  # every finished file is whole (a kill can only orphan a hidden temp file)
        if path.suffix == ".json" and not path.name.startswith("."):
            json.loads(path.read_text())
        elif path.suffix == ".safetensors" and not path.name.startswith("."):
            safetensors.torch.load_file(path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the child: the same reductions, bit for bit
    try:
        assert cli(["train", model_dir, *args, "--resume"]) == 0
        assert cli(["train", other, *args]) == 0
    finally:
        torch.set_num_threads(threads)
    resumed, straight = _coefficients(model_dir, "a"), _coefficients(other, "a")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    histories = [json.loads((d / "tasks" / "a.json").read_text())["history"] for d in (model_dir, other)]
    losses = [[(row["epoch"], row["train_loss"], row["val_accuracy"]) for row in h] for h in histories]
    assert len(losses[0]) == 6 and losses[0] == losses[1]  # every epoch, not only the best, is the same
    assert not (model_dir / "checkpoints" / "a").exists()


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun is not installed")
def test_torchrun_two_processes_equal_one(model_dir, data, tmp_path):
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    single = tmp_path / "single"
    shutil.copytree(model_dir, single)
    args = ["--task", "a", "--data", f"imagefolder:{data['a']}", "--epochs", "2", "--batch-size", "8",
            "--lr", "0.01", "--seed", "7", "--no-augment", "--no-progress", "--device", "cpu"]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    command = [torchrun, "--standalone", "--nproc_per_node", "2", str(launcher), "train", str(model_dir), *args]
    returncode, stderr = _run_terminating_on_timeout(command, timeout=300)
    assert returncode == 0, stderr[-3000:]
    assert cli(["train", single, *args]) == 0
    two, one = _coefficients(model_dir, "a"), _coefficients(single, "a")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)
    assert not torch.equal(one["coefficients"], tiny_model().task_tensors("base")["coefficients"])
    histories = [json.loads((d / "tasks" / "a.json").read_text())["history"] for d in (model_dir, single)]
    for row_two, row_one in zip(*histories, strict=True):  # the same steps, the same losses
        assert row_two["step"] == row_one["step"]
        assert row_two["train_loss"] == pytest.approx(row_one["train_loss"], abs=1e-5)


def test_existing_directory_keeps_its_method(model_dir, data, capsys):
    assert cli(["train", model_dir, "--task", "a", "--data", f"imagefolder:{data['a']}", "--method", "lora", *FAST]) == 2
    assert "was made for method 'recast', not 'lora'" in capsys.readouterr().err


def test_bad_method_option_is_explained(tmp_path, data, capsys):
    args = ["train", tmp_path / "new", "--task", "a", "--data", f"imagefolder:{data['a']}", "--model", "recast-vit32",
            "--opt", "groups", *FAST]
    assert cli(args) == 2
    assert "--opt 'groups': write KEY=VALUE" in capsys.readouterr().err


def test_sequence_accepts_the_offline_suite_name(tmp_path):
    suite, entries = read_sequence("offline")
    assert suite == "offline" and [e.data for e in entries][:2] == ["builtin:mnist", "builtin:emoji-google"]
    assert [e.hflip for e in entries][:2] == [0.0, 0.5]
    with pytest.raises(ConfigError, match="no such file or suite; use 'offline'"):
        read_sequence(tmp_path / "missing.json")


def _sequence_file(path: Path, data: dict[str, Path]) -> Path:
    tasks = [{"name": "t1", "data": f"imagefolder:{data['a']}"}, {"name": "t2", "data": f"imagefolder:{data['b']}"},
             {"name": "t3", "data": f"imagefolder:{data['a']}", "hflip": 0}]
    path.write_text(json.dumps({"name": "three", "tasks": tasks}))
    return path


def test_sequence_killed_in_task_two_resumes_to_the_same_matrix(model_dir, data, tmp_path):
    """SIGKILL during task 2 of 3, then --resume: the accuracy matrix equals an uninterrupted run's, bit for bit."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    sequence = _sequence_file(tmp_path / "seq.json", data)
    other = tmp_path / "straight"
    shutil.copytree(model_dir, other)
    args = ["--sequence", sequence, "--seeds", "3", "--epochs", "4", "--batch-size", "8", "--lr", "0.02",
            "--no-progress"]
    child = subprocess.Popen([sys.executable, launcher, "train", model_dir, *args, "--out", tmp_path / "killed"],
                             env=_child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = model_dir / "checkpoints" / "sequence-three" / "seed3"
    inside_task_two = state / "epochs" / "t2" / "checkpoint.json"
    deadline = time.time() + 120
    while not inside_task_two.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()
    progress = json.loads((state / "progress.json").read_text())
    assert [r["name"] for r in progress["records"]] == ["t1"]  # killed after task 1, inside task 2
    killed_epochs = json.loads(inside_task_two.read_text())["history"]
    assert 1 <= len(killed_epochs) < 4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the child: the same reductions, bit for bit
    try:
        assert cli(["train", model_dir, *args, "--out", tmp_path / "killed", "--resume"]) == 0
        assert cli(["train", other, *args, "--out", tmp_path / "straight-results"]) == 0
    finally:
        torch.set_num_threads(threads)
    resumed = json.loads((tmp_path / "killed" / "three-recast-seed3.json").read_text())
    straight = json.loads((tmp_path / "straight-results" / "three-recast-seed3.json").read_text())
    assert resumed["accuracy_matrix"] == straight["accuracy_matrix"]
    assert [t["test_accuracy"] for t in resumed["tasks"]] == [t["test_accuracy"] for t in straight["tasks"]]
    for task in ("t1", "t2", "t3"):
        a, b = _coefficients(model_dir, task), _coefficients(other, task)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # resumed, not restarted: task 1 kept from before the kill, task 2's first epochs from its checkpoint
    assert resumed["tasks"][0]["train_seconds"] == progress["records"][0]["train_seconds"]
    history = json.loads((model_dir / "tasks" / "t2.json").read_text())["history"]
    assert history[: len(killed_epochs)] == killed_epochs and len(history) == 4
    assert not (model_dir / "checkpoints" / "sequence-three" / "seed3").exists()


def test_sequence_records_the_method_of_the_directory(data, tmp_path):
    directory = tmp_path / "linear"
    build_method("linear", tiny_base()).save_pretrained(directory)
    sequence = tmp_path / "seq.json"
    sequence.write_text(json.dumps([{"name": "a", "data": f"imagefolder:{data['a']}"}]))
    assert cli(["train", directory, "--sequence", sequence, "--seeds", "1", "--epochs", "1", "--batch-size", "16",
                "--no-progress", "--out", tmp_path / "out"]) == 0
    assert json.loads((directory / "tasks" / "a.json").read_text())["method"] == "linear"
    run = json.loads((tmp_path / "out" / "seq-linear-seed1.json").read_text())
    assert run["method"] == "linear" and run["model_method"] == "linear" and run["tasks"][0]["params"]["coefficients"] == 0


def test_image_size_is_used_and_recorded_by_train_eval_and_tasks(model_dir, data, capsys):
    spec = f"imagefolder:{data['a']}"
    assert cli(["train", model_dir, "--task", "a", "--data", spec, *FAST, "--image-size", "32", "--augment", "none",
                "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    record = json.loads((model_dir / "tasks" / "a.json").read_text())
    assert record["train_config"]["image_size"] == 32 and record["train_config"]["augment"] == "none"
    assert cli(["eval", model_dir, "--task", "a", "--data", spec, "--json"]) == 0  # the recorded size by default
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["image_size"] == 32 and evaluated["accuracy"] == trained["metrics"]["test_accuracy"]
    assert cli(["eval", model_dir, "--task", "a", "--data", spec, "--image-size", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["image_size"] == 16
    assert cli(["tasks", model_dir, "--json"]) == 0
    assert {r["task"]: r["image_size"] for r in json.loads(capsys.readouterr().out)["tasks"]}["a"] == 32
    assert cli(["train", model_dir, "--task", "b", "--data", spec, *FAST, "--image-size", "20"]) == 2
    assert "multiple of 8" in capsys.readouterr().err
    assert cli(["train", model_dir, "--task", "r", "--data", spec, *FAST, "--augment", "reference", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert cli(["eval", model_dir, "--task", "r", "--data", spec, "--json"]) == 0  # the reference's evaluation too
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["augment"] == "reference" and evaluated["accuracy"] == trained["metrics"]["test_accuracy"]
