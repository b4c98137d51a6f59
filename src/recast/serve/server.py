"""Running the application on uvicorn: one process, or ``workers`` processes on one port.

uvicorn ends on SIGTERM or SIGINT gracefully: it stops accepting connections, lets open requests
finish, then the application's lifespan stops the batcher after its queued requests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import uvicorn

from recast.errors import ConfigError
from recast.serve.app import OPTIONS_ENV, create_app
from recast.serve.engine import Engine, ServeOptions


def run_server(
    directory: str | Path, options: ServeOptions, *, host: str = "127.0.0.1", port: int = 8000,
    workers: int = 1, log_level: str = "info",
) -> None:
    """Serve ``directory`` until SIGTERM/SIGINT. Each worker process loads the model once."""
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be 0-65535, got {port}")
    if workers == 1:
        app = create_app(Engine(directory, options))
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
        return
    Engine(directory, options)  # fail here, once, with a clear error rather than in every worker
    os.environ[OPTIONS_ENV] = json.dumps({"directory": str(directory), "options": options.to_dict()})
    uvicorn.run("recast.serve.app:app_from_environment", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, timeout_graceful_shutdown=30)
