"""The cost-figures harness runs end to end on a tiny ViT (in-process, one repetition)."""

from recast.perf import train_step_figures


def test_train_step_figures_on_a_tiny_vit():
    tiny = {"img_size": 16, "patch_size": 8, "depth": 6, "embed_dim": 32, "num_heads": 2}
    figures = train_step_figures("vit_tiny_patch16_224", model_kwargs=tiny, batch=2, steps=1, warmup=0,
                                 targets=("att",), isolate=False)
    train = {row["method"]: row for row in figures["train"]}
    assert set(train) == {"recast-att", "full"}
    assert train["recast-att"]["trainable_params"] < train["full"]["trainable_params"]
    assert all(row["step_seconds"] > 0 and row["peak_rss_mb"] > 0 for row in train.values())
    (inference,) = figures["inference"]
    assert inference["switch_plus_first_forward_seconds"] > 0 and inference["base_eval_forward_seconds"] > 0
