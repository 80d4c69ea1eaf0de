"""`lion demo`: the built-in `lion-shapes` model on bundled example images, offline.

    lion demo                 # caption, a question and a grounded phrase per example image
    lion demo --out DIR       # where the pictures with the drawn boxes go (default: <tmp>/lion-demo)

Nothing is downloaded: the model ships inside the package (`lion_mllm/assets/models/lion-shapes`) and
its image tags come from :class:`lion_mllm.shapes.ShapesTagger` (pixels), not from RAM. Decoding and
prompts are the model's own (its `generation_config.json`: greedy, repetition penalty 1.0, the
`Question: {question} Short answer:` template it was trained on); the shared model options
(:mod:`lion_mllm.model_options`) can override them. The CLI mounts `add_demo_subcommand(subparsers)`;
`python -m lion_mllm.demo` runs it on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from .model_options import add_model_options, decoding_from_args, model_from_args

__all__ = ["EXAMPLES_DIR", "DEMO_MODEL", "add_demo_subcommand", "configure_parser", "load_examples", "main",
           "run_demo"]

EXAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "examples"
DEMO_MODEL = "lion-shapes"
# Drawn pictures are enlarged from the 128 px scenes so that the box and its label are readable.
DRAW_SCALE = 4


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The (optional) options of `lion demo`."""
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for the pictures with the drawn boxes (default: <tmp>/lion-demo)")
    add_model_options(parser, tags=False, model_help="a shapes model (default: the built-in lion-shapes; the "
                                                      "examples are shapes scenes)")
    parser.set_defaults(model=DEMO_MODEL)
    return parser


def add_demo_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Add `demo` to an argparse sub-parsers object (the `lion` CLI); its `func` is `run_demo`."""
    parser = subparsers.add_parser(
        "demo", help="offline demo: the built-in shapes model captions, answers and grounds example images",
        description="Run the built-in lion-shapes model on bundled example images (no network).")
    configure_parser(parser)
    parser.set_defaults(func=run_demo)
    return parser


def load_examples(directory: Path = EXAMPLES_DIR) -> list[dict[str, Any]]:
    """The bundled examples: `examples.json` entries {image, question, phrase, ...} with absolute paths."""
    entries = json.loads((directory / "examples.json").read_text())
    for entry in entries:
        entry["path"] = directory / entry["image"]
    return entries


def run_demo(args: argparse.Namespace) -> int:
    """Caption, ask and ground every bundled example; print the answers and where the pictures are."""
    # No network: the hub libraries must never try to reach a server for this model.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from PIL import Image

    from .checkpoints.hub import resolve_model
    from .drawing import draw_grounding
    from .shapes import ShapesTagger

    torch.set_flush_denormal(True)
    out_dir = Path(args.out) if getattr(args, "out", None) else Path(tempfile.gettempdir()) / "lion-demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("device", "dtype", "ram", "ram_config"):  # `python -m lion_mllm.demo` callers may omit them
        setattr(args, name, getattr(args, name, None))
    args.model = getattr(args, "model", None) or DEMO_MODEL
    model_path = resolve_model(args.model)
    lion = model_from_args(args)
    if lion.tagger is None:  # a shapes bundle without tagger.json
        lion.tagger = ShapesTagger()
    decoding = decoding_from_args(args)  # empty unless flags were given: the model's own settings
    print(f"model: {model_path}")
    for example in load_examples():
        image = Image.open(example["path"]).convert("RGB")
        tags = lion.tag([image])[0]
        caption = lion.caption(image, tags=tags, **decoding)
        answer = lion.ask(image, example["question"], tags=tags, **decoding)
        grounding = lion.ground(image, example["phrase"], tags=tags, **decoding)
        print(f"\n{example['image']}  (tags: {tags})")
        print(f"  caption:  {caption}")
        print(f"  question: {example['question']}  ->  {answer}")
        print(f"  ground:   {example['phrase']}  ->  {grounding.text}")
        if grounding.box_pixels is None:
            print("  (no box in the answer; nothing drawn)")
            continue
        big = image.resize((image.width * DRAW_SCALE, image.height * DRAW_SCALE), Image.Resampling.NEAREST)
        box = tuple(v * DRAW_SCALE for v in grounding.box_pixels)
        target = out_dir / f"{Path(example['image']).stem}-grounding.png"
        draw_grounding(big, box, example["phrase"]).save(target)
        print(f"  drawn:    {target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m lion_mllm.demo [--out DIR]`."""
    parser = configure_parser(argparse.ArgumentParser(prog="lion demo", description=__doc__.splitlines()[0]))
    return run_demo(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
