"""The training loop: one program for one process or many (torchrun), resumable to the sample.

Per optimizer step each process takes `accum_grad_iters` micro-batches of `batch_size_train` samples.
The loss is the mean token cross-entropy over every valid target token of the step on all processes
(token counts are summed across processes before the backward passes), so N processes of batch B
compute the same update as one process of batch N x B, and accumulation the same as a bigger batch.

Exact resume: a checkpoint stores LION's parameters, AdamW's state, the step of the schedule, the
position of the sample stream and every process's random generators; augmentation is seeded by
stream position and the DataLoader uses its own generator, so a resumed run sees the same next batch,
learning rate and dropout masks as the uninterrupted one and ends bit-identical (same hardware and
thread count).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from ..checkpoint_files import folder_written_whole
from ..errors import CheckpointError
from ..named_imports import STREAMS, VALIDATORS, load_named
from ..pipeline import Lion
from .checkpoint import find_resume_point, list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import (
    STAGE_VISUAL_INPUT,
    AugmentConfig,
    ConfigError,
    DatasetSpec,
    RunConfig,
    TrainConfig,
)
from .data import (
    AnnotationDataset,
    BadDataError,
    BadItem,
    Collator,
    MixtureDataset,
    MixtureSampler,
    MixtureSchedule,
    StreamedBatches,
    load_tag_cache,
)
from .distributed import DistContext, gradient_sync, init_distributed, wrap_ddp, wrap_fsdp2
from .objectives import TrainingForward, build_objectives
from .rundir import RunDirectoryLocked, RunLock, truncate_metrics
from .stages import (
    STAGE_DESCRIPTIONS,
    WarmupCosineSchedule,
    build_lion,
    configure_trainable,
    is_trained_parameter,
    load_into,
    optimizer_param_groups,
)
from .trackers import MlflowLogger, flat_params

logger = logging.getLogger("lion_mllm.train")

@dataclass
class TrainResult:
    run_dir: Path
    step: int
    total_steps: int
    finished: bool
    last_checkpoint: Path | None
    export_dir: Path | None
    loss: float | None
    bad: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Bad-data accounting


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


# ----------------------------------------------------------------------------------------------------
# Logging and metrics


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


def _setup_logging(run_dir: Path | None, ctx: DistContext) -> list[logging.Handler]:
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


# ----------------------------------------------------------------------------------------------------
# Model preparation


def _enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass: T5 blocks and Q-Former layers via transformers, the
    aggregator's blocks via torch.utils.checkpoint (the ViT is frozen and keeps no activations)."""
    from torch.utils.checkpoint import checkpoint

    def enable(module: torch.nn.Module, **kwargs: Any) -> None:
        kwargs = {"use_reentrant": False, **kwargs}
        # transformers 5 renamed gradient_checkpointing_enable (still there, deprecated)
        if hasattr(module, "activation_checkpointing_enable"):
            module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    for part in (model.language_model, model.language_model.encoder, model.language_model.decoder):
        part.config.use_cache = False  # no KV cache in training (it conflicts with recompute)
    enable(model.language_model, context_fn=model.checkpoint_contexts)  # adapters need their routes
    if getattr(model, "qformer", None) is not None:
        enable(model.qformer)
    if getattr(model, "aggregator", None) is not None:
        for block in model.aggregator.blocks:
            forward = block.forward
            block.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def _train_mode(model: torch.nn.Module) -> None:
    model.train()
    if not any(p.requires_grad for p in model.vision_model.parameters()):
        model.vision_model.eval()  # the authors keep the frozen ViT in eval mode


def _clock(seconds: float) -> str:
    """Seconds as H:MM:SS (log lines: elapsed time and ETA)."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class Validation:
    """Held-out loss: the mean token cross-entropy over the validation records, in eval mode (no
    dropout, no augmentation), sharded over processes. Every process runs the same number of forward
    passes (a zero-weighted placeholder where its shard has run out): FSDP2 all-gathers in each one."""

    def __init__(self, datasets: list[AnnotationDataset], processor: Any, image_size: int, batch_size: int,
                 max_samples: int | None, ctx: DistContext):
        keys = [(d, i, 0) for d, dataset in enumerate(datasets)
                for i in range(min(len(dataset), max_samples or len(dataset)))]
        self.size = len(keys)
        self.keys = keys[ctx.rank::ctx.world_size]
        self.batch_size, self.ctx = batch_size, ctx
        self.batches = math.ceil(math.ceil(self.size / ctx.world_size) / batch_size)
        self.dataset = MixtureDataset(datasets, image_size, AugmentConfig(), seed=0, rank=0)
        self.collate = Collator(processor)

    def loss(self, model: torch.nn.Module, device: torch.device, autocast: Callable[[], Any],
             dummy: dict[str, torch.Tensor]) -> dict[str, Any]:
        model.eval()
        loss_sum, tokens, samples, skipped = 0.0, 0.0, 0, 0
        with torch.no_grad():
            for index in range(self.batches):
                chunk = self.keys[index * self.batch_size:(index + 1) * self.batch_size]
                collated = self.collate([self.dataset[key] for key in chunk]) if chunk else {"batch": None,
                                                                                              "bad": []}
                skipped += len(collated["bad"])
                batch = _to_device(collated["batch"], device) if collated["batch"] else dummy
                with autocast():
                    value = float(_token_loss_sum(model, batch))
                if collated["batch"]:
                    loss_sum += value
                    tokens += float((collated["batch"]["labels"] != -100).sum())
                    samples += len(collated["batch"]["labels"])
        loss_sum, tokens, samples, skipped = self.ctx.all_reduce_sum([loss_sum, tokens, samples, skipped])
        return {"val_loss": loss_sum / tokens if tokens else float("nan"), "val_tokens": int(tokens),
                "val_samples": int(samples), "val_skipped": int(skipped)}


def _task_score(task: Any, lion: Lion, model: torch.nn.Module, autocast: Callable[[], Any], run_dir: Path,
                step: int) -> dict[str, Any]:
    """A benchmark score of the model being trained, through the `lion eval` harness (which shards the
    questions over processes and gathers them), or through its own scorer when `VALIDATORS` names one.
    Reports go to <run dir>/eval/step_N/."""
    from ..evaluation.harness import evaluate

    if task.task in VALIDATORS:
        return load_named(VALIDATORS, task.task, "validator")(task, lion, model, step)
    model.eval()
    evaluator = Lion(model, lion.processor, lion.tagger)

    def generate_fn(images: list[Any], questions: list[str], tasks: list[str], **decoding: Any) -> list[str]:
        if task.tags is not None:
            decoding = {**decoding, "tags": [task.tags] * len(questions)}
        with torch.no_grad(), autocast():
            return evaluator.generate(images, questions, tasks=tasks, **decoding)

    report = evaluate(task.task, generate_fn, task.ann, task.images, limit=task.limit, batch_size=task.batch_size,
                      decoding=task.decoding, box_format=task.box_format, out_dir=run_dir / "eval" / f"step_{step:06d}",
                      model_name=f"{run_dir.name} step {step}")
    primary = report["primary_metric"]
    value = float(report["metrics"].get(primary, float("nan")))
    logger.info("step %d %s %s %.4f on %d questions", step, task.task, primary, value, report["num_samples"])
    return {task.key: value, f"{task.key}_samples": report["num_samples"]}


def _token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed token cross-entropy (float32) of a batch."""
    output = model(**batch)
    labels = batch["labels"]
    return F.cross_entropy(output.logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                           reduction="sum")


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------
# The run


def _new_run_dir(cfg: TrainConfig, ctx: DistContext) -> Path:
    base = Path(cfg.run.output_dir).expanduser()
    if not base.is_absolute():
        base = Path.cwd() / base
    if cfg.run.run_name and base.name != cfg.run.run_name:
        base = base / cfg.run.run_name
    name = None
    if ctx.is_main:
        name = time.strftime("%Y%m%d%H%M%S")
        while (base / name).exists():  # two runs started in the same second
            time.sleep(1.0)
            name = time.strftime("%Y%m%d%H%M%S")
        (base / name).mkdir(parents=True)
    return base / ctx.broadcast_object(name)


def _steps_per_epoch(cfg: TrainConfig, total_samples: int, world_size: int) -> int:
    if cfg.run.iters_per_epoch:
        return cfg.run.iters_per_epoch
    per_step = world_size * cfg.run.batch_size_train * cfg.run.accum_grad_iters
    return max(1, math.ceil(total_samples / per_step))


def train(cfg: TrainConfig, resume: str | Path | None = None, stop_after_steps: int | None = None) -> TrainResult:
    """Run (or resume) a training run described by `cfg`; returns where it ended.

    `resume`: a run directory, one of its checkpoints, or an output directory (newest run); "auto"
    means the newest run under `run.output_dir`; None: `cfg.resume_from` (LAVIS `run.resume_ckpt_path`)
    if set. `stop_after_steps`: save and return after this many steps of this invocation (a scheduled
    stop; `run.stop_after_steps` in the config does the same). SIGTERM (preemption) saves and returns
    at the end of the current step.
    """
    run = cfg.run
    if resume is None and cfg.resume_from is not None:
        resume = cfg.resume_from
    ctx = init_distributed(run.device)
    handlers: list[logging.Handler] = []
    threads = torch.get_num_threads()
    lock: RunLock | None = None
    try:
        if run.num_threads:
            torch.set_num_threads(run.num_threads)
        resume_point = None
        if resume is not None:
            target = Path(run.output_dir) if str(resume) == "auto" else Path(resume)
            if str(resume) == "auto" and run.run_name and target.name != run.run_name:
                target = target / run.run_name
            resume_point = find_resume_point(target)
            run_dir = resume_point.parent.parent
        else:
            run_dir = _new_run_dir(cfg, ctx)
        lock, lock_note = _lock_run_dir(run_dir, ctx)
        handlers = _setup_logging(run_dir, ctx)
        if lock_note is not None:
            logger.warning("%s", lock_note)
        if ctx.is_main:
            for note in cfg.notes:
                logger.warning("config: %s", note)
            if cfg.resume_from is not None and resume == cfg.resume_from:
                logger.info("run.resume_ckpt_path: resuming from %s", resume_point)
        with _sigterm_requests_a_stop() as stop_requested:
            return _train(cfg, ctx, run_dir, resume_point, stop_after_steps or run.stop_after_steps, stop_requested)
    except BaseException as error:
        # The traceback's frames hold the DDP model and its reducer. They must be gone before the
        # process group is destroyed (ctx.close below), else freeing them later can deadlock in gloo.
        _clear_frames(error)
        raise
    finally:
        if lock is not None:
            lock.release()
        ctx.close()  # after _clear_frames, and while train.log still takes its warnings
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        torch.set_num_threads(threads)


def _clear_frames(error: BaseException) -> None:
    """Drop the local variables of every finished frame in `error`'s traceback (and its chained
    exceptions'); the traceback itself -- files, lines, function names -- stays printable."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        todo += [current.__cause__, current.__context__]


def _lock_run_dir(run_dir: Path, ctx: DistContext) -> tuple[RunLock | None, str | None]:
    """The main process takes the run directory's lock; every process raises alike if it is taken.
    Returns the lock and, when a stale one was taken over, a note for the log."""
    lock, refusal, note = None, None, None
    if ctx.is_main:
        lock = RunLock(run_dir)
        try:
            note = lock.acquire()
        except RunDirectoryLocked as error:
            lock, refusal = None, str(error)
    refusal = ctx.broadcast_object(refusal)
    if refusal is not None:
        raise RunDirectoryLocked(refusal)
    return lock, note


@contextlib.contextmanager
def _sigterm_requests_a_stop() -> Iterator[Callable[[], bool]]:
    """While training, SIGTERM (a cluster's preemption notice; torchrun forwards it to its workers)
    only sets a flag: the loop saves a checkpoint at the end of the step and returns. A second SIGTERM
    acts as before the run (default: terminate). Off the main thread signals cannot be caught: no-op."""
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


@dataclass
class _Window:
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
    Nothing in it refers back to it, so dropping the frames that hold it releases the DDP model."""

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
    schedule: MixtureSchedule | StreamedBatches  # the sample stream's position (checkpointed)
    iterator: Iterator[dict[str, Any]]  # micro-batches
    dummy: dict[str, torch.Tensor]  # the batch a process without samples runs (zero-weighted)
    tracker: BadDataTracker
    record_report: dict[str, Any]
    validation: Validation | None
    metrics: MetricsWriter
    progress: Any  # tqdm bar or None
    steps_per_epoch: int
    total_steps: int
    step: int
    best: dict[str, Any] | None  # the best evaluation so far: step, metric, value
    earlier_s: float  # training time of the invocations before this one
    last_saved: Path | None
    saved_step: int
    stop_after: int | None
    stop_requested: Callable[[], bool]
    first_step: int = field(init=False)  # where this invocation started (its ETA)
    steps_this_run: int = 0
    started: float = field(default_factory=time.time)
    window: _Window = field(default_factory=_Window)
    last_loss: float | None = None
    grad_norm: float = float("nan")

    @property
    def model(self) -> torch.nn.Module:
        return self.lion.model

    def __post_init__(self) -> None:
        self.first_step = self.step


def _train(cfg: TrainConfig, ctx: DistContext, run_dir: Path, resume_point: Path | None,
           stop_after: int | None, stop_requested: Callable[[], bool] = lambda: False) -> TrainResult:
    state = _start(cfg, ctx, run_dir, resume_point, stop_after, stop_requested)
    finished = False
    try:
        while state.step < state.total_steps:
            stops = _train_step(state)
            epoch_end = state.step % state.steps_per_epoch == 0
            if state.step % cfg.run.print_freq == 0 or state.step == state.total_steps or epoch_end:
                _log_progress(state)
            stopped = _evaluate_and_save(state, stops, epoch_end)
            if stopped is not None:
                return stopped
        result = _finish(state)
        finished = True
        return result
    finally:
        if isinstance(state.schedule, StreamedBatches):
            state.schedule.close()  # its prefetching worker
        if state.progress is not None:
            state.progress.close()
        state.metrics.close(finished)


# ----------------------------------------------------------------------------------------------------
# Setting a run up: model, optimizer, data, resume point


def _start(cfg: TrainConfig, ctx: DistContext, run_dir: Path, resume_point: Path | None, stop_after: int | None,
           stop_requested: Callable[[], bool]) -> TrainRun:
    """Everything the loop needs, built in the order that fixes the random generators: model, objectives,
    optimizer, data, schedule, resumed state, then the processes' seeds."""
    run = cfg.run
    fsdp = run.parallel == "fsdp2" and ctx.distributed
    use_bf16, autocast = _precision(run, ctx.device, fsdp)
    _write_config(cfg, ctx, run_dir, resume_point)
    lion, objectives = _build_model(cfg, resume_point, torch.bfloat16 if use_bf16 and not fsdp else
                                    torch.float32, torch.device("cpu") if fsdp else ctx.device)
    core, wrapped = _wrap(cfg, ctx, lion.model, objectives, fsdp, use_bf16)
    optimizer = _build_optimizer(run, lion.model, objectives)
    datasets, tracker, record_report, validation = _read_data(cfg, ctx, run_dir, lion)
    steps_per_epoch, total_steps = _run_length(cfg, ctx, datasets)
    scheduler = WarmupCosineSchedule(optimizer, run.init_lr, run.min_lr, total_steps, run.warmup_steps,
                                     run.warmup_lr)
    step, schedule_state, saved_rng, resumed = 0, None, None, {}
    if resume_point is not None:
        step, schedule_state, saved_rng, resumed = _resume(resume_point, run_dir, lion.model, wrapped, optimizer,
                                                           scheduler, tracker, ctx, fsdp, run.unfreeze, objectives)
    schedule, source = _sample_source(cfg, ctx, lion, datasets, schedule_state)
    dummy = _to_device(Collator(lion.processor).dummy(), ctx.device)
    if resume_point is None:
        torch.manual_seed(run.seed + ctx.rank)  # dropout differs between processes, is reproducible
        if ctx.device.type == "cuda":
            torch.cuda.manual_seed(run.seed + ctx.rank)
    elif saved_rng is not None:
        set_rng_state(saved_rng)
    metrics, progress = _outputs(cfg, ctx, run_dir, step, resume_point is not None, total_steps)
    return TrainRun(cfg=cfg, ctx=ctx, run_dir=run_dir, fsdp=fsdp, autocast=autocast, lion=lion,
                    objectives=objectives, core=core, wrapped=wrapped, optimizer=optimizer, scheduler=scheduler,
                    schedule=schedule, iterator=iter(source), dummy=dummy, tracker=tracker,
                    record_report=record_report, validation=validation, metrics=metrics, progress=progress,
                    steps_per_epoch=steps_per_epoch, total_steps=total_steps, step=step,
                    best=resumed.get("best"), earlier_s=float(resumed.get("elapsed_s", 0.0)),
                    last_saved=resume_point, saved_step=step if resume_point is not None else -1,
                    stop_after=stop_after, stop_requested=stop_requested)


def _precision(run: RunConfig, device: torch.device, fsdp: bool) -> tuple[bool, Callable[[], Any]]:
    """Whether the frozen parts are bfloat16 (GPU), and the autocast the forward passes run under."""
    use_bf16 = run.mixed_precision == "bf16" and device.type == "cuda"
    cpu_bf16 = run.mixed_precision == "bf16" and device.type == "cpu" and run.cpu_autocast
    if run.mixed_precision == "bf16" and device.type != "cuda" and not cpu_bf16:
        logger.info("mixed_precision bf16 applies on GPU (on CPU with run.cpu_autocast); on %s the run computes "
                    "in float32", device.type)
    if run.flush_denormal:
        torch.set_flush_denormal(True)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 and not fsdp else
                (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if cpu_bf16 else nullcontext)
    return use_bf16, autocast


def _write_config(cfg: TrainConfig, ctx: DistContext, run_dir: Path, resume_point: Path | None) -> None:
    """The resolved config into the run directory (each resumption its own file)."""
    if ctx.is_main:
        resolved = {**cfg.to_dict(), "_resolved": {"world_size": ctx.world_size, "device": str(ctx.device),
                                                   "source": str(cfg.source) if cfg.source else None,
                                                   "torch": str(torch.__version__)}}
        name = "config.yaml" if resume_point is None else f"config.resume-{time.strftime('%Y%m%d%H%M%S')}.yaml"
        (run_dir / name).write_text(yaml.safe_dump(resolved, sort_keys=False))
    logger.info("run directory %s; stage %d (%s); %d process(es) on %s", run_dir, cfg.run.stage,
                STAGE_DESCRIPTIONS[cfg.run.stage], ctx.world_size, ctx.device)


def _build_model(cfg: TrainConfig, resume_point: Path | None, frozen_dtype: torch.dtype,
                 build_device: torch.device) -> tuple[Lion, dict[str, torch.nn.Module]]:
    """The stage's model (earlier stages' weights loaded, trainable parts float32 and in train mode) and
    the training-only objectives."""
    run = cfg.run
    lion = build_lion(cfg.model, run.stage, build_device, frozen_dtype, seed=run.seed)
    model = lion.model
    # made right after the model: a from-scratch preset leaves the generator where its init ended
    objectives = build_objectives(run.objectives, model.config)
    untagged = [t.task for t in run.eval_tasks if t.tags is None]
    if untagged and model.config.enable_semantic_tags and lion.tagger is None:
        raise ConfigError(f"run.eval_tasks {untagged}: this model's prompt needs tags and it has no tagger "
                          "(training never runs RAM); give the task `tags:`")
    if resume_point is None:
        for path in cfg.model.init_from:
            load_into(model, path)
    trainable = configure_trainable(model, run.freeze, unfreeze=run.unfreeze)
    with torch.no_grad():  # the optimizer updates float32 master weights, whatever the frozen dtype
        for name, param in model.named_parameters():
            if is_trained_parameter(name, run.unfreeze) and param.dtype != torch.float32:
                param.data = param.data.float()
    _train_mode(model)
    if run.activation_checkpointing:
        _enable_activation_checkpointing(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    logger.info("trainable: %d tensors, %s parameters of %s (%s model)", len(trainable), f"{n_train:,}",
                f"{n_all:,}", model.config.visual_input)
    return lion, objectives


def _wrap(cfg: TrainConfig, ctx: DistContext, model: torch.nn.Module, objectives: dict[str, torch.nn.Module],
          fsdp: bool, use_bf16: bool) -> tuple[torch.nn.Module | None, torch.nn.Module]:
    """The training pass (`TrainingForward` for grouped batches (a stream) or objectives, else the model)
    and what runs it: itself, or its DDP / FSDP2 wrapper."""
    core = (TrainingForward(model, objectives, {o.name: o.weight for o in cfg.run.objectives}).to(ctx.device)
            if objectives or cfg.train_stream else None)
    if fsdp:
        wrapped = wrap_fsdp2(model.to(ctx.device), ctx, use_bf16)
    elif ctx.distributed:
        wrapped = wrap_ddp(core or model, ctx, cfg.run.find_unused_parameters)
    else:
        wrapped = core or model
    if ctx.distributed:
        ctx.track(wrapped)  # the process group outlives it: see DistContext.close
    return core, wrapped


def _build_optimizer(run: RunConfig, model: torch.nn.Module, objectives: dict[str, torch.nn.Module]
                     ) -> torch.optim.Optimizer:
    groups = optimizer_param_groups(model, run.weight_decay, run.lr_scale, run.boost_lr_scale)
    if objectives:
        named = _objective_parameters(objectives)
        groups.append({"params": list(named.values()), "names": list(named), "weight_decay": run.weight_decay,
                       "lr_scale": run.lr_scale, "group": "objectives"})
    optimizer = torch.optim.AdamW(groups, lr=run.init_lr, betas=(run.beta1, run.beta2))
    for group in groups:
        logger.info("optimizer group %s: %d tensors, lr x %g, weight decay %g", group["group"],
                    len(group["params"]), group["lr_scale"], group["weight_decay"])
    return optimizer


def _read_data(cfg: TrainConfig, ctx: DistContext, run_dir: Path, lion: Lion
               ) -> tuple[list[AnnotationDataset], BadDataTracker, dict[str, Any], Validation | None]:
    """The training and validation annotation files, read and checked (too many malformed records, or a
    file with none usable, is BadDataError), and the tracker of unusable samples."""
    run, model = cfg.run, lion.model
    caches: dict[Path, dict[str, str]] = {}

    def read(spec: DatasetSpec) -> AnnotationDataset:
        cache_path = spec.tag_cache or run.tag_cache
        if cache_path is not None and cache_path not in caches:
            caches[cache_path] = load_tag_cache(cache_path)
        return AnnotationDataset(spec, model.config.enable_semantic_tags, run.missing_tags, caches.get(cache_path))

    datasets = []
    for spec in cfg.train_datasets:
        if not spec.is_train:
            logger.info("%s: is_train is false, not used for training", spec.ann_path)
            continue
        datasets.append(read(spec))
    bad_file = run_dir / ("bad_data.jsonl" if ctx.is_main else f"bad_data.rank{ctx.rank}.jsonl")
    tracker = BadDataTracker(run.max_bad_fraction, run.bad_check_min_samples, bad_file, ctx.rank)
    record_report = tracker.check_records(datasets, ctx.is_main)
    validation = None
    if cfg.valid_datasets:
        valid_sets = [read(spec) for spec in cfg.valid_datasets]
        record_report["validation"] = tracker.check_records(valid_sets, ctx.is_main, label="validation ")
        validation = Validation(valid_sets, lion.processor, model.config.vision.image_size,
                                run.batch_size_eval or run.batch_size_train, run.eval_max_samples, ctx)
        logger.info("validation: %d records (%s), every %s", validation.size,
                    ", ".join(d.spec.label for d in valid_sets),
                    f"{run.eval_every_steps} steps" if run.eval_every_steps else "checkpoint save")
    for spec, d in zip([s for s in cfg.train_datasets if s.is_train], datasets):
        if len(d) == 0:
            raise BadDataError(f"{spec.ann_path}: no usable record (see the skipped records above)")
    return datasets, tracker, record_report, validation


def _run_length(cfg: TrainConfig, ctx: DistContext, datasets: list[AnnotationDataset]) -> tuple[int, int]:
    """Steps per epoch and in all (logged with the batch shape)."""
    run = cfg.run
    # a stream has no epochs: one "epoch" is the whole run (config: a stream needs max_steps)
    steps_per_epoch = (run.max_steps if cfg.train_stream else
                       _steps_per_epoch(cfg, sum(len(d) for d in datasets), ctx.world_size))
    total_steps = run.max_steps if run.max_steps is not None else run.max_epoch * steps_per_epoch
    if cfg.train_stream:
        logger.info("%d steps of %d x %d groups of samples generated by the %r stream x %d process(es)",
                    total_steps, run.batch_size_train, run.accum_grad_iters, cfg.train_stream.stream, ctx.world_size)
    else:
        logger.info("%d steps (%d per epoch) of %d x %d samples x %d process(es); datasets %s, ratios %s",
                    total_steps, steps_per_epoch, run.batch_size_train, run.accum_grad_iters, ctx.world_size,
                    [d.spec.label for d in datasets], [d.spec.sample_ratio for d in datasets])
    return steps_per_epoch, total_steps


def _resume(resume_point: Path, run_dir: Path, model: torch.nn.Module, wrapped: torch.nn.Module,
            optimizer: torch.optim.Optimizer, scheduler: WarmupCosineSchedule, tracker: BadDataTracker,
            ctx: DistContext, fsdp: bool, unfreeze: list[str], objectives: dict[str, torch.nn.Module]
            ) -> tuple[int, dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    """The checkpoint's state restored; returns its step, the sample stream's state, this process's
    random generators and the saved training state."""
    state = load_checkpoint(resume_point)
    step, schedule_state, saved_rng = _restore(state, model, wrapped, optimizer, scheduler, tracker, ctx, fsdp,
                                               unfreeze, objectives)
    logger.info("resumed from %s at step %d (lr %.3g)", resume_point, step, scheduler.lr_at(step))
    _set_aside_later_checkpoints(run_dir, step, ctx)
    return step, schedule_state, saved_rng, state["training_state"]


def _sample_source(cfg: TrainConfig, ctx: DistContext, lion: Lion, datasets: list[AnnotationDataset],
                   schedule_state: dict[str, Any] | None
                   ) -> tuple[MixtureSchedule | StreamedBatches, Iterable[dict[str, Any]]]:
    """Where the micro-batches come from, at `schedule_state` when resuming: the position to checkpoint
    and the micro-batches (iterate them after seeding: DataLoader workers start then)."""
    run = cfg.run
    if cfg.train_stream:  # generated in this process, in order: its position and generator are the state
        stream = _stream(cfg, lion.processor, ctx, schedule_state)
        return stream, stream
    sizes = [len(d) for d in datasets]
    ratios = [d.spec.sample_ratio for d in datasets]
    schedule = MixtureSchedule(sizes, ratios, run.seed, ctx.rank, ctx.world_size, schedule_state)
    loader = torch.utils.data.DataLoader(
        MixtureDataset(datasets, lion.model.config.vision.image_size, run.augment, run.seed, ctx.rank),
        batch_size=run.batch_size_train, sampler=MixtureSampler(sizes, ratios, run.seed, ctx.rank, ctx.world_size,
                                                                schedule.state_dict()),
        collate_fn=Collator(lion.processor), num_workers=run.num_workers, pin_memory=ctx.device.type == "cuda",
        persistent_workers=run.num_workers > 0, generator=torch.Generator().manual_seed(run.seed),
    )
    return schedule, loader


def _outputs(cfg: TrainConfig, ctx: DistContext, run_dir: Path, step: int, resumed: bool, total_steps: int
             ) -> tuple[MetricsWriter, Any]:
    """The metrics writer (with MLflow when `run.loggers` names it) and, on a terminal, a progress bar."""
    run = cfg.run
    mlflow = None
    if ctx.is_main and "mlflow" in run.loggers:
        mlflow = MlflowLogger(run_dir, run.mlflow_experiment or run_dir.parent.name, run.mlflow_tracking_uri,
                              flat_params(cfg.to_dict()["run"]))
    metrics = MetricsWriter(run_dir if ctx.is_main else None, run.tensorboard or "tensorboard" in run.loggers,
                            step if resumed else None, mlflow)
    progress = None
    if ctx.is_main and run.progress_bar and sys.stderr.isatty():
        try:
            from tqdm import tqdm

            progress = tqdm(total=total_steps, initial=step, desc=f"stage {run.stage}", dynamic_ncols=True)
        except ImportError:
            pass
    return metrics, progress


# ----------------------------------------------------------------------------------------------------
# One step, its log line, evaluation and checkpoints


def _train_step(state: TrainRun) -> float:
    """One optimizer step over `accum_grad_iters` micro-batches; returns how many processes were asked to
    stop (SIGTERM)."""
    run, ctx = state.cfg.run, state.ctx
    micro = [next(state.iterator) for _ in range(run.accum_grad_iters)]
    local_tokens = sum(float((m["batch"]["labels"] != -100).sum()) for m in micro if m["batch"])
    local_drawn = sum(m["size"] for m in micro)
    local_items = [item for m in micro for item in m["bad"]]
    state.tracker.note(local_items)
    tokens, bad, drawn, stops = ctx.all_reduce_sum([local_tokens, len(local_items), local_drawn,
                                                   float(state.stop_requested())])
    if bad:  # every rank knows the sum, so all join this gather: rank 0 logs them all to train.log
        gathered = ctx.gather_objects([(i.source, i.reason, i.kind) for i in local_items])
        if ctx.is_main:
            state.tracker.log(gathered)
    state.tracker.update(int(bad), int(drawn))  # raises BadDataError on every process alike
    step_loss, step_aux = torch.zeros((), dtype=torch.float64), 0.0
    if tokens > 0:
        step_loss, step_aux = _update(state, micro, tokens)
    else:
        logger.warning("step %d: no usable sample on any process; no update", state.step + 1)
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    state.schedule.advance(run.accum_grad_iters * run.batch_size_train)
    state.step += 1
    state.steps_this_run += 1
    window = state.window
    window.loss += float(step_loss)
    window.aux += step_aux
    window.tokens += tokens
    window.samples += drawn
    window.region += sum(m["region"] for m in micro)
    window.local_samples += local_drawn
    window.steps += 1
    if state.progress is not None:
        state.progress.update(1)
        if tokens:
            state.progress.set_postfix(loss=f"{float(step_loss) / max(local_tokens, 1):.4f}")
    return stops


def _update(state: TrainRun, micro: list[dict[str, Any]], tokens: float) -> tuple[torch.Tensor, float]:
    """Forward and backward passes over the micro-batches, clipping and the optimizer step; returns this
    process's summed token loss and its weighted objective loss."""
    accum, world_size = state.cfg.run.accum_grad_iters, state.ctx.world_size
    step_loss, step_aux = torch.zeros((), dtype=torch.float64), 0.0
    for index, m in enumerate(micro):
        batch = _to_device(m["batch"], state.ctx.device) if m["batch"] else state.dummy
        weight = 1.0 if m["batch"] else 0.0  # an empty micro-batch still joins the all-reduce
        with gradient_sync(state.wrapped, index == accum - 1):
            with state.autocast():
                loss_sum, aux = state.wrapped(**batch) if state.core is not None else (
                    _token_loss_sum(state.wrapped, batch), None)
            # DDP/FSDP average gradients over processes: scale so the result is the token mean
            scaled = loss_sum * (weight * world_size / tokens)
            if aux is not None:  # objectives: a mean per micro-batch, averaged over them (and ranks)
                scaled = scaled + aux * (weight / accum)
                step_aux += float(aux.detach()) * weight / accum
            scaled.backward()
        step_loss += loss_sum.detach().double().cpu() * weight
    # the model's parameters only: objective heads are not clipped (the lion-shapes recipe)
    params = [p for p in state.model.parameters() if p.requires_grad]
    max_norm = state.cfg.run.max_grad_norm if state.cfg.run.max_grad_norm is not None else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    state.grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    state.optimizer.step()
    return step_loss, step_aux


def _log_progress(state: TrainRun) -> None:
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
    state.window = _Window()


def _evaluate_and_save(state: TrainRun, stops: float, epoch_end: bool) -> TrainResult | None:
    """After a step: evaluate and save when due; on a scheduled stop or SIGTERM, save and return where the
    run stopped."""
    run, step, total_steps = state.cfg.run, state.step, state.total_steps
    preempted = stops > 0 and step < total_steps
    out_of_time = _budget_spent(state) and step < total_steps
    stopping = (state.stop_after is not None and state.steps_this_run >= state.stop_after
                and step < total_steps) or preempted or out_of_time
    saving = (run.save_every_steps and step % run.save_every_steps == 0) or epoch_end or stopping
    if run.eval_every_steps:
        evaluation_due = step % run.eval_every_steps == 0 or step == total_steps
    else:  # with every checkpoint, so that each checkpoint knows the best model up to it
        evaluation_due = saving or step == total_steps
    if (state.validation is not None or run.eval_tasks) and evaluation_due and not preempted:
        _evaluate(state)
    if saving:
        _save_now(state)
    if not stopping:
        return None
    if out_of_time:
        _write_summary(state, complete=False)
        logger.info("incomplete: run.max_minutes=%g spent at step %d of %d; saved, not shipped; resume with "
                    "--resume %s (and a larger run.max_minutes) to finish the same schedule", run.max_minutes,
                    step, total_steps, state.run_dir)
    else:
        why = "SIGTERM received" if preempted else f"stopping after {state.steps_this_run} steps of this invocation"
        logger.info("%s: saved step %d; resume with --resume %s", why, step, state.run_dir)
    return TrainResult(state.run_dir, step, total_steps, False, state.last_saved, None, state.last_loss,
                       state.tracker.report())


def _evaluate(state: TrainRun) -> None:
    """Validation loss and task scores now; a new best (by run.best_metric) is exported to <run dir>/best
    before the checkpoint that records it, so a resumed run knows its best."""
    run, step, model, best = state.cfg.run, state.step, state.model, state.best
    result: dict[str, Any] = {}
    if state.validation is not None:
        result.update(state.validation.loss(model, state.ctx.device, state.autocast, state.dummy))
        logger.info("step %d validation loss %.4f on %d samples (%d tokens)", step, result["val_loss"],
                    result["val_samples"], result["val_tokens"])
    for task in run.eval_tasks:
        result.update(_task_score(task, state.lion, model, state.autocast, state.run_dir, step))
    _train_mode(model)
    record = {"step": step, "epoch": step / state.steps_per_epoch, **result, "time": time.time()}
    value = result[run.best_metric]
    lower_is_better = run.best_metric == "val_loss"
    improved = math.isfinite(value) and (best is None or (value < best["value"] if lower_is_better
                                                          else value > best["value"]))
    if improved:
        best = state.best = {"step": step, "metric": run.best_metric, "value": value}
    record["val_best"] = best["value"] if best else None
    state.metrics.write(record)
    logger.info("step %d %s %.4f%s", step, run.best_metric, value, " - best so far" if improved else
                f"; best {best['value']:.4f} at step {best['step']}" if best else "")
    if improved and run.keep_best:
        _export(state.run_dir, state.lion, model, state.wrapped, state.ctx, state.fsdp, name="best", info=best)


def _save_now(state: TrainRun) -> None:
    """A checkpoint of the current step (with the best so far and the training time of every invocation)."""
    state.last_saved = _save(state.run_dir, state.step, state.model, state.wrapped, state.optimizer,
                             state.scheduler, state.schedule, state.tracker, state.ctx, state.fsdp, state.cfg,
                             state.steps_per_epoch, state.cfg.run.keep_checkpoints, state.best, state.objectives,
                             state.earlier_s + time.time() - state.started)
    state.saved_step = state.step


def _finish(state: TrainRun) -> TrainResult:
    """The end of the schedule: the last checkpoint, the exported model, summary.json and training.json, and
    with `run.ship_best_to` the best model shipped (a complete run only)."""
    ctx, step = state.ctx, state.step
    if state.saved_step != step:
        _save_now(state)
    export_dir = (_export(state.run_dir, state.lion, state.model, state.wrapped, ctx, state.fsdp)
                  if state.cfg.run.export_final else None)
    kinds = ctx.gather_objects(dict(state.tracker.kinds))
    merged: Counter[str] = Counter()
    for counts in kinds or []:
        merged.update(counts)
    result = TrainResult(state.run_dir, step, state.total_steps, True, state.last_saved, export_dir, state.last_loss,
                         {**state.record_report, **state.tracker.report(merged)})
    digests = None if state.fsdp else ctx.gather_objects(_digest(state.model))
    if ctx.is_main:
        if digests is not None and len(set(digests)) != 1:
            logger.error("the processes ended with different weights: %s", digests)
        _write_summary(state, complete=True, export=str(export_dir) if export_dir else None, bad_data=result.bad,
                       replicas_identical=None if digests is None else len(set(digests)) == 1)
        _write_training_record(state)
        logger.info("finished: %d steps; %d of %d records skipped at load, %d of %d drawn samples skipped; "
                    "model exported to %s", step, state.record_report["skipped_records"],
                    state.record_report["records"], state.tracker.bad, state.tracker.drawn, export_dir)
        if state.cfg.run.ship_best_to is not None:
            ship_run(state.run_dir, state.cfg.run.ship_best_to)
    return result


def _budget_spent(state: TrainRun) -> bool:
    """`run.max_minutes`: whether the training wall time of all invocations has reached the budget. The
    budget never changes the schedule (a function of the step alone); it stops the run, incomplete."""
    budget = state.cfg.run.max_minutes
    return budget is not None and _wall_seconds(state) >= budget * 60.0


def _wall_seconds(state: TrainRun) -> float:
    """Training wall time so far, over every invocation of the run (earlier ones from the checkpoint)."""
    return state.earlier_s + time.time() - state.started


def _write_summary(state: TrainRun, complete: bool, **extra: Any) -> None:
    """<run dir>/summary.json: where the run is and whether it is complete (ran its whole schedule). A run
    stopped by its time budget is marked `"complete": false` and is never shipped."""
    if not state.ctx.is_main:
        return
    summary = {"complete": complete, "step": state.step, "total_steps": state.total_steps,
               "stopped_by": None if complete else "run.max_minutes", "final_loss": state.last_loss,
               "checkpoint": str(state.last_saved), "wall_seconds": round(_wall_seconds(state), 1),
               "world_size": state.ctx.world_size, "best": state.best, **extra}
    (state.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _write_training_record(state: TrainRun) -> None:
    """<run dir>/training.json: what made this model -- the command as typed, the resolved config, the
    source commit, steps, wall time, device, threads and CPU model. Shipped with the model;
    `python -m lion_mllm.shapes score --record` adds its held-out scores."""
    record = {"command": _command_line(), "config": state.cfg.to_dict(), **_source_commit(),
              "steps": state.step, "max_steps": state.total_steps, "wall_seconds": round(_wall_seconds(state), 1),
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


def _objective_parameters(objectives: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """The objectives' parameters by checkpoint name, `objectives.<name>.<parameter>`."""
    return {f"objectives.{name}.{key}": param for name, module in objectives.items()
            for key, param in module.named_parameters()}


def _stream(cfg: TrainConfig, processor: Any, ctx: DistContext, state: dict[str, Any] | None) -> StreamedBatches:
    """The run's streamed source (`train_datasets: [{stream: NAME, ...}]`), at `state` when resuming."""
    spec = cfg.train_stream
    try:
        source = load_named(STREAMS, spec.stream, "stream")(seed=cfg.run.seed,
                                                            images_per_batch=cfg.run.batch_size_train, **spec.options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"train_datasets[0] (stream {spec.stream}): {error}") from None
    return StreamedBatches(source, processor, cfg.run.seed, ctx.rank, ctx.world_size, cfg.run.accum_grad_iters,
                           state, prefetch=cfg.run.stream_prefetch)


def ship_run(run_dir: Path, target: Path) -> Path:
    """`run.ship_best_to`: copy a complete run's model to `target` as package data -- its `best/` (else
    `final/`) in float16, with the run's `training.json` and `metrics.jsonl`, keeping the MODEL_CARD.md
    already there; written beside `target`, then swapped in. A run whose summary.json does not say it
    is complete (stopped by its time budget, or still running) is refused: ValueError naming it."""
    run_dir, target = Path(run_dir), Path(target)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    if summary.get("complete") is not True:
        where = (f"stopped at step {summary.get('step')} of {summary.get('total_steps')} by "
                 f"{summary.get('stopped_by')}" if summary else "no summary.json: not finished")
        raise ValueError(f"run.ship_best_to: refusing to ship {run_dir}: the run is incomplete ({where}); "
                         "resume it to its last step first")
    bundle = run_dir / "best" if (run_dir / "best").is_dir() else run_dir / "final"
    if not bundle.is_dir():
        raise ValueError(f"run.ship_best_to: {run_dir} has no model to ship (no best/ and no final/: set "
                         "run.keep_best with evaluations, or run.export_final)")
    with folder_written_whole(target, replace=True) as partial:  # the shipped model stays whole until then
        Lion.from_pretrained(bundle).write_bundle(partial, dtype=torch.float16)
        for name in ("training.json", "metrics.jsonl"):
            shutil.copy(run_dir / name, partial / name)
        if (target / "MODEL_CARD.md").is_file():
            shutil.copy(target / "MODEL_CARD.md", partial / "MODEL_CARD.md")
        for file in partial.rglob("*"):
            if file.is_file():
                file.chmod(0o644)  # safetensors writes 0600
    logger.info("shipped %s (%s) to %s", bundle, "complete run", target)
    return target


def _digest(model: torch.nn.Module) -> str:
    """sha256 of the trainable parameters' bytes: equal on every process of a healthy DDP run."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _set_aside_later_checkpoints(run_dir: Path, step: int, ctx: DistContext) -> None:
    """Checkpoints newer than the resume point belong to an abandoned future: rename them so that
    neither pruning nor a later --resume mixes the two histories."""
    if not ctx.is_main:
        return
    for path in list_checkpoints(run_dir / "checkpoints"):
        if int(path.name.split("_")[1]) > step:
            target = path.with_name(f"superseded-{path.name}-{time.strftime('%Y%m%d%H%M%S')}")
            logger.warning("setting aside %s (newer than the resume point) as %s", path.name, target.name)
            path.rename(target)


def _restore(state: dict[str, Any], model: torch.nn.Module, wrapped: torch.nn.Module,
             optimizer: torch.optim.Optimizer, scheduler: WarmupCosineSchedule, tracker: BadDataTracker,
             ctx: DistContext, fsdp: bool, unfreeze: list[str], objectives: dict[str, torch.nn.Module]
             ) -> tuple[int, dict[str, Any], dict[str, Any] | None]:
    training = state["training_state"]
    params = state["lion_params"]
    expected = {n for n, _ in model.named_parameters() if is_trained_parameter(n, unfreeze)}
    expected |= set(_objective_parameters(objectives))
    if set(params) != expected:
        missing, extra = sorted(expected - set(params)), sorted(set(params) - expected)
        raise CheckpointError(f"the checkpoint's parameters do not fit this model (another stage or size?): "
                              f"missing {missing[:3]}, unexpected {extra[:3]}")
    saved_names = [g["names"] for g in state["optimizer"]["param_groups"]]
    current_names = [g["names"] for g in optimizer.param_groups]
    if saved_names != current_names:
        raise CheckpointError("the trainable parameters changed since the checkpoint (run.freeze or stage?); "
                              "start a new run with model.init_from pointing at the checkpoint instead")
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(wrapped, params, options=options)
        set_optimizer_state_dict(wrapped, optimizer, state["optimizer"], options=options)
    else:
        with torch.no_grad():
            named = {**dict(model.named_parameters()), **_objective_parameters(objectives)}
            for name, tensor in params.items():
                named[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    tracker.bad, tracker.drawn = int(training["bad"]["samples_skipped"]), int(training["bad"]["samples_drawn"])
    rngs = training["rng"]
    if len(rngs) != ctx.world_size:
        logger.warning("the checkpoint holds random states of %d processes, this run has %d: dropout "
                       "masks will differ from the original run", len(rngs), ctx.world_size)
    rng = rngs[ctx.rank] if ctx.rank < len(rngs) else None
    return int(training["step"]), training["schedule"], rng


def _save(run_dir: Path, step: int, model: torch.nn.Module, wrapped: torch.nn.Module,
          optimizer: torch.optim.Optimizer, scheduler: WarmupCosineSchedule, schedule: MixtureSchedule,
          tracker: BadDataTracker, ctx: DistContext, fsdp: bool, cfg: TrainConfig, steps_per_epoch: int,
          keep: int, best: dict[str, Any] | None = None, objectives: dict[str, torch.nn.Module] | None = None,
          elapsed_s: float = 0.0) -> Path:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(wrapped, options=options)
        params = {k: v for k, v in full.items() if is_trained_parameter(k, cfg.run.unfreeze)}
        optimizer_state = get_optimizer_state_dict(wrapped, optimizer, options=options)
        # keep the group names (checked on resume) next to the FQN-keyed state
        for saved, group in zip(optimizer_state.get("param_groups", []), optimizer.param_groups):
            saved["names"] = group["names"]
    else:
        params = {n: p for n, p in model.named_parameters() if is_trained_parameter(n, cfg.run.unfreeze)}
        params.update(_objective_parameters(objectives or {}))  # trained, so saved (never exported)
        optimizer_state = optimizer.state_dict()
    rngs = ctx.gather_objects(rng_state())
    path = run_dir / "checkpoints" / f"step_{step:06d}"
    if ctx.is_main:
        training_state = {"step": step, "epoch": step // steps_per_epoch, "scheduler": scheduler.state_dict(),
                          "schedule": schedule.state_dict(), "rng": rngs, "world_size": ctx.world_size,
                          "bad": {"samples_skipped": tracker.bad, "samples_drawn": tracker.drawn},
                          "elapsed_s": elapsed_s}
        if best is not None:  # the lowest validation loss so far and its step: a resumed run keeps it
            training_state["best"] = dict(best)
        meta = {"stage": cfg.run.stage, "visual_input": STAGE_VISUAL_INPUT[cfg.run.stage],
                "epoch": step / steps_per_epoch, "world_size": ctx.world_size, "lr": scheduler.lr_at(step),
                "time": time.strftime("%Y-%m-%d %H:%M:%S"), "config": str(run_dir / "config.yaml")}
        path = save_checkpoint(run_dir / "checkpoints", step, params, optimizer_state, training_state, meta, keep)
        logger.info("checkpoint %s", path)
    ctx.barrier()
    return path


def _export(run_dir: Path, lion: Lion, model: torch.nn.Module, wrapped: torch.nn.Module, ctx: DistContext,
            fsdp: bool, name: str = "final", info: dict[str, Any] | None = None) -> Path:
    """The model as a `save_pretrained` bundle in <run dir>/<name> (written atomically): the finished
    model (`final`) or the best by validation loss (`best`, with `info` in its best.json)."""
    final = run_dir / name
    state = None
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.is_main:
        was_training = model.training
        with folder_written_whole(final, replace=True) as partial:
            Lion(model, lion.processor, lion.tagger, lion.generation_config).write_bundle(partial, state=state)
            if info is not None:
                (partial / "best.json").write_text(json.dumps(info, indent=2) + "\n")
        if was_training:
            _train_mode(model)  # the frozen ViT back in eval mode too
        logger.info("exported the %s model to %s (load with Lion.from_pretrained)",
                    "trained" if name == "final" else name, final)
    ctx.barrier()
    return final
