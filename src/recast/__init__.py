"""recast: RECAST template banks and tiny per-task coefficients for pretrained vision models."""

__version__ = "0.1.0"

from recast.config import RecastConfig
from recast.errors import ConfigError, FileFormatError, RecastError, SurgeryError, TaskError
from recast.model import RecastModel

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
