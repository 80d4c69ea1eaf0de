"""Image taggers: what `Lion` needs of one, and how a bundle stores and rebuilds its tagger (`tagger.json`).

A tagger is anything with `tag(images) -> ["tag1, tag2", ...]`. A bundle rebuilds two kinds by the
`type` its `tagger.json` names: `ram` (RAM's weights, config and vocabulary, read lazily) and the
kinds of `named_imports.TAGGER_KINDS`, which are small pixel taggers stored as their few settings. The
demo world's tagger is one of those; it is imported only when a bundle names it, so the core does not
depend on the demo world.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from ..errors import CheckpointError
from ..named_imports import TAGGER_KINDS, load_named

__all__ = ["TAGGER_FILE", "Tagger", "bundle_tagger", "write_tagger"]

TAGGER_FILE = "tagger.json"


class Tagger(Protocol):
    def tag(self, images: list[Image.Image]) -> list[str]: ...


def write_tagger(tagger: Any, directory: Path) -> None:
    """Put the model's tagger into a bundle, with `tagger.json` saying how to rebuild it: built-in taggers
    by their few settings (`bundle_spec`), RAM by its weights, config and vocabulary (read lazily when
    loaded). Other taggers cannot be stored and must be attached again after loading."""
    spec = getattr(tagger, "bundle_spec", None)
    if spec is None:
        from ..ram import LazyRamTagger, RamTagger

        if isinstance(tagger, LazyRamTagger):
            tagger = tagger.load()
        if isinstance(tagger, RamTagger):
            spec = tagger.save_bundle(directory)
    if spec is not None:
        (Path(directory) / TAGGER_FILE).write_text(json.dumps(spec, indent=1) + "\n")


def bundle_tagger(directory: Path, device: str | torch.device = "cpu") -> Any:
    """The tagger a bundle's `tagger.json` names (RAM read lazily on `device`), or None without that file."""
    path = Path(directory) / TAGGER_FILE
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(spec, dict):
        raise CheckpointError(f"{path}: expected a JSON object with a 'type'")
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind == "ram":
        from ..ram import LazyRamTagger

        return LazyRamTagger.from_bundle(directory, spec, device=device)
    if kind in TAGGER_KINDS:
        tagger_class = load_named(TAGGER_KINDS, kind, "tagger type")
        try:
            return tagger_class(**spec)
        except TypeError as error:
            raise CheckpointError(f"{path}: not a {kind} tagger's settings: {error}") from None
    raise CheckpointError(f"{path}: unknown tagger type {kind!r} (known: {', '.join(['ram', *TAGGER_KINDS])})")
