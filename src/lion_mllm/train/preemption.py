"""SIGTERM as a request to stop: a cluster's preemption notice (torchrun forwards it to its workers)
makes the run save a checkpoint at the end of the current step and return, resumable."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def sigterm_requests_a_stop() -> Iterator[Callable[[], bool]]:
    """While training, SIGTERM only sets a flag, which the yielded function reads. A second SIGTERM acts
    as before the run (default: terminate). Off the main thread signals cannot be caught: no-op."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        if received:
            signal.signal(signal.SIGTERM, previous)
            signal.raise_signal(signal.SIGTERM)
        received.append(signum)

    # None: the previous handler was not installed from Python; the default is the closest stand-in
    previous = signal.signal(signal.SIGTERM, on_sigterm) or signal.SIG_DFL
    try:
        yield lambda: bool(received)
    finally:
        signal.signal(signal.SIGTERM, previous)
