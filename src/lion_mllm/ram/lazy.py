"""A RAM tagger that reads its weights only when tags are first needed."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from .modeling_ram import RAM_BUNDLE_WEIGHTS, RamTagger

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


class LazyRamTagger:
    """Holds the paths and loads RAM's weights only when tags are first needed (thread-safe).

    Takes :meth:`RamTagger.from_official`'s arguments (the checkpoint, then `tag_list`, `thresholds`,
    `config`, `device`, `dtype`, ...); the files are not opened at construction.
    """

    def __init__(self, checkpoint_path: PathLike, *args: Any, **kwargs: Any) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self._load: Callable[[], RamTagger] = partial(RamTagger.from_official, self.checkpoint_path, *args, **kwargs)
        self._tagger: RamTagger | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(cls, directory: PathLike, spec: Mapping[str, Any], *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> LazyRamTagger:
        """A bundle's RAM (`RamTagger.from_bundle`), read when tags are first needed; the entry itself
        (config, named files) is checked now, so a broken bundle fails when it is loaded."""
        RamTagger.bundle_entry(directory, spec)
        lazy = cls(Path(directory) / str(spec.get("weights", RAM_BUNDLE_WEIGHTS)))
        lazy._load = partial(RamTagger.from_bundle, Path(directory), dict(spec), device=device, dtype=dtype)
        return lazy

    @property
    def is_loaded(self) -> bool:
        return self._tagger is not None

    def load(self) -> RamTagger:
        """Load (once) and return the underlying :class:`RamTagger`."""
        if self._tagger is None:
            with self._lock:
                if self._tagger is None:
                    self._tagger = self._load()
        return self._tagger

    def tag(self, images: Sequence[Image.Image] | Image.Image, threshold: float | None = None) -> list[str]:
        """See :meth:`RamTagger.tag`; loads the weights on the first call with at least one image."""
        if not isinstance(images, Image.Image) and len(images) == 0:
            return []
        return self.load().tag(images, threshold)

    def logits(self, pixel_values: Tensor) -> Tensor:
        """See :meth:`RamTagger.logits`."""
        return self.load().logits(pixel_values)

    def tags_from_logits(self, logits: Tensor, threshold: float | None = None) -> list[str]:
        """See :meth:`RamTagger.tags_from_logits`."""
        return self.load().tags_from_logits(logits, threshold)
