"""A RAM tagger that reads its weights only when tags are first needed."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from .config import RamConfig
from .modeling_ram import RAM_BUNDLE_WEIGHTS, RamTagger


logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


class LazyRamTagger:
    """Holds the paths and loads RAM's weights only when tags are first needed (thread-safe).

    Same arguments as :meth:`RamTagger.from_official`; the files are not opened at construction.
    """

    def __init__(
        self,
        checkpoint_path: PathLike,
        tag_list: PathLike | None = None,
        thresholds: PathLike | None = None,
        config: RamConfig | PathLike | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        verify_tag_files: bool | None = None,
        progress: bool = False,
    ) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self._kwargs = {
            "tag_list": tag_list,
            "thresholds": thresholds,
            "config": config,
            "device": device,
            "dtype": dtype,
            "verify_tag_files": verify_tag_files,
            "progress": progress,
        }
        self._tagger: RamTagger | None = None
        self._lock = threading.Lock()
        self._bundle: tuple[Path, dict[str, Any]] | None = None

    @classmethod
    def from_bundle(cls, directory: PathLike, spec: Mapping[str, Any], *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> LazyRamTagger:
        """A bundle's RAM (`RamTagger.from_bundle`), read when tags are first needed; the entry itself
        (config, named files) is checked now, so a broken bundle fails when it is loaded."""
        RamTagger.bundle_entry(directory, spec)
        lazy = cls(Path(directory) / str(spec.get("weights", RAM_BUNDLE_WEIGHTS)), device=device, dtype=dtype)
        lazy._bundle = (Path(directory), dict(spec))
        return lazy

    @property
    def is_loaded(self) -> bool:
        return self._tagger is not None

    def load(self) -> RamTagger:
        """Load (once) and return the underlying :class:`RamTagger`."""
        if self._tagger is None:
            with self._lock:
                if self._tagger is None and self._bundle is not None:
                    self._tagger = RamTagger.from_bundle(*self._bundle, device=self._kwargs["device"],
                                                         dtype=self._kwargs["dtype"])  # type: ignore[arg-type]
                elif self._tagger is None:
                    self._tagger = RamTagger.from_official(self.checkpoint_path, **self._kwargs)  # type: ignore[arg-type]
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
