"""The project's own error types: every failure a user can cause ends in one of these."""


class RecastError(Exception):
    """Base class of every error the project raises on purpose, with a message that says what to do."""


class ConfigError(RecastError, ValueError):
    """An invalid configuration value, or a configuration that does not fit the model."""


class SurgeryError(RecastError, ValueError):
    """The model cannot be rewritten as asked (no module matches, unsupported layout, ...)."""


class TaskError(RecastError, LookupError):
    """An unknown, duplicate or invalid task name, or a task that does not fit the model."""


class FileFormatError(RecastError):
    """A file that is missing, corrupt, of the wrong version or made for another backbone."""


class DiskError(RecastError, OSError):
    """Writing a file failed (disk full, I/O error, no permission); the message names the file,
    says what was kept and what to do. Built by :func:`recast.io.disk_error` only."""

    def __str__(self) -> str:
        return str(self.strerror)
