"""Batch first, then one by one: the failure isolation every batched caller of the model shares.

A batch that raises (one unreadable image, one prompt the processor refuses) would otherwise fail all
its neighbours; running its items again one at a time gives the error to the item that causes it alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


def batch_then_singly(items: Sequence[Item], run: Callable[[Sequence[Item]], Sequence[Result]], *,
                      on_batch_error: Callable[[Exception], None] | None = None) -> list[Result | Exception]:
    """`run(items)` as one batch; if it raises, `run([item])` for each item, so that only the items that
    fail on their own get an error. Returns one entry per item, in order: its result, or the exception
    its own run raised. `on_batch_error` is told of the whole batch's failure (e.g. to count it)."""
    try:
        return list(run(items))
    except Exception as error:  # noqa: BLE001 - isolated below, item by item
        if on_batch_error is not None:
            on_batch_error(error)
        if len(items) == 1:
            return [error]
        log.warning("a batch of %d failed (%r); retrying its items one by one", len(items), error)
    outcomes: list[Result | Exception] = []
    for item in items:
        try:
            outcomes.extend(run([item]))
        except Exception as error:  # noqa: BLE001 - this item's own failure, returned in its place
            outcomes.append(error)
    return outcomes
