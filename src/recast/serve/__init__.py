"""Serving many tasks from one backbone over HTTP: ``recast serve DIR``.

:mod:`recast.serve.engine` holds the model and its tasks (and notices tasks committed while it
runs), :mod:`recast.serve.batcher` gathers requests into mixed-task batches,
:mod:`recast.serve.app` is the FastAPI application and :mod:`recast.serve.bench` the load test.
"""

from recast.serve.engine import Engine, ServeOptions

__all__ = ["Engine", "ServeOptions"]
