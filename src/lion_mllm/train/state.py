"""What one invocation of a training run holds (`TrainRun`): the loop and its pieces -- bookkeeping,
validation, saving -- each take it whole.

This module imports none of its siblings at run time (their types only for annotations), so every piece
can import it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..lion import Lion
    from .bookkeeping import BadDataTracker, MetricsWriter
    from .config import TrainConfig
    from .data import MixtureSchedule, StreamedBatches
    from .distributed import DistContext
    from .stages import WarmupCosineSchedule
    from .validation import Validation


@dataclass
class ProgressWindow:
    """Sums over the steps since the last progress line (its rates and mean loss)."""

    loss: float = 0.0  # summed token cross-entropy, this process
    aux: float = 0.0  # weighted objective loss, this process
    tokens: float = 0.0  # target tokens, all processes
    samples: float = 0  # samples drawn, all processes
    region: int = 0  # region-level samples, this process
    local_samples: int = 0  # samples drawn, this process (a stream's micro-batch counts images, not samples)
    steps: int = 0
    start: float = field(default_factory=time.time)


@dataclass
class TrainRun:
    """What the pieces of one invocation of a run share: the model and its optimizer, where the samples
    come from, the position in the schedule, and the bookkeeping of logs, checkpoints and the best model.
    Nothing in it refers back to it, so dropping the frames that hold it releases the DDP model.

    `startup.start_run` makes it: the model side first, then a checkpoint's position (`saving.restore`),
    then the sample stream and the outputs, which start from that position."""

    cfg: TrainConfig
    ctx: DistContext
    run_dir: Path
    fsdp: bool
    autocast: Callable[[], Any]
    lion: Lion
    objectives: dict[str, torch.nn.Module]
    core: torch.nn.Module | None  # the grouped training pass (`TrainingForward`), when it is used
    wrapped: torch.nn.Module  # what the forward runs: the model or `core`, wrapped by DDP or FSDP2
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosineSchedule
    tracker: BadDataTracker
    record_report: dict[str, Any]
    validation: Validation | None
    steps_per_epoch: int
    total_steps: int
    stop_after: int | None
    stop_requested: Callable[[], bool]
    # where the run stands: a new run's start, or what the checkpoint it resumes from says
    step: int = 0
    first_step: int = 0  # where this invocation started (its ETA)
    best: dict[str, Any] | None = None  # the best evaluation so far: step, metric, value
    earlier_s: float = 0.0  # training time of the invocations before this one
    last_saved: Path | None = None
    saved_step: int = -1
    # made once the position is known
    schedule: MixtureSchedule | StreamedBatches = field(init=False)  # the sample stream's position (checkpointed)
    iterator: Iterator[dict[str, Any]] = field(init=False)  # micro-batches
    dummy: dict[str, torch.Tensor] = field(init=False)  # the batch a process without samples runs (zero-weighted)
    metrics: MetricsWriter = field(init=False)
    progress: Any = field(init=False)  # tqdm bar or None
    # this invocation
    steps_this_run: int = 0
    started: float = field(default_factory=time.time)
    window: ProgressWindow = field(default_factory=ProgressWindow)
    last_loss: float | None = None
    grad_norm: float = float("nan")

    @property
    def model(self) -> torch.nn.Module:
        return self.lion.model

    def start_clocks(self) -> None:
        """This invocation's clocks (elapsed time, ETA, rates) start at its first step, after loading."""
        self.started = time.time()
        self.window = ProgressWindow()
