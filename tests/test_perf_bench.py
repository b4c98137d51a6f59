"""`recast bench --perf`: interleaved pairs, paired ratios with their spread, end to end on a tiny ViT."""

import pytest
import torch

from recast.bench.perf import PerfSetup, interleaved, paired_ratio, run_pair, run_perf

TINY = {"img_size": 16, "patch_size": 8, "depth": 6, "embed_dim": 32, "num_heads": 2}
RATIOS = (
    "train_step_recast_att_over_lora", "train_step_recast_attmlp_over_full", "train_step_recast_mlp_over_full",
    "peak_mem_recast_over_lora", "switch_recast_over_peft", "eval_recast_over_base", "eval_export_over_base",
    "mimicry_svd_over_iterative",
)
PAIRED = ("train_step_recast_att_over_lora", "train_step_recast_attmlp_over_full", "switch_recast_over_peft",
          "eval_recast_over_base", "eval_export_over_base")


def test_paired_ratio_is_the_median_of_per_pair_ratios_with_its_quartiles():
    a = [2.0, 4.0, 6.0, 8.0, 100.0]
    b = [1.0, 1.0, 2.0, 4.0, 10.0]  # pair ratios 2, 4, 3, 2, 10 -> sorted 2, 2, 3, 4, 10
    figure = paired_ratio(a, b)
    assert figure["ratio"] == 3.0 and figure["iqr"] == [2.0, 4.0] and figure["repeats"] == 5
    assert figure["iqr_rel"] == pytest.approx(2.0 / 3.0)
    assert figure["a"] == 6.0 and figure["b"] == 2.0
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
    assert len(figures["a_times"]) == len(figures["b_times"]) == 3
    assert min(figures["a_times"] + figures["b_times"]) > 0 and figures["threads"] == 1
    assert figures["trainable_params"][0] == 6 * 2 + 10 * 32 + 10  # G=6: n=1 per bank, K=2


def test_perf_figures_on_a_tiny_vit():
    setup = PerfSetup("vit_tiny_patch16_224", TINY, batch=2, repeats=2, warmup=0, threads=1, isolate=False)
    figures = run_perf(setup, progress=False, iterative_steps=3)
    for name in RATIOS:
        entry = figures[name]
        assert entry["a"] > 0 and entry["b"] > 0 and entry["repeats"] >= 1
    for name in PAIRED:
        entry = figures[name]
        assert entry["iqr"][0] <= entry["ratio"] <= entry["iqr"][1] and entry["repeats"] >= 2
    assert figures["switch_recast_over_peft"]["repeats"] == 4 * setup.repeats
    assert figures["setup"]["threads"] == 1 and figures["setup"]["repeats"] == 2
    trainable = figures["setup"]["trainable_params"]
    assert trainable["recast-att"] == 6 * 2 + 10 * 32 + 10
    assert trainable["full"] > trainable["lora"] > trainable["linear"]
    memory = figures["setup"]["memory"]
    assert memory["recast-att"]["peak_rss_mb"] >= memory["recast-att"]["rss_before_training_mb"] > 0
    assert figures["mimicry_svd_over_iterative"]["svd_weight_rel_error"] < 1e-5
    assert figures["switch_recast_over_peft"]["recast_task_file_bytes"] < figures["switch_recast_over_peft"]["peft_adapter_file_bytes"]


def test_the_fast_switch_still_refuses_a_task_file_whose_bytes_were_altered(tmp_path):
    from recast import RecastConfig, RecastModel
    from recast.errors import FileFormatError
    from helpers import tiny_vit

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
