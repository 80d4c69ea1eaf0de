"""Stage-wise instruction tuning of LION: annotation files in, checkpoints and a bundle out.

    lion train --config configs/lion_train_stage4.yaml               # one process
    torchrun --nproc_per_node=8 -m lion_mllm.train --config FILE      # the same program on 8 GPUs
    lion train --config FILE --resume outputs/lion_stage4/20240101120000

The CLI mounts `add_train_subcommand(subparsers)`; `run_train(args)` runs it. Library use:
`train(load_train_config(path))`. See docs/training.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_train_subcommand", "build_parser", "configure_parser", "load_train_config", "main", "run_train",
           "train"]


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `lion train` / `python -m lion_mllm.train`."""
    parser.add_argument("--config", "--cfg-path", dest="config", required=True,
                        help="training YAML: model / run / train_datasets (configs/lion_train_stage*.yaml)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                        help="continue a run exactly where it stopped: a run directory, one of its checkpoints, "
                             "or nothing (the newest run under run.output_dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set run.init_lr=1e-4 (repeatable)")
    parser.add_argument("--output-dir", default=None, help="shortcut for --set run.output_dir=DIR")
    parser.add_argument("--stop-after-steps", type=int, default=None, metavar="N",
                        help="save a checkpoint and stop after N steps of this invocation (resume later)")
    return parser


def add_train_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Add `train` to an argparse sub-parsers object (the `lion` CLI); its `func` is `run_train`."""
    parser = subparsers.add_parser(
        "train", help="stage-wise instruction tuning (stages 1-4), one GPU or many (torchrun), resumable",
        description="Train LION from annotation files; run under torchrun for several processes.")
    configure_parser(parser)
    parser.set_defaults(func=run_train)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The stand-alone parser of `python -m lion_mllm.train`."""
    parser = argparse.ArgumentParser(prog="python -m lion_mllm.train", description=__doc__.splitlines()[0])
    return configure_parser(parser)


def run_train(args: argparse.Namespace) -> int:
    """Execute `lion train` for parsed `args`; returns the process exit code (0 done or stopped as asked,
    1 bad data / checkpoint problem / run directory in use, 2 config error). Every expected failure is
    one line on stderr, the same under `lion train`, `python -m lion_mllm.train` and torchrun."""
    from ..errors import CheckpointError
    from .config import ConfigError, load_train_config
    from .data import AnnotationFileError, BadDataError
    from .loop import train
    from .rundir import RunDirectoryLocked

    overrides = list(args.overrides or [])
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    # the failures a run expects, told apart in this order (an AnnotationFileError is a BadDataError): how
    # the line on stderr starts and the exit code. A ConfigError may come from the file or once the model
    # is built (e.g. eval tasks without tags).
    expected = ((ConfigError, "config error", 2), (AnnotationFileError, "bad data", 1),
                (BadDataError, "stopped", 1), (CheckpointError, "checkpoint error", 1),
                (RunDirectoryLocked, "refused", 1))
    try:
        config = load_train_config(args.config, overrides)
        result = train(config, resume=args.resume, stop_after_steps=args.stop_after_steps)
    except tuple(kind for kind, _, _ in expected) as error:
        label, code = next((label, code) for kind, label, code in expected if isinstance(error, kind))
        print(f"lion train: {label}: {error}", file=sys.stderr)
        return code
    state = "finished" if result.finished else "stopped (resume with --resume)"
    print(f"lion train: {state} at step {result.step}/{result.total_steps}; run directory {result.run_dir}",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m lion_mllm.train` (and each torchrun worker): the same program and messages as `lion
    train`; an unexpected failure is one line too, with the traceback under --debug."""
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")
    args = parser.parse_args(argv)
    try:
        return run_train(args)
    except KeyboardInterrupt:
        print("lion train: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one line, as `lion train` prints it
        if args.debug:
            import traceback

            traceback.print_exc()
        text = str(error).strip()
        print(f"lion train: error: {text.splitlines()[0] if text else type(error).__name__}", file=sys.stderr)
        return 1


def load_train_config(source: Any, overrides: list[str] | None = None) -> Any:
    """Read a training YAML (or mapping) into a checked `TrainConfig` (see `lion_mllm.train.config`)."""
    from .config import load_train_config as load

    return load(source, overrides)


def train(config: Any, resume: Any = None, stop_after_steps: int | None = None) -> Any:
    """Run or resume a training run; returns a `TrainResult` (see `lion_mllm.train.loop.train`)."""
    from .loop import train as run

    return run(config, resume=resume, stop_after_steps=stop_after_steps)
