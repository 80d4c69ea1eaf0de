"""Setting a run up: everything the loop needs (`TrainRun`), built in the order that fixes the random
generators -- model, objectives, optimizer, data, schedule, a checkpoint's state, then the processes'
seeds -- so that a resumed run continues exactly where it stopped."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml

from ..lion import Lion
from ..named_imports import STREAMS, load_named
from .bookkeeping import BadDataTracker, MetricsWriter
from .checkpoint import set_rng_state
from .config import ConfigError, DatasetSpec, RunConfig, TrainConfig
from .data import (
    AnnotationDataset,
    BadDataError,
    Collator,
    MixtureDataset,
    MixtureSampler,
    MixtureSchedule,
    StreamedBatches,
    load_tag_cache,
    to_device,
)
from .distributed import DistContext, wrap_ddp, wrap_fsdp2
from .objectives import TrainingForward, build_objectives
from .saving import objective_parameters, restore
from .stages import (
    STAGE_DESCRIPTIONS,
    WarmupCosineSchedule,
    build_lion,
    configure_trainable,
    is_trained_parameter,
    load_into,
    optimizer_param_groups,
    set_train_mode,
)
from .state import TrainRun
from .trackers import MlflowLogger, flat_params
from .validation import Validation

logger = logging.getLogger("lion_mllm.train")


def start_run(cfg: TrainConfig, ctx: DistContext, run_dir: Path, resume_point: Path | None, stop_after: int | None,
              stop_requested: Callable[[], bool]) -> TrainRun:
    """The run's state at its first step of this invocation: at `resume_point`'s when given."""
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
    state = TrainRun(cfg=cfg, ctx=ctx, run_dir=run_dir, fsdp=fsdp, autocast=autocast, lion=lion,
                     objectives=objectives, core=core, wrapped=wrapped, optimizer=optimizer, scheduler=scheduler,
                     tracker=tracker, record_report=record_report, validation=validation,
                     steps_per_epoch=steps_per_epoch, total_steps=total_steps, stop_after=stop_after,
                     stop_requested=stop_requested)
    schedule_state, saved_rng = restore(state, resume_point) if resume_point is not None else (None, None)
    state.schedule, source = _sample_source(state, datasets, schedule_state)
    state.dummy = to_device(Collator(lion.processor).dummy(), ctx.device)
    if resume_point is None:
        torch.manual_seed(run.seed + ctx.rank)  # dropout differs between processes, is reproducible
        if ctx.device.type == "cuda":
            torch.cuda.manual_seed(run.seed + ctx.rank)
    elif saved_rng is not None:
        set_rng_state(saved_rng)
    state.metrics, state.progress = _outputs(state, resumed=resume_point is not None)
    state.iterator = iter(source)  # after seeding: DataLoader workers start now
    state.start_clocks()
    return state


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
    set_train_mode(model)
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
    """AdamW over the authors' parameter groups, plus one group of the objectives' parameters."""
    groups = optimizer_param_groups(model, run.weight_decay, run.lr_scale, run.boost_lr_scale)
    if objectives:
        named = objective_parameters(objectives)
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


def _steps_per_epoch(cfg: TrainConfig, total_samples: int, world_size: int) -> int:
    if cfg.run.iters_per_epoch:
        return cfg.run.iters_per_epoch
    per_step = world_size * cfg.run.batch_size_train * cfg.run.accum_grad_iters
    return max(1, math.ceil(total_samples / per_step))


def _sample_source(state: TrainRun, datasets: list[AnnotationDataset], schedule_state: dict[str, Any] | None
                   ) -> tuple[MixtureSchedule | StreamedBatches, Iterable[dict[str, Any]]]:
    """Where the micro-batches come from, at `schedule_state` when resuming: the position to checkpoint
    and the micro-batches (iterate them after seeding: DataLoader workers start then)."""
    cfg, ctx, lion = state.cfg, state.ctx, state.lion
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


def _outputs(state: TrainRun, resumed: bool) -> tuple[MetricsWriter, Any]:
    """The metrics writer (with MLflow when `run.loggers` names it) and, on a terminal, a progress bar."""
    cfg, ctx, run_dir, step, run = state.cfg, state.ctx, state.run_dir, state.step, state.cfg.run
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

            progress = tqdm(total=state.total_steps, initial=step, desc=f"stage {run.stage}", dynamic_ncols=True)
        except ImportError:
            pass
    return metrics, progress


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
