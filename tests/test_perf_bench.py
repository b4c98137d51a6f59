"""`recast bench --perf` runs end to end on a tiny ViT and reports every ratio with its two figures."""

from recast.bench.perf import PerfSetup, run_perf

RATIOS = (
    "train_step_recast_att_over_lora", "train_step_recast_attmlp_over_full", "peak_mem_recast_over_lora",
    "switch_recast_over_peft", "eval_recast_over_base", "eval_export_over_base", "mimicry_svd_over_iterative",
)


def test_worker_process_reports_one_method():
    from recast.bench.perf import _run_worker

    setup = PerfSetup("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 8, "depth": 6, "embed_dim": 32,
                                               "num_heads": 2}, batch=2, steps=1, warmup=0)
    figures = _run_worker("recast-att", setup)
    assert figures["step_seconds"] > 0 and figures["peak_rss_mb"] >= figures["rss_before_training_mb"] > 0


def test_perf_figures_on_a_tiny_vit():
    setup = PerfSetup("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 8, "depth": 6, "embed_dim": 32,
                                               "num_heads": 2}, batch=2, steps=1, warmup=0, isolate=False)
    figures = run_perf(setup, progress=False, iterative_steps=3)
    for name in RATIOS:
        entry = figures[name]
        assert entry["a"] > 0 and entry["b"] > 0
        assert abs(entry["ratio"] - entry["a"] / entry["b"]) < 1e-12
    workers = figures["setup"]["workers"]
    assert workers["recast-att"]["trainable_params"] == 6 * 2 + 10 * 32 + 10  # G=6: n=1 per bank, K=2
    assert workers["full"]["trainable_params"] > workers["lora"]["trainable_params"] > workers["linear"]["trainable_params"]
    assert figures["mimicry_svd_over_iterative"]["svd_weight_rel_error"] < 1e-5
    assert figures["switch_recast_over_peft"]["recast_task_file_bytes"] < figures["switch_recast_over_peft"]["peft_adapter_file_bytes"]
