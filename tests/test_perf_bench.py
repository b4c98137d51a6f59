"""`recast bench --perf`: interleaved pairs, paired ratios with their spread, end to end on a tiny ViT."""

import json
import statistics

import pytest
import torch

from helpers import tiny_vit
from recast import RecastConfig, RecastModel
from recast.bank import TemplateBank, compose
from recast.bench.perf import (
    EVAL_PROCESSES,
    EVAL_ROUNDS_FACTOR,
    MIMICRY_PROCESSES,
    SWITCH_PAIRS_FACTOR,
    SWITCH_PROCESSES,
    TRAIN_PROCESSES,
    eval_figures,
    mimicry_figures,
    run_memory,
    run_pair,
    run_perf,
    switch_figures,
)
from recast.bench.perf_table import load_perf_runs
from recast.bench.timing import interleaved, median_interval, paired_ratio, process_figures, rounds_per_process
from recast.bench.workload import PerfSetup
from recast.cli import main
from recast.errors import ConfigError, FileFormatError

TINY = {"img_size": 16, "patch_size": 8, "depth": 6, "embed_dim": 32, "num_heads": 2}
RATIOS = (
    "train_step_recast_att_over_lora", "train_step_recast_attmlp_over_full", "train_step_recast_mlp_over_full",
    "peak_mem_recast_over_lora", "switch_recast_over_peft", "eval_recast_over_base", "eval_export_over_base",
    "mimicry_svd_over_iterative",
)
PAIRED = ("train_step_recast_att_over_lora", "train_step_recast_attmlp_over_full", "switch_recast_over_peft",
          "eval_recast_over_base", "eval_export_over_base")


def test_the_median_interval_narrows_with_more_rounds_and_the_quartiles_do_not():
    spread = [0.8 + 0.4 * i / 99 for i in range(100)]  # ratios evenly spread over 0.8-1.2
    few, many = paired_ratio(spread[::10], [1.0] * 10), paired_ratio(spread, [1.0] * 100)
    assert many["iqr_rel"] == pytest.approx(few["iqr_rel"], rel=0.2)
    assert many["median_interval_rel"] < few["median_interval_rel"] / 2
    assert many["median_interval"] == [spread[46], spread[53]]  # ranks 50 -+ 0.6745 * sqrt(100) / 2
    assert median_interval([5.0]) == (5.0, 5.0)


def test_paired_ratio_is_the_median_of_per_pair_ratios_with_its_quartiles():
    a = [2.0, 4.0, 6.0, 8.0, 100.0]
    b = [1.0, 1.0, 2.0, 4.0, 10.0]  # pair ratios 2, 4, 3, 2, 10 -> sorted 2, 2, 3, 4, 10
    figure = paired_ratio(a, b)
    assert figure["ratio"] == 3.0 and figure["iqr"] == [2.0, 4.0] and figure["repeats"] == 5
    assert figure["iqr_rel"] == pytest.approx(2.0 / 3.0)
    assert figure["a"] == 6.0 and figure["b"] == 2.0
    assert figure["median_interval"][0] <= figure["ratio"] <= figure["median_interval"][1]
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def test_interleaved_alternates_the_order_after_the_warm_up():
    calls = []
    sides = [lambda: calls.append("a"), lambda: calls.append("b")]
    times = interleaved(sides, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(t) for t in times] == [3, 3] and all(t >= 0 for side in times for t in side)


def test_pair_worker_process_times_both_methods_interleaved():
    setup = PerfSetup("vit_tiny_patch16_224", TINY, batch=2, repeats=3, warmup=1, threads=1)
    figures = run_pair("recast-att", "lora", setup)
    assert figures["processes"] == TRAIN_PROCESSES == len(figures["process_ratios"])  # split over fresh processes, pooled
    assert len(figures["a_times"]) == len(figures["b_times"]) == TRAIN_PROCESSES * rounds_per_process(3, TRAIN_PROCESSES)
    assert min(figures["a_times"] + figures["b_times"]) > 0 and figures["threads"] == 1
    assert figures["trainable_params"][0] == 6 * 2 + 10 * 32 + 10  # G=6: n=1 per bank, K=2


def test_eval_worker_process_times_recast_export_and_base_interleaved():
    setup = PerfSetup("vit_tiny_patch16_224", TINY, batch=2, repeats=2, warmup=0, threads=1)
    figures = eval_figures(setup)
    for name in ("eval_recast_over_base", "eval_export_over_base"):
        entry = figures[name]
        per_process = rounds_per_process(EVAL_ROUNDS_FACTOR * setup.repeats, EVAL_PROCESSES)
        assert entry["processes"] == EVAL_PROCESSES and entry["repeats"] == EVAL_PROCESSES * per_process
        assert len(entry["process_ratios"]) == EVAL_PROCESSES and all(r > 0 for r in entry["process_ratios"])
        assert entry["a"] > 0 and entry["b"] > 0 and entry["iqr"][0] <= entry["ratio"] <= entry["iqr"][1]
    assert figures["eval_recast_over_base"]["b"] == figures["eval_export_over_base"]["b"]  # one base, timed once per round


def test_mimicry_fits_are_timed_in_fresh_processes_one_pair_each():
    setup = PerfSetup("vit_tiny_patch16_224", TINY, batch=2, repeats=1, warmup=0, threads=1)
    figure = mimicry_figures(setup, iterative_steps=3, svd_repeats=3)["mimicry_svd_over_iterative"]
    assert figure["processes"] == figure["repeats"] == MIMICRY_PROCESSES == len(figure["iterative_times"])
    assert figure["svd_repeats"] == len(figure["svd_times"]) == 3 * MIMICRY_PROCESSES
    per_process = [statistics.median(figure["svd_times"][3 * i:3 * i + 3]) / t
                   for i, t in enumerate(figure["iterative_times"])]
    assert figure["process_ratios"] == pytest.approx(per_process)
    assert figure["ratio"] == pytest.approx(statistics.median(per_process))
    assert figure["iqr"][0] <= figure["ratio"] <= figure["iqr"][1] and figure["b"] > figure["a"] > 0


def test_switches_are_timed_in_fresh_processes_and_pooled():
    setup = PerfSetup("vit_tiny_patch16_224", TINY, batch=2, repeats=1, warmup=0, threads=1)
    figure = switch_figures(setup)["switch_recast_over_peft"]
    per_process = rounds_per_process(SWITCH_PAIRS_FACTOR, SWITCH_PROCESSES)
    assert figure["processes"] == SWITCH_PROCESSES and figure["repeats"] == SWITCH_PROCESSES * per_process
    assert figure["recast_task_file_bytes"] < figure["peft_adapter_file_bytes"]


def test_process_figures_give_each_process_its_own_median_ratio():
    parts = [{"a": [2.0, 4.0, 3.0], "b": [1.0, 1.0, 1.0]}, {"a": [1.0], "b": [2.0]}]
    assert process_figures(parts, "a", "b") == {"processes": 2, "process_ratios": [3.0, 0.5]}


def test_rounds_per_process_covers_the_total():
    assert rounds_per_process(10, 3) == 4 and rounds_per_process(9, 3) == 3 and rounds_per_process(1, 6) == 1


def test_memory_workers_load_only_their_own_method_libraries():
    setup = PerfSetup("vit_tiny_patch16_224", TINY, batch=2, repeats=1, warmup=0, threads=1)
    recast, lora = run_memory("recast-att", setup), run_memory("lora", setup)
    assert not recast["peft_loaded"] and lora["peft_loaded"]  # PEFT is the LoRA side's cost only
    for record in (recast, lora):
        assert record["peak_rss_mb"] >= record["rss_before_training_mb"] > 0


def test_perf_figures_on_a_tiny_vit():
    setup = PerfSetup("vit_tiny_patch16_224", TINY, batch=2, repeats=2, warmup=0, threads=1, isolate=False)
    figures = run_perf(setup, progress=False, iterative_steps=3)
    for name in RATIOS:
        entry = figures[name]
        assert entry["a"] > 0 and entry["b"] > 0 and entry["repeats"] >= 1
    for name in PAIRED:
        entry = figures[name]
        assert entry["iqr"][0] <= entry["ratio"] <= entry["iqr"][1] and entry["repeats"] >= 2
    assert figures["switch_recast_over_peft"]["repeats"] == SWITCH_PAIRS_FACTOR * setup.repeats
    assert figures["setup"]["threads"] == 1 and figures["setup"]["repeats"] == 2
    trainable = figures["setup"]["trainable_params"]
    assert trainable["recast-att"] == 6 * 2 + 10 * 32 + 10
    assert trainable["full"] > trainable["lora"] > trainable["linear"]
    memory = figures["setup"]["memory"]
    assert 0 < memory["recast-att"]["rss_before_building_mb"] < memory["recast-att"]["peak_rss_mb"] + 1  # two clocks of RSS
    assert memory["recast-att"]["peak_rss_mb"] >= memory["recast-att"]["rss_before_training_mb"] > 0
    for entry in memory.values():  # the training-only increment: final peak minus resident before training
        assert entry["training_increment_mb"] == pytest.approx(entry["peak_rss_mb"] - entry["resident_before_training_mb"])
        assert entry["resident_before_training_mb"] <= entry["peak_rss_mb"] + 1  # kernel counters are approximate
    assert figures["mimicry_svd_over_iterative"]["svd_weight_rel_error"] < 1e-5
    assert figures["switch_recast_over_peft"]["recast_task_file_bytes"] < figures["switch_recast_over_peft"]["peft_adapter_file_bytes"]


def test_perf_only_measures_the_chosen_groups_and_refuses_unknown_ones():
    setup = PerfSetup("vit_tiny_patch16_224", TINY, batch=2, repeats=2, warmup=0, threads=1, isolate=False)
    figures = run_perf(setup, progress=False, iterative_steps=3, groups=["mimicry", "switch"])
    assert set(figures) == {"mimicry_svd_over_iterative", "switch_recast_over_peft", "setup"}
    assert figures["setup"]["groups"] == ["switch", "mimicry"]  # recorded in measuring order
    assert figures["setup"]["trainable_params"] == {} and figures["setup"]["memory"] == {}
    for groups in (["train", "speed"], []):
        with pytest.raises(ConfigError, match="train, memory, switch, eval, mimicry"):
            run_perf(setup, progress=False, groups=groups)


def test_the_fast_switch_still_refuses_a_task_file_whose_bytes_were_altered(tmp_path):
    model = RecastModel.from_base(tiny_vit(depth=2), RecastConfig(target="att", groups=1))
    model.add_task("b", 3)
    model.save_pretrained(tmp_path)
    model.set_task("b")
    model.load_task(tmp_path, "b", replace=True)  # the switch as the benchmark times it
    before = model.task_tensors("b")
    with torch.no_grad():
        weights_before = [m.weight_for("b").clone() for _, m in model.task_modules() if m.kind == "coefficients"]
    path = tmp_path / "tasks" / "b.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of the last coefficient: the file still parses
    path.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="checksum"):
        model.load_task(tmp_path, "b", replace=True)
    assert model.active_task == "b"
    after = model.task_tensors("b")
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        weights_after = [m.weight_for("b") for _, m in model.task_modules() if m.kind == "coefficients"]
    assert all(torch.equal(a, b) for a, b in zip(weights_after, weights_before, strict=True))


def test_compose_into_a_buffer_equals_the_plain_composition():

    templates = torch.randn(3, 5, 4, 2, 2)
    for coefficients in (torch.randn(2, 3), torch.randn(4, 2, 3)):  # one module, a batch of modules
        expected = compose(templates, coefficients)
        buffer = torch.empty_like(expected)
        assert compose(templates, coefficients, out=buffer) is buffer
        assert torch.allclose(buffer, expected, atol=1e-6)
        mix = coefficients.mean(-2)  # W = sum_i mean_k(alpha[k, i]) T[i], written out
        by_hand = sum(mix[..., i, None, None, None, None] * templates[i] for i in range(3))
        assert torch.allclose(expected, by_hand, atol=1e-6)


def test_a_switch_generates_the_loaded_weights_into_the_replaced_buffers(tmp_path):

    model = RecastModel.from_base(tiny_vit(depth=2), RecastConfig(target="att", groups=1))
    assert all(bank.templates.is_contiguous() for bank in model.banks.values())
    assert TemplateBank(torch.randn(4, 3, 2).transpose(1, 2)).templates.is_contiguous()
    model.add_task("b", 3)
    layers = [m for _, m in model.task_modules() if m.kind == "coefficients"]
    with torch.no_grad():
        for layer in layers:
            layer.coefficients("b").add_(0.5)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        for layer in layers:
            layer.coefficients("b").mul_(-3.0)  # in memory only; the file holds the +0.5 values
        stale = [layer.weight_for("b").clone() for layer in layers]
        buffers = [layer.weight_for("b").data_ptr() for layer in layers]
        model.load_task(tmp_path, "b", replace=True)
        for layer, old, buffer in zip(layers, stale, buffers, strict=True):
            weight = layer.weight_for("b")
            assert weight.data_ptr() == buffer  # composed into the replaced weight's memory
            assert torch.allclose(weight, compose(layer.bank.templates, layer.coefficients("b")), atol=1e-6)
            assert not torch.allclose(weight, old)


def test_bf16_setup_trains_and_evaluates_under_autocast_and_records_its_device():
    setup = PerfSetup("vit_tiny_patch16_224", TINY, batch=2, repeats=2, warmup=0, threads=1, isolate=False,
                      precision="bf16")
    figures = run_perf(setup, progress=False, iterative_steps=3)
    assert figures["setup"]["precision"] == "bf16" and figures["setup"]["device"] == "cpu"
    assert figures["setup"]["device_name"] == "cpu" and figures["setup"]["torch"] == torch.__version__
    memory = figures["setup"]["memory"]["recast-att"]
    assert memory["measure"] == "peak RSS" and memory["peak_mb"] == memory["peak_rss_mb"]
    with setup.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")


def test_perf_setup_refuses_unknown_precisions_and_devices():
    with pytest.raises(ValueError, match="precision"):
        PerfSetup(precision="fp8")
    with pytest.raises(ConfigError, match="cpu, cuda or cuda:N"):
        PerfSetup(device="tpu")


def test_perf_table_puts_runs_side_by_side_with_their_spread(tmp_path, capsys):
    def figure(ratio: float, **extra) -> dict:
        return {"ratio": ratio, "a": ratio * 0.002, "b": 0.002, "unit": "s", "repeats": 10, **extra}

    first = {"switch": figure(0.20, iqr=[0.18, 0.22], median_interval=[0.19, 0.21]), "eval": figure(1.0),
             "setup": {"threads": 1}}
    second = {"switch": figure(0.22, iqr=[0.20, 0.24], median_interval=[0.215, 0.226])}  # --perf-only switch
    paths = []
    for index, run in enumerate((first, second)):
        paths.append(tmp_path / f"run{index}.json")
        paths[-1].write_text(json.dumps(run))
    assert main(["bench", "--perf-table", *map(str, paths)]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()}
    assert rows["switch"] == "| switch | 0.200 / 0.220 | 10.0% | 0.4 ms | 2.0 ms | 18.2% | 5.0% | 10 |"
    assert "| eval | 1.000 / - | - |" in rows["eval"]  # not measured in the second run: no spread
    (tmp_path / "notes.json").write_text(json.dumps({"setup": {}}))
    with pytest.raises(FileFormatError, match="not the output of 'recast bench --perf --json'"):
        load_perf_runs([tmp_path / "notes.json"])
