"""Tables and plots made from benchmark result files (one JSON per method, backbone and seed).

Everything here reads the JSON files and nothing else, so a table always shows what the files
say (DESIGN.md: "Benchmarks as data").
"""

from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from recast.errors import FileFormatError
from recast.io import atomic_write_bytes, read_json

REQUIRED_FIELDS = ("method", "backbone", "suite", "seed", "tasks", "average_accuracy", "forgetting", "bwt")


def file_stem(text: str) -> str:
    """``text`` as a file name stem every file system accepts: anything but letters, digits and
    ``_.+-`` becomes ``-`` (``recast:dw`` -> ``recast-dw``; Windows refuses ``:`` in names)."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", text)


def load_runs(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every run file under ``results_dir/runs`` (sorted by name), checked for the required fields."""
    runs = []
    for path in sorted(Path(results_dir, "runs").glob("*.json")):
        try:
            run = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise FileFormatError(f"{path}: not valid JSON ({exc})") from None
        missing = [f for f in REQUIRED_FIELDS if f not in run]
        if missing:
            raise FileFormatError(f"{path}: missing fields {missing}")
        runs.append(run)
    return runs


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, backbone): means over tasks, mean and std over seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["method"], run["backbone"])].append(run)
    rows = []
    for (method, backbone), group in groups.items():
        accuracies = [r["average_accuracy"] for r in group]
        tasks = [t for r in group for t in r["tasks"]]
        kinds = sorted({k for t in tasks for k in t.get("params", {})})
        rows.append({
            "method": method,
            "backbone": backbone,
            "seeds": len(group),
            "params": {k: _mean([t["params"].get(k, 0) for t in tasks]) for k in kinds},
            "bytes": _mean([t.get("bytes", 0) for t in tasks]),
            "accuracy_mean": _mean(accuracies),
            "accuracy_std": statistics.pstdev(accuracies) if len(accuracies) > 1 else 0.0,
            "forgetting": _mean([r["forgetting"] for r in group]),
            "train_seconds": _mean([t.get("train_seconds", 0.0) for t in tasks]),
            "peak_rss_mb": max((t.get("peak_rss_mb", 0.0) for t in tasks), default=0.0),
        })
    return sorted(rows, key=lambda r: (r["backbone"], -r["accuracy_mean"]))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results table in Markdown: accuracy (mean ± std over seeds), per-task size, cost."""
    header = (
        "| method | backbone | per-task params (coef / head / other) | bytes per task | average accuracy "
        "| forgetting | train s per task | process peak RSS MB* | seeds |\n|---|---|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for row in rows:
        params = row["params"]
        extra = sum(v for k, v in params.items() if k not in ("coefficients", "head"))
        counts = f"{params.get('coefficients', 0):,.0f} / {params.get('head', 0):,.0f} / {extra:,.0f}"
        lines.append(
            f"| {row['method']} | {row['backbone']} | {counts} | {row['bytes']:,.0f} | "
            f"{row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f} | {row['forgetting']:.3f} | "
            f"{row['train_seconds']:.1f} | {row['peak_rss_mb']:.0f} | {row['seeds']} |"
        )
    lines.append("\n*The peak resident memory of the process so far: runs that share a process report the largest "
                 "value up to their end. Compare memory with `recast bench --perf`, which measures each method in a "
                 "fresh process.")
    return "\n".join(lines) + "\n"


def settings_text(runs: list[dict[str, Any]]) -> str:
    """One line per backbone: input size, augmentation and epochs, as the run files state them."""
    seen: dict[str, set[str]] = defaultdict(set)
    for run in runs:
        config = run.get("train_config") or {}
        size = run.get("image_size", config.get("image_size"))
        seen[run["backbone"]].add(f"{f'{size} px' if size else 'its own input size'}, augmentation "
                                  f"{run.get('augment', config.get('augment', 'default'))}, {config.get('epochs', '?')} epochs")
    lines = [f"- {backbone}: {'; '.join(sorted(settings))}" for backbone, settings in sorted(seen.items())]
    return "Training settings by backbone:\n\n" + "\n".join(lines) + "\n"


def tuning_table(runs: list[dict[str, Any]], results_dir: Path | None = None) -> str:
    """The learning rates chosen by ``--tune``: grid, choice and its validation accuracy (empty when untuned).

    A run keeps the tuning record it was trained under; when ``results_dir/tuning/`` holds a later
    record for the same method and backbone that chose the same rates (a widened grid), that one is
    shown: it is the selection the runs now stand on.
    """
    tuned = {(r["method"], r["backbone"]): r["tuning"] for r in runs if isinstance(r.get("tuning"), dict)}
    for key, tuning in tuned.items():
        later = _later_tuning(results_dir, *key) if results_dir is not None else None
        if later is not None and later.get("chosen") == tuning.get("chosen"):
            tuned[key] = later
    if not tuned:
        return ""
    lines = ["\nLearning rates chosen by validation accuracy on the first seed (`recast bench --tune`); the test "
             "splits were read only by the final runs.\n",
             "| method | backbone | grid | chosen | validation accuracy (chosen / worst) | points |",
             "|---|---|---|---|---:|---:|"]
    for (method, backbone), tuning in sorted(tuned.items()):
        grid = defaultdict(set)
        for point in tuning["grid"]:
            for kind, lr in point.items():
                grid[kind].add(lr)
        shown = "; ".join(f"{kind} {', '.join(f'{v:g}' for v in sorted(values))}" for kind, values in grid.items())
        chosen = ", ".join(f"{kind} {lr:g}" for kind, lr in tuning["chosen"].items())
        scores = [s["val_accuracy"] for s in tuning["scores"]]
        measured = f"{max(scores):.3f} / {min(scores):.3f}" if scores else "- (one point)"
        if scores and len(tuning.get("seeds", [])) > 1:  # --tune-seeds: each score a mean over seeds
            measured += f", mean of seeds {', '.join(map(str, tuning['seeds']))}"
        lines.append(f"| {method} | {backbone} | {shown} | {chosen} | {measured} | {len(tuning['grid'])} |")
    return "\n".join(lines) + "\n"


def tuning_path(results_dir: Path, method: str, backbone: str) -> Path:
    """Where ``recast bench --tune`` keeps the tuning record of a method on a backbone."""
    return results_dir / "tuning" / (file_stem(f"{method}__{backbone}") + ".json")


def _later_tuning(results_dir: Path, method: str, backbone: str) -> dict[str, Any] | None:
    path = tuning_path(results_dir, method, backbone)
    try:
        record = read_json(path) if path.is_file() else None
    except FileFormatError:
        return None
    return record if isinstance(record, dict) and {"grid", "chosen", "scores"} <= set(record) else None


def write_report(results_dir: str | Path) -> Path:
    """Write ``RESULTS.md`` and the plots from the run files; returns the Markdown path."""
    results_dir = Path(results_dir)
    runs = load_runs(results_dir)
    if not runs:
        raise FileFormatError(f"{results_dir / 'runs'}: no result files; run `recast bench` first")
    rows = summarise(runs)
    plots = [plot_accuracy_vs_bytes(rows, results_dir / "accuracy_vs_bytes.png")]
    plots += [plot_accuracy_matrix(run, results_dir) for run in runs if run.get("accuracy_matrix")]
    text = "# Results\n\nMade by `recast bench` from the files in `runs/`.\n\n" + markdown_table(rows)
    text += "\n" + settings_text(runs) + tuning_table(runs, results_dir)
    text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots if p is not None) + "\n"
    path = results_dir / "RESULTS.md"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def plot_accuracy_vs_bytes(rows: list[dict[str, Any]], path: Path) -> Path:
    """Average accuracy against bytes per task (log axis), one point per method and backbone."""
    fig = Figure(figsize=(7, 4.5))  # no pyplot: no global state, no display backend
    ax = fig.subplots()
    for row in rows:
        ax.errorbar(max(row["bytes"], 1), row["accuracy_mean"], yerr=row["accuracy_std"], fmt="o", capsize=3)
        ax.annotate(f"{row['method']} ({row['backbone']})", (max(row["bytes"], 1), row["accuracy_mean"]),
                    fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("bytes on disk per task (log)")
    ax.set_ylabel("average accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_accuracy_matrix(run: dict[str, Any], results_dir: Path) -> Path:
    """Heat map of accuracy on task j (column) after learning task i (row) for one run."""
    matrix = run["accuracy_matrix"]
    names = [t["name"] for t in run["tasks"]]
    fig = Figure(figsize=(1.2 + 0.8 * len(names), 1.0 + 0.7 * len(names)))
    ax = fig.subplots()
    ax.imshow([[v if v is not None else float("nan") for v in row] for row in matrix], vmin=0, vmax=1, cmap="viridis")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value is not None:
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), [f"after {n}" for n in names], fontsize=7)
    ax.set_title(f"{run['method']} / {run['backbone']} / seed {run['seed']}", fontsize=8)
    fig.tight_layout()
    path = results_dir / (file_stem(f"matrix_{run['method']}_{run['backbone']}_{run['seed']}").replace("+", "-") + ".png")
    fig.savefig(path, dpi=120)
    return path
