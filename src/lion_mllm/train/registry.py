"""Parts a training config names but another package builds (the demo world's stream, objective, model
preset and scorer), kept as "module:attribute" strings and imported only when a config names them, so that
the training package does not import the layers above it."""

from __future__ import annotations

import importlib
from typing import Any


def load_named(table: dict[str, str], name: str, what: str) -> Any:
    """The object `table[name]` names ("module:attribute"), imported now."""
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; known: {sorted(table)}")
    module, attribute = table[name].split(":")
    return getattr(importlib.import_module(module), attribute)
