"""The model-directory file format: names, record checks, the store and ``recast verify``.

Nothing outside this package opens files in ``tasks/``, writes ``recast_config.json``, stages
files or checks their checksums; everything else goes through :class:`ModelStore`.
"""

from recast.format.names import (
    BACKBONE_FILE,
    BASELINE_FORMAT,
    CONFIG_FILE,
    FORMAT_VERSION,
    MODEL_FORMAT,
    TASK_NAME_RULE,
    TASKS_DIR,
    check_task_name,
    is_task_name,
)
from recast.format.reading import consistent_read
from recast.format.store import ModelStore, is_model_directory, task_records
from recast.format.verify import Finding, check_model_dir, leftover_files, verify_model_dir

__all__ = [
    "BACKBONE_FILE",
    "BASELINE_FORMAT",
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "MODEL_FORMAT",
    "TASKS_DIR",
    "TASK_NAME_RULE",
    "Finding",
    "ModelStore",
    "check_model_dir",
    "check_task_name",
    "consistent_read",
    "is_model_directory",
    "is_task_name",
    "leftover_files",
    "task_records",
    "verify_model_dir",
]

