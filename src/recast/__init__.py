"""recast: RECAST template banks and tiny per-task coefficients for pretrained vision models."""

from recast.config import RecastConfig
from recast.errors import ConfigError, FileFormatError, RecastError, SurgeryError, TaskError
from recast.model import RecastModel
from recast.version import __version__

__all__ = [
    "ConfigError",
    "FileFormatError",
    "RecastConfig",
    "RecastError",
    "RecastModel",
    "SurgeryError",
    "TaskError",
    "__version__",
]
