"""``recast serve DIR`` (HTTP server for every task of a model directory) and ``recast serve-bench``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from recast.errors import ConfigError
from recast.serve.bench import PARTS, run_all
from recast.serve.engine import ServeOptions


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``serve-bench`` to the ``recast`` command."""
    _register_serve(subparsers)
    _register_bench(subparsers)


def _register_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve every task of a model directory over HTTP",
        description="Load the backbone of DIR once with all its committed tasks and answer POST /v1/predict "
        "(multipart: field 'task', files in field 'image', optional 'top_k'), GET /v1/tasks, GET /healthz and "
        "GET /metrics. Requests of different tasks are batched into one forward. Tasks committed into DIR while "
        "serving (recast train, save_task) become servable without a restart; removed ones answer 404. "
        "SIGTERM ends it gracefully.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("directory", metavar="DIR")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (each loads the model)")
    parser.add_argument("--max-batch", type=int, default=32, help="most images in one forward")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    parser.add_argument("--max-upload-mb", type=float, default=8.0, help="largest request body accepted")
    parser.add_argument("--max-images", type=int, default=32, help="most images in one request")
    parser.add_argument("--reload-interval", type=float, default=0.5, help="seconds between checks for new tasks")
    parser.add_argument("--mode", default="mixed", choices=["mixed", "per-request"],
                        help="mixed: one forward for requests of many tasks; per-request: set_task and a forward per "
                        "task of each micro-batch (no mixing)")
    parser.add_argument("--batching", default="auto", choices=["auto", "template", "group"],
                        help="how generated layers mix tasks in a batch (auto: per-layer cost model)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--log-level", default="info", help="uvicorn log level")
    parser.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    # Deferred: the web stack (uvicorn, FastAPI, Starlette) loads only for the command that serves,
    # so every other subcommand starts without it (and runs where it is not installed).
    from recast.serve.server import run_server

    options = ServeOptions(
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_images=args.max_images, reload_interval_s=args.reload_interval, mode=args.mode, batching=args.batching,
        threads=args.threads,
    )
    run_server(args.directory, options, host=args.host, port=args.port, workers=args.workers, log_level=args.log_level)
    return 0


BENCH_DESCRIPTION = (
    "Start servers on 127.0.0.1 for the shipped recast-vit32 with TASKS tasks (cloned from one task with perturbed "
    "coefficients and heads: a speed test, not trained tasks) and drive them with an async client at each "
    "concurrency, the same request sequence (a uniform random task each) for every server: RECAST mixed batching, "
    "RECAST with set_task per task of each micro-batch, PEFT LoRA r=8 with adapter_names mixed batches (same "
    "micro-batching options for all three). Also memory per task on ViT-S/16 (RECAST-Att, LoRA r=8 and heads alone, "
    "10-class heads, each in a fresh process) at each --memory-tasks count, and the ViT-S att mixed-batch "
    "micro-benchmark. One JSON file per part under --out; progress on stderr, a summary on stdout."
)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``recast serve-bench`` (also ``recast bench --serve``)."""
    parser.add_argument("--out", default="results/serve", help="folder of the JSON results")
    parser.add_argument("--tasks", type=int, default=100, help="tasks loaded in the load test")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64], help="concurrent clients")
    parser.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    parser.add_argument("--limit", type=float, default=600.0, help="seconds one concurrency level may take "
                        "(unanswered requests then count as failed)")
    parser.add_argument("--memory-tasks", type=int, nargs="+", default=[10, 100, 1000], help="task counts for memory")
    parser.add_argument("--micro-batch", type=int, default=32, help="batch of the ViT-S micro-benchmark")
    parser.add_argument("--micro-repeats", type=int, default=10, help="timed forwards per micro-benchmark case")
    parser.add_argument("--micro-size", type=int, default=224, help="image size of the micro-benchmark")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(PARTS), help="parts to leave out")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_bench)


def _register_bench(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve-bench", help="load test of recast serve against set_task per request and PEFT LoRA (= bench --serve)",
        description=BENCH_DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_bench_arguments(parser)


def run_bench(args: argparse.Namespace) -> int:
    """Run the serving benchmark with parsed ``serve-bench`` options."""
    counts = (args.tasks, args.requests, args.micro_batch, args.micro_repeats, args.micro_size, *args.concurrency,
              *args.memory_tasks)
    if min(counts) < 1 or args.limit <= 0:
        raise ConfigError("--tasks, --requests, --concurrency, --memory-tasks and the --micro-* options must be "
                          "at least 1, and --limit above 0")
    summary = run_all(
        args.out, tasks=args.tasks, concurrency=args.concurrency, requests=args.requests,
        memory_tasks=args.memory_tasks, micro_batch=args.micro_batch, micro_repeats=args.micro_repeats,
        micro_size=args.micro_size, skip=set(args.skip), seed=args.seed, limit_s=args.limit, progress=_progress,
    )
    print(json.dumps(summary, indent=2))
    return 0


def _progress(line: str) -> None:
    print(f"[serve-bench {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)
