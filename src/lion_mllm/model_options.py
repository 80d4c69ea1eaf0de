"""The model options every `lion` command that loads a model shares, and the one way they become a model.

    add_model_options(parser)          # --model --device --dtype --ram --ram-config --tags + decoding flags
    args = parser.parse_args()
    lion = model_from_args(args)       # device and dtype checked before anything is loaded
    lion.generate(..., **decoding_from_args(args))   # only the flags given: the model's defaults otherwise

Commands: caption, ask, ground, tag, run, demo, eval, serve. Decoding flags default to None, so a model's
own generation config (`generation_config.json`) applies unless a flag says otherwise. This module
imports no torch until a model is actually needed, so `--help` and usage errors stay fast.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .devices import DeviceUnavailableError, resolve_device
from .model.generation import DECODING_RULES

__all__ = ["DTYPE_CHOICES", "ModelOptionError", "add_model_options", "decoding_from_args", "model_from_args",
           "tagger_from_args"]

# float16 is not offered: FlanT5's activations overflow in it (see pipeline.resolve_dtype).
DTYPE_CHOICES = ("float32", "bfloat16", "fp32", "bf16")
MODEL_HELP = ("bundle directory, local-dir:PATH, hf-hub:owner/repo[@revision], the authors' YAML config, or an "
              "installed name (lion-flant5xl after `lion download`); default: $LION_MODEL or lion-shapes")


class ModelOptionError(ValueError):
    """A model option that cannot work here (a device this machine lacks, a missing --ram file): a usage
    error, reported before anything is loaded."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _decoding_flag(field: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """The argparse type of a decoding flag: `parse`, then the decoding type's rule for `field`."""
    def convert(text: str) -> Any:
        value = parse(text)
        valid, wanted = DECODING_RULES[field]
        if not valid(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value

    return convert


def _tags(text: str) -> str:
    """`--tags "a, b"` normalised to LION's `a, b` form."""
    return ", ".join(t.strip() for t in text.split(",") if t.strip())


def add_model_options(parser: argparse.ArgumentParser, *, decoding: bool = True, tags: bool = True,
                      model_help: str = MODEL_HELP) -> argparse.ArgumentParser:
    """Add the shared model options to `parser` (a command's parser or a parent parser); returns it."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", metavar="NAME_OR_PATH", default=None, help=model_help)
    group.add_argument("--device", default=None,
                       help="cpu, cuda, cuda:1, ... (default: cuda if a GPU is available, else cpu)")
    group.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                       help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    group.add_argument("--ram", metavar="CHECKPOINT", default=None,
                       help="RAM tagger checkpoint (ram_swin_large_14m.pth), replacing the model's own tagger")
    group.add_argument("--ram-config", metavar="DIR_OR_JSON", default=None,
                       help="the --ram checkpoint's config: RAM's config folder (configs/ + data/) or a JSON file "
                            "of RamConfig fields (default: inferred from the weights)")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="compile the decoder step (default: on a GPU only; on a CPU the first steps take tens "
                            "of seconds to compile, which pays off over a long job: run, eval, serve)")
    if tags:
        group.add_argument("--tags", type=_tags, default=None, metavar='"a, b"',
                           help="image tags for the prompt, for every image (default: the model's tagger)")
    if decoding:
        group = parser.add_argument_group("decoding (default: the model's own generation config)")
        group.add_argument("--num-beams", type=_decoding_flag("num_beams", int), default=None)
        group.add_argument("--max-new-tokens", type=_decoding_flag("max_new_tokens", int), default=None)
        group.add_argument("--repetition-penalty", type=_decoding_flag("repetition_penalty", float), default=None)
        group.add_argument("--length-penalty", type=_decoding_flag("length_penalty", float), default=None)
        group.add_argument("--sample", action="store_true", default=None, help="sample instead of beam search")
        group.add_argument("--temperature", type=_decoding_flag("temperature", float), default=None, help="with --sample")
        group.add_argument("--top-p", type=_decoding_flag("top_p", float), default=None, help="with --sample")
        group.add_argument("--seed", type=int, default=None, help="random seed (for --sample)")
    return parser


def decoding_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """`Lion.generate` keyword arguments for the decoding flags that were given (none: the model's own)."""
    if getattr(args, "seed", None) is not None:
        import torch

        torch.manual_seed(args.seed)
    names = {"num_beams": "num_beams", "max_new_tokens": "max_new_tokens", "repetition_penalty": "repetition_penalty",
             "length_penalty": "length_penalty", "sample": "do_sample", "temperature": "temperature",
             "top_p": "top_p"}
    return {key: getattr(args, flag) for flag, key in names.items() if getattr(args, flag, None) is not None}


def _device(args: argparse.Namespace) -> str:
    """`--device` checked against this machine (default: cuda when a GPU is available, else cpu)."""
    try:
        return resolve_device(getattr(args, "device", None))
    except DeviceUnavailableError as error:
        raise ModelOptionError(str(error)) from None


def _check_ram_options(args: argparse.Namespace) -> None:
    ram, ram_config = getattr(args, "ram", None), getattr(args, "ram_config", None)
    if ram is not None and not Path(ram).expanduser().is_file():
        raise ModelOptionError(f"--ram {ram}: no such file (RAM's checkpoint, ram_swin_large_14m.pth)")
    if ram_config is not None and ram is None:
        raise ModelOptionError("--ram-config needs --ram (a model's own RAM comes with its config)")
    if ram_config is not None and not Path(ram_config).expanduser().exists():
        raise ModelOptionError(f"--ram-config {ram_config}: no such file or folder")


def _ram_config(value: str | None) -> Any:
    """A --ram-config value as `LazyRamTagger` takes it: a RamConfig for a .json file, else the folder."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.suffix.lower() == ".json":
        from .ram import RamConfig

        return RamConfig.from_json_file(path)
    return path


def model_from_args(args: argparse.Namespace, say: Callable[[str], None] | None = None) -> Any:
    """The `Lion` the options describe, with its tagger (or `--ram`'s) and generation config.

    Device, dtype and file options are checked before the (slow) load; `say` gets progress lines.
    """
    from .checkpoints.hub import resolve_model

    _check_ram_options(args)
    device = _device(args)
    resolved = resolve_model(getattr(args, "model", None))  # a wrong name fails here, before any import
    if say:
        say(f"loading {resolved} on {device} ...")
    started = time.monotonic()
    from . import load_model

    lion = load_model(resolved, device=device, dtype=getattr(args, "dtype", None))
    lion.compile_decoder = getattr(args, "compile", None)
    if getattr(args, "ram", None):
        from .ram import LazyRamTagger

        lion.tagger = LazyRamTagger(args.ram, config=_ram_config(args.ram_config), device=device)
    if say:
        say(f"model ready in {time.monotonic() - started:.1f} s")
    return lion


def tagger_from_args(args: argparse.Namespace) -> Any:
    """Only the tagger of the model the options describe (`--ram`'s if given), without loading LION
    itself; ModelOptionError when the model has none."""
    from .checkpoints.hub import resolve_model

    _check_ram_options(args)
    device = _device(args)
    if getattr(args, "ram", None):
        from .ram import LazyRamTagger

        return LazyRamTagger(args.ram, config=_ram_config(args.ram_config), device=device)
    resolved = resolve_model(getattr(args, "model", None))
    if resolved.endswith((".yaml", ".yml")):
        from .checkpoints.official import OfficialPaths
        from .ram import LazyRamTagger

        paths = OfficialPaths.from_yaml(resolved)
        if paths.ram_model is None:
            raise ModelOptionError(f"{resolved} names no ram_model; pass --ram ram_swin_large_14m.pth")
        return LazyRamTagger(paths.ram_model, device=device, **paths.ram_tagger_options())
    from .model.taggers import bundle_tagger

    tagger = bundle_tagger(Path(resolved), device)
    if tagger is None:
        raise ModelOptionError(f"{resolved}: the bundle holds no tagger; pass --ram ram_swin_large_14m.pth")
    return tagger
