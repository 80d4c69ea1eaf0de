"""A run's state saved and restored (checkpoints: exact resume), and its model exported and shipped.

A checkpoint (`checkpoint.py` writes and reads its files) holds what the stage trains and the objectives,
AdamW's state, the schedule's step, the sample stream's position, every process's random generators and
the run's counters; restoring it makes the next step of a resumed run the one the uninterrupted run
would have taken. An export is a `Lion` bundle (`Lion.write_bundle`); shipping copies a complete run's
best model into the package.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..checkpoints.checkpoint_files import folder_written_whole
from ..errors import CheckpointError
from ..lion import Lion
from .checkpoint import list_checkpoints, load_checkpoint, rng_state, save_checkpoint
from .config import STAGE_VISUAL_INPUT
from .distributed import DistContext
from .stages import is_trained_parameter, set_train_mode
from .state import TrainRun

logger = logging.getLogger("lion_mllm.train")


def objective_parameters(objectives: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """The objectives' parameters by checkpoint name, `objectives.<name>.<parameter>`."""
    return {f"objectives.{name}.{key}": param for name, module in objectives.items()
            for key, param in module.named_parameters()}


# ----------------------------------------------------------------------------------------------------
# Saving


def save(state: TrainRun, elapsed_s: float) -> None:
    """A checkpoint of the current step, with the best so far and `elapsed_s`, the training time of every
    invocation (a later budget counts on from it)."""
    params, optimizer_state = _trained_state(state)
    rngs = state.ctx.gather_objects(rng_state())
    step, run_dir, ctx = state.step, state.run_dir, state.ctx
    path = run_dir / "checkpoints" / f"step_{step:06d}"
    if ctx.is_main:
        training_state = {"step": step, "epoch": step // state.steps_per_epoch,
                          "scheduler": state.scheduler.state_dict(), "schedule": state.schedule.state_dict(),
                          "rng": rngs, "world_size": ctx.world_size,
                          "bad": {"samples_skipped": state.tracker.bad, "samples_drawn": state.tracker.drawn},
                          "elapsed_s": elapsed_s}
        if state.best is not None:  # the best evaluation so far and its step: a resumed run keeps it
            training_state["best"] = dict(state.best)
        meta = {"stage": state.cfg.run.stage, "visual_input": STAGE_VISUAL_INPUT[state.cfg.run.stage],
                "epoch": step / state.steps_per_epoch, "world_size": ctx.world_size,
                "lr": state.scheduler.lr_at(step), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "config": str(run_dir / "config.yaml")}
        path = save_checkpoint(run_dir / "checkpoints", step, params, optimizer_state, training_state, meta,
                               state.cfg.run.keep_checkpoints)
        logger.info("checkpoint %s", path)
    ctx.barrier()
    state.last_saved, state.saved_step = path, step


def _trained_state(state: TrainRun) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What the run trains (the stage's parameters and the objectives') and the optimizer's state, whole
    (gathered from the shards under FSDP2)."""
    unfreeze = state.cfg.run.unfreeze
    if not state.fsdp:
        params = {n: p for n, p in state.model.named_parameters() if is_trained_parameter(n, unfreeze)}
        params.update(objective_parameters(state.objectives))  # trained, so saved (never exported)
        return params, state.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(state.wrapped, options=options)
    params = {k: v for k, v in full.items() if is_trained_parameter(k, unfreeze)}
    optimizer_state = get_optimizer_state_dict(state.wrapped, state.optimizer, options=options)
    # keep the group names (checked on resume) next to the FQN-keyed state
    for saved, group in zip(optimizer_state.get("param_groups", []), state.optimizer.param_groups):
        saved["names"] = group["names"]
    return params, optimizer_state


# ----------------------------------------------------------------------------------------------------
# Restoring


def restore(state: TrainRun, resume_point: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The checkpoint at `resume_point` restored into `state` (weights, optimizer, schedule, counters, the
    best so far, the position); returns the sample stream's state and this process's random generators,
    which the caller sets once the stream is made. Later checkpoints are set aside."""
    checkpoint = load_checkpoint(resume_point)
    _check_fits(state, checkpoint)
    _load_trained_state(state, checkpoint)
    training = checkpoint["training_state"]
    state.scheduler.load_state_dict(training["scheduler"])
    state.tracker.bad = int(training["bad"]["samples_skipped"])
    state.tracker.drawn = int(training["bad"]["samples_drawn"])
    state.step = state.first_step = state.saved_step = int(training["step"])
    state.last_saved = resume_point
    state.best = training.get("best")
    state.earlier_s = float(training.get("elapsed_s", 0.0))
    rng = _this_process_rng(training["rng"], state.ctx)
    logger.info("resumed from %s at step %d (lr %.3g)", resume_point, state.step, state.scheduler.lr_at(state.step))
    _set_aside_later_checkpoints(state.run_dir, state.step, state.ctx)
    return training["schedule"], rng


def _check_fits(state: TrainRun, checkpoint: dict[str, Any]) -> None:
    """The checkpoint holds exactly what this run trains, in the same optimizer groups."""
    params = checkpoint["lion_params"]
    expected = {n for n, _ in state.model.named_parameters() if is_trained_parameter(n, state.cfg.run.unfreeze)}
    expected |= set(objective_parameters(state.objectives))
    if set(params) != expected:
        missing, extra = sorted(expected - set(params)), sorted(set(params) - expected)
        raise CheckpointError(f"the checkpoint's parameters do not fit this model (another stage or size?): "
                              f"missing {missing[:3]}, unexpected {extra[:3]}")
    saved_names = [g["names"] for g in checkpoint["optimizer"]["param_groups"]]
    current_names = [g["names"] for g in state.optimizer.param_groups]
    if saved_names != current_names:
        raise CheckpointError("the trainable parameters changed since the checkpoint (run.freeze or stage?); "
                              "start a new run with model.init_from pointing at the checkpoint instead")


def _load_trained_state(state: TrainRun, checkpoint: dict[str, Any]) -> None:
    params = checkpoint["lion_params"]
    if state.fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(state.wrapped, params, options=options)
        set_optimizer_state_dict(state.wrapped, state.optimizer, checkpoint["optimizer"], options=options)
        return
    with torch.no_grad():
        named = {**dict(state.model.named_parameters()), **objective_parameters(state.objectives)}
        for name, tensor in params.items():
            named[name].copy_(tensor)
    state.optimizer.load_state_dict(checkpoint["optimizer"])


def _this_process_rng(rngs: list[dict[str, Any]], ctx: DistContext) -> dict[str, Any] | None:
    if len(rngs) != ctx.world_size:
        logger.warning("the checkpoint holds random states of %d processes, this run has %d: dropout "
                       "masks will differ from the original run", len(rngs), ctx.world_size)
    return rngs[ctx.rank] if ctx.rank < len(rngs) else None


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


# ----------------------------------------------------------------------------------------------------
# Exporting and shipping


def export(state: TrainRun, name: str = "final", info: dict[str, Any] | None = None) -> Path:
    """The model as a bundle (`Lion.write_bundle`) in <run dir>/<name>, written whole or not at all: the
    finished model (`final`) or the best so far (`best`, with `info` in its best.json)."""
    final = state.run_dir / name
    gathered = None
    if state.fsdp:  # every process gives its shards; the main process writes
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        gathered = get_model_state_dict(state.wrapped, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
    if state.ctx.is_main:
        was_training = state.model.training
        with folder_written_whole(final, replace=True) as partial:
            state.lion.write_bundle(partial, state=gathered)
            if info is not None:
                (partial / "best.json").write_text(json.dumps(info, indent=2) + "\n")
        if was_training:
            set_train_mode(state.model)  # the frozen ViT back in eval mode too
        logger.info("exported the %s model to %s (load with Lion.from_pretrained)",
                    "trained" if name == "final" else name, final)
    state.ctx.barrier()
    return final


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


def replicas_digest(model: torch.nn.Module) -> str:
    """sha256 of the trainable parameters' bytes: equal on every process of a healthy DDP run."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
