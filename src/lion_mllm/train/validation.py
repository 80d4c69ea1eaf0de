"""Evaluation during training: the held-out loss, benchmark scores of the model being trained, and the
best model so far (by `run.best_metric`), exported before the checkpoint that records it."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from ..lion import Lion
from ..named_imports import VALIDATORS, load_named
from .config import AugmentConfig, EvalTaskSpec
from .data import AnnotationDataset, Collator, MixtureDataset, to_device
from .distributed import DistContext
from .objectives import token_loss_sum
from .saving import export
from .stages import set_train_mode
from .state import TrainRun

logger = logging.getLogger("lion_mllm.train")


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
                batch = to_device(collated["batch"], device) if collated["batch"] else dummy
                with autocast():
                    value = float(token_loss_sum(model, batch))
                if collated["batch"]:
                    loss_sum += value
                    tokens += float((collated["batch"]["labels"] != -100).sum())
                    samples += len(collated["batch"]["labels"])
        loss_sum, tokens, samples, skipped = self.ctx.all_reduce_sum([loss_sum, tokens, samples, skipped])
        return {"val_loss": loss_sum / tokens if tokens else float("nan"), "val_tokens": int(tokens),
                "val_samples": int(samples), "val_skipped": int(skipped)}


def evaluate(state: TrainRun) -> None:
    """Validation loss and task scores now; a new best (by run.best_metric) is exported to <run dir>/best
    before the checkpoint that records it, so a resumed run knows its best."""
    run, step, model = state.cfg.run, state.step, state.model
    result: dict[str, Any] = {}
    if state.validation is not None:
        result.update(state.validation.loss(model, state.ctx.device, state.autocast, state.dummy))
        logger.info("step %d validation loss %.4f on %d samples (%d tokens)", step, result["val_loss"],
                    result["val_samples"], result["val_tokens"])
    for task in run.eval_tasks:
        result.update(task_score(state, task))
    set_train_mode(model)
    value = result[run.best_metric]
    improved = _improves(value, state.best, lower_is_better=run.best_metric == "val_loss")
    if improved:
        state.best = {"step": step, "metric": run.best_metric, "value": value}
    best = state.best
    state.metrics.write({"step": step, "epoch": step / state.steps_per_epoch, **result, "time": time.time(),
                         "val_best": best["value"] if best else None})
    logger.info("step %d %s %.4f%s", step, run.best_metric, value, " - best so far" if improved else
                f"; best {best['value']:.4f} at step {best['step']}" if best else "")
    if improved and run.keep_best:
        export(state, name="best", info=best)


def _improves(value: float, best: dict[str, Any] | None, lower_is_better: bool) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best["value"] if lower_is_better else value > best["value"]


def task_score(state: TrainRun, task: EvalTaskSpec) -> dict[str, Any]:
    """A benchmark score of the model being trained, through the `lion eval` harness (which shards the
    questions over processes and gathers them), or through its own scorer when `VALIDATORS` names one.
    The model answers as `Lion.generate` does with its own generation config (the decoding defaults it is
    trained for), under the task's decoding. Reports go to <run dir>/eval/step_N/."""
    from ..evaluation.harness import evaluate as evaluate_benchmark

    lion, model, step, run_dir = state.lion, state.model, state.step, state.run_dir
    if task.task in VALIDATORS:
        return load_named(VALIDATORS, task.task, "validator")(task, lion, model, step)
    model.eval()
    # a Lion of its own: its decode engine (and cache) is dropped with it after the evaluation
    evaluator = Lion(model, lion.processor, lion.tagger, lion.generation_config)

    def generate_fn(images: list[Any], questions: list[str], tasks: list[str], **decoding: Any) -> list[str]:
        if task.tags is not None:
            decoding = {**decoding, "tags": [task.tags] * len(questions)}
        with torch.no_grad(), state.autocast():
            return evaluator.generate(images, questions, tasks=tasks, **decoding)

    report = evaluate_benchmark(task.task, generate_fn, task.ann, task.images, limit=task.limit,
                                batch_size=task.batch_size, decoding=task.decoding, box_format=task.box_format,
                                out_dir=run_dir / "eval" / f"step_{step:06d}", model_name=f"{run_dir.name} step {step}")
    primary = report["primary_metric"]
    value = float(report["metrics"].get(primary, float("nan")))
    logger.info("step %d %s %s %.4f on %d questions", step, task.task, primary, value, report["num_samples"])
    return {task.key: value, f"{task.key}_samples": report["num_samples"]}
