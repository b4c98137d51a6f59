"""Parsing shared by the subcommands: repeatable ``KEY=VALUE`` options."""

from __future__ import annotations

import json
from typing import Any

from recast.errors import ConfigError


def parse_options(pairs: list[str], flag: str = "--opt") -> dict[str, Any]:
    """``["groups=3", "target=mlp", "lr=0.01"]`` -> typed dict (JSON values where they parse, else text)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {pair!r}: write KEY=VALUE, e.g. {flag} groups=3")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options
