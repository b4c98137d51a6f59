"""The compression curve: fidelity and backbone bytes of a rebuilt model as n grows, and its plot."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from recast.config import RecastConfig
from recast.errors import ConfigError
from recast.io import atomic_write_json
from recast.mimicry.features import MimicModel, feature_fidelity
from recast.surgery import plan_banks

ModelBuilder = Callable[..., MimicModel]
"""Builds a model as ``builder(base, config, mimicry=method, **options)``: ``RecastModel.from_base``."""


def layers_per_group(base: nn.Module, config: RecastConfig) -> int:
    """The largest number of layers sharing one bank under ``config``."""
    return max(len(plan.layers) for plan in plan_banks(copy.deepcopy(base), config))


def compression_curve(
    base: nn.Module,
    config: RecastConfig,
    ns: list[int] | None = None,
    method: str = "svd",
    images: Tensor | None = None,
    *,
    builder: ModelBuilder,
    **options: Any,
) -> list[dict[str, Any]]:
    """Fidelity and backbone bytes for each n in ``ns`` (default: 1 .. layers per group + 1).

    ``builder`` builds each model (pass ``RecastModel.from_base``; this package cannot import the
    model, which imports it). One point per n: ``templates``, ``seconds``, the weight metrics,
    ``backbone_bytes``, ``original_bytes``, ``backbone_ratio`` (backbone / original), and the
    feature metrics when ``images`` are given.
    """
    ns = ns or list(range(1, layers_per_group(base, config) + 2))
    if any(n < 1 for n in ns):
        raise ConfigError(f"every n in the curve must be >= 1, got {ns}")
    points = []
    for n in ns:
        model = builder(base, dataclasses.replace(config, templates=n), mimicry=method, **options)
        report = model.mimicry_report
        point = {"templates": n, "method": method, **{k: v for k, v in report.items() if k not in ("layers", "options", "method")}}
        point["backbone_ratio"] = report["backbone_bytes"] / report["original_bytes"]
        if images is not None:
            features = feature_fidelity(model, base, images)
            point.update({k: v for k, v in features.items() if k not in ("feature_cosine", "seconds")})
        points.append(point)
    return points


def plot_curve(points: list[dict[str, Any]], path: str | Path, title: str = "Neural Mimicry: fidelity vs size") -> Path:
    """Write a PNG: relative weight error (and feature cosine) and backbone size against n."""
    # Deferred: matplotlib takes most of a second to import and only the plot needs it.

    ns = [p["templates"] for p in points]
    figure = Figure(figsize=(6.4, 4.4), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    axis.plot(ns, [p["weight_rel_error"] for p in points], "o-", label="weight rel. error")
    if all("feature_cosine_min" in p for p in points):
        axis.plot(ns, [1 - p["feature_cosine_min"] for p in points], "s--", label="1 - min feature cosine")
    axis.set_xlabel("templates per bank (n)")
    axis.set_ylabel("error")
    axis.set_xticks(ns)
    size = axis.twinx()
    size.plot(ns, [p["backbone_bytes"] / 2**20 for p in points], "^:", color="tab:red", label="backbone MiB")
    size.axhline(points[0]["original_bytes"] / 2**20, color="tab:red", alpha=0.3, label="original MiB")
    size.set_ylabel("backbone MiB", color="tab:red")
    axis.set_title(title)
    figure.legend(loc="outside lower center", ncol=2, fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def save_curve(record: dict[str, Any], directory: str | Path, title: str) -> tuple[Path, Path]:
    """Write ``record`` (with its ``points``) as ``curve.json`` and its plot as ``curve.png`` in ``directory``."""
    directory = Path(directory)
    atomic_write_json(directory / "curve.json", record)
    return directory / "curve.json", plot_curve(record["points"], directory / "curve.png", title=title)
