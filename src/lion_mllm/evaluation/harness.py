"""The evaluation harness: load a benchmark, query the model, save predictions, score.

``generate_fn(images, questions, tasks) -> answers`` is the model; ``tasks`` holds the
route of each query ("caption" | "vqa" | "grounding"; grounding selects LION's
region-level adapter route). Predictions are appended to a JSON Lines file after each
batch, so an interrupted run resumes where it stopped and re-scoring reuses them.
Under ``torch.distributed`` each rank answers samples ``rank::world_size`` and rank 0
gathers, scores and writes the report, which is then broadcast to every rank.
"""

from __future__ import annotations

import glob
import inspect
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..model.images import ImageLoadError
from .datasets import (
    AnnotationError,
    EvalSample,
    iter_jsonl,
    load_aokvqa,
    load_captions,
    load_generic_vqa,
    load_gqa,
    load_iconqa,
    load_mmbench,
    load_pope,
    load_rec,
    load_visdial,
    load_vqa_pair,
    load_vsr,
)
from .metrics_caption import check_java
from .report import render_markdown
from .scorers import score_task
from .submissions import SUBMISSION_FORMATS, write_submission
from .tasks import get_task, infer_split, set_protocol

__all__ = ["evaluate", "load_task_samples", "render_prompt", "read_predictions", "GenerateFn", "ScoreFn"]

GenerateFn = Callable[[list[Any], list[str], list[str]], list[str]]
# (images, prompts, candidate answers per query, tasks) -> one score per candidate (higher = better),
# e.g. `likelihood.candidate_log_likelihoods`: the generative ranking of VisDial's 100 answers.
ScoreFn = Callable[[list[Any], list[str], list[list[str]], list[str]], list[list[float]]]
PathArg = str | os.PathLike | Sequence[str | os.PathLike]


def load_task_samples(
    spec: Mapping[str, Any], annotation_path: PathArg, image_root: str | os.PathLike | None, *,
    split: str | None = None, box_format: str = "auto",
) -> list[EvalSample]:
    """Run the loader of task ``spec`` on ``annotation_path``."""
    loader = spec["loader"]
    paths = [annotation_path] if isinstance(annotation_path, (str, os.PathLike)) else list(annotation_path)
    for p in paths:
        # IconQA may be given as a folder of its release.
        if not (os.path.isfile(p) or (loader == "iconqa" and os.path.isdir(p))):
            raise FileNotFoundError(f"annotation file not found: {p}")
    if loader == "vqa_pair":
        return load_vqa_pair(paths if len(paths) > 1 else paths[0], image_root)
    if loader == "visdial":
        return load_visdial(paths if len(paths) > 1 else paths[0], image_root)
    if len(paths) != 1:
        raise ValueError(f"task {spec['name']!r} takes one annotation file, got {len(paths)}")
    path = paths[0]
    if loader == "captions":
        return load_captions(path, image_root, split=split or "test")
    if loader == "rec":
        return load_rec(path, image_root, box_format=box_format)
    if loader == "iconqa":
        return load_iconqa(path, image_root, split=split or "test")
    simple = {"gqa": load_gqa, "aokvqa": load_aokvqa, "generic_vqa": load_generic_vqa, "vsr": load_vsr,
              "pope": load_pope, "mmbench": load_mmbench}
    return simple[loader](path, image_root)


def render_prompt(template: str, sample: EvalSample) -> str:
    """Fill ``template`` with the sample's fields; unknown placeholders raise a clear error."""
    try:
        return template.format_map(sample.fields)
    except KeyError as exc:
        raise KeyError(
            f"prompt template {template!r} uses {{{exc.args[0]}}} but this task provides only "
            f"{sorted(sample.fields)}"
        ) from None


def _apply_limit(samples: list[EvalSample], limit: int | None) -> list[EvalSample]:
    """Keep the first ``limit`` questions; MMBench rotations of one question stay together."""
    if limit is None:
        return samples
    if limit < 0:
        raise ValueError("limit must be >= 0")
    kept: list[EvalSample] = []
    groups: set[str] = set()
    for s in samples:
        g = s.meta.get("group_id", s.id)
        if g not in groups:
            if len(groups) == limit:
                break
            groups.add(g)
        kept.append(s)
    return kept


def read_predictions(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read a predictions JSON Lines file (id -> record), plus leftover rank part files.

    A malformed line raises `AnnotationError` with file and line, except a truncated
    *last* line (a write interrupted by a crash), which is dropped with a warning.
    """
    out: dict[str, dict[str, Any]] = {}
    files = [os.fspath(path)] + sorted(glob.glob(glob.escape(os.fspath(path)) + ".rank*"))
    for f in files:
        if not os.path.isfile(f):
            continue
        for lineno, rec in iter_jsonl(f, resumable=True):
            if "id" not in rec or not isinstance(rec.get("prediction"), str):
                raise AnnotationError(f"{f}:{lineno}: malformed prediction line (needs an object with 'id' and a "
                                      "string 'prediction')")
            out[str(rec["id"])] = rec
    return out


def _write_predictions(path: str, records: Mapping[str, Mapping[str, Any]]) -> None:
    """Rewrite `path` with `records` alone (atomically), and fold in the rank part files: they are in
    `records` now."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in records.values():
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    for part in glob.glob(glob.escape(path) + ".rank*"):
        os.remove(part)


def _decoding_kwargs(fn: Callable, decoding: Mapping[str, Any]) -> dict[str, Any]:
    """The decoding settings ``fn`` can take as keyword arguments.

    A plain ``fn(images, questions, tasks)`` gets none (settings are then only
    recorded); one with ``**kwargs`` gets all; otherwise the matching names.
    """
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(decoding)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in decoding.items() if k in names}


def _dist_info() -> tuple[int, int]:
    try:
        import torch.distributed as dist
    except ImportError:  # torch is a dependency, but keep scoring usable without it
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _record(sample: EvalSample, task: str, split: str | None, prompt: str, prediction: str | None,
            **extra: Any) -> dict[str, Any]:
    """One line of the predictions file."""
    return {"id": sample.id, "task": task, "split": split, "prompt": prompt, "prediction": prediction, **extra}


def _readable_batches(
    samples: Sequence[EvalSample], prompts: Mapping[str, str], batch_size: int, task: str, split: str | None,
    out: dict[str, dict[str, Any]], progress: bool = False,
) -> Iterator[tuple[list[EvalSample], list[Any], list[str]]]:
    """Batches of (samples, their images, their prompts); samples whose image does not load go into `out`
    as skipped records instead (never written to the predictions file, so a re-run tries them again)."""
    starts: Iterable[int] = range(0, len(samples), batch_size)
    if progress:
        try:
            from tqdm import tqdm

            starts = tqdm(starts, desc=f"lion eval {task}", unit="batch")
        except ImportError:
            pass
    for start in starts:
        batch, images = [], []
        for sample in samples[start:start + batch_size]:
            try:
                images.append(sample.load_image())
                batch.append(sample)
            except ImageLoadError as error:
                out[sample.id] = _record(sample, task, split, prompts[sample.id], None, skipped=str(error))
        if batch:
            yield batch, images, [prompts[s.id] for s in batch]


def _generate(
    samples: Sequence[EvalSample], prompts: Mapping[str, str], generate_fn: GenerateFn, route: str,
    batch_size: int, decoding: Mapping[str, Any], task: str, split: str | None, sink: str | None,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    kwargs = _decoding_kwargs(generate_fn, decoding)
    out: dict[str, dict[str, Any]] = {}
    for batch, images, questions in _readable_batches(samples, prompts, batch_size, task, split, out, progress):
        answers = generate_fn(images, questions, [route] * len(batch), **kwargs)
        if not isinstance(answers, (list, tuple)) or len(answers) != len(batch):
            raise RuntimeError(
                f"generate_fn returned {type(answers).__name__} of length "
                f"{len(answers) if hasattr(answers, '__len__') else '?'} for a batch of {len(batch)}"
            )
        recs = []
        for s, q, a in zip(batch, questions, answers):
            if not isinstance(a, str):
                raise RuntimeError(f"generate_fn returned a {type(a).__name__} for sample {s.id!r}; expected str")
            recs.append(_record(s, task, split, q, a))
        _keep(out, sink, recs)
    return out


def _keep(out: dict[str, dict[str, Any]], sink: str | None, records: Sequence[dict[str, Any]]) -> None:
    """Add a batch's records to `out` and append them to the predictions file: flushed per batch, so a
    crash loses at most the current batch."""
    out.update((rec["id"], rec) for rec in records)
    if sink is not None:
        with open(sink, "a", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _rank_candidates(
    samples: Sequence[EvalSample], prompts: Mapping[str, str], score_fn: ScoreFn, route: str, batch_size: int,
    task: str, split: str | None, sink: str | None,
) -> dict[str, dict[str, Any]]:
    """Score every candidate answer of each sample; records carry the scores and the best candidate."""
    out: dict[str, dict[str, Any]] = {}
    for batch, images, questions in _readable_batches(samples, prompts, batch_size, task, split, out):
        candidates = [list(s.target["candidates"]) for s in batch]
        scores = score_fn(images, questions, candidates, [route] * len(batch))
        if not isinstance(scores, (list, tuple)) or len(scores) != len(batch):
            raise RuntimeError(f"score_fn returned {len(scores) if hasattr(scores, '__len__') else '?'} score lists "
                               f"for a batch of {len(batch)}")
        recs = []
        for s, q, cands, row in zip(batch, questions, candidates, scores):
            row = [float(v) for v in row]
            if len(row) != len(cands):
                raise RuntimeError(f"score_fn returned {len(row)} scores for the {len(cands)} candidates of {s.id!r}")
            best = max(range(len(row)), key=lambda i: (row[i], -i))
            recs.append(_record(s, task, split, q, cands[best], scores=row))
        _keep(out, sink, recs)
    return out


@dataclass
class _Run:
    """One evaluation, resolved: the task, its samples and prompts, and where the answers are kept."""

    spec: dict[str, Any]
    annotation_paths: list[str | os.PathLike]
    image_root: str | os.PathLike | None
    samples: list[EvalSample]
    split: str | None
    template: str
    decoding: dict[str, Any]
    prompts: dict[str, str]
    stem: str
    out_dir: str | os.PathLike | None
    pred_path: str | None
    existing: dict[str, dict[str, Any]]
    rank: int
    world: int

    @property
    def sink(self) -> str | None:
        """The file this rank appends its new predictions to."""
        if not self.pred_path:
            return None
        return self.pred_path if self.world == 1 else f"{self.pred_path}.rank{self.rank}"


def evaluate(
    task_name: str,
    generate_fn: GenerateFn,
    annotation_path: PathArg,
    image_root: str | os.PathLike | None,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    predictions_path: str | os.PathLike | None = None,
    prompt: str | None = None,
    decoding: Mapping[str, Any] | None = None,
    out_dir: str | os.PathLike | None = None,
    split: str | None = None,
    box_format: str = "auto",
    model_name: str | None = None,
    spice: bool | None = None,
    progress: bool = False,
    protocol: str | None = None,
    score_fn: ScoreFn | None = None,
    submission: bool | None = None,
) -> dict[str, Any]:
    """Evaluate a model on one benchmark and return the report.

    Args:
        task_name: a key of `tasks.BENCHMARKS` (e.g. "vqav2", "coco_caption", "refcoco",
            "pope_adversarial", "mmbench").
        generate_fn: ``(images: list[PIL.Image], questions: list[str], tasks: list[str])
            -> list[str]``; it also receives the decoding settings as keyword arguments
            when its signature accepts them.
        annotation_path: the benchmark's annotation file (VQAv2/OK-VQA: questions and
            annotations files, or the annotations file alone).
        image_root: folder the annotation's image names are relative to (None for
            MMBench, whose TSV embeds the images).
        limit: only the first ``limit`` questions (MMBench: base questions).
        batch_size: queries per ``generate_fn`` call.
        predictions_path: JSON Lines file of predictions; ids already present are not
            generated again. Default: ``<out_dir>/<task>[_<split>].predictions.jsonl``
            when ``out_dir`` is given, else predictions are kept in memory only.
        prompt: template overriding the task's default (fields as in `tasks.PROMPT_FIELDS`).
        decoding: settings merged over the task's defaults (num_beams, max_new_tokens, ...).
        out_dir: where ``<stem>.report.json`` and ``<stem>.report.md`` are written.
        split: caption split for Karpathy files (default "test"), or the split label
            of REC/POPE reports (default: inferred from the file name).
        box_format: ground-truth box layout of REC files: "xywh", "xyxy", or "auto" (the one
            under which every box fits its image; ambiguous files and misfits are errors).
        model_name: label for the report and its markdown tables.
        spice: SPICE for captions (None = only if its models are installed).
        progress: show a tqdm progress bar.
        score_fn: ranks candidate answers (VisDial): ``(images, prompts, candidates, tasks) ->
            scores``; without it, ``generate_fn.score_candidates`` is used when present.
        submission: write the evaluation server's file (``<out_dir>/<stem>.submission.json`` or
            ``.xlsx``, see `submissions`); None = only when the annotation has no ground truth.
        protocol: scoring protocol of tasks that have several (vqav2/okvqa: "vqa2016" (default)
            or "vqa2021"; aokvqa_da: "allenai" (default), "lavis" or "vqa"); reported.

    Returns:
        The report dict (also on non-zero ranks under torch.distributed), with
        ``metrics``, ``primary_metric``, ``paper`` numbers and ``markdown``.
    """
    started = time.time()
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    run = _plan(task_name, annotation_path, image_root, limit=limit, split=split, box_format=box_format,
                prompt=prompt, decoding=decoding, protocol=protocol, predictions_path=predictions_path,
                out_dir=out_dir)
    new = _gathered(_answer(run, generate_fn, score_fn, batch_size, progress), run.world)
    report: dict[str, Any] | None = None
    failure: Exception | None = None
    if run.rank == 0:
        try:
            report = _report(run, new, limit=limit, spice=spice, submission=submission, model_name=model_name,
                             started=started)
        except Exception as exc:
            if run.world == 1:
                raise
            failure = exc  # told to the other ranks, which wait for the report
    return _shared_report(report, failure, run.rank, run.world)


def _plan(task_name: str, annotation_path: PathArg, image_root: str | os.PathLike | None, *, limit: int | None,
          split: str | None, box_format: str, prompt: str | None, decoding: Mapping[str, Any] | None,
          protocol: str | None, predictions_path: str | os.PathLike | None,
          out_dir: str | os.PathLike | None) -> _Run:
    """Load the task's samples and the predictions already made for it; fail early on what would only
    fail after generating (another task's predictions file, no Java for the caption scorers)."""
    spec = set_protocol(get_task(task_name), protocol)
    samples = _apply_limit(
        load_task_samples(spec, annotation_path, image_root, split=split, box_format=box_format), limit
    )
    report_split = split or infer_split(spec, annotation_path)
    template = prompt if prompt is not None else spec["prompt"]
    prompts = {s.id: render_prompt(template, s) for s in samples}
    stem = spec["name"] + (f"_{report_split}" if report_split else "")
    if predictions_path is None and out_dir is not None:
        predictions_path = os.path.join(os.fspath(out_dir), f"{stem}.predictions.jsonl")
    rank, world = _dist_info()
    pred_path = os.fspath(predictions_path) if predictions_path is not None else None
    existing = _existing_predictions(pred_path, spec["name"], report_split)
    if spec["kind"] == "caption" and rank == 0 and any(s.target for s in samples):
        check_java()  # fail before generating for an hour, not after (test splits are not scored here)
    if pred_path and rank == 0 and world == 1 and existing:
        _write_predictions(pred_path, existing)  # drops a truncated tail, folds in part files, before appending
    paths = [annotation_path] if isinstance(annotation_path, (str, os.PathLike)) else list(annotation_path)
    return _Run(spec, paths, image_root, samples, report_split, template, {**spec["decoding"], **(decoding or {})},
                prompts, stem, out_dir, pred_path, existing, rank, world)


def _existing_predictions(pred_path: str | None, task: str, split: str | None) -> dict[str, dict[str, Any]]:
    if not pred_path:
        return {}
    os.makedirs(os.path.dirname(os.path.abspath(pred_path)), exist_ok=True)
    existing = read_predictions(pred_path)
    foreign = next((r for r in existing.values() if r.get("task", task) != task or r.get("split", split) != split),
                   None)
    if foreign is not None:
        # Ids repeat across benchmarks and splits (POPE question ids 1..3000 in every
        # split): reusing another run's answers would silently corrupt the score.
        raise ValueError(
            f"{pred_path} holds predictions of task {foreign.get('task')!r} split {foreign.get('split')!r}, "
            f"not {task!r} split {split!r}; use another predictions file"
        )
    return existing


def _answer(run: _Run, generate_fn: GenerateFn, score_fn: ScoreFn | None, batch_size: int,
            progress: bool) -> dict[str, dict[str, Any]]:
    """This rank's new predictions: its share of the samples not answered yet."""
    spec = run.spec
    todo = [s for s in run.samples[run.rank::run.world] if s.id not in run.existing]
    if spec["kind"] != "visdial":
        return _generate(todo, run.prompts, generate_fn, spec["route"], batch_size, run.decoding, spec["name"],
                         run.split, run.sink, progress)
    if not todo:
        return {}
    ranker = score_fn or getattr(generate_fn, "score_candidates", None)
    if ranker is None:
        raise ValueError(f"task {spec['name']!r} ranks candidate answers: pass score_fn (e.g. "
                         "lion_mllm.evaluation.likelihood.candidate_log_likelihoods) or an existing predictions file")
    return _rank_candidates(todo, run.prompts, ranker, spec["route"], batch_size, spec["name"], run.split, run.sink)


def _gathered(new: dict[str, dict[str, Any]], world: int) -> dict[str, dict[str, Any]]:
    """Every rank's new predictions, on every rank."""
    if world == 1:
        return new
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, new)
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        merged.update(part or {})
    return merged


def _report(run: _Run, new: dict[str, dict[str, Any]], *, limit: int | None, spice: bool | None,
            submission: bool | None, model_name: str | None, started: float) -> dict[str, Any]:
    """Score the predictions and write the report (rank 0)."""
    merged = {**run.existing, **new}
    if run.pred_path and run.world > 1:
        _write_predictions(run.pred_path, merged)
    samples, skipped = _scorable(run.samples, merged)
    metrics, notes = score_task(run.spec, samples, {s.id: merged[s.id]["prediction"] for s in samples}, spice=spice,
                                candidate_scores={s.id: merged[s.id].get("scores") for s in samples})
    stale = sum(1 for s in samples
                if s.id in run.existing and run.existing[s.id].get("prompt") not in (None, run.prompts[s.id]))
    if stale:
        notes.append(f"{stale} reused predictions were generated with a different prompt")
    if skipped:
        notes.append(f"{len(skipped)} samples skipped (unreadable images) and left out of the scores, "
                     f"e.g. {next(iter(skipped.values()))}")
    # Splits without public answers (metrics empty) get the evaluation server's file.
    want_submission = submission if submission is not None else (
        not metrics and run.spec["kind"] in SUBMISSION_FORMATS)
    submission_path = _write_submission(run, samples, merged, notes) if want_submission else None
    report = {
        "task": run.spec["name"], "benchmark": run.spec["benchmark"], "split": run.split, "model": model_name,
        "annotation": [os.fspath(p) for p in run.annotation_paths],
        "annotation_name": os.path.basename(os.fspath(run.annotation_paths[-1])),
        "image_root": os.fspath(run.image_root) if run.image_root is not None else None,
        "num_samples": len(samples), "num_generated": len(new),
        "num_reused": sum(1 for s in samples if s.id in run.existing),
        "num_skipped": len(skipped), "skipped": dict(list(skipped.items())[:20]), "limit": limit,
        "route": run.spec["route"], "prompt": run.template, "decoding": run.decoding,
        "primary_metric": run.spec["primary"], "protocol": run.spec.get("protocol"), "metrics": metrics,
        "paper": run.spec["paper"], "notes": notes, "predictions_path": run.pred_path,
        "submission_path": submission_path, "world_size": run.world, "time_s": round(time.time() - started, 3),
    }
    report["markdown"] = render_markdown([report], model_label=model_name or "this run")
    if run.out_dir is not None:
        report["report_path"] = _write_report(report, os.path.join(os.fspath(run.out_dir), run.stem))
    return report


def _scorable(samples: list[EvalSample], merged: dict[str, dict[str, Any]]
              ) -> tuple[list[EvalSample], dict[str, str]]:
    """The samples to score, and the skipped ones (unreadable images: id -> why), which are scored without,
    counted and named in the report. Raises when a sample has no prediction or none is left to score."""
    missing = [s.id for s in samples if s.id not in merged]
    if missing:
        raise RuntimeError(f"{len(missing)} samples have no prediction, e.g. {missing[:3]}")
    skipped = {s.id: merged.pop(s.id)["skipped"] for s in samples if merged[s.id].get("skipped")}
    if skipped:
        samples = [s for s in samples if s.id not in skipped]
        if not samples:
            raise RuntimeError(f"every sample's image was unreadable, e.g. {next(iter(skipped.values()))}")
    return samples, skipped


def _write_submission(run: _Run, samples: list[EvalSample], merged: Mapping[str, Mapping[str, Any]],
                      notes: list[str]) -> str:
    if run.out_dir is None:
        raise ValueError("a submission file is written into out_dir; pass out_dir (lion eval --out)")
    os.makedirs(run.out_dir, exist_ok=True)
    path = write_submission(run.spec, samples, merged, os.fspath(run.annotation_paths[0]),
                            os.path.join(os.fspath(run.out_dir), run.stem))
    notes.append(f"submission file ({SUBMISSION_FORMATS[run.spec['kind']][1]}): {path}")
    return path


def _write_report(report: Mapping[str, Any], base: str) -> str:
    """`<base>.report.json` (without the markdown) and `<base>.report.md`; the JSON file's path."""
    os.makedirs(os.path.dirname(base), exist_ok=True)
    with open(base + ".report.json", "w", encoding="utf-8") as fh:
        json.dump({k: v for k, v in report.items() if k != "markdown"}, fh, indent=2, ensure_ascii=False)
    with open(base + ".report.md", "w", encoding="utf-8") as fh:
        fh.write(report["markdown"])
    return base + ".report.json"


def _shared_report(report: dict[str, Any] | None, failure: Exception | None, rank: int, world: int
                   ) -> dict[str, Any]:
    """Rank 0's report on every rank; rank 0's scoring failure raised on every rank (instead of the others
    hanging in the broadcast)."""
    if world > 1:
        import torch.distributed as dist

        box: list[Any] = [report, None if failure is None else f"rank 0 failed while scoring: {failure!r}"]
        dist.broadcast_object_list(box, src=0)
        report, error = box
        if error is not None:
            if failure is not None:
                raise failure
            raise RuntimeError(error)
    assert report is not None
    return report
