"""``recast bench --perf-table FILE...``: the Markdown table of several ``--perf --json`` runs.

Whether a speed ratio can be trusted shows only across runs: this puts each ratio of every file
side by side with its spread over the runs (max / min - 1), beside the last run's absolute
figures, the interquartile range of its single pairs and the median's 50% confidence interval.
A figure missing from a run (``--perf-only`` measured other groups) is shown as ``-`` and left out
of the spread, so partial reruns can be compared with full ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recast.errors import FileFormatError
from recast.io import read_json


def load_perf_runs(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Each file's figures (a JSON object written by ``recast bench --perf --json``)."""
    runs = []
    for path in paths:
        figures = read_json(Path(path))
        if not isinstance(figures, dict) or not any(_is_ratio(v) for v in figures.values()):
            raise FileFormatError(f"{path}: not the output of 'recast bench --perf --json' (no ratios in it)")
        runs.append(figures)
    return runs


def _is_ratio(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("ratio"), int | float)


def _amount(value: float, unit: str) -> str:
    if unit == "MiB":
        return f"{value:,.0f} MiB"
    return f"{value * 1000:.1f} ms" if value < 0.1 else f"{value:.3f} s"


def format_ratio(value: float) -> str:
    """Three decimals, or two significant digits below 0.1 (the mimicry ratio is about 0.001)."""
    return f"{value:.3f}" if value >= 0.1 else f"{value:.2g}"


def _share(low_high: Sequence[float] | None, middle: float) -> str:
    return "-" if not low_high else f"{(low_high[1] - low_high[0]) / middle * 100:.1f}%"


def perf_table(runs: Sequence[dict[str, Any]]) -> str:
    """One row per ratio in any run, in first-seen order; A and B are the last run's medians."""
    names = list(dict.fromkeys(name for run in runs for name, entry in run.items() if _is_ratio(entry)))
    lines = ["| ratio | A / B, each run | spread over runs | A (last run) | B (last run) | IQR of pairs "
             "| median's 50% interval | pairs |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        values = [run[name]["ratio"] if _is_ratio(run.get(name)) else None for run in runs]
        present = [v for v in values if v is not None]
        spread = f"{(max(present) / min(present) - 1) * 100:.1f}%" if len(present) > 1 and min(present) > 0 else "-"
        last = next(run[name] for run in reversed(runs) if _is_ratio(run.get(name)))
        each = " / ".join("-" if v is None else format_ratio(v) for v in values)
        lines.append(f"| {name} | {each} | {spread} | {_amount(last['a'], last['unit'])} | "
                     f"{_amount(last['b'], last['unit'])} | {_share(last.get('iqr'), last['ratio'])} | "
                     f"{_share(last.get('median_interval'), last['ratio'])} | {last['repeats']} |")
    return "\n".join(lines)
