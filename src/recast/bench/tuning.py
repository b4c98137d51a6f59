"""Fair comparisons: each method's learning rates chosen from a small grid by validation accuracy.

For every (method, backbone) of a suite, each point of the method's grid learns the suite's tasks
on the first seed with the test splits never opened for reading (``fit_task`` without a test
set); the point with the best mean validation accuracy over the tasks is chosen, and every seed
then runs with it. With ``seeds`` (``--tune-seeds N``) each point learns the tasks once per seed
and is scored by the mean over them: on small training sets one seed's validation can favour a
rate by a point that the other seeds do not confirm. The grid, every point's validation scores
and the choice are written to ``tuning/<method>__<backbone>.json`` and into each run file, so the
report can show them.

Learning rates are per kind of trained state: ``head``, ``coefficients`` (RECAST), ``adapter``
(LoRA, VeRA and the adapters) and ``backbone`` (full fine-tuning).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from recast.bench.report import tuning_path
from recast.bench.suites import Run, Suite, load_base, method_name, open_tasks, run_config
from recast.distributed import DistContext
from recast.errors import ConfigError
from recast.io import atomic_write_json, read_json
from recast.methods import build_method
from recast.train import fit_task, prepare_task

DEFAULT_GRID: dict[str, tuple[float, ...]] = {
    "head": (3e-3, 1e-2, 3e-2),
    "coefficients": (1e-3, 3e-3, 1e-2),
    "adapter": (1e-3, 3e-3, 1e-2),
    "backbone": (1e-4, 3e-4, 1e-3),
}
OPTION_OF_KIND = {"head": "head_lr", "coefficients": "coef_lr", "adapter": "adapter_lr", "backbone": "adapter_lr"}


def tuned_kinds(method: str) -> tuple[str, ...]:
    """The kinds of state whose learning rates are tuned for ``method`` (a suite entry or registry name)."""
    name = method_name(method)
    if name == "linear":
        return ("head",)
    if name == "recast":
        return ("coefficients", "head")
    if name == "full":
        return ("backbone", "head")
    return ("adapter", "head")  # LoRA, VeRA, the adapters alone, and RECAST + an adapter


def grid_points(method: str, grid: Mapping[str, Sequence[float]] | None = None) -> list[dict[str, float]]:
    """Every combination of the method's tuned learning rates, as ``{kind: lr}``.

    With RECAST + an adapter, the coefficients share the adapter's rate unless ``grid`` names
    ``coefficients``: then they are a kind of their own (an adapter such as Piggyback's masks may
    want a rate a hundred times below the coefficients').
    """
    own_coefficients = method_name(method).startswith("recast+") and "coefficients" in (grid or {})
    grid = {**DEFAULT_GRID, **(grid or {})}
    kinds = tuned_kinds(method) + (("coefficients",) if own_coefficients else ())
    points = [dict(zip(kinds, values, strict=True)) for values in itertools.product(*(grid[k] for k in kinds))]
    if method_name(method).startswith("recast+") and not own_coefficients:
        points = [{**p, "coefficients": p["adapter"]} for p in points]
    return points


def method_options(point: Mapping[str, float]) -> dict[str, float]:
    """A grid point as ``build_method`` options (``head_lr``, ``coef_lr``, ``adapter_lr``)."""
    return {OPTION_OF_KIND[kind]: lr for kind, lr in point.items()}


def parse_grid(pairs: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """``["head=1e-3,1e-2", "adapter=3e-3"]`` -> ``{"head": (0.001, 0.01), "adapter": (0.003,)}``."""
    grid: dict[str, tuple[float, ...]] = {}
    for pair in pairs:
        kind, sep, text = pair.partition("=")
        if not sep or kind not in DEFAULT_GRID:
            raise ConfigError(f"--tune-grid {pair!r}: write KIND=LR,LR,... with KIND one of {', '.join(DEFAULT_GRID)}")
        try:
            values = tuple(float(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ConfigError(f"--tune-grid {pair!r}: learning rates must be numbers, e.g. head=1e-3,1e-2") from None
        if not values or any(not v > 0 for v in values):
            raise ConfigError(f"--tune-grid {pair!r}: give at least one positive learning rate")
        grid[kind] = values
    return grid


def validation_score(suite: Suite, run: Run, options: Mapping[str, Any], device: str = "cpu") -> dict[str, Any]:
    """Learn the suite's tasks with ``options`` on ``run``'s seed; validation accuracies only (no test split)."""
    config = run_config(suite, run)
    base = load_base(run, config)
    model = build_method(method_name(run.method), base, **{**run.backbone.options.get(run.method, {}), **options})
    per_task = {}
    for task in open_tasks(suite, base, run.seed, config):
        prepare_task(model, task.name, task.classes, seed=config.seed)
        per_task[task.name] = fit_task(model, task.train, task.val, None, config,
                                       dist=DistContext(device=device)).val_accuracy
    return {"val_accuracy": sum(per_task.values()) / len(per_task), "per_task": per_task}


def tuning_seeds(suite: Suite, count: int) -> list[int]:
    """The seeds a point is scored on: the suite's first ``count`` (``--tune-seeds``)."""
    if not 1 <= count <= len(suite.seeds):
        raise ConfigError(f"--tune-seeds must be 1 to {len(suite.seeds)} (the suite's seeds are "
                          f"{', '.join(map(str, suite.seeds))}); got {count}")
    return list(suite.seeds[:count])


def seeds_label(seeds: Sequence[int]) -> str:
    """How a choice's seeds read in logs: ``seed 42`` or ``mean of seeds 42, 1998``."""
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"mean of seeds {', '.join(map(str, seeds))}"


def tuning_file(out: Path, run: Run) -> Path:
    """Where the tuning of ``run``'s method and backbone is kept."""
    return tuning_path(out, run.method, run.backbone.key)


def tuning_setup(suite: Suite, run: Run) -> dict[str, Any]:
    """Everything besides the learning rates that a validation score depends on, as JSON values.

    A scored point is reused only under an equal setup: the suite's training options, its tasks and
    training-split size, the backbone and the method's options.
    """
    setup = {"train": dict(suite.train), "max_train_images": suite.max_train_images,
             "tasks": [[t.name, t.data, t.hflip] for t in suite.tasks], "backbone": run.backbone.spec,
             "method_options": run.backbone.options.get(run.method, {})}
    return json.loads(json.dumps(setup, sort_keys=True))


def _earlier_scores(record: Any, setup: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """Each (point, seed) scored by an earlier record made under the same setup.

    A one-seed record keeps ``val_accuracy`` and ``per_task`` in each score; a record of several
    seeds keeps them per seed under ``per_seed``.
    """
    if not isinstance(record, dict) or record.get("setup") != setup:
        return {}
    earlier = {}
    for score in record.get("scores", []):
        if not isinstance(score, dict) or not isinstance(score.get("lrs"), dict):
            continue
        for entry in score.get("per_seed", [{**score, "seed": record.get("seed")}]):
            if isinstance(entry, dict) and isinstance(entry.get("val_accuracy"), float):  # else: scored again
                kept = {k: entry[k] for k in ("val_accuracy", "per_task") if k in entry}
                earlier[(_point_key(score["lrs"]), entry.get("seed"))] = kept
    return earlier


def _point_key(point: Mapping[str, float]) -> str:
    return json.dumps(dict(point), sort_keys=True)


def _record_seeds(record: Any) -> list[int] | None:
    """The seeds a record's scores averaged (old records name only ``seed``)."""
    if not isinstance(record, dict):
        return None
    return record.get("seeds") or [record.get("seed")]


def _score(
    suite: Suite, run: Run, point: dict[str, float], seeds: Sequence[int], earlier: dict[tuple[str, int], Any],
    device: str,
) -> tuple[dict[str, Any], bool]:
    """A point's score over ``seeds`` (reusing earlier (point, seed) scores) and whether all were reused."""
    per_seed = []
    for seed in seeds:
        kept = earlier.get((_point_key(point), seed))
        per_seed.append({"seed": seed, **(kept or validation_score(suite, Run(run.method, run.backbone, seed),
                                                                   method_options(point), device))})
    reused = all((_point_key(point), seed) in earlier for seed in seeds)
    if len(per_seed) == 1:
        return {"lrs": point, **{k: v for k, v in per_seed[0].items() if k != "seed"}}, reused
    mean = sum(entry["val_accuracy"] for entry in per_seed) / len(per_seed)
    return {"lrs": point, "val_accuracy": mean, "per_seed": per_seed}, reused


def tune(
    suite: Suite, run: Run, out: Path, *, grid: Mapping[str, Sequence[float]] | None = None, resume: bool = True,
    log: Callable[[str], None] = print, device: str = "cpu", seeds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Choose ``run``'s learning rates by validation accuracy on ``run``'s seed (the first seed), or
    by the mean validation accuracy over ``seeds`` when given.

    Returns the tuning record: ``grid`` (the points tried), ``scores`` (each point's validation
    accuracies; per seed under ``per_seed`` when several), ``chosen`` (``{kind: lr}``), ``options``
    (as method options), ``seed`` (the first), ``seeds`` and ``setup`` (:func:`tuning_setup`). A
    record already in ``out/tuning/`` for the same grid and seeds is reused when ``resume``; for a
    grid or seeds that add to it, made under the same setup, only the new (point, seed) pairs are
    scored (widening a grid does not rerun the points it had).
    """
    seeds = list(seeds or [run.seed])
    points = grid_points(run.method, grid)
    path = tuning_file(out, run)
    setup = tuning_setup(suite, run)
    earlier: dict[tuple[str, int], dict[str, Any]] = {}
    if resume and path.is_file():
        record = read_json(path)
        if isinstance(record, dict) and record.get("grid") == points and _record_seeds(record) == seeds:
            log(f"  tune {run.method} / {run.backbone.key}: kept {record['chosen']} from {path}")
            return record
        earlier = _earlier_scores(record, setup)
    scores = []
    for index, point in enumerate(points if len(points) > 1 else [], 1):  # one point: nothing to choose between
        score, reused = _score(suite, run, point, seeds, earlier, device)
        scores.append(score)
        kept = " (kept from the earlier grid)" if reused else ""
        over = f" ({seeds_label(seeds)})" if len(seeds) > 1 else ""
        log(f"  tune {run.method} / {run.backbone.key} [{index}/{len(points)}] {point}: "
            f"validation {score['val_accuracy']:.4f}{over}{kept}")
    best = max(scores, key=lambda s: s["val_accuracy"])["lrs"] if scores else points[0]  # ties: the grid's order
    record = {"method": run.method, "backbone": run.backbone.key, "seed": seeds[0], "selected_on": "validation",
              "grid": points, "scores": scores, "chosen": best, "options": method_options(best), "setup": setup}
    if len(seeds) > 1:
        record["seeds"] = seeds
    atomic_write_json(path, record)
    return record
