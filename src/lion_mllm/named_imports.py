"""Classes and functions a file names but a higher layer defines (a bundle's tagger, a training config's
stream, objective, model preset or scorer from the demo world): kept in small tables as "module:attribute"
strings and imported only when a file names them, so that the lower layer does not import the higher."""

from __future__ import annotations

import importlib
from typing import Any


def load_named(table: dict[str, str], name: str, what: str) -> Any:
    """The object `table[name]` names ("module:attribute"), imported now."""
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; known: {sorted(table)}")
    module, attribute = table[name].split(":")
    return getattr(importlib.import_module(module), attribute)
