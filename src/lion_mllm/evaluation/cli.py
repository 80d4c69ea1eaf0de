"""``lion eval``: argparse wiring for the evaluation harness.

The main ``lion`` command mounts it with::

    from lion_mllm.evaluation.cli import add_eval_subcommand
    add_eval_subcommand(subparsers)        # sets func=run_eval on the sub-parser
    ...
    args = parser.parse_args(); sys.exit(args.func(args))
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..devices import resolve_device
from ..model.tasks import SHORT_ANSWER_TEMPLATE
from ..model_options import add_model_options, decoding_from_args, model_from_args
from .tasks import ALIASES, BENCHMARKS

__all__ = ["add_eval_subcommand", "run_eval", "build_parser"]


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--task", required=False, metavar="NAME",
                   help=f"benchmark: {', '.join(BENCHMARKS)} (aliases: {', '.join(ALIASES)})")
    p.add_argument("--ann", nargs="+", metavar="FILE",
                   help="annotation file(s); VQAv2/OK-VQA: questions and annotations JSON (or annotations only)")
    p.add_argument("--images", metavar="DIR", default=None,
                   help="image folder the annotation's file names are relative to (not needed for MMBench)")
    # the options every model-loading `lion` command shares (--model --device --dtype --ram --tags, decoding)
    add_model_options(p, model_help="bundle directory, hf-hub:/local-dir: name, the authors' YAML or an installed "
                                    "name; omit to only re-score an existing predictions file")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", metavar="DIR", default="eval_out", help="report and predictions folder (default: eval_out)")
    p.add_argument("--predictions", metavar="FILE", default=None,
                   help="predictions JSON Lines (default: <out>/<task>[_<split>].predictions.jsonl)")
    p.add_argument("--prompt", default=None, help=f"prompt template overriding the task default, e.g. '{SHORT_ANSWER_TEMPLATE}'")
    p.add_argument("--split", default=None, help="Karpathy split (default test), IconQA problems.json split (default test) / split label for REC and POPE")
    p.add_argument("--box-format", choices=("auto", "xywh", "xyxy"), default="auto",
                   help="ground-truth bbox layout in REC files: xywh (COCO), xyxy (Shikra REC_*.jsonl) or auto "
                        "(the one under which every box fits its image; an error names the format to pass)")
    p.add_argument("--submission", action="store_true",
                   help="also write the evaluation server's file (<out>/<task>.submission.json/.xlsx); it is "
                        "written anyway for splits without public answers (MMBench test, TextCaps test, NoCaps, VisDial test)")
    p.add_argument("--protocol", default=None,
                   help="scoring protocol: vqav2/okvqa vqa2016 (default, the vqaEval.py LAVIS ships) or vqa2021 "
                        "(master); aokvqa_da allenai (default, official), lavis or vqa; see docs/evaluation.md")
    p.add_argument("--spice", choices=("auto", "on", "off"), default="auto", help="SPICE for captions (auto: if installed)")
    p.add_argument("--model-name", default=None, help="label of this model in the markdown tables")
    p.add_argument("--summarize", action="store_true",
                   help="only combine the *.report.json files in --out into <out>/summary.md and print it")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    return p


def add_eval_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command to an argparse ``subparsers`` object; returns it.

    The sub-parser's default ``func`` is `run_eval`.
    """
    p = subparsers.add_parser(
        "eval", help="evaluate a model on a benchmark (captioning, VQA, REC, POPE, MMBench)",
        description="Run a LION benchmark and write predictions, a JSON report and a paper-style markdown table.",
    )
    _configure(p)
    p.set_defaults(func=run_eval)
    return p


def build_parser() -> argparse.ArgumentParser:
    """Stand-alone parser (``python -m lion_mllm.evaluation.cli``)."""
    p = _configure(argparse.ArgumentParser(prog="lion eval"))
    p.set_defaults(func=run_eval)
    return p


def _maybe_init_distributed() -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if resolve_device(None) == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def _default_device(requested: str | None) -> str:
    """`requested`, else this process's GPU (its torchrun LOCAL_RANK) when there is one, else cpu."""
    if requested:
        return requested
    device = resolve_device(None)
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if device == "cuda" else device


def _model_generate_fn(args: argparse.Namespace):
    if args.model is None:
        def no_model(images, questions, tasks, **_):
            raise SystemExit(
                f"lion eval: {len(questions)}+ predictions are missing from the predictions file and no "
                "--model was given to generate them"
            )
        no_model.score_candidates = lambda images, prompts, candidates, tasks: no_model(images, prompts, tasks)
        return no_model
    args.device = _default_device(args.device)
    model = model_from_args(args)  # the model with its tagger and generation config, `--ram` attached

    def generate_fn(images, questions, tasks, **decoding):
        if args.tags is not None:
            decoding = {**decoding, "tags": [args.tags] * len(questions)}
        return model.generate(images, questions, tasks=tasks, **decoding)

    def score_candidates(images, prompts, candidates, tasks):
        # VisDial: rank the candidate answers by the model's log-likelihood of each.
        from .likelihood import candidate_log_likelihoods

        return candidate_log_likelihoods(model, images, prompts, candidates, tasks)

    generate_fn.score_candidates = score_candidates
    return generate_fn


def run_eval(args: argparse.Namespace) -> int:
    """Execute ``lion eval`` for parsed ``args``; returns the process exit code."""
    from .harness import evaluate
    from .report import summarize_reports

    if args.summarize:
        text = summarize_reports(args.out, model_label=args.model_name or "this run")
        with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as fh:
            fh.write(text)
        print(text)
        return 0
    if not args.task or not args.ann:
        print("lion eval: --task and --ann are required (or use --summarize)", file=sys.stderr)
        return 2
    decoding = decoding_from_args(args)  # only the flags given
    _maybe_init_distributed()
    report = evaluate(
        args.task,
        _model_generate_fn(args),
        args.ann if len(args.ann) > 1 else args.ann[0],
        args.images,
        limit=args.limit,
        batch_size=args.batch_size,
        predictions_path=args.predictions,
        prompt=args.prompt,
        decoding=decoding,
        out_dir=args.out,
        split=args.split,
        box_format=args.box_format,
        model_name=args.model_name or (os.path.basename(os.path.normpath(args.model)) if args.model else None),
        spice={"auto": None, "on": True, "off": False}[args.spice],
        progress=args.progress,
        protocol=args.protocol,
        submission=True if args.submission else None,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(report["markdown"])
        print(json.dumps({"task": report["task"], "split": report["split"], "metrics": report["metrics"],
                          "report": report.get("report_path")}, indent=2))
    return 0


if __name__ == "__main__":
    _args = build_parser().parse_args()
    sys.exit(_args.func(_args))
