"""``recast bench --perf``: speed and memory of RECAST against its peers, as ratios you can trust.

Every ratio is A over B (lower is better). Times are measured *interleaved*: after warm-up, A and B
run alternately (A B, then B A, ... so a slow drift of the machine hits both sides alike), each
pair gives one ratio, and the figure is the median of those per-pair ratios with its interquartile
range and the number of pairs. Both sides' median absolute times are reported beside it.

Each training-step pair is timed in ``TRAIN_PROCESSES`` fresh worker processes (this file run with
``--pair A B``; it loads PEFT only when a side is LoRA) that
build the two models and do nothing else, their rounds pooled (:mod:`recast.bench.timing` says why);
peak memory is measured in one more fresh process per method (``--memory
METHOD``) so that one method's allocations cannot inflate another's peak (peak RSS over building the
model and two training steps; beside it, the training-only increment: that peak minus the resident
memory just before training), the evaluation forwards in ``EVAL_PROCESSES`` more (``--eval ROUNDS``),
the task switches in ``SWITCH_PROCESSES`` more (``--switch PAIRS``), each pooled, and the two mimicry
fits in ``MIMICRY_PROCESSES`` more (``--mimicry STEPS``), one pair per process (a 1,000-step iterative
fit takes half a minute); every pooled figure also lists each process's own median ratio
(``process_ratios``), so a process that ran apart from the others shows.
The torch thread count is fixed (``PerfSetup.threads``, set in every process) and recorded.
The backbone is timm ``vit_small_patch16_224`` at 224 px by default (random weights: speed does not
depend on their values) and the batch is the same for all.

On a GPU (``PerfSetup.device``) every timed call ends with a device synchronisation, ``bf16``
runs forwards under autocast, and peak memory is the CUDA allocator's peak over building the model
and two training steps (reset before each method), measured in the one process that measures
everything else: a fresh process per figure would cost seconds of CUDA start-up each and changes
nothing the allocator's own peak counter reports.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recast.bench.timing import interleaved, paired_ratio, pooled, process_figures, ratio, rounds_per_process
from recast.bench.workload import WORKER_METHODS, PerfSetup, build_for_training, lora_model, train_step
from recast.errors import ConfigError
from recast.format import task_records
from recast.model import RecastModel

TRAIN_PAIRS = {  # figure name -> (A, B)
    "train_step_recast_att_over_lora": ("recast-att", "lora"),
    "train_step_recast_attmlp_over_full": ("recast-att+mlp", "full"),
    "train_step_recast_att_over_linear": ("recast-att", "linear"),
    "train_step_recast_mlp_over_full": ("recast-mlp", "full"),
}
EVAL_ROUNDS_FACTOR = 3  # evaluation rounds per setup repeat (a ViT-S forward of batch 8 is ~1 s on one core)
# Fresh processes the evaluation rounds are split over: each process's memory placement biases all of
# its pairs alike (three processes left the ratio 4% apart between runs), so more, shorter processes.
EVAL_PROCESSES = 6
# Fresh processes a training-step pair is split over. One process left att+mlp/full 5% apart between
# runs; three left att/LoRA 6.7% apart (0.966 to 1.030), the process medians of one run 1.00-1.04.
TRAIN_PROCESSES = 6
# Fresh processes that each time both mimicry fits, one pair per process: the SVD side moved 34% with
# the process and the iterative fit 10% (3 processes left the ratio 6% apart between runs).
MIMICRY_PROCESSES = 6
SWITCH_PAIRS_FACTOR = 10  # switch pairs per setup repeat: each pair takes ~30 ms, and 40 left runs 8% apart
# Fresh processes the switch pairs are split over: in the measuring process itself, after the other
# figures, PEFT's side took 26 ms in one run and 43 ms in the next (the ratio 0.206 to 0.242).
SWITCH_PROCESSES = 3
# Untimed SVD fits before the timed ones: a process's first fits run slower (0.36 s falling to 0.16 s
# over eight fits) while the allocator learns to keep the model's freed megabytes instead of
# returning them to the system, which then faults them back in.
SVD_WARMUP = 4
SVD_REPEATS = 12
MEMORY_PAIRS = {
    "peak_mem_recast_over_lora": ("recast-att", "lora"),
    "peak_mem_recast_attmlp_over_full": ("recast-att+mlp", "full"),
}


def pair_worker(a: str, b: str, setup: PerfSetup, rounds: int | None = None) -> dict[str, Any]:
    """Run in a fresh process: ``rounds`` (default ``setup.repeats``) interleaved training-step times of ``a`` and ``b``."""
    torch.set_num_threads(setup.threads)
    torch.manual_seed(0)
    models = [build_for_training(method, setup) for method in (a, b)]
    a_times, b_times = interleaved([train_step(m, setup) for m in models], rounds or setup.repeats, setup.warmup)
    trainable = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in models]
    return {"a_times": a_times, "b_times": b_times, "trainable_params": trainable, "threads": torch.get_num_threads()}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes).

    Read here rather than from ``recast.train``, whose import pulls in PEFT for its baselines
    (about 70 MB resident that a RECAST model's process would otherwise carry).
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float | None:
    """This process's resident memory now, in MiB (Linux ``/proc``; ``None`` elsewhere)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_worker(method: str, setup: PerfSetup) -> dict[str, Any]:
    """Run in a fresh process: this process's peak RSS (MiB) over building ``method`` and two training steps.

    Also recorded: the peak before training (building the model included) and the resident memory
    just before training, whose difference to the final peak is the training-only increment. On a
    GPU: the CUDA allocator's figures instead (:func:`cuda_memory_worker`).
    """
    torch.set_num_threads(setup.threads)
    torch.manual_seed(0)
    if setup.on_cuda:
        return cuda_memory_worker(method, setup)
    started = current_rss_mb()  # the libraries loaded so far (PEFT comes with the LoRA model)
    model = build_for_training(method, setup)
    before, resident = peak_rss_mb(), current_rss_mb()
    step = train_step(model, setup)
    for _ in range(2):  # the second step holds AdamW's state too
        step()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = peak_rss_mb()
    return {"peak_mb": peak, "measure": "peak RSS", "peak_rss_mb": peak, "peft_loaded": "peft" in sys.modules,
            "rss_before_building_mb": started, "rss_before_training_mb": before, "resident_before_training_mb": resident,
            "training_increment_mb": None if resident is None else peak - resident, "trainable_params": trainable}


def cuda_memory_worker(method: str, setup: PerfSetup) -> dict[str, Any]:
    """Peak CUDA memory (MiB, the allocator's) over building ``method`` and two training steps.

    Counted from what was allocated before building (earlier figures' models are freed first), so
    one process can measure every method; ``training_increment_mb`` is the peak minus what the
    built model held.
    """
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(setup.device)
    start = torch.cuda.memory_allocated(setup.device)
    model = build_for_training(method, setup)
    resident = torch.cuda.memory_allocated(setup.device) - start
    step = train_step(model, setup)
    for _ in range(2):  # the second step holds AdamW's state too
        step()
    peak = (torch.cuda.max_memory_allocated(setup.device) - start) / 2**20
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"peak_mb": peak, "measure": "peak CUDA memory allocated", "resident_before_training_mb": resident / 2**20,
            "training_increment_mb": peak - resident / 2**20, "trainable_params": trainable}


# Runs this file as ``__main__`` in a fresh interpreter. A process measuring a RECAST model must hold
# what a RecastModel user's holds: PEFT and transformers (~70 MB resident) load only on a LoRA side;
# the ``recast.bench`` package that ``timing`` and ``workload`` bring along adds about 2 MB to both.
_WORKER_LAUNCH = "import runpy, sys; runpy.run_path(sys.argv.pop(1), run_name='__main__')"


def _in_worker(args: list[str], setup: PerfSetup) -> dict[str, Any]:
    """Run this module's ``main`` with ARGS in a fresh process and return its JSON line."""
    command = [sys.executable, "-c", _WORKER_LAUNCH, __file__, *args, "--setup", json.dumps(asdict(setup))]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"perf worker {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _split(setup: PerfSetup, total: int, processes: int, local: Callable[[int], dict[str, Any]],
           worker_args: Callable[[int], list[str]]) -> list[dict[str, Any]]:
    """``total`` rounds of one measurement: split over ``processes`` fresh worker processes (each
    called with ``worker_args(rounds)``) when isolating, else ``local(total)`` in this process."""
    if not setup.isolate:
        return [local(total)]
    rounds = rounds_per_process(total, processes)
    return [_in_worker(worker_args(rounds), setup) for _ in range(processes)]


def run_pair(a: str, b: str, setup: PerfSetup) -> dict[str, Any]:
    """Interleaved training-step times of ``a`` and ``b``: ``setup.repeats`` rounds or more, split over
    ``TRAIN_PROCESSES`` fresh processes and pooled when isolating (in this process otherwise)."""
    parts = _split(setup, setup.repeats, TRAIN_PROCESSES, lambda rounds: pair_worker(a, b, setup, rounds),
                   lambda rounds: ["--pair", a, b, "--rounds", str(rounds)])
    return {**pooled(parts, ("a_times", "b_times")), "trainable_params": parts[0]["trainable_params"],
            "threads": parts[0]["threads"], **process_figures(parts, "a_times", "b_times")}


def run_memory(method: str, setup: PerfSetup) -> dict[str, Any]:
    """Peak memory of ``method``'s training (in a fresh process when isolating)."""
    return _in_worker(["--memory", method], setup) if setup.isolate else memory_worker(method, setup)


def switch_worker(setup: PerfSetup, pairs: int) -> dict[str, Any]:
    """Run in a fresh process: ``pairs`` interleaved task switches from a file, RECAST (read + check +
    activate + generate every weight) against PEFT ``load_adapter`` + ``set_adapter``."""
    torch.set_num_threads(setup.threads)
    torch.manual_seed(0)
    base = setup.base()
    model = RecastModel.from_base(base, setup.recast_config("att", base))
    peft_model = lora_model(setup.base())
    with tempfile.TemporaryDirectory() as tmp:
        model.add_task("b", 10)
        model.save_pretrained(tmp)
        peft_model.save_pretrained(Path(tmp, "peft"))

        def recast_switch() -> None:
            model.set_task("base")
            model.load_task(tmp, "b", replace=True)
            model.set_task("b")
            with torch.no_grad():
                for _, module in model.task_modules():
                    if module.kind == "coefficients":
                        module.weight_for("b")  # what the first forward would generate
            setup.sync()

        loaded: list[str] = []

        def peft_switch() -> None:
            name = f"t{len(loaded)}"
            peft_model.load_adapter(str(Path(tmp, "peft")), adapter_name=name)
            peft_model.set_adapter(name)
            loaded.append(name)
            if len(loaded) > 1:  # keep one adapter loaded, as RECAST keeps one copy of task b
                peft_model.delete_adapter(loaded[-2])
            setup.sync()

        recast_s, peft_s = interleaved([recast_switch, peft_switch], pairs, setup.warmup)
        return {"recast_s": recast_s, "peft_s": peft_s, "recast_task_file_bytes": task_records(tmp)["b"]["bytes"],
                "peft_adapter_file_bytes": Path(tmp, "peft", "adapter_model.safetensors").stat().st_size}


def switch_figures(setup: PerfSetup) -> dict[str, Any]:
    """The task switch, ``SWITCH_PAIRS_FACTOR`` x repeats pairs split over ``SWITCH_PROCESSES`` fresh
    processes (when isolating) and pooled."""
    parts = _split(setup, SWITCH_PAIRS_FACTOR * setup.repeats, SWITCH_PROCESSES,
                   lambda pairs: switch_worker(setup, pairs), lambda pairs: ["--switch", str(pairs)])
    times = pooled(parts, ("recast_s", "peft_s"))
    sizes = {key: parts[0][key] for key in ("recast_task_file_bytes", "peft_adapter_file_bytes")}
    return {"switch_recast_over_peft": {**paired_ratio(times["recast_s"], times["peft_s"]), **sizes,
                                        **process_figures(parts, "recast_s", "peft_s")}}


def eval_worker(setup: PerfSetup, rounds: int) -> dict[str, Any]:
    """Run in a fresh process: ``rounds`` interleaved evaluation forwards (no grad) of a
    RECAST-Att+MLP model, of its export and of the plain base, all in eval mode, on one input tensor."""
    torch.set_num_threads(setup.threads)
    torch.manual_seed(0)
    base = setup.base().eval()
    model = RecastModel.from_base(base, setup.recast_config("att+mlp", base)).eval()
    plain = model.export("base").eval()
    images = setup.images()

    def forward(net: nn.Module) -> None:
        with setup.autocast():
            net(images)
        setup.sync()

    with torch.no_grad():
        sides = [lambda n=net: forward(n) for net in (base, model, plain)]
        base_s, recast_s, export_s = interleaved(sides, rounds, setup.warmup)
    return {"base_s": base_s, "recast_s": recast_s, "export_s": export_s}


def eval_figures(setup: PerfSetup) -> dict[str, Any]:
    """Evaluation forward of a RECAST model and of its export against the plain base.

    Measured in the main process after the other figures, with the base left in training mode and
    one round per repeat, the ratio moved by 10% between runs (0.91 to 1.01) while the three models
    run the same GEMMs: where a process's allocator happened to place each model's weights biases
    that whole process. So the ``EVAL_ROUNDS_FACTOR`` x repeats rounds are split over
    ``EVAL_PROCESSES`` fresh processes (when isolating) that each build the three models and do
    nothing else, and the ratio is the median over all their pairs.
    """
    parts = _split(setup, EVAL_ROUNDS_FACTOR * setup.repeats, EVAL_PROCESSES,
                   lambda rounds: eval_worker(setup, rounds), lambda rounds: ["--eval", str(rounds)])
    times = pooled(parts, ("base_s", "recast_s", "export_s"))
    return {"eval_recast_over_base": {**paired_ratio(times["recast_s"], times["base_s"]),
                                      **process_figures(parts, "recast_s", "base_s")},
            "eval_export_over_base": {**paired_ratio(times["export_s"], times["base_s"]),
                                      **process_figures(parts, "export_s", "base_s")}}


def mimicry_worker(setup: PerfSetup, iterative_steps: int, svd_repeats: int) -> dict[str, Any]:
    """Run in a fresh process: ``svd_repeats`` timings of the closed-form SVD fit around one of the
    iterative fit (half before it, half after, so the SVD side's median spans the same stretch of
    time), after ``SVD_WARMUP`` untimed SVD fits (the first use of the LAPACK / cuSOLVER kernels, the
    allocator settling). Each times ``from_base`` rewriting a copy of the base in place (surgery,
    fit, fidelity report); the copy is made before the clock starts, on both sides."""
    torch.set_num_threads(setup.threads)
    base = setup.base()

    def fit(method: str, **options: Any) -> tuple[float, RecastModel]:
        net = copy.deepcopy(base)  # copied before the clock: an 88 MB allocation's cost follows the allocator
        setup.sync()
        start = time.perf_counter()
        model = RecastModel.from_base(net, setup.recast_config("att", net), mimicry=method, inplace=True, **options)
        setup.sync()
        return time.perf_counter() - start, model

    for _ in range(SVD_WARMUP):
        fit("svd")
    before = svd_repeats // 2
    svd_times = [fit("svd")[0] for _ in range(before)]  # each model freed before the next fit
    iterative_seconds, iterative_model = fit("iterative", steps=iterative_steps)
    iterative_error = iterative_model.mimicry_report["weight_rel_error"]
    del iterative_model  # freed before the SVD fits after it, as each SVD model is before the next
    svd_times += [fit("svd")[0] for _ in range(svd_repeats - before - 1)]
    seconds, svd_model = fit("svd")
    return {"svd_times": [*svd_times, seconds], "iterative_s": iterative_seconds,
            "svd_weight_rel_error": svd_model.mimicry_report["weight_rel_error"],
            "iterative_weight_rel_error": iterative_error}


def mimicry_figures(setup: PerfSetup, iterative_steps: int = 1000, svd_repeats: int = SVD_REPEATS) -> dict[str, Any]:
    """Closed-form SVD mimicry against the paper's iterative fit (its 1000 steps by default).

    The sub-second SVD fit moves with the process (its allocations' placement) and the iterative
    fit with the process and the run, so each of ``MIMICRY_PROCESSES`` fresh processes (when
    isolating) times both and gives one pair: the median of its SVD fits and its iterative fit.
    The ratio is the median of the per-process ratios, with their spread, as every other ratio.
    """
    args = ["--mimicry", str(iterative_steps), "--svd-repeats", str(svd_repeats)]
    parts = ([_in_worker(args, setup) for _ in range(MIMICRY_PROCESSES)] if setup.isolate
             else [mimicry_worker(setup, iterative_steps, svd_repeats)])
    process_svd = [statistics.median(part["svd_times"]) for part in parts]
    iterative_times = [part["iterative_s"] for part in parts]
    svd_times = pooled(parts, ("svd_times",))["svd_times"]
    process_ratios = [a / b for a, b in zip(process_svd, iterative_times, strict=True)]
    figure = paired_ratio(process_svd, iterative_times)
    figure.update({"svd_weight_rel_error": parts[0]["svd_weight_rel_error"],
                   "iterative_weight_rel_error": parts[0]["iterative_weight_rel_error"],
                   "svd_repeats": len(svd_times), "svd_times": svd_times, "iterative_times": iterative_times,
                   "processes": len(parts), "process_ratios": process_ratios,
                   "iterative_steps": iterative_steps, "paper_iterative_steps": 1000})
    return {"mimicry_svd_over_iterative": figure}


PERF_GROUPS = ("train", "memory", "switch", "eval", "mimicry")
"""The figure groups of ``recast bench --perf``, in the order they are measured (``--perf-only``)."""


def run_perf(
    setup: PerfSetup | None = None, progress: bool = True, iterative_steps: int = 1000,
    groups: Collection[str] = PERF_GROUPS,
) -> dict[str, Any]:
    """The figures of ``recast bench --perf`` in ``groups`` (all by default); see the module docstring."""
    unknown = sorted(set(groups) - set(PERF_GROUPS))
    if unknown or not groups:
        raise ConfigError(f"perf figure groups must be some of {', '.join(PERF_GROUPS)}; got {', '.join(unknown) or 'none'}")
    setup = setup or PerfSetup()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(setup.threads)
    try:
        return _all_figures(setup, progress, iterative_steps, groups)
    finally:
        torch.set_num_threads(threads_before)


def _all_figures(setup: PerfSetup, progress: bool, iterative_steps: int, groups: Collection[str]) -> dict[str, Any]:
    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)

    figures: dict[str, Any] = {}
    pairs: dict[str, Any] = {}  # raw measurements for the setup record, empty when a group is skipped
    memory: dict[str, Any] = {}
    if "train" in groups:
        train, pairs = _train_figures(setup, say)
        figures.update(train)
    if "memory" in groups:
        peaks, memory = _memory_figures(setup, say)
        figures.update(peaks)
    if "switch" in groups:
        say("task switch from a file, interleaved")
        figures.update(switch_figures(setup))
    if "eval" in groups:
        say("evaluation forward, interleaved")
        figures.update(eval_figures(setup))
    if "mimicry" in groups:
        say("mimicry: svd vs iterative")
        figures.update(mimicry_figures(setup, iterative_steps))
    trainable = {m: n for name, (a, b) in TRAIN_PAIRS.items() if name in pairs
                 for m, n in zip((a, b), pairs[name]["trainable_params"], strict=True)}
    figures["setup"] = {**asdict(setup), "image_size": setup.image_size, "threads": torch.get_num_threads(),
                        "device_name": torch.cuda.get_device_name(setup.device) if setup.on_cuda else "cpu",
                        "torch": torch.__version__, "groups": [g for g in PERF_GROUPS if g in groups],
                        "worker_threads": sorted({p["threads"] for p in pairs.values()}),
                        "trainable_params": trainable, "memory": memory}
    return figures


def _train_figures(setup: PerfSetup, say: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every training-step ratio, and each pair's raw measurements."""
    figures: dict[str, Any] = {}
    pairs: dict[str, Any] = {}
    for name, (a, b) in TRAIN_PAIRS.items():
        say(f"training steps, interleaved: {a} vs {b} ({setup.model}, {setup.image_size} px, batch {setup.batch}, "
            f"{setup.repeats} pairs, {setup.threads} thread(s))")
        pairs[name] = run_pair(a, b, setup)
        figures[name] = {**paired_ratio(pairs[name]["a_times"], pairs[name]["b_times"]),
                         "processes": pairs[name]["processes"], "process_ratios": pairs[name]["process_ratios"]}
    return figures, pairs


def _memory_figures(setup: PerfSetup, say: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both peak-memory ratios, and each method's raw measurement."""
    figures: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    for method in dict.fromkeys(m for pair in MEMORY_PAIRS.values() for m in pair):
        say(f"peak memory: {method}")
        memory[method] = run_memory(method, setup)
    for name, (a, b) in MEMORY_PAIRS.items():
        figures[name] = ratio(memory[a]["peak_mb"], memory[b]["peak_mb"], "MiB")
        if memory[a]["training_increment_mb"] and memory[b]["training_increment_mb"]:
            figures[name]["training_increment"] = ratio(
                memory[a]["training_increment_mb"], memory[b]["training_increment_mb"], "MiB")
    return figures, memory


def main() -> None:
    """Worker entry point (``python recast/bench/perf.py --pair A B``, ``--memory METHOD``, ``--eval ROUNDS``,
    ``--switch PAIRS`` or ``--mimicry STEPS``)."""
    parser = argparse.ArgumentParser(description="one measurement of recast bench --perf, in a fresh process")
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--pair", nargs=2, choices=WORKER_METHODS, metavar="METHOD", help="interleaved step times of A and B")
    task.add_argument("--memory", choices=WORKER_METHODS, help="peak memory of one method's training")
    task.add_argument("--eval", type=int, metavar="ROUNDS", help="interleaved evaluation forwards of RECAST, export and base")
    task.add_argument("--mimicry", type=int, metavar="STEPS", help="SVD fit timings and one iterative fit of STEPS")
    task.add_argument("--switch", type=int, metavar="PAIRS", help="interleaved task switches of RECAST and PEFT")
    parser.add_argument("--rounds", type=int, help="rounds of --pair (default: the setup's repeats)")
    parser.add_argument("--svd-repeats", type=int, default=SVD_REPEATS, help="timed SVD fits of --mimicry")
    parser.add_argument("--setup", default="{}", help="PerfSetup fields as JSON")
    args = parser.parse_args()
    setup = PerfSetup(**json.loads(args.setup))
    if args.eval is not None:
        figures = eval_worker(setup, args.eval)
    elif args.switch is not None:
        figures = switch_worker(setup, args.switch)
    elif args.mimicry is not None:
        figures = mimicry_worker(setup, args.mimicry, args.svd_repeats)
    else:
        figures = pair_worker(*args.pair, setup, args.rounds) if args.pair else memory_worker(args.memory, setup)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
