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
import shutil
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from ..errors import CheckpointError
from ..pipeline import Lion
from ..taggers import write_tagger
from .checkpoint import find_resume_point, list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import STAGE_VISUAL_INPUT, AugmentConfig, ConfigError, DatasetSpec, TrainConfig
from .data import (
    STREAMS,
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
from .objectives import TrainingForward, build_objectives, load_named
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
    questions over processes and gathers them). Reports go to <run dir>/eval/step_N/."""
    from ..evaluation.harness import evaluate

    if task.task == "shapes":
        return _shapes_score(task, lion, model, step)
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


def _shapes_score(task: Any, lion: Lion, model: torch.nn.Module, step: int) -> dict[str, Any]:
    """The shapes world's held-out scores (REC Acc@0.5, VQA exact match, caption object-set; fractions, bf16
    autocast on CPU) on generated scenes; `val_shapes` is their sum, what lion-shapes' best model is
    chosen by. Every process scores the same scenes (small: no sharding)."""
    from ..shapes import HELD_OUT_SEED_BASE, evaluate_model

    start = task.first_seed if task.first_seed is not None else HELD_OUT_SEED_BASE + 500
    scores = evaluate_model(model, lion.processor, task.limit or 100, start=start, batch_size=task.batch_size)
    result = {"val_shapes": scores["rec_acc50"] + scores["vqa_exact"] + scores["caption_objects"],
              "val_shapes_rec": scores["rec_acc50"], "val_shapes_vqa": scores["vqa_exact"],
              "val_shapes_caption": scores["caption_objects"], "val_shapes_samples": scores["count"]}
    logger.info("step %d shapes: REC %.3f VQA %.3f caption %.3f on %d held-out scenes from seed %d", step,
                scores["rec_acc50"], scores["vqa_exact"], scores["caption_objects"], scores["count"], start)
    return result


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


def _train(cfg: TrainConfig, ctx: DistContext, run_dir: Path, resume_point: Path | None,
           stop_after: int | None, stop_requested: Callable[[], bool] = lambda: False) -> TrainResult:
    run = cfg.run
    device = ctx.device
    use_bf16 = run.mixed_precision == "bf16" and device.type == "cuda"
    cpu_bf16 = run.mixed_precision == "bf16" and device.type == "cpu" and run.cpu_autocast
    if run.mixed_precision == "bf16" and device.type != "cuda" and not cpu_bf16:
        logger.info("mixed_precision bf16 applies on GPU (on CPU with run.cpu_autocast); on %s the run computes "
                    "in float32", device.type)
    if run.flush_denormal:
        torch.set_flush_denormal(True)
    if ctx.is_main:
        resolved = {**cfg.to_dict(), "_resolved": {"world_size": ctx.world_size, "device": str(device),
                                                   "source": str(cfg.source) if cfg.source else None,
                                                   "torch": str(torch.__version__)}}
        name = "config.yaml" if resume_point is None else f"config.resume-{time.strftime('%Y%m%d%H%M%S')}.yaml"
        (run_dir / name).write_text(yaml.safe_dump(resolved, sort_keys=False))
    logger.info("run directory %s; stage %d (%s); %d process(es) on %s", run_dir, run.stage,
                STAGE_DESCRIPTIONS[run.stage], ctx.world_size, device)

    # -- model ------------------------------------------------------------------------------------------
    fsdp = run.parallel == "fsdp2" and ctx.distributed
    frozen_dtype = torch.bfloat16 if use_bf16 and not fsdp else torch.float32
    build_device = torch.device("cpu") if fsdp else device
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
    # grouped batches (a stream) or objectives: the training pass is `TrainingForward`, and DDP wraps it
    core = (TrainingForward(model, objectives, {o.name: o.weight for o in run.objectives}).to(device)
            if objectives or cfg.train_stream else None)
    if fsdp:
        wrapped = wrap_fsdp2(model.to(device), ctx, use_bf16)
    elif ctx.distributed:
        wrapped = wrap_ddp(core or model, ctx, run.find_unused_parameters)
    else:
        wrapped = core or model
    if ctx.distributed:
        ctx.track(wrapped)  # the process group outlives it: see DistContext.close
    groups = optimizer_param_groups(model, run.weight_decay, run.lr_scale, run.boost_lr_scale)
    if objectives:
        named = _objective_parameters(objectives)
        groups.append({"params": list(named.values()), "names": list(named), "weight_decay": run.weight_decay,
                       "lr_scale": run.lr_scale, "group": "objectives"})
    optimizer = torch.optim.AdamW(groups, lr=run.init_lr, betas=(run.beta1, run.beta2))
    for group in groups:
        logger.info("optimizer group %s: %d tensors, lr x %g, weight decay %g", group["group"],
                    len(group["params"]), group["lr_scale"], group["weight_decay"])

    # -- data ---------------------------------------------------------------------------------------------
    need_tags = model.config.enable_semantic_tags
    caches: dict[Path, dict[str, str]] = {}

    def read(spec: DatasetSpec) -> AnnotationDataset:
        cache_path = spec.tag_cache or run.tag_cache
        if cache_path is not None and cache_path not in caches:
            caches[cache_path] = load_tag_cache(cache_path)
        return AnnotationDataset(spec, need_tags, run.missing_tags, caches.get(cache_path))

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
    sizes = [len(d) for d in datasets]
    ratios = [d.spec.sample_ratio for d in datasets]
    # a stream has no epochs: one "epoch" is the whole run (config: a stream needs max_steps)
    steps_per_epoch = run.max_steps if cfg.train_stream else _steps_per_epoch(cfg, sum(sizes), ctx.world_size)
    total_steps = run.max_steps if run.max_steps is not None else run.max_epoch * steps_per_epoch
    scheduler = WarmupCosineSchedule(optimizer, run.init_lr, run.min_lr, total_steps, run.warmup_steps,
                                     run.warmup_lr)
    micro_batch, accum = run.batch_size_train, run.accum_grad_iters
    if cfg.train_stream:
        logger.info("%d steps of %d x %d groups of samples generated by the %r stream x %d process(es)",
                    total_steps, micro_batch, accum, cfg.train_stream.stream, ctx.world_size)
    else:
        logger.info("%d steps (%d per epoch) of %d x %d samples x %d process(es); datasets %s, ratios %s",
                    total_steps, steps_per_epoch, micro_batch, accum, ctx.world_size,
                    [d.spec.label for d in datasets], ratios)

    # -- resume --------------------------------------------------------------------------------------------
    step, schedule_state, saved_rng, best = 0, None, None, None
    resumed_state: dict[str, Any] = {}
    if resume_point is not None:
        state = load_checkpoint(resume_point)
        step, schedule_state, saved_rng = _restore(state, model, wrapped, optimizer, scheduler, tracker, ctx, fsdp,
                                                   run.unfreeze, objectives)
        best = state["training_state"].get("best")
        resumed_state = state["training_state"]
        logger.info("resumed from %s at step %d (lr %.3g)", resume_point, step, scheduler.lr_at(step))
        _set_aside_later_checkpoints(run_dir, step, ctx)
    if cfg.train_stream:  # generated in this process, in order: its position and generator are the state
        schedule = stream = _stream(cfg, lion.processor, ctx, schedule_state)
    else:
        schedule = MixtureSchedule(sizes, ratios, run.seed, ctx.rank, ctx.world_size, schedule_state)
        loader = torch.utils.data.DataLoader(
            MixtureDataset(datasets, model.config.vision.image_size, run.augment, run.seed, ctx.rank),
            batch_size=micro_batch, sampler=MixtureSampler(sizes, ratios, run.seed, ctx.rank, ctx.world_size,
                                                           schedule.state_dict()),
            collate_fn=Collator(lion.processor), num_workers=run.num_workers, pin_memory=device.type == "cuda",
            persistent_workers=run.num_workers > 0, generator=torch.Generator().manual_seed(run.seed),
        )
    dummy = _to_device(Collator(lion.processor).dummy(), device)
    if resume_point is None:
        torch.manual_seed(run.seed + ctx.rank)  # dropout differs between processes, is reproducible
        if device.type == "cuda":
            torch.cuda.manual_seed(run.seed + ctx.rank)
    elif saved_rng is not None:
        set_rng_state(saved_rng)

    # -- loop ----------------------------------------------------------------------------------------------
    mlflow = None
    if ctx.is_main and "mlflow" in run.loggers:
        mlflow = MlflowLogger(run_dir, run.mlflow_experiment or run_dir.parent.name, run.mlflow_tracking_uri,
                              flat_params(cfg.to_dict()["run"]))
    metrics = MetricsWriter(run_dir if ctx.is_main else None, run.tensorboard or "tensorboard" in run.loggers,
                            step if resume_point is not None else None, mlflow)
    finished = False
    progress = None
    if ctx.is_main and run.progress_bar and sys.stderr.isatty():
        try:
            from tqdm import tqdm

            progress = tqdm(total=total_steps, initial=step, desc=f"stage {run.stage}", dynamic_ncols=True)
        except ImportError:
            pass
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 and not fsdp else
                (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if cpu_bf16 else nullcontext)
    last_saved: Path | None = resume_point
    saved_step = step if resume_point is not None else -1
    window = {"loss": 0.0, "tokens": 0.0, "samples": 0, "region": 0, "start": time.time(), "steps": 0, "aux": 0.0,
              "local_samples": 0}
    started = time.time()
    first_step = step
    earlier_s = float(resumed_state.get("elapsed_s", 0.0))  # training time of the invocations before this one
    steps_this_run = 0
    last_loss: float | None = None
    grad_norm = float("nan")
    iterator = stream if cfg.train_stream else iter(loader)

    def save(current_step: int) -> Path:
        nonlocal last_saved, saved_step
        path = _save(run_dir, current_step, model, wrapped, optimizer, scheduler, schedule, tracker, ctx, fsdp,
                     cfg, steps_per_epoch, run.keep_checkpoints, best, objectives,
                     earlier_s + time.time() - started)
        last_saved, saved_step = path, current_step
        return path

    def evaluate(current_step: int) -> None:
        """Validation loss and task scores now; a new best (by run.best_metric) is exported to
        <run dir>/best before the checkpoint that records it, so a resumed run knows its best."""
        nonlocal best
        result: dict[str, Any] = {}
        if validation is not None:
            result.update(validation.loss(model, device, autocast, dummy))
            logger.info("step %d validation loss %.4f on %d samples (%d tokens)", current_step, result["val_loss"],
                        result["val_samples"], result["val_tokens"])
        for task in run.eval_tasks:
            result.update(_task_score(task, lion, model, autocast, run_dir, current_step))
        _train_mode(model)
        record = {"step": current_step, "epoch": current_step / steps_per_epoch, **result, "time": time.time()}
        value = result[run.best_metric]
        lower_is_better = run.best_metric == "val_loss"
        improved = math.isfinite(value) and (best is None or (value < best["value"] if lower_is_better
                                                              else value > best["value"]))
        if improved:
            best = {"step": current_step, "metric": run.best_metric, "value": value}
        record["val_best"] = best["value"] if best else None
        metrics.write(record)
        logger.info("step %d %s %.4f%s", current_step, run.best_metric, value, " - best so far" if improved else
                    f"; best {best['value']:.4f} at step {best['step']}" if best else "")
        if improved and run.keep_best:
            _export(run_dir, lion, model, wrapped, ctx, fsdp, name="best", info=best)
            if run.ship_best_to is not None and ctx.is_main:
                _ship(run_dir / "best", run.ship_best_to)

    try:
        while step < total_steps:
            micro = [next(iterator) for _ in range(accum)]
            local_tokens = sum(float((m["batch"]["labels"] != -100).sum()) for m in micro if m["batch"])
            local_bad = sum(len(m["bad"]) for m in micro)
            local_drawn = sum(m["size"] for m in micro)
            local_items = [item for m in micro for item in m["bad"]]
            tracker.note(local_items)
            tokens, bad, drawn, stops = ctx.all_reduce_sum([local_tokens, local_bad, local_drawn,
                                                           float(stop_requested())])
            if bad:  # every rank knows the sum, so all join this gather: rank 0 logs them all to train.log
                gathered = ctx.gather_objects([(i.source, i.reason, i.kind) for i in local_items])
                if ctx.is_main:
                    tracker.log(gathered)
            tracker.update(int(bad), int(drawn))  # raises BadDataError on every process alike
            step_loss = torch.zeros((), dtype=torch.float64)
            step_aux = 0.0
            if tokens > 0:
                for index, m in enumerate(micro):
                    batch = _to_device(m["batch"], device) if m["batch"] else dummy
                    weight = 1.0 if m["batch"] else 0.0  # an empty micro-batch still joins the all-reduce
                    with gradient_sync(wrapped, index == accum - 1):
                        with autocast():
                            loss_sum, aux = wrapped(**batch) if core is not None else (
                                _token_loss_sum(wrapped, batch), None)
                        # DDP/FSDP average gradients over processes: scale so the result is the token mean
                        scaled = loss_sum * (weight * ctx.world_size / tokens)
                        if aux is not None:  # objectives: a mean per micro-batch, averaged over them (and ranks)
                            scaled = scaled + aux * (weight / accum)
                            step_aux += float(aux.detach()) * weight / accum
                        scaled.backward()
                    step_loss += loss_sum.detach().double().cpu() * weight
                # the model's parameters only: objective heads are not clipped (the lion-shapes recipe)
                params = [p for p in model.parameters() if p.requires_grad]
                max_norm = run.max_grad_norm if run.max_grad_norm is not None else float("inf")
                norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                optimizer.step()
            else:
                logger.warning("step %d: no usable sample on any process; no update", step + 1)
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if run.max_minutes is not None:
                total_steps = _follow_time_budget(scheduler, earlier_s + time.time() - started, run.max_minutes,
                                                  step + 1, total_steps)
            schedule.advance(accum * micro_batch)
            step += 1
            steps_this_run += 1
            window["loss"] += float(step_loss)
            window["aux"] += step_aux
            window["tokens"] += tokens
            window["samples"] += drawn
            window["region"] += sum(m["region"] for m in micro)
            window["local_samples"] += local_drawn  # samples (a stream's micro-batch counts images, not samples)
            window["steps"] += 1
            if progress is not None:
                progress.update(1)
                if tokens:
                    progress.set_postfix(loss=f"{float(step_loss) / max(local_tokens, 1):.4f}")
            epoch_end = step % steps_per_epoch == 0
            if step % run.print_freq == 0 or step == total_steps or epoch_end:
                loss_total, aux_total = ctx.all_reduce_sum([window["loss"], window["aux"]])
                elapsed = time.time() - window["start"]
                run_elapsed = time.time() - started
                eta = run_elapsed / max(step - first_step, 1) * (total_steps - step)
                last_loss = loss_total / window["tokens"] if window["tokens"] else float("nan")
                record = {"step": step, "epoch": step / steps_per_epoch, "loss": last_loss,
                          "lr": scheduler.lr_at(scheduler.step_count - 1), "grad_norm": grad_norm,
                          "samples_per_s": window["samples"] / max(elapsed, 1e-9),
                          "tokens_per_s": window["tokens"] / max(elapsed, 1e-9),
                          "region_fraction_rank0": window["region"] / max(1, window["local_samples"]),
                          "samples_skipped": tracker.bad, "samples_drawn": tracker.drawn,
                          "elapsed_s": run_elapsed, "eta_s": eta, "time": time.time()}
                for group in optimizer.param_groups:  # the rates this step's update used
                    record[f"lr_{group['group']}"] = record["lr"] * group["lr_scale"]
                if objectives:  # the weighted objective loss, mean over steps and processes
                    record["aux_loss"] = aux_total / (window["steps"] * ctx.world_size)
                metrics.write(record)
                aux_text = f" aux_loss {record['aux_loss']:.4f}" if objectives else ""
                logger.info("step %d/%d epoch %.2f loss %.4f%s lr %.3g grad_norm %.3g %.1f samples/s elapsed %s "
                            "eta %s", step, total_steps, record["epoch"], last_loss, aux_text, record["lr"], grad_norm,
                            record["samples_per_s"], _clock(run_elapsed), _clock(eta))
                window = {"loss": 0.0, "tokens": 0.0, "samples": 0, "region": 0, "start": time.time(), "steps": 0,
                          "aux": 0.0, "local_samples": 0}
            preempted = stops > 0 and step < total_steps
            stopping = (stop_after is not None and steps_this_run >= stop_after and step < total_steps) or preempted
            saving = (run.save_every_steps and step % run.save_every_steps == 0) or epoch_end or stopping
            if run.eval_every_steps:
                evaluation_due = step % run.eval_every_steps == 0 or step == total_steps
            else:  # with every checkpoint, so that each checkpoint knows the best model up to it
                evaluation_due = saving or step == total_steps
            if (validation is not None or run.eval_tasks) and evaluation_due and not preempted:
                evaluate(step)
            if saving:
                save(step)
            if stopping:
                why = "SIGTERM received" if preempted else f"stopping after {steps_this_run} steps of this invocation"
                logger.info("%s: saved step %d; resume with --resume %s", why, step, run_dir)
                return TrainResult(run_dir, step, total_steps, False, last_saved, None, last_loss, tracker.report())
        if saved_step != step:
            save(step)
        export_dir = _export(run_dir, lion, model, wrapped, ctx, fsdp) if cfg.run.export_final else None
        kinds = ctx.gather_objects(dict(tracker.kinds))
        merged: Counter[str] = Counter()
        for counts in kinds or []:
            merged.update(counts)
        result = TrainResult(run_dir, step, total_steps, True, last_saved, export_dir, last_loss,
                             {**record_report, **tracker.report(merged)})
        digests = None if fsdp else ctx.gather_objects(_digest(model))
        if ctx.is_main:
            summary = {"step": step, "total_steps": total_steps, "final_loss": last_loss,
                       "checkpoint": str(last_saved), "export": str(export_dir) if export_dir else None,
                       "world_size": ctx.world_size, "bad_data": result.bad, "best": best,
                       "replicas_identical": None if digests is None else len(set(digests)) == 1}
            if digests is not None and len(set(digests)) != 1:
                logger.error("the processes ended with different weights: %s", digests)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            logger.info("finished: %d steps; %d of %d records skipped at load, %d of %d drawn samples skipped; "
                        "model exported to %s", step, record_report["skipped_records"], record_report["records"],
                        tracker.bad, tracker.drawn, export_dir)
        finished = True
        return result
    finally:
        if progress is not None:
            progress.close()
        metrics.close(finished)


def _follow_time_budget(scheduler: WarmupCosineSchedule, spent_s: float, max_minutes: float, step: int,
                        total_steps: int) -> int:
    """`run.max_minutes`: move the schedule to the fraction of the budget spent when that is further along
    than the step count (a slow or shared machine still anneals in time); returns the run's total steps,
    cut to `step` once the budget is spent."""
    fraction = spent_s / (max_minutes * 60.0)
    by_time = min(scheduler.total_steps, int(fraction * scheduler.total_steps))
    if by_time > scheduler.step_count:
        scheduler.step_count = by_time
        scheduler.apply()
    if fraction >= 1.0 and step < total_steps:
        logger.info("run.max_minutes=%g spent at step %d of %d: finishing here", max_minutes, step, total_steps)
        return step
    return total_steps


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
                           state)


def _ship(bundle: Path, target: Path) -> None:
    """Copy an exported bundle to `target` in float16 (package data: small, readable by everyone), keeping
    the MODEL_CARD.md already there; written beside it, then swapped in."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    Lion.from_pretrained(bundle).save_pretrained(tmp, dtype=torch.float16)
    for file in tmp.rglob("*"):
        if file.is_file():
            file.chmod(0o644)  # safetensors writes 0600
    if (target / "MODEL_CARD.md").is_file():
        shutil.copy(target / "MODEL_CARD.md", tmp / "MODEL_CARD.md")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    logger.info("shipped the best model to %s", target)


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
    tmp = run_dir / f".tmp-{name}"
    state = None
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        was_training = model.training
        if state is None:
            Lion(model, lion.processor, lion.tagger, lion.generation_config).save_pretrained(tmp)
        else:
            from ..bundle import write_bundle_config
            from ..checkpoint_files import save_state_sharded

            tmp.mkdir(parents=True)
            write_bundle_config(model.config, tmp)  # as save_pretrained writes it
            aliases = ("language_model.encoder.embed_tokens.weight", "language_model.decoder.embed_tokens.weight")
            save_state_sharded({k: v for k, v in state.items() if k not in aliases}, tmp)
            lion.processor.save_pretrained(tmp)
            write_tagger(lion.tagger, tmp)
            lion.generation_config.save(tmp)  # decoding defaults and templates travel with the model
        if was_training:
            _train_mode(model)  # the frozen ViT back in eval mode too
        if info is not None:
            (tmp / "best.json").write_text(json.dumps(info, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        logger.info("exported the %s model to %s (load with Lion.from_pretrained)",
                    "trained" if name == "final" else name, final)
    ctx.barrier()
    return final
