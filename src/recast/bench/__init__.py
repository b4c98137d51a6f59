"""The comparison harness: suites, runs and their result files, the report; speed and mimicry figures.

Modules: ``suites`` (what a comparison runs), ``report`` (``RESULTS.md`` and plots from result
files alone), ``runner`` (one run, a whole suite), ``tuning`` (learning rates chosen on
validation accuracy), ``perf`` (``recast bench --perf``), ``perf_table`` (``--perf-table``) and
``mimicry`` (``recast mimic --bench``); the last three are imported by name where they are used.
"""

from recast.bench.report import load_runs, summarise, write_report
from recast.bench.runner import run_one, run_suite
from recast.bench.suites import (
    PAPER_SEEDS,
    BenchBackbone,
    BenchTask,
    Run,
    Suite,
    describe,
    effnet_suite,
    load_base,
    method_name,
    missing_data,
    offline_suite,
    open_tasks,
    paper_suite,
    plan,
    presets_suite,
    run_config,
    with_training,
)
from recast.bench.tuning import DEFAULT_GRID, grid_points, parse_grid, tune

__all__ = [
    "DEFAULT_GRID",
    "PAPER_SEEDS",
    "BenchBackbone",
    "BenchTask",
    "Run",
    "Suite",
    "describe",
    "effnet_suite",
    "grid_points",
    "load_base",
    "load_runs",
    "method_name",
    "missing_data",
    "offline_suite",
    "open_tasks",
    "paper_suite",
    "parse_grid",
    "plan",
    "presets_suite",
    "run_config",
    "run_one",
    "run_suite",
    "summarise",
    "tune",
    "with_training",
    "write_report",
]
