"""RAM's tag vocabulary: the 4585 English tags and per-class thresholds, public files of RAM's repository
(not in the checkpoint), fetched md5-verified or read from local paths."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..checkpoints.downloads import RemoteFile, cache_dir, file_digest
from ..errors import CheckpointError
from .config import OFFICIAL_NUM_TAGS

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]



# RAM's vocabulary files, pinned to a commit of xinyu1205/recognize-anything (they have not changed
# since June 2023); the md5 values are the ones of the files LION was released with.
RAM_REPO_COMMIT = "7cb804a8609e9f4b1a50b7f31436d2df40bb9481"
_RAW = f"https://raw.githubusercontent.com/xinyu1205/recognize-anything/{RAM_REPO_COMMIT}/ram/data"
RAM_TAG_LIST_FILE = RemoteFile(
    url=f"{_RAW}/ram_tag_list.txt",
    filename="ram/ram_tag_list.txt",
    md5="204f1d83085e9cf76333e70c5af83b3e",
    size=41904,
)
RAM_THRESHOLDS_FILE = RemoteFile(
    url=f"{_RAW}/ram_tag_list_threshold.txt",
    filename="ram/ram_tag_list_threshold.txt",
    md5="46a53b3d3bce330871412aa627ae4b1c",
    size=22016,
)


# A bundle's copy of RAM (written by RamTagger.save_bundle).

# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------


def fetch_ram_vocabulary_files(directory: PathLike | None = None, *, progress: bool = False) -> tuple[Path, Path]:
    """Download (or reuse, md5-verified) RAM's tag list and threshold files; return their paths.

    Files go to ``<directory>/ram/`` (default directory: the package cache, ``$LION_MLLM_CACHE`` or
    ``~/.cache/lion_mllm``).
    """
    base = Path(directory) if directory is not None else cache_dir()
    return RAM_TAG_LIST_FILE.fetch(base, progress=progress), RAM_THRESHOLDS_FILE.fetch(base, progress=progress)


@dataclass(frozen=True)
class RamVocabulary:
    """RAM's English tag names and per-class thresholds (same order as the label embeddings)."""

    tags: tuple[str, ...]
    thresholds: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.tags)

    @classmethod
    def from_files(cls, tag_list: PathLike, thresholds: PathLike, *, verify: bool = True) -> RamVocabulary:
        """Read a tag list and a threshold file; with ``verify`` they must be RAM's official files (md5)."""
        tag_path, thr_path = Path(tag_list).expanduser(), Path(thresholds).expanduser()
        for path, remote in ((tag_path, RAM_TAG_LIST_FILE), (thr_path, RAM_THRESHOLDS_FILE)):
            if not path.is_file():
                raise FileNotFoundError(f"RAM vocabulary file not found: {path}")
            if verify:
                actual = file_digest(path, "md5")
                if actual != remote.md5:
                    raise CheckpointError(
                        f"{path} is not RAM's official {Path(remote.filename).name}: md5 expected {remote.md5}, "
                        f"got {actual} (corrupt or different copy; pass verify=False for a custom vocabulary)"
                    )
        # Same parsing as the authors: splitlines() for names, float(line.strip()) for thresholds.
        tags = tuple(tag_path.read_text(encoding="utf-8").splitlines())
        values: list[float] = []
        for lineno, line in enumerate(thr_path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                values.append(float(line.strip()))
            except ValueError:
                raise CheckpointError(f"{thr_path}:{lineno}: not a number: {line!r}") from None
        if len(tags) != len(values):
            raise CheckpointError(f"{tag_path} has {len(tags)} tags but {thr_path} has {len(values)} thresholds")
        return cls(tags=tags, thresholds=tuple(values))

    @classmethod
    def official(cls, directory: PathLike | None = None, *, progress: bool = False) -> RamVocabulary:
        """RAM's official 4585-tag vocabulary, fetched into the cache if needed."""
        tag_path, thr_path = fetch_ram_vocabulary_files(directory, progress=progress)
        return cls.from_files(tag_path, thr_path, verify=True)


def resolve_vocabulary(
    tag_list: PathLike | None,
    thresholds: PathLike | None,
    *,
    num_tags: int,
    verify: bool | None,
    progress: bool,
) -> RamVocabulary:
    if (tag_list is None) != (thresholds is None):
        raise ValueError("pass both tag_list and thresholds, or neither (then the official files are fetched)")
    if tag_list is None:
        vocab = RamVocabulary.official(progress=progress)
    else:
        # Auto: a checkpoint with the official number of classes must come with the official files;
        # other sizes (test stand-ins, custom models) only get the consistency checks.
        do_verify = (num_tags == OFFICIAL_NUM_TAGS) if verify is None else verify
        vocab = RamVocabulary.from_files(tag_list, thresholds, verify=do_verify)  # type: ignore[arg-type]
    if len(vocab) != num_tags:
        raise CheckpointError(f"the vocabulary has {len(vocab)} tags but the checkpoint has {num_tags} classes")
    return vocab
