"""`python -m lion_mllm.shapes train-data DIR` / `benchmarks DIR` / `score MODEL` / `examples DIR`: the worked
example of the training and evaluation docs, the model card's scores and the demo's examples."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .dataset import write_benchmarks, write_dataset, write_examples
from .scoring import score_pipeline
from .world import HELD_OUT_SEED_BASE


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lion_mllm.shapes train-data DIR --scenes N` / `benchmarks DIR --count N` / `score MODEL` /
    `examples DIR`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lion_mllm.shapes",
                                     description="The synthetic shapes world: training data, benchmarks, scores.")
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("train-data", help="write images + a JSON Lines training file for `lion train`")
    data.add_argument("directory", type=Path)
    data.add_argument("--scenes", type=int, default=2000)
    data.add_argument("--first-seed", type=int, default=0, help=f"scene seeds from here (< {HELD_OUT_SEED_BASE})")
    data.add_argument("--vqa-per-image", type=int, default=2)
    data.add_argument("--rec-per-image", type=int, default=2)
    bench = commands.add_parser("benchmarks", help="write held-out REC / VQA / caption files for `lion eval`")
    bench.add_argument("directory", type=Path)
    bench.add_argument("--count", type=int, default=200)
    bench.add_argument("--first-seed", type=int, default=HELD_OUT_SEED_BASE + 10_000)
    examples = commands.add_parser("examples", help="choose the demo's example scenes for a model (lion demo)")
    examples.add_argument("directory", type=Path, help="e.g. src/lion_mllm/assets/examples")
    examples.add_argument("--model", default="lion-shapes")
    examples.add_argument("--first-seed", type=int, default=HELD_OUT_SEED_BASE + 20_000)
    score = commands.add_parser("score", help="held-out REC Acc@0.5, VQA exact match, caption object-set match "
                                "(through Lion.generate, float32 on CPU)")
    score.add_argument("model", help="a bundle directory or an installed name (lion-shapes)")
    score.add_argument("--count", type=int, default=500)
    score.add_argument("--first-seed", type=int, default=HELD_OUT_SEED_BASE + 10_000)
    score.add_argument("--record", action="store_true",
                       help="write the scores into the bundle's training.json (`held_out`: what its card states)")
    args = parser.parse_args(argv)
    if args.command == "train-data":
        if args.first_seed + args.scenes > HELD_OUT_SEED_BASE:
            parser.error(f"training seeds must stay below the held-out seeds ({HELD_OUT_SEED_BASE})")
        path = write_dataset(args.directory, range(args.first_seed, args.first_seed + args.scenes),
                             num_objects=(1, 2, 2, 3, 3, 4, 4), vqa_per_image=args.vqa_per_image,
                             rec_per_image=args.rec_per_image)
        print(f"{sum(1 for _ in path.open())} records of {args.scenes} scenes: ann_path {path}, "
              f"vis_root {args.directory}")
    elif args.command == "examples":
        if args.first_seed < HELD_OUT_SEED_BASE:
            parser.error(f"example seeds must be held out (>= {HELD_OUT_SEED_BASE})")
        from .. import load_model

        for entry in write_examples(args.directory, load_model(args.model), args.first_seed):
            print(json.dumps(entry))
    elif args.command == "benchmarks":
        if args.first_seed < HELD_OUT_SEED_BASE:
            parser.error(f"benchmark seeds must be held out (>= {HELD_OUT_SEED_BASE})")
        for kind, path in write_benchmarks(args.directory, range(args.first_seed, args.first_seed + args.count)
                                           ).items():
            print(f"{kind}: {path}")
    else:
        import torch

        from .. import load_model
        from ..checkpoints.hub import resolve_model

        record = Path(resolve_model(args.model)) / "training.json" if args.record else None
        if record is not None and not record.is_file():
            parser.error(f"--record: {record} does not exist (a bundle shipped by lion train has it)")
        torch.set_flush_denormal(True)  # a small model trained on CPU: denormals would slow it ~2x
        lion = load_model(args.model)
        # Through Lion.generate in the dtype load_model gives (float32 on CPU): what users run.
        metrics = score_pipeline(lion, count=args.count, start=args.first_seed)
        print(json.dumps(metrics))
        if record is not None:
            write_held_out(record, metrics, torch.get_num_threads())
    return 0


def write_held_out(record: Path, metrics: dict, threads: int) -> None:
    """`held_out` of a training.json: the scores of `score_pipeline` rounded to 4 places, the scenes they
    came from, which scenes each task got right, and the thread count they were computed with."""
    data = json.loads(record.read_text())
    data["held_out"] = {"count": metrics["count"], "first_seed": metrics["first_seed"],
                        "rec": round(metrics["rec_acc50"], 4), "vqa": round(metrics["vqa_exact"], 4),
                        "caption": round(metrics["caption_objects"], 4), "dtype": metrics["dtype"],
                        "path": metrics["path"], "threads": threads, "correct": metrics["correct"]}
    record.write_text(json.dumps(data, indent=2) + "\n")

