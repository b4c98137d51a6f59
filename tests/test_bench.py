import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import Dataset

from recast import bench
from recast.bench.tuning import DEFAULT_GRID, grid_points, parse_grid
from recast.errors import ConfigError
from recast.train import sequence
from tests.helpers import tiny_vit


def colour_folder(root, classes=3, per_class=12, seed=0):
    """An image folder whose classes differ in colour: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            base = np.zeros((16, 16, 3)) + 255 * np.eye(3)[c]
            pixels = np.clip(base * 0.7 + rng.normal(0, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture
def tiny_suite(tmp_path):
    tasks = tuple(bench.BenchTask(f"t{k}", f"imagefolder:{colour_folder(tmp_path / f'd{k}', seed=k)}") for k in range(2))
    backbone = bench.BenchBackbone("tiny", "tiny-vit", ("recast:att", "linear"),
                                   {"recast:att": {"target": "att", "groups": 1}}, loader=lambda: tiny_vit(depth=2))
    return bench.Suite("tiny", tasks, (backbone,), {"epochs": 2, "batch_size": 8, "step_size": 1, "lr": 0.05},
                       seeds=(42,))


def test_harness_runs_end_to_end_and_reports(tiny_suite, tmp_path):
    out = tmp_path / "results"
    runs = bench.plan(tiny_suite)
    report = bench.run_suite(tiny_suite, runs, out, log=lambda _: None)
    record = json.loads((out / "runs" / "recast-att__tiny__42.json").read_text())
    assert record["forgetting"] == 0.0
    assert len(record["accuracy_matrix"]) == 2 and record["accuracy_matrix"][0][1] is None
    assert record["tasks"][0]["params"]["coefficients"] == 2 * 2 * 2
    assert record["tasks"][0]["bytes"] == (out / "models" / "recast-att__tiny__42" / "tasks" / "t0.safetensors").stat().st_size
    assert all(0.0 <= t["test_accuracy"] <= 1.0 for t in record["tasks"])
    text = report.read_text()
    assert "| recast:att | tiny |" in text and "| linear | tiny |" in text
    # a finished run is kept, not rerun
    logs = []
    bench.run_suite(tiny_suite, runs, out, log=logs.append)
    assert sum("already done" in line for line in logs) == 2


def test_plan_filters_and_errors(tiny_suite):
    assert [r.method for r in bench.plan(tiny_suite, methods=["recast"])] == ["recast:att"]
    with pytest.raises(ConfigError, match="unknown backbone 'vit'"):
        bench.plan(tiny_suite, backbones=["vit"])
    with pytest.raises(ConfigError, match="nothing to run"):
        bench.plan(tiny_suite, methods=["lora"])


def test_paper_suite_dry_run_names_missing_roots(tmp_path):
    (tmp_path / "flowers102").mkdir()
    suite = bench.paper_suite(tmp_path)
    missing = bench.missing_data(suite)
    assert len(missing) == 5 and not any(m.startswith("flowers") for m in missing)
    text = bench.describe(suite, bench.plan(suite))
    assert "MISSING data root -> cars" in text and "timm:vit_small_patch16_224" in text


class _TestSpy(Dataset):
    """A test split that notes every read in a shared event list."""

    def __init__(self, inner, events):
        self.inner, self.events = inner, events

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        self.events.append(("test", index))
        return self.inner[index]


def test_tune_chooses_on_validation_and_reads_test_data_only_in_the_final_runs(tiny_suite, tmp_path, monkeypatch):
    events = []
    real_open = sequence.open_data

    def spying_open(spec, **options):
        splits = real_open(spec, **options)
        return replace(splits, test=_TestSpy(splits.test, events))

    monkeypatch.setattr(sequence, "open_data", spying_open)
    suite = replace(tiny_suite, seeds=(42, 7), train={**tiny_suite.train, "epochs": 1})
    runs = bench.plan(suite, methods=["recast"])
    out = tmp_path / "results"
    grid = {"coefficients": (1e-4, 5e-2), "head": (5e-2,)}
    report = bench.run_suite(suite, runs, out, log=lambda line: events.append(("log", line)), tune_lrs=True, grid=grid)
    trials = [i for i, (kind, what) in enumerate(events) if kind == "log" and "tune recast:att / tiny [" in str(what)]
    reads = [i for i, (kind, _) in enumerate(events) if kind == "test"]
    assert len(trials) == 2 and reads and max(trials) < min(reads)  # no test read before the final runs
    records = [json.loads((out / "runs" / f"recast-att__tiny__{seed}.json").read_text()) for seed in (42, 7)]
    tuning = records[0]["tuning"]
    assert tuning["selected_on"] == "validation" and tuning["seed"] == 42 and len(tuning["scores"]) == 2
    assert tuning["chosen"] == max(tuning["scores"], key=lambda s: s["val_accuracy"])["lrs"]
    assert records[1]["tuning"] == tuning  # every seed runs with the first seed's choice
    for record in records:
        assert record["method_options"]["lrs"] == tuning["chosen"]
    assert sorted(p.name for p in (out / "tuning").iterdir()) == ["recast-att__tiny.json"]
    text = report.read_text()
    assert "Learning rates chosen by validation accuracy" in text and "| recast:att | tiny |" in text


def test_later_seeds_alone_reuse_the_first_seeds_tuning(tiny_suite, tmp_path):
    suite = replace(tiny_suite, seeds=(42, 7), train={**tiny_suite.train, "epochs": 1})
    out, grid = tmp_path / "results", {"coefficients": (1e-4, 5e-2), "head": (5e-2,)}
    bench.run_suite(suite, bench.plan(suite, methods=["recast"], seeds=[42]), out, log=lambda _: None,
                    tune_lrs=True, grid=grid)
    logs = []
    bench.run_suite(suite, bench.plan(suite, methods=["recast"], seeds=[7]), out, log=logs.append,
                    tune_lrs=True, grid=grid)
    assert any("kept" in line and "recast:att / tiny" in line for line in logs)  # no new tuning on seed 7
    record = json.loads((out / "runs" / "recast-att__tiny__7.json").read_text())
    assert record["tuning"]["seed"] == 42


def test_tuning_grids_per_method():
    assert grid_points("linear") == [{"head": lr} for lr in DEFAULT_GRID["head"]]
    assert {tuple(p) for p in grid_points("recast:att")} == {("coefficients", "head")}
    assert {tuple(p) for p in grid_points("lora")} == {("adapter", "head")}
    assert {tuple(p) for p in grid_points("full")} == {("backbone", "head")}
    both = grid_points("recast+clr", {"adapter": (1e-3,), "head": (1e-2,)})
    assert both == [{"adapter": 1e-3, "head": 1e-2, "coefficients": 1e-3}]
    apart = grid_points("recast+piggyback", {"adapter": (1e-4,), "coefficients": (3e-2, 1e-2), "head": (1e-2,)})
    assert apart == [{"adapter": 1e-4, "head": 1e-2, "coefficients": 3e-2},
                     {"adapter": 1e-4, "head": 1e-2, "coefficients": 1e-2}]
    assert len(grid_points("recast")) == len(DEFAULT_GRID["coefficients"]) * len(DEFAULT_GRID["head"])
    assert parse_grid(["head=1e-3,1e-2"]) == {"head": (1e-3, 1e-2)}

    with pytest.raises(ConfigError, match="KIND=LR"):
        parse_grid(["lr=1e-3"])


class _Stop(Exception):
    """Raised by a log callback to interrupt a run the way a kill would, between two tasks' records."""


def test_an_interrupted_run_resumes_to_the_same_record(tiny_suite, tmp_path):
    runs = bench.plan(tiny_suite, methods=["recast"])
    bench.run_suite(tiny_suite, runs, tmp_path / "straight", log=lambda _: None)

    def stop_after_second_task(line):
        if "/ t1: test" in line:  # t1 is saved, its record not yet kept
            raise _Stop

    with pytest.raises(_Stop):
        bench.run_suite(tiny_suite, runs, tmp_path / "stopped", log=stop_after_second_task)
    assert not (tmp_path / "stopped" / "runs").exists() and (tmp_path / "stopped" / "state").is_dir()
    logs = []
    bench.run_suite(tiny_suite, runs, tmp_path / "stopped", log=logs.append)
    assert any("resuming the interrupted run" in line for line in logs)
    resumed, straight = (json.loads((tmp_path / d / "runs" / "recast-att__tiny__42.json").read_text())
                         for d in ("stopped", "straight"))
    assert resumed["accuracy_matrix"] == straight["accuracy_matrix"]
    assert not (tmp_path / "stopped" / "state" / "recast-att__tiny__42").exists()


def test_a_grid_of_one_point_is_chosen_without_trials(tmp_path):
    run = bench.Run("linear", bench.BenchBackbone("b", "-", ("linear",)), 1)
    record = bench.tune(bench.Suite("s", (), (), {}), run, tmp_path, grid={"head": (1e-2,)}, log=lambda _: None)
    assert record["chosen"] == {"head": 1e-2} and record["options"] == {"head_lr": 1e-2} and record["scores"] == []
    assert json.loads((tmp_path / "tuning" / "linear__b.json").read_text()) == record


def test_run_files_record_device_precision_and_workers(tiny_suite, tmp_path):
    suite = bench.with_training(tiny_suite, precision="bf16", num_workers=0)
    bench.run_suite(suite, bench.plan(suite, methods=["linear"]), tmp_path, log=lambda _: None, device="cpu")
    record = json.loads((tmp_path / "runs" / "linear__tiny__42.json").read_text())
    assert record["device"] == "cpu"
    assert record["train_config"]["precision"] == "bf16" and record["train_config"]["num_workers"] == 0


def test_max_train_images_zero_means_every_image(capsys):
    from recast.cli import main
    assert main(["bench", "--suite", "effnet", "--dry-run", "--max-train-images", "0", "--methods", "linear"]) == 0
    assert "training split: every image per task" in capsys.readouterr().out
    assert main(["bench", "--suite", "effnet", "--dry-run", "--methods", "linear"]) == 0
    assert "training split: at most 1000 images per task" in capsys.readouterr().out


def test_widening_a_grid_scores_only_the_new_points_under_the_same_setup(tiny_suite, tmp_path, monkeypatch):
    from recast.bench import tuning
    scored = []
    real = tuning.validation_score

    def counting(suite, run, options, device="cpu"):
        scored.append(dict(options))
        return real(suite, run, options, device)

    monkeypatch.setattr(tuning, "validation_score", counting)
    suite = replace(tiny_suite, train={**tiny_suite.train, "epochs": 1})
    run = bench.plan(suite, methods=["linear"])[0]
    first = tuning.tune(suite, run, tmp_path, grid={"head": (1e-3, 5e-2)}, log=lambda _: None)
    assert len(scored) == 2 and first["setup"] == tuning.tuning_setup(suite, run)
    logs = []
    wider = tuning.tune(suite, run, tmp_path, grid={"head": (1e-3, 5e-2, 1e-1)}, log=logs.append)
    assert scored[2:] == [{"head_lr": 1e-1}]  # only the new point ran
    assert wider["scores"][:2] == first["scores"] and sum("kept from the earlier grid" in line for line in logs) == 2
    changed = replace(suite, train={**suite.train, "epochs": 2})  # another setup: nothing is reused
    tuning.tune(changed, run, tmp_path, grid={"head": (1e-3, 5e-2, 1e-1, 2e-1)}, log=lambda _: None)
    assert len(scored) == 3 + 4


def test_tuning_on_several_seeds_scores_the_mean_and_reuses_what_one_seed_scored(tiny_suite, tmp_path, monkeypatch):
    from recast.bench import tuning
    scored = []
    real = tuning.validation_score

    def counting(suite, run, options, device="cpu"):
        scored.append((run.seed, options["head_lr"]))
        return real(suite, run, options, device)

    monkeypatch.setattr(tuning, "validation_score", counting)
    suite = replace(tiny_suite, train={**tiny_suite.train, "epochs": 1}, seeds=(42, 7))
    run = bench.plan(suite, methods=["linear"], seeds=[42])[0]
    grid = {"head": (1e-3, 5e-2)}
    one = tuning.tune(suite, run, tmp_path, grid=grid, log=lambda _: None)
    assert scored == [(42, 1e-3), (42, 5e-2)] and "seeds" not in one
    two = tuning.tune(suite, run, tmp_path, grid=grid, log=lambda _: None, seeds=tuning.tuning_seeds(suite, 2))
    assert scored[2:] == [(7, 1e-3), (7, 5e-2)]  # seed 42's scores were kept
    assert two["seeds"] == [42, 7] and two["seed"] == 42
    for first, both in zip(one["scores"], two["scores"], strict=True):
        assert [e["seed"] for e in both["per_seed"]] == [42, 7]
        assert both["per_seed"][0]["val_accuracy"] == first["val_accuracy"]
        assert both["val_accuracy"] == pytest.approx(sum(e["val_accuracy"] for e in both["per_seed"]) / 2)
    assert two["chosen"] == max(two["scores"], key=lambda s: s["val_accuracy"])["lrs"]
    again = tuning.tune(suite, run, tmp_path, grid=grid, log=lambda _: None, seeds=[42, 7])
    assert again == two and len(scored) == 4
    from recast.bench.report import tuning_table
    assert ", mean of seeds 42, 7 | 2 |" in tuning_table([{"method": "linear", "backbone": "tiny", "tuning": two}])
    with pytest.raises(ConfigError, match="--tune-seeds must be 1 to 2"):
        tuning.tuning_seeds(suite, 3)


def test_an_edited_tuning_record_is_scored_again_where_it_is_not_a_score(tiny_suite, tmp_path, monkeypatch):
    from recast.bench import tuning
    scored = []
    monkeypatch.setattr(tuning, "validation_score", lambda suite, run, options, device="cpu": scored.append(
        (run.seed, options["head_lr"])) or {"val_accuracy": 0.5, "per_task": {}})
    run = bench.plan(tiny_suite, methods=["linear"])[0]
    first = tuning.tune(tiny_suite, run, tmp_path, grid={"head": (1e-3, 5e-2)}, log=lambda _: None)
    edited = {**first, "grid": [], "scores": [{**first["scores"][0], "val_accuracy": "high"}, first["scores"][1], 7]}
    tuning.tuning_file(tmp_path, run).write_text(json.dumps(edited))
    again = tuning.tune(tiny_suite, run, tmp_path, grid={"head": (1e-3, 5e-2)}, log=lambda _: None)
    assert scored == [(42, 1e-3), (42, 5e-2), (42, 1e-3)] and again["scores"] == first["scores"]


def test_tune_seeds_is_checked_before_anything_runs(capsys):
    from recast.cli import main
    assert main(["bench", "--suite", "effnet", "--dry-run", "--methods", "linear", "--tune", "--tune-seeds", "2"]) == 0
    assert "learning-rate points on validation, mean of seeds 42, 1998:" in capsys.readouterr().out
    assert main(["bench", "--suite", "effnet", "--dry-run", "--methods", "linear", "--tune", "--tune-seeds", "4"]) != 0
    assert "--tune-seeds must be 1 to 3" in capsys.readouterr().err
    assert main(["bench", "--suite", "effnet", "--dry-run", "--methods", "linear", "--tune-seeds", "2"]) != 0
    assert "--tune-seeds applies to --tune" in capsys.readouterr().err


def test_a_finished_tuned_run_is_rerun_only_when_the_chosen_rates_change(tiny_suite, tmp_path):
    suite = replace(tiny_suite, train={**tiny_suite.train, "epochs": 1})
    runs = bench.plan(suite, methods=["linear"])
    out = tmp_path / "results"
    bench.run_suite(suite, runs, out, tune_lrs=True, grid={"head": (5e-2,)}, log=lambda _: None)
    logs = []
    bench.run_suite(suite, runs, out, tune_lrs=True, grid={"head": (5e-2,)}, log=logs.append)
    assert any("already done with these learning rates, kept" in line for line in logs)
    logs = []
    bench.run_suite(suite, runs, out, tune_lrs=True, grid={"head": (1e-3,)}, log=logs.append)
    assert any("done with other learning rates" in line and "rerun" in line for line in logs)
    record = json.loads((out / "runs" / runs[0].file_name).read_text())
    assert record["tuning"]["chosen"] == {"head": 1e-3}


def test_the_report_shows_a_widened_grid_that_chose_the_same_rates(tiny_suite, tmp_path):
    from recast.bench import tuning
    suite = replace(tiny_suite, train={**tiny_suite.train, "epochs": 1})
    runs = bench.plan(suite, methods=["linear"])
    out = tmp_path / "results"
    bench.run_suite(suite, runs, out, tune_lrs=True, grid={"head": (5e-2, 1e-9)}, log=lambda _: None)
    assert "| head 1e-09, 0.05 |" in (out / "RESULTS.md").read_text()
    record = json.loads(tuning.tuning_file(out, runs[0]).read_text())
    wider = {**record, "grid": [*record["grid"], {"head": 2e-9}], "scores": [*record["scores"], {"lrs": {"head": 2e-9},
                                                                                              "val_accuracy": 0.0}]}
    tuning.tuning_file(out, runs[0]).write_text(json.dumps(wider))
    text = bench.write_report(out).read_text()
    assert "| head 1e-09, 2e-09, 0.05 |" in text and "| 3 |" in text
    tuning.tuning_file(out, runs[0]).write_text(json.dumps({**wider, "chosen": {"head": 2e-9}}))
    assert "| head 1e-09, 0.05 |" in bench.write_report(out).read_text()  # other rates: the runs' own record
