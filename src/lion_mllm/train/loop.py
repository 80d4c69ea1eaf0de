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

This module is the loop, top to bottom: `train` (the run directory, its lock, the log, SIGTERM), then
`_train` (set up, step, log, evaluate and save, finish). Its pieces live beside it: `startup` (building
the run's state, `TrainRun`), `bookkeeping` (unusable data, metrics, progress lines, summaries),
`validation` (held-out loss, task scores, the best model), `saving` (checkpoints, exports, shipping),
`rundir` and `preemption` (the run directory's lock, SIGTERM).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .bookkeeping import log_progress, setup_logging, write_summary, write_training_record
from .config import TrainConfig
from .data import StreamedBatches, to_device
from .distributed import DistContext, gradient_sync, init_distributed
from .objectives import token_loss_sum
from .preemption import sigterm_requests_a_stop
from .rundir import RunLock, choose_run_dir, lock_run_dir
from .saving import export, replicas_digest, save, ship_run
from .startup import start_run
from .state import TrainRun
from .validation import evaluate

__all__ = ["TrainResult", "ship_run", "train"]

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
        run_dir, resume_point = choose_run_dir(cfg, ctx, resume)
        lock, lock_note = lock_run_dir(run_dir, ctx)
        handlers = setup_logging(run_dir, ctx)
        if lock_note is not None:
            logger.warning("%s", lock_note)
        if ctx.is_main:
            for note in cfg.notes:
                logger.warning("config: %s", note)
            if cfg.resume_from is not None and resume == cfg.resume_from:
                logger.info("run.resume_ckpt_path: resuming from %s", resume_point)
        with sigterm_requests_a_stop() as stop_requested:
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


def _train(cfg: TrainConfig, ctx: DistContext, run_dir: Path, resume_point: Path | None,
           stop_after: int | None, stop_requested: Callable[[], bool] = lambda: False) -> TrainResult:
    state = start_run(cfg, ctx, run_dir, resume_point, stop_after, stop_requested)
    finished = False
    try:
        while state.step < state.total_steps:
            stops = _train_step(state)
            epoch_end = state.step % state.steps_per_epoch == 0
            if state.step % cfg.run.print_freq == 0 or state.step == state.total_steps or epoch_end:
                log_progress(state)
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
# One step


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
        batch = to_device(m["batch"], state.ctx.device) if m["batch"] else state.dummy
        weight = 1.0 if m["batch"] else 0.0  # an empty micro-batch still joins the all-reduce
        with gradient_sync(state.wrapped, index == accum - 1):
            with state.autocast():
                loss_sum, aux = state.wrapped(**batch) if state.core is not None else (
                    token_loss_sum(state.wrapped, batch), None)
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


# ----------------------------------------------------------------------------------------------------
# After a step: evaluation, checkpoints, stopping


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
        evaluate(state)
    if saving:
        save(state, _wall_seconds(state))
    if not stopping:
        return None
    if out_of_time:
        write_summary(state, complete=False, wall_seconds=_wall_seconds(state))
        logger.info("incomplete: run.max_minutes=%g spent at step %d of %d; saved, not shipped; resume with "
                    "--resume %s (and a larger run.max_minutes) to finish the same schedule", run.max_minutes,
                    step, total_steps, state.run_dir)
    else:
        why = "SIGTERM received" if preempted else f"stopping after {state.steps_this_run} steps of this invocation"
        logger.info("%s: saved step %d; resume with --resume %s", why, step, state.run_dir)
    return TrainResult(state.run_dir, step, total_steps, False, state.last_saved, None, state.last_loss,
                       state.tracker.report())


def _budget_spent(state: TrainRun) -> bool:
    """`run.max_minutes`: whether the training wall time of all invocations has reached the budget. The
    budget never changes the schedule (a function of the step alone); it stops the run, incomplete."""
    budget = state.cfg.run.max_minutes
    return budget is not None and _wall_seconds(state) >= budget * 60.0


def _wall_seconds(state: TrainRun) -> float:
    """Training wall time so far, over every invocation of the run (earlier ones from the checkpoint)."""
    return state.earlier_s + time.time() - state.started


# ----------------------------------------------------------------------------------------------------
# The end of the schedule


def _finish(state: TrainRun) -> TrainResult:
    """The end of the schedule: the last checkpoint, the exported model, summary.json and training.json, and
    with `run.ship_best_to` the best model shipped (a complete run only)."""
    ctx, step = state.ctx, state.step
    if state.saved_step != step:
        save(state, _wall_seconds(state))
    export_dir = export(state) if state.cfg.run.export_final else None
    kinds = ctx.gather_objects(dict(state.tracker.kinds))
    merged: Counter[str] = Counter()
    for counts in kinds or []:
        merged.update(counts)
    result = TrainResult(state.run_dir, step, state.total_steps, True, state.last_saved, export_dir, state.last_loss,
                         {**state.record_report, **state.tracker.report(merged)})
    digests = None if state.fsdp else ctx.gather_objects(replicas_digest(state.model))
    if ctx.is_main:
        if digests is not None and len(set(digests)) != 1:
            logger.error("the processes ended with different weights: %s", digests)
        write_summary(state, complete=True, wall_seconds=_wall_seconds(state),
                      export=str(export_dir) if export_dir else None, bad_data=result.bad,
                      replicas_identical=None if digests is None else len(set(digests)) == 1)
        write_training_record(state, _wall_seconds(state))
        logger.info("finished: %d steps; %d of %d records skipped at load, %d of %d drawn samples skipped; "
                    "model exported to %s", step, state.record_report["skipped_records"],
                    state.record_report["records"], state.tracker.bad, state.tracker.drawn, export_dir)
        if state.cfg.run.ship_best_to is not None:
            ship_run(state.run_dir, state.cfg.run.ship_best_to)
    return result
