"""The ``lion`` command.

    lion caption photo.jpg [more.jpg ...]          # one caption per image
    lion ask photo.jpg "What is the man holding?"
    lion ground photo.jpg "the dog" --draw out.png  # box in pixels and normalised; drawn with a label
    lion tag photo.jpg                              # RAM tags
    lion run --input tasks.jsonl --output results.jsonl   # resumable batch inference (see lion_mllm.run)
    lion download lion-flant5xl [--to DIR]          # every file the published model needs
    lion convert --config lion_flant5xl.yaml --out bundle/
    lion eval ...                                   # benchmarks (when lion_mllm.evaluation is present)

Every command that loads a model takes the same model options (:mod:`lion_mllm.model_options`):
``--model`` (a bundle directory, ``local-dir:``/``hf-hub:`` names, an authors' YAML config or an
installed model name; default ``$LION_MODEL``, else ``lion-shapes``), ``--device``, ``--dtype``,
``--ram``, ``--ram-config``, ``--tags`` and the decoding flags, which default to the model's own
generation config. Errors are one line on stderr (``lion: error: ...``; ``--debug`` adds the traceback).
Exit codes: 0 ok, 1 runtime failure, 2 usage error. Progress of long work goes to stderr, results to
stdout. torch and transformers are imported only once a command needs a model, so ``--help``, usage
errors and bad paths answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .model.boxes import box_record
from .model.tasks import SHORT_ANSWER_TEMPLATE
from .model_options import (
    ModelOptionError,
    _positive_int,
    add_model_options,
    decoding_from_args,
    model_from_args,
    tagger_from_args,
)

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["build_parser", "main"]



class UsageError(Exception):
    """A problem with the command line itself (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error format: `lion: error: ...`, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"lion: error: {message}\n")


# ---------------------------------------------------------------------------------------- parser


# The option groups a sub-command inherits (common flags, model options, --json).
Parents = argparse.ArgumentParser

EVAL_HELP = "evaluate a model on a benchmark (captioning, VQA, REC, POPE, MMBench)"


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The `lion` argument parser with all sub-commands.

    `command` is the sub-command about to run (None: none given); the evaluation options, whose module
    pulls in the evaluation stack (numpy and more), are then only built for `eval` itself, so `lion
    --help` and the other commands start at once. The default "*" builds everything."""
    base = _Parser(add_help=False)
    base.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                      help="show tracebacks and library warnings")
    base.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                      help="no progress messages on stderr")

    output = _Parser(add_help=False)
    output.add_argument("--json", action="store_true", help="machine-readable output: one JSON object per line")
    model = add_model_options(_Parser(add_help=False))  # the shared model options (lion_mllm.model_options)
    tagger_only = add_model_options(_Parser(add_help=False), decoding=False, tags=False)

    parser = _Parser(prog="lion", parents=[base],
                     description="LION (CVPR 2024): caption, ask, ground and tag images; batch runs; "
                                 "download and convert models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_caption(sub, base, model, output)
    _add_ask(sub, base, model, output)
    _add_ground(sub, base, model, output)
    _add_tag(sub, base, tagger_only, output)
    _add_run(sub, base, model, output)
    _add_download(sub, base)
    _add_convert(sub, base)

    if command in ("*", "eval"):
        try:
            from .evaluation.cli import add_eval_subcommand
        except ImportError:  # the evaluation extra is optional; the rest of the CLI works without it
            pass
        else:
            add_eval_subcommand(sub)
    else:  # listed under its name and help only: it is not the command being run
        sub.add_parser("eval", help=EVAL_HELP)
    from .demo import add_demo_subcommand
    from .server import add_serve_subcommand  # imports no web framework until `lion serve` runs
    from .train import add_train_subcommand

    add_demo_subcommand(sub)
    add_serve_subcommand(sub)
    add_train_subcommand(sub)
    return parser


def _add_caption(sub: Any, base: Parents, model: Parents, output: Parents) -> None:
    p = sub.add_parser("caption", parents=[base, model, output], help="describe images in a sentence")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--prompt", default=None, help="caption instruction (default: the model's)")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.set_defaults(func=_cmd_caption)


def _add_ask(sub: Any, base: Parents, model: Parents, output: Parents) -> None:
    p = sub.add_parser("ask", parents=[base, model, output], help="answer a question about an image",
                       description="The question goes into the model's question template (lion-shapes: "
                                   f"'{SHORT_ANSWER_TEMPLATE}'; the authors' models: as typed).")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("question", metavar="QUESTION")
    p.set_defaults(func=_cmd_ask)


def _add_ground(sub: Any, base: Parents, model: Parents, output: Parents) -> None:
    p = sub.add_parser("ground", parents=[base, model, output], help="find the box of a phrase in an image")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("phrase", metavar="PHRASE")
    p.add_argument("--draw", metavar="OUT.png", default=None, help="save the image with the box and the phrase drawn")
    p.set_defaults(func=_cmd_ground)


def _add_tag(sub: Any, base: Parents, tagger_only: Parents, output: Parents) -> None:
    p = sub.add_parser("tag", parents=[base, tagger_only, output],
                       help="image tags from the model's tagger (RAM, or lion-shapes' built-in one)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=_cmd_tag)


def _add_run(sub: Any, base: Parents, model: Parents, output: Parents) -> None:
    p = sub.add_parser("run", parents=[base, model, output], help="batch inference over a JSON Lines task file",
                       description="Each input line: {\"id\", \"image\", \"task\": caption|vqa|grounding, \"prompt\" "
                                   "(or \"phrase\" for grounding), optional \"tags\"}. Re-running skips ids already "
                                   "in the output.")
    p.add_argument("--input", required=True, metavar="TASKS.jsonl")
    p.add_argument("--output", required=True, metavar="RESULTS.jsonl")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--image-root", metavar="DIR", default=None,
                   help="folder relative image paths are in (default: working directory, then the input's folder)")
    p.add_argument("--max-batches", type=_positive_int, default=None,
                   help="stop after N batches (re-run to continue)")
    p.add_argument("--retry-errors", action="store_true", help="drop earlier error records and try those tasks again")
    p.add_argument("--max-pixels", type=_positive_int, default=None,
                   help="larger images become error records, checked from the header before decoding "
                        "(default: lion_mllm.model.images.DEFAULT_MAX_PIXELS, 150 megapixels)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray_options = p.add_argument_group(
        "Ray engine", "--engine ray runs the job on Ray Data (the `scale` extra; docs/scale.md): --input may also "
                      "be a folder of images, Parquet files or WebDataset tar shards, and --output is a folder "
                      "of result shards")
    ray_options.add_argument("--engine", choices=("local", "ray"), default="local",
                             help="local: this process (default); ray: a Ray cluster (ray.init() finds it, "
                                  "or starts one on this machine)")
    ray_options.add_argument("--layout", choices=("jsonl", "folder", "parquet", "webdataset"), default=None,
                             help="the input layout (default: from --input)")
    ray_options.add_argument("--task", choices=("caption", "vqa", "grounding"), default=None,
                             help="the task of every image of a folder, and of rows/samples that name none")
    ray_options.add_argument("--prompt", default=None, help="with --task: the question (vqa) or a full prompt")
    ray_options.add_argument("--phrase", default=None, help="with --task grounding: the phrase to find")
    ray_options.add_argument("--replicas", type=_positive_int, default=None,
                             help="model replicas (default: one per GPU of the cluster, else 1)")
    ray_options.add_argument("--threads", type=_positive_int, default=1, help="intra-op threads of each replica")
    ray_options.add_argument("--replica-cpus", type=float, default=None,
                             help="CPUs Ray reserves for each replica (default: --threads); a fixed cluster "
                                  "runs as many replicas as fit beside the other stages")
    ray_options.add_argument("--decode-cpus", type=float, default=1.0,
                             help="CPUs Ray reserves for each read/decode/write task (default 1)")
    ray_options.add_argument("--output-format", choices=("parquet", "jsonl"), default="parquet")
    ray_options.add_argument("--shard-rows", type=_positive_int, default=1000,
                             help="results per output shard (a restart redoes at most the unwritten shards)")
    ray_options.add_argument("--ray-address", default=None, help="the cluster to join (default: ray.init()'s)")
    p.set_defaults(func=_cmd_run)


def _add_download(sub: Any, base: Parents) -> None:
    p = sub.add_parser("download", parents=[base], help="download a published model (lion-flant5xl, lion-flant5xxl)")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("--to", metavar="DIR", default=None, help="put the files here instead of the caches")
    p.add_argument("--refresh", action="store_true", help="ask the servers again even if already downloaded")
    p.add_argument("--list", action="store_true", help="list the published models and whether they are installed")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_download)


def _add_convert(sub: Any, base: Parents) -> None:
    p = sub.add_parser("convert", parents=[base], help="authors' YAML config -> lion-mllm bundle (save_pretrained)",
                       description="Write the whole model as one bundle: weights, config, tokenizers, the RAM "
                                   "tagger the YAML names (weights, config, vocabulary) and the generation "
                                   "config (decoding defaults, prompt templates).")
    p.add_argument("--config", required=True, metavar="CONFIG.yaml",
                   help="the authors' model config (or a downloaded model name)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "fp32", "bf16"),
                   help="dtype of the saved LION weights (default float32; RAM stays float32)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_convert)


def _version() -> str:
    try:
        from . import __version__

        return __version__
    except ImportError:
        return "unknown"


# ---------------------------------------------------------------------------------------- helpers


def _say(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(f"lion: {message}", file=sys.stderr, flush=True)


def _check_paths(paths: Sequence[str]) -> None:
    """Local image paths that do not exist fail before any heavy import (URLs are left to the loader)."""
    for path in paths:
        if "://" not in path and not path.startswith("data:") and not Path(path).expanduser().exists():
            raise UsageError(f"{path}: no such image file")


def _check_images(paths: Sequence[str]) -> list[Image.Image]:
    """Read every image before the (slow) model load, so a typo or a broken file fails at once."""
    _check_paths(paths)
    from .model.processing import load_image

    return [load_image(p) for p in paths]


def _load(args: argparse.Namespace):
    """The Lion the shared model options describe; progress on stderr."""
    return model_from_args(args, say=lambda message: _say(args, message))


def _need_tags(args: argparse.Namespace, lion: Any) -> None:
    if lion.lacks_tagger and args.tags is None:
        raise UsageError('this model puts image tags in its prompt but has no tagger: pass --tags "a, b" '
                         "or --ram ram_swin_large_14m.pth")


def _decoding(args: argparse.Namespace) -> dict[str, Any]:
    return decoding_from_args(args)


def _emit(args: argparse.Namespace, record: dict[str, Any], text: str) -> None:
    print(json.dumps(record, ensure_ascii=False) if args.json else text, flush=True)


def _fmt(values: Sequence[float], digits: int) -> str:
    return " ".join(f"{v:.{digits}f}" for v in values)


# ---------------------------------------------------------------------------------------- commands


def _cmd_caption(args: argparse.Namespace) -> int:
    images = _check_images(args.images)
    lion = _load(args)
    _need_tags(args, lion)
    prompt = lion.generation_config.prompt("caption", args.prompt)
    decoding = _decoding(args)
    for start in range(0, len(images), args.batch_size):
        chunk = images[start:start + args.batch_size]
        captions = lion.generate(chunk, [prompt] * len(chunk), "caption",
                                 [args.tags] * len(chunk) if args.tags is not None else None, **decoding)
        for path, caption in zip(args.images[start:start + args.batch_size], captions):
            text = caption if len(images) == 1 else f"{path}: {caption}"
            _emit(args, {"image": path, "caption": caption}, text)
    return 0


def _cmd_ask(args: argparse.Namespace) -> int:
    (image,) = _check_images([args.image])
    lion = _load(args)
    _need_tags(args, lion)
    answer = lion.ask(image, args.question, tags=args.tags, **_decoding(args))
    _emit(args, {"image": args.image, "question": args.question, "answer": answer}, answer)
    return 0


def _cmd_ground(args: argparse.Namespace) -> int:
    if args.draw:
        from PIL import Image

        if Path(args.draw).suffix.lower() not in Image.registered_extensions():
            raise UsageError(f"--draw {args.draw}: unknown image file extension")
    (image,) = _check_images([args.image])
    lion = _load(args)
    _need_tags(args, lion)
    result = lion.ground(image, args.phrase, tags=args.tags, **_decoding(args))
    width, height = image.size
    record: dict[str, Any] = {
        "image": args.image, "phrase": args.phrase, "answer": result.text, "width": width, "height": height,
        **box_record(result.box, width, height),
    }
    if result.box is None:
        _emit(args, record, f"no box in the answer: {result.text}")
        if args.draw:
            raise RuntimeError(f"nothing to draw: the model gave no box, {args.draw} not written")
        return 0
    if args.draw:
        out = Path(args.draw)
        out.parent.mkdir(parents=True, exist_ok=True)
        from .drawing import draw_grounding

        draw_grounding(image, result.box_pixels, args.phrase).save(out)
        record["drawn"] = str(out)
        _say(args, f"drew the box on {out}")
    text = (f"box (normalised): {_fmt(result.box.as_tuple(), 3)}\n"
            f"box (pixels):     {_fmt(result.box_pixels, 1)}  (image {width}x{height})")
    _emit(args, record, text)
    return 0


def _cmd_tag(args: argparse.Namespace) -> int:
    images = _check_images(args.images)
    # Only the tagger is needed: read it from the model (bundle or YAML) instead of loading all of LION.
    tagger = tagger_from_args(args)
    source = getattr(tagger, "checkpoint_path", None) or type(tagger).__name__
    _say(args, f"tagging {len(images)} image(s) with {source} ...")
    for path, tags in zip(args.images, tagger.tag(images)):
        text = tags if len(images) == 1 else f"{path}: {tags}"
        _emit(args, {"image": path, "tags": [t.strip() for t in tags.split(",") if t.strip()]}, text)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .run import run_batch

    if args.engine == "ray":
        return _cmd_run_ray(args)
    if not Path(args.input).is_file():
        raise FileNotFoundError(f"{args.input}: no such input file")
    lion = _load(args)
    summary = run_batch(lion, args.input, args.output, batch_size=args.batch_size, tags=args.tags,
                        image_root=args.image_root, max_batches=args.max_batches,
                        progress=not (args.no_progress or getattr(args, "quiet", False)),
                        retry_errors=args.retry_errors, generate_kwargs=_decoding(args),
                        **({"max_pixels": args.max_pixels} if args.max_pixels is not None else {}))
    message = (f"{summary.done} answered, {summary.errors} error records, {summary.skipped} already in "
               f"{args.output}; {summary.seconds:.1f} s")
    if summary.stopped_early:
        message += f"; stopped after {summary.batches} batch(es) (--max-batches), run again to continue"
    _say(args, message)
    if args.json:
        print(json.dumps({"output": args.output, "answered": summary.done, "errors": summary.errors,
                          "skipped": summary.skipped, "batches": summary.batches,
                          "complete": not summary.stopped_early, "seconds": round(summary.seconds, 3)}))
    return 0


def _cmd_run_ray(args: argparse.Namespace) -> int:
    if args.max_batches is not None or args.retry_errors:
        raise UsageError("--max-batches and --retry-errors are for --engine local (a Ray job resumes by shards)")
    if not Path(args.input).exists():
        raise FileNotFoundError(f"{args.input}: no such input file or folder")
    import functools

    try:
        from .scale import run_ray
    except ImportError as error:
        raise UsageError(str(error)) from None
    from .checkpoints.hub import resolve_model

    resolve_model(getattr(args, "model", None))  # a wrong model name fails here, not in every replica
    summary = run_ray(functools.partial(model_from_args, args), args.input, args.output, layout=args.layout,
                      task=args.task, prompt=args.prompt, phrase=args.phrase, tags=args.tags,
                      batch_size=args.batch_size, replicas=args.replicas, device=args.device,
                      threads=args.threads, replica_cpus=args.replica_cpus, decode_cpus=args.decode_cpus,
                      output_format=args.output_format, rows_per_shard=args.shard_rows,
                      image_root=args.image_root, generate_kwargs=_decoding(args), address=args.ray_address,
                      progress=not (args.no_progress or getattr(args, "quiet", False)),
                      **({"max_pixels": args.max_pixels} if args.max_pixels is not None else {}))
    _say(args, f"{summary.done} answered, {summary.errors} error records, {summary.skipped} already in "
               f"{args.output}; {summary.seconds:.1f} s")
    if args.json:
        print(json.dumps({"output": args.output, "answered": summary.done, "errors": summary.errors,
                          "skipped": summary.skipped, "complete": True, "seconds": round(summary.seconds, 3)}))
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from .checkpoints.hub import PUBLISHED_MODELS, ModelNotInstalledError, download_model, installed_model

    if args.list:
        for name, spec in PUBLISHED_MODELS.items():
            try:
                where = installed_model(name)
            except ModelNotInstalledError:
                where = None
            if args.json:
                print(json.dumps({"name": name, "description": spec.description,
                                  "installed": str(where) if where else None}))
            else:
                print(f"{name:16s} {'installed' if where else 'not installed':14s} {spec.description}")
        return 0
    if not args.name:
        raise UsageError(f"name a model to download: {', '.join(PUBLISHED_MODELS)} (or --list)")
    if args.name not in PUBLISHED_MODELS:
        raise UsageError(f"unknown model {args.name!r}; published models: {', '.join(PUBLISHED_MODELS)}")
    quiet = getattr(args, "quiet", False)
    config = download_model(args.name, args.to, refresh=args.refresh, progress=not quiet,
                            say=None if quiet else (lambda m: print(f"lion download: {m}", file=sys.stderr,
                                                                    flush=True)))
    print(json.dumps({"name": args.name, "config": str(config)}) if args.json else str(config))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoints.hub import resolve_model
    from .lion import Lion

    config = resolve_model(args.config)
    if not config.endswith((".yaml", ".yml")):
        raise UsageError(f"--config {args.config}: expected the authors' YAML config (or a downloaded model name)")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; choose a new --out")
    _say(args, f"loading {config} ...")
    started = time.monotonic()
    lion = Lion.from_official(config, device=args.device, dtype=args.dtype)
    _say(args, f"loaded in {time.monotonic() - started:.1f} s; writing {out} ...")
    lion.save_pretrained(out)
    if lion.lacks_tagger:
        _say(args, "note: the YAML names no ram_model, so the bundle has no tagger; pass --tags (or --ram) "
                   "when using it")
    print(str(out))
    return 0


# ---------------------------------------------------------------------------------------- entry point


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    if isinstance(error, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]  # KeyError's str() adds quotes
    first = text.splitlines()[0] if text else type(error).__name__
    return first


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `lion` command; returns the exit code (0 ok, 1 failure, 2 usage error)."""
    words = list(sys.argv[1:] if argv is None else argv)
    # the first word that is not an option is the sub-command (the top-level options take no value)
    parser = build_parser(command=next((w for w in words if not w.startswith("-")), None))
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse: --help/--version (0) or a usage error (2)
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    debug = getattr(args, "debug", False)
    if not debug:
        # Library chatter (deprecations, generation-config notes) would bury the one line that matters.
        warnings.filterwarnings("ignore")
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
        else:  # read by transformers when (and if) a command imports it
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return int(args.func(args) or 0)
    except (UsageError, ModelOptionError) as error:
        print(f"lion: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lion: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lion ... | head`
        return 0
    except Exception as error:  # noqa: BLE001 - every failure becomes one line (traceback with --debug)
        if debug:
            traceback.print_exc()
        from .checkpoints.hub import ModelNotInstalledError

        hint = ""
        if isinstance(error, ModelNotInstalledError) and "is not installed" in str(error):
            hint = ("; pass --model with a bundle directory, a config .yaml, hf-hub:owner/repo, "
                    "or a downloaded model (lion download lion-flant5xl)")
        print(f"lion: error: {_one_line(error)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
