"""A run's bookkeeping: unusable data counted and judged, metrics written (metrics.jsonl, TensorBoard,
MLflow), the log (train.log) and its progress lines, and the files that say what a run did
(summary.json, training.json)."""

from __future__ import annotations

import json
import logging
import math
import platform
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from .data import AnnotationDataset, BadDataError, BadItem
from .distributed import DistContext
from .rundir import truncate_metrics
from .state import ProgressWindow, TrainRun
from .trackers import MlflowLogger

logger = logging.getLogger("lion_mllm.train")


class BadDataTracker:
    """Counts malformed records (at load) and unusable samples (when drawn); judges the fraction.

    Every process writes its own unusable samples to its file (`bad_data.jsonl` on rank 0,
    `bad_data.rankN.jsonl` elsewhere); the main process logs those of every rank to train.log (gathered
    each step that had any) and `summary.json` counts them by kind over all ranks."""

    def __init__(self, limit: float, min_samples: int, log_file: Path | None, rank: int = 0):
        self.limit, self.min_samples, self.log_file, self.rank = limit, min_samples, log_file, rank
        self.drawn = 0  # over all processes
        self.bad = 0
        self.kinds: Counter[str] = Counter()  # this process's unusable samples, by kind
        self.examples: list[str] = []
        self.seen: set[str] = set()  # sources already logged (main process)

    def check_records(self, datasets: list[AnnotationDataset], is_main: bool, label: str = "") -> dict[str, Any]:
        total = sum(d.total for d in datasets)
        bad = [item for d in datasets for item in d.bad]
        if is_main:
            for item in bad:
                logger.warning("skipped %srecord %s", label, item)
            for d in datasets:
                logger.info("%s%s: %d records, %d usable, %d skipped", label, d.spec.ann_path, d.total, len(d),
                            len(d.bad))
        report = {"records": total, "skipped_records": len(bad),
                  "skipped_records_by_kind": dict(sorted(Counter(item.kind for item in bad).items()))}
        if total and len(bad) / total > self.limit:
            raise BadDataError(f"{len(bad)} of {total} {label}annotation records ({len(bad) / total:.1%}) are "
                               f"malformed, over run.max_bad_fraction={self.limit}; first: {bad[0]}")
        return report

    def note(self, items: list[BadItem]) -> None:
        """This process's unusable samples of a step: counted and written to its file."""
        for item in items:
            self.kinds[item.kind] += 1
            if self.log_file is not None:
                with open(self.log_file, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"source": item.source, "reason": item.reason, "kind": item.kind,
                                             "rank": self.rank}) + "\n")

    def log(self, per_rank: list[list[tuple[str, str, str]]]) -> None:
        """On the main process: every rank's unusable samples of a step, each source logged once."""
        for rank, items in enumerate(per_rank):
            for source, reason, _kind in items:
                if source in self.seen:
                    continue
                self.seen.add(source)
                text = f"{source}: {reason}"
                logger.warning("skipped sample %s%s", text, f" (rank {rank})" if len(per_rank) > 1 else "")
                if len(self.examples) < 5:
                    self.examples.append(text)

    def update(self, bad: int, drawn: int) -> None:
        self.bad += bad
        self.drawn += drawn
        if self.drawn >= self.min_samples and self.drawn and self.bad / self.drawn > self.limit:
            example = f"; e.g. {self.examples[0]}" if self.examples else ""
            raise BadDataError(f"{self.bad} of {self.drawn} samples drawn so far ({self.bad / self.drawn:.1%}) "
                               f"could not be used (unreadable or missing images), over "
                               f"run.max_bad_fraction={self.limit}{example}")

    def report(self, kinds_all_ranks: dict[str, int] | None = None) -> dict[str, Any]:
        return {"samples_drawn": self.drawn, "samples_skipped": self.bad,
                "samples_skipped_by_kind": dict(sorted((kinds_all_ranks or self.kinds).items())),
                "distinct_bad_sources": len(self.seen), "examples": self.examples}




class MetricsWriter:
    """metrics.jsonl (always), TensorBoard (when installed) and MLflow (`run.loggers`), on the main process
    only."""

    def __init__(self, run_dir: Path | None, tensorboard: bool, resumed_step: int | None = None,
                 mlflow: MlflowLogger | None = None):
        """`resumed_step`: the checkpoint a resumed run starts from. Rows logged after it by the run that
        was killed are dropped from metrics.jsonl and purged from TensorBoard, so every step appears once."""
        self.file = None
        if run_dir is not None:
            if resumed_step is not None:
                dropped = truncate_metrics(run_dir / "metrics.jsonl", resumed_step)
                if dropped:
                    logger.info("metrics.jsonl: dropped %d rows logged after step %d (resumed there)", dropped,
                                resumed_step)
            self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.tb = None
        self.mlflow = mlflow
        if run_dir is not None and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = {"purge_step": resumed_step + 1} if resumed_step is not None else {}
                self.tb = SummaryWriter(str(run_dir / "tensorboard"), **purge)
            except Exception:  # tensorboard is an optional extra
                logger.info("tensorboard is not installed: metrics go to metrics.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    name = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                    self.tb.add_scalar(name, value, record["step"])
        if self.mlflow is not None:
            self.mlflow.write(record)

    def close(self, finished: bool = False) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.close(finished)


def setup_logging(run_dir: Path | None, ctx: DistContext) -> list[logging.Handler]:
    """The trainer's log handlers (returned, to be removed when the run ends): stderr (the main process's
    info lines, the others' warnings) and, on the main process, <run dir>/train.log."""
    handlers: list[logging.Handler] = []
    fmt = logging.Formatter(f"%(asctime)s [rank {ctx.rank}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setLevel(logging.INFO if ctx.is_main else logging.WARNING)
    handlers.append(stream)
    if run_dir is not None and ctx.is_main:
        file = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        file.setLevel(logging.INFO)
        handlers.append(file)
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handlers


def log_progress(state: TrainRun) -> None:
    """The progress line and metrics row of the steps since the last one (loss: token mean over them and
    every process)."""
    step, window, ctx = state.step, state.window, state.ctx
    loss_total, aux_total = ctx.all_reduce_sum([window.loss, window.aux])
    elapsed = time.time() - window.start
    run_elapsed = time.time() - state.started
    eta = run_elapsed / max(step - state.first_step, 1) * (state.total_steps - step)
    state.last_loss = loss_total / window.tokens if window.tokens else float("nan")
    lr = state.scheduler.lr_at(state.scheduler.step_count - 1)
    record = {"step": step, "epoch": step / state.steps_per_epoch, "loss": state.last_loss, "lr": lr,
              "grad_norm": state.grad_norm, "samples_per_s": window.samples / max(elapsed, 1e-9),
              "tokens_per_s": window.tokens / max(elapsed, 1e-9),
              "region_fraction_rank0": window.region / max(1, window.local_samples),
              "samples_skipped": state.tracker.bad, "samples_drawn": state.tracker.drawn,
              "elapsed_s": run_elapsed, "eta_s": eta, "time": time.time()}
    for group in state.optimizer.param_groups:  # the rates this step's update used
        record[f"lr_{group['group']}"] = lr * group["lr_scale"]
    if state.objectives:  # the weighted objective loss, mean over steps and processes
        record["aux_loss"] = aux_total / (window.steps * ctx.world_size)
    state.metrics.write(record)
    aux_text = f" aux_loss {record['aux_loss']:.4f}" if state.objectives else ""
    logger.info("step %d/%d epoch %.2f loss %.4f%s lr %.3g grad_norm %.3g %.1f samples/s elapsed %s eta %s",
                step, state.total_steps, record["epoch"], state.last_loss, aux_text, lr, state.grad_norm,
                record["samples_per_s"], _clock(run_elapsed), _clock(eta))
    state.window = ProgressWindow()


def _clock(seconds: float) -> str:
    """Seconds as H:MM:SS (log lines: elapsed time and ETA)."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def write_summary(state: TrainRun, complete: bool, wall_seconds: float, **extra: Any) -> None:
    """<run dir>/summary.json: where the run is and whether it is complete (ran its whole schedule). A run
    stopped by its time budget is marked `"complete": false` and is never shipped. `wall_seconds`: the
    training time of every invocation so far."""
    if not state.ctx.is_main:
        return
    summary = {"complete": complete, "step": state.step, "total_steps": state.total_steps,
               "stopped_by": None if complete else "run.max_minutes", "final_loss": state.last_loss,
               "checkpoint": str(state.last_saved), "wall_seconds": round(wall_seconds, 1),
               "world_size": state.ctx.world_size, "best": state.best, **extra}
    (state.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def write_training_record(state: TrainRun, wall_seconds: float) -> None:
    """<run dir>/training.json: what made this model -- the command as typed, the resolved config, the
    source commit, steps, wall time, device, threads and CPU model. Shipped with the model;
    `python -m lion_mllm.shapes score --record` adds its held-out scores."""
    record = {"command": _command_line(), "config": state.cfg.to_dict(), **_source_commit(),
              "steps": state.step, "max_steps": state.total_steps, "wall_seconds": round(wall_seconds, 1),
              "device": str(state.ctx.device), "threads": torch.get_num_threads(), "machine": _machine(),
              "world_size": state.ctx.world_size, "torch": str(torch.__version__),
              "resumed": state.earlier_s > 0, "best": state.best, "held_out": None}
    (state.run_dir / "training.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def _command_line() -> str:
    """This process's command line as typed (`lion train ...` or `python -m lion_mllm.train ...`)."""
    program = Path(sys.argv[0]).name
    if program == "__main__.py":  # python -m lion_mllm.train
        program = "python -m lion_mllm." + Path(sys.argv[0]).parent.name
    return shlex.join([program, *sys.argv[1:]])


def _source_commit() -> dict[str, Any]:
    """The git commit of the source tree this trainer was imported from, and whether its `src/` or
    `configs/` differ from it (`commit` None outside a git checkout)."""
    root = Path(__file__).resolve().parents[3]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--", "src", "configs") if commit else None
    return {"commit": commit, "commit_dirty": bool(changes) if commit else None}


def _machine() -> str:
    """The CPU model (`model name` of /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
