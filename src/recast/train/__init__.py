"""Training: options, the explicit loop, checkpoints, evaluation, sequences of tasks.

Modules, each importing only those above it: ``config`` (:class:`TrainConfig`), ``evaluate``
(accuracy, logits, mixed-task batches), ``checkpoint`` (epoch checkpoints that resume bit for
bit), ``loop`` (:func:`fit_task`), ``resolution`` (input size as an option), ``directory`` (model
directories: open one, list its task records), ``sequence`` (:func:`learn_sequence`, the run
record, ``recast train --sequence``).
"""

from recast.train.checkpoint import has_checkpoint, load_state_tensors, remove_checkpoint, state_tensors
from recast.train.config import AUGMENTS, PRECISIONS, TrainConfig, TrainingError, read_config_file
from recast.train.directory import (
    backbone_bytes,
    create_directory,
    is_model_directory,
    load_model,
    recorded_augment,
    recorded_image_size,
    task_records,
)
from recast.train.evaluate import evaluate, forward_mixed, predict_logits
from recast.train.loop import FitResult, fit_task, peak_rss_mb, write_history_csv
from recast.train.resolution import image_size_of, set_image_size
from recast.train.sequence import (
    SequenceEntry,
    SequenceRun,
    SequenceTask,
    check_classes,
    eval_transform,
    learn_sequence,
    offline_entries,
    open_task,
    prepare_task,
    read_sequence,
    run_record,
    run_sequence,
    task_meta,
    versions,
)

__all__ = [
    "AUGMENTS", "PRECISIONS", "FitResult", "SequenceEntry", "SequenceRun", "SequenceTask", "TrainConfig",
    "TrainingError", "backbone_bytes", "check_classes", "create_directory", "eval_transform", "evaluate", "fit_task", "forward_mixed", "has_checkpoint", "image_size_of",
    "is_model_directory", "learn_sequence", "load_model", "load_state_tensors", "offline_entries", "open_task",
    "peak_rss_mb", "predict_logits", "prepare_task", "read_config_file", "read_sequence", "recorded_augment", "recorded_image_size",
    "remove_checkpoint", "run_record", "run_sequence", "set_image_size", "state_tensors",
    "task_meta", "task_records", "versions", "write_history_csv",
]
