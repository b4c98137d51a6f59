"""The comparison harness: suites, runs and their result files, the report; speed and mimicry figures.

Modules: ``suites`` (what a comparison runs), ``report`` (``RESULTS.md`` and plots from result
files alone), ``runner`` (one run, a whole suite), ``tuning`` (learning rates chosen on
validation accuracy), ``perf`` (``recast bench --perf``) and ``mimicry`` (``recast mimic --bench``);
the last two are imported by name where they are used.
"""

from recast.bench.report import load_runs, summarise, write_report
from recast.bench.runner import open_tasks, run_config, run_one, run_suite
from recast.bench.suites import (
    PAPER_SEEDS,
    BenchBackbone,
    BenchTask,
    Run,
    Suite,
    describe,
    method_name,
    missing_data,
    offline_suite,
    paper_suite,
    plan,
    with_training,
)

__all__ = [
    "PAPER_SEEDS", "BenchBackbone", "BenchTask", "Run", "Suite", "describe", "load_runs", "method_name",
    "missing_data", "offline_suite", "open_tasks", "paper_suite", "plan", "run_config", "run_one", "run_suite",
    "summarise", "with_training", "write_report",
]
