"""Mimicry methods by name: ``@register_mimicry("svd")`` on each fit function, ``fit`` to run one.

A fit function takes ``problems`` (a list of ``FitProblem``) and keyword options, and returns one
``FitResult`` per problem. The methods register themselves when their modules are imported (the
package ``__init__`` imports them all), so the names here are always the complete list.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

from recast.errors import ConfigError
from recast.mimicry.problem import FitProblem, FitResult

FitMethod = Callable[..., list[FitResult]]

_METHODS: dict[str, FitMethod] = {}


def register_mimicry(name: str) -> Callable[[FitMethod], FitMethod]:
    """Decorator: make the fit function available to :func:`fit` as ``name``."""

    def register(function: FitMethod) -> FitMethod:
        if name in _METHODS:
            raise ConfigError(f"mimicry method {name!r} is registered twice; give the new method another name")
        _METHODS[name] = function
        return function

    return register


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_METHODS)


def registered_methods() -> dict[str, FitMethod]:
    """Name -> fit function for every registered method (a copy)."""
    return dict(_METHODS)


def get_method(name: str) -> FitMethod:
    """The fit function called ``name``; an unknown name is refused with the known ones."""
    if name not in _METHODS:
        raise ConfigError(f"unknown mimicry method {name!r}; choose one of {', '.join(_METHODS)}")
    return _METHODS[name]


def method_options(name: str) -> tuple[str, ...]:
    """The keyword options the method ``name`` takes."""
    return tuple(p for p in inspect.signature(get_method(name)).parameters if p != "problems")


def steps_option(name: str) -> str:
    """The option that counts the method's optimisation steps: ``epochs`` or ``steps``."""
    return "epochs" if "epochs" in method_options(name) else "steps"


def fit(problems: list[FitProblem], method: str = "svd", **options: Any) -> tuple[list[FitResult], float]:
    """Run the mimicry method ``method`` on ``problems``; returns the results and the seconds it took.

    Options the method does not take are refused before anything runs, with the ones it does take.
    """
    function = get_method(method)
    try:
        inspect.signature(function).bind(problems, **options)
    except TypeError as exc:
        raise ConfigError(
            f"bad options for mimicry method {method!r} ({exc}); it takes: {', '.join(method_options(method))}"
        ) from None
    start = time.perf_counter()
    results = function(problems, **options)
    return results, time.perf_counter() - start
