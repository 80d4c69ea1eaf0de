"""Published LION models: where their files live, how to download them, and how names resolve.

``lion download lion-flant5xl`` fetches everything the authors' model needs from its public home:

* the LION checkpoint, FlanT5 and BERT (config + vocabulary only) and RAM's checkpoint from the
  Hugging Face hub, through ``huggingface_hub`` (``HF_ENDPOINT`` is honoured, read at call time);
* ``eva_vit_g.pth`` and RAM's two vocabulary files from plain URLs, through
  :func:`lion_mllm.checkpoints.downloads.download_file` (resumable, checksum-verified);

then writes an authors'-format YAML config pointing at the cached files. ``--model lion-flant5xl``
(:func:`resolve_model`) finds that YAML again.

Where files go (default): hub files in the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), plain
URLs and the YAML in the package cache (:func:`lion_mllm.checkpoints.downloads.cache_dir`):
``<cache>/eva_vit_g.pth``, ``<cache>/ram/…`` (where the RAM tagger looks for its vocabulary) and
``<cache>/models/<name>/<name>.yaml``. With ``to=DIR`` the checkpoints and model folders go under
``DIR`` instead (the YAML is written there as well as into the cache, so the name still resolves).

``LION_MLLM_MIRROR`` (optional): a base URL that replaces ``https://`` for the plain-URL files, e.g.
``http://mirror.internal/`` fetches ``http://mirror.internal/storage.googleapis.com/…/eva_vit_g.pth``.

Other installed models: a directory ``<cache>/models/<name>/`` holding a bundle (``config.json``,
written by ``Lion.save_pretrained``) or ``<name>.yaml``, or a bundle shipped inside the package under
``lion_mllm/assets/models/<name>/``, is found by name too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .downloads import DownloadError, RemoteFile, cache_dir, download_file

__all__ = [
    "DEFAULT_MODEL",
    "MIRROR_ENV",
    "PUBLISHED_MODELS",
    "HubFile",
    "HubFolder",
    "ModelNotInstalledError",
    "PublishedModel",
    "download_model",
    "installed_model",
    "model_home",
    "resolve_model",
]

# The built-in demo model another part of the project ships; `--model` defaults to it.
DEFAULT_MODEL = "lion-shapes"
MODEL_ENV = "LION_MODEL"
MIRROR_ENV = "LION_MLLM_MIRROR"

EVA_VIT_G = RemoteFile(
    url="https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth",
    filename="eva_vit_g.pth",
)


class ModelNotInstalledError(FileNotFoundError):
    """A model name that is neither a path nor an installed/downloaded model."""


@dataclass(frozen=True)
class HubFile:
    """One file of a Hugging Face hub repository, at a pinned commit where one is known."""

    repo_id: str
    filename: str
    revision: str = "main"


@dataclass(frozen=True)
class HubFolder:
    """The files of a hub repository that match ``allow_patterns`` (a model folder for transformers).

    ``fallback_patterns`` are fetched only when the first download brought no ``*.safetensors``
    weights although some were asked for (older repositories hold ``pytorch_model*.bin`` only).
    """

    repo_id: str
    allow_patterns: tuple[str, ...]
    revision: str = "main"
    fallback_patterns: tuple[str, ...] = ()

    @property
    def folder_name(self) -> str:
        return self.repo_id.rsplit("/", 1)[-1]


# Commits the downloads are pinned to, so a later push to a repository cannot change what
# `lion download` installs. The LION checkpoints' repositories have no commit recorded here yet and follow
# `main` (their files are checked by loading: every key and shape must fit).
FLAN_T5_XL_REVISION = "7d6315df2c2fb742f0f5b556879d730926ca9001"
FLAN_T5_XXL_REVISION = "ae7c9136adc7555eeccc78cdd960dfd60fb346ce"
BERT_BASE_UNCASED_REVISION = "86b5e0934494bd15c9632b12f734a8a67f723594"
RAM_REVISION = "ebc52dc741e86466202a5ab8ab22eae6e7d48bf1"

_T5_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_T5_FALLBACK = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
# The Q-Former is built from BERT's config and vocabulary; BERT's weights are never used by LION.
_BERT_PATTERNS = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _ram_vocabulary() -> tuple[RemoteFile, ...]:
    # Imported lazily: the tagger module pulls in torch, which `lion download --list` does not need.
    from ..ram import RAM_TAG_LIST_FILE, RAM_THRESHOLDS_FILE

    return (RAM_TAG_LIST_FILE, RAM_THRESHOLDS_FILE)


@dataclass(frozen=True)
class PublishedModel:
    """A released LION model and every file it needs."""

    name: str
    description: str
    checkpoint: HubFile
    llm: HubFolder
    bert: HubFolder = HubFolder("google-bert/bert-base-uncased", _BERT_PATTERNS, revision=BERT_BASE_UNCASED_REVISION)
    vit: RemoteFile = EVA_VIT_G
    ram: HubFile | None = HubFile("xinyu1205/recognize_anything_model", "ram_swin_large_14m.pth",
                                  revision=RAM_REVISION)
    # None: RAM's official tag list and thresholds (lion_mllm.ram); () for none.
    ram_vocabulary: tuple[RemoteFile, ...] | None = None
    visual_input: str = "ALL"
    extra_config: dict[str, Any] = field(default_factory=dict)

    def vocabulary_files(self) -> tuple[RemoteFile, ...]:
        if self.ram is None:
            return ()
        return _ram_vocabulary() if self.ram_vocabulary is None else self.ram_vocabulary


def _flan_t5(repo: str, revision: str) -> HubFolder:
    """A FlanT5 repository, fetched as every published model needs it (`_T5_PATTERNS`)."""
    return HubFolder(repo, _T5_PATTERNS, revision=revision, fallback_patterns=_T5_FALLBACK)


PUBLISHED_MODELS: dict[str, PublishedModel] = {
    "lion-flant5xl": PublishedModel(
        name="lion-flant5xl",
        description="LION-FlanT5-XL (LION-4B): EVA ViT-g + FlanT5-XL, stage-3 weights",
        checkpoint=HubFile("daybreaksly/LION-FlanT5-XL", "LION-FlanT5-XL.pth"),
        llm=_flan_t5("google/flan-t5-xl", FLAN_T5_XL_REVISION),
    ),
    "lion-flant5xxl": PublishedModel(
        name="lion-flant5xxl",
        description="LION-FlanT5-XXL (LION-12B): EVA ViT-g + FlanT5-XXL",
        checkpoint=HubFile("daybreaksly/LION-FlanT5-XXL", "LION-FlanT5-XXL.pth"),
        llm=_flan_t5("google/flan-t5-xxl", FLAN_T5_XXL_REVISION),
    ),
}


# ---------------------------------------------------------------------------------------- resolving


def model_home(name: str) -> Path:
    """Where an installed model's YAML (or bundle) lives in the package cache."""
    return cache_dir() / "models" / name


def _config_paths(config: Path) -> list[Path]:
    """The files an authors'-format YAML names (missing ones make the install incomplete)."""
    data = yaml.safe_load(config.read_text()) or {}
    model = data.get("model", data) if isinstance(data, dict) else {}
    found = []
    for key in ("bert_model", "vit_model", "llm_model", "ram_model", "pretrained"):
        value = model.get(key) if isinstance(model, dict) else None
        if value:
            path = Path(str(value)).expanduser()
            found.append(path if path.is_absolute() else config.parent / path)
    return found


def installed_model(name: str) -> Path | None:
    """The bundle directory or YAML config installed under ``name``, or None.

    Raises :class:`ModelNotInstalledError` for a downloaded model whose files have since gone.
    """
    home = model_home(name)
    if (home / "config.json").is_file():
        return home
    config = home / f"{name}.yaml"
    if config.is_file():
        missing = [str(p) for p in _config_paths(config) if not p.exists()]
        if missing:
            raise ModelNotInstalledError(
                f"model {name!r} is incomplete ({missing[0]} is missing); run `lion download {name}` again")
        return config
    packaged = Path(__file__).resolve().parents[1] / "assets" / "models" / name  # lion_mllm/assets
    if (packaged / "config.json").is_file():
        return packaged
    return None


def _looks_like_name(text: str) -> bool:
    return not any(sep in text for sep in ("/", "\\", os.sep)) and not text.startswith((".", "~")) \
        and Path(text).suffix == ""


def resolve_model(spec: str | os.PathLike[str] | None = None) -> str:
    """The one place a model name becomes a local path: a bundle directory or the authors' YAML.

    ``spec`` (default ``$LION_MODEL``, else :data:`DEFAULT_MODEL`) may be a bundle directory, a YAML
    config, ``local-dir:PATH``, ``hf-hub:owner/repo[@revision]`` (downloaded into the Hugging Face cache,
    or reused from it), or an installed model name (``lion-flant5xl`` after ``lion download``). Raises
    :class:`ModelNotInstalledError` (a FileNotFoundError) with a one-line explanation otherwise.
    """
    text = str(spec) if spec else (os.environ.get(MODEL_ENV) or DEFAULT_MODEL)
    if text.startswith("hf-hub:"):
        return str(fetch_hub_bundle(text[len("hf-hub:"):]))
    if text.startswith("local-dir:"):
        path = Path(text[len("local-dir:"):]).expanduser()
        if not path.is_dir():
            raise ModelNotInstalledError(f"{text}: not a directory")
        return str(path)
    path = Path(text).expanduser()
    if path.suffix.lower() in (".yaml", ".yml"):
        if not path.is_file():
            raise ModelNotInstalledError(f"{text}: no such config file")
        return str(path)
    if path.is_dir():
        return str(path)
    if path.exists():
        from ..errors import CheckpointError

        raise CheckpointError(f"{text}: a {path.suffix or 'plain'} file is not a model; pass a bundle directory "
                              "(`lion convert` writes one from the authors' files) or the authors' .yaml config "
                              "that names this file")
    if not _looks_like_name(text):
        raise ModelNotInstalledError(f"{text}: no such file or directory")
    found = installed_model(text)
    if found is not None:
        return str(found)
    if text in PUBLISHED_MODELS:
        raise ModelNotInstalledError(f"model {text!r} is not downloaded; run `lion download {text}` first")
    raise ModelNotInstalledError(f"model {text!r} is not installed")


# ---------------------------------------------------------------------------------------- downloading


def _say(message: str) -> None:
    print(f"lion download: {message}", file=sys.stderr, flush=True)


def mirrored(url: str) -> str:
    """``url`` rewritten onto ``$LION_MLLM_MIRROR`` when that is set (scheme dropped, host kept as a folder)."""
    mirror = os.environ.get(MIRROR_ENV)
    if not mirror:
        return url
    return f"{mirror.rstrip('/')}/{url.split('://', 1)[-1]}"


def _endpoint() -> str | None:
    # Read now rather than at huggingface_hub's import, so a changed HF_ENDPOINT is honoured.
    value = os.environ.get("HF_ENDPOINT")
    return value.rstrip("/") if value else None


def _hub_error(what: str, error: BaseException) -> DownloadError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    where = _endpoint() or "https://huggingface.co"
    return DownloadError(f"could not download {what} from {where}: {first}")


def fetch_hub_file(item: HubFile, local_dir: Path | None = None) -> Path:
    """Download (or reuse from the cache) one hub file; returns its local path."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(item.repo_id, item.filename, revision=item.revision, endpoint=_endpoint(),
                                    local_dir=str(local_dir) if local_dir is not None else None))
    except Exception as error:  # huggingface_hub raises many types; one clear line is what users need
        raise _hub_error(f"{item.repo_id}/{item.filename}", error) from error


def fetch_hub_folder(item: HubFolder, local_dir: Path | None = None) -> Path:
    """Download (or reuse) the files of ``item`` matching its patterns; returns the folder."""
    from huggingface_hub import snapshot_download

    def fetch(patterns: tuple[str, ...]) -> Path:
        try:
            return Path(snapshot_download(item.repo_id, revision=item.revision, allow_patterns=list(patterns),
                                          endpoint=_endpoint(),
                                          local_dir=str(local_dir) if local_dir is not None else None))
        except Exception as error:
            raise _hub_error(f"{item.repo_id} ({', '.join(patterns)})", error) from error

    folder = fetch(item.allow_patterns)
    if item.fallback_patterns and not any(folder.glob("*.safetensors")):
        folder = fetch(item.fallback_patterns)
    if not (folder / "config.json").is_file():
        raise DownloadError(f"{item.repo_id}: the download has no config.json (is it a model repository?)")
    return folder


def fetch_hub_bundle(repo_and_revision: str) -> Path:
    """A lion-mllm bundle published on the hub (``owner/repo[@revision]``): the whole repository."""
    from huggingface_hub import snapshot_download

    repo, _, revision = repo_and_revision.partition("@")
    try:
        folder = Path(snapshot_download(repo, revision=revision or None, endpoint=_endpoint()))
    except Exception as error:  # huggingface_hub raises many types; one clear line is what users need
        raise _hub_error(repo_and_revision, error) from error
    if not (folder / "config.json").is_file():
        raise DownloadError(f"hf-hub:{repo_and_revision}: the repository has no config.json, so it is not a "
                            "lion-mllm bundle (Lion.save_pretrained writes one)")
    return folder


@contextlib.contextmanager
def _hub_progress(enabled: bool) -> Iterator[None]:
    """huggingface_hub's own progress bars on or off for the duration (its switch is global)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not enabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


def _is_complete(config: Path) -> bool:
    try:
        return config.is_file() and all(p.exists() for p in _config_paths(config))
    except (OSError, yaml.YAMLError):
        return False


def write_official_config(path: Path, *, bert_model: Path, vit_model: Path, llm_model: Path,
                          pretrained: Path, ram_model: Path | None, visual_input: str = "ALL",
                          enable_semantic_tags: bool = True, extra: dict[str, Any] | None = None) -> Path:
    """Write an authors'-format YAML (``model: {...}``) with absolute paths; returns ``path``."""
    model: dict[str, Any] = {
        "bert_model": str(Path(bert_model).resolve()),
        "vit_model": str(Path(vit_model).resolve()),
        "llm_model": str(Path(llm_model).resolve()),
        "ram_model": str(Path(ram_model).resolve()) if ram_model is not None else None,
        "load_pretrained": True,
        "pretrained": str(Path(pretrained).resolve()),
        "visual_input": visual_input,
        "enable_semantic_tags": enable_semantic_tags,
        **(extra or {}),
    }
    if model["ram_model"] is None:
        del model["ram_model"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump({"model": model}, sort_keys=False))
    os.replace(tmp, path)  # a half-written YAML would look like a complete install
    return path


def download_model(model: str | PublishedModel, to: str | os.PathLike[str] | None = None, *,
                   refresh: bool = False, progress: bool = True,
                   say: Callable[[str], None] | None = _say) -> Path:
    """Fetch every file of a published model and return the path of its YAML config.

    An install that is already complete is returned without any network access unless ``refresh``;
    with ``refresh`` the servers are asked again but files already in the caches are not downloaded
    again. Raises ``KeyError`` for an unknown name and :class:`DownloadError` when a file cannot be
    fetched or does not verify.
    """
    spec = model if isinstance(model, PublishedModel) else PUBLISHED_MODELS.get(model)
    if spec is None:
        raise KeyError(f"unknown model {model!r}; published models: {', '.join(PUBLISHED_MODELS)}")
    say = say or (lambda _message: None)
    target = Path(to).expanduser() if to is not None else None
    cache_config = model_home(spec.name) / f"{spec.name}.yaml"
    config = (target / f"{spec.name}.yaml") if target is not None else cache_config
    if not refresh and _is_complete(config):
        if config != cache_config:
            cache_config.parent.mkdir(parents=True, exist_ok=True)
            cache_config.write_text(config.read_text())
        say(f"{spec.name} is already downloaded ({config})")
        return config

    vocabulary = spec.vocabulary_files()
    steps = 5 + (1 if spec.ram is not None else 0) + len(vocabulary)
    step = iter(range(1, steps + 1))

    with _hub_progress(progress):
        say(f"[{next(step)}/{steps}] LION checkpoint {spec.checkpoint.repo_id}/{spec.checkpoint.filename}")
        pretrained = fetch_hub_file(spec.checkpoint, target)
        say(f"[{next(step)}/{steps}] language model {spec.llm.repo_id}")
        llm = fetch_hub_folder(spec.llm, target / spec.llm.folder_name if target is not None else None)
        say(f"[{next(step)}/{steps}] BERT tokenizer/config {spec.bert.repo_id}")
        bert = fetch_hub_folder(spec.bert, target / spec.bert.folder_name if target is not None else None)
    say(f"[{next(step)}/{steps}] vision encoder {spec.vit.url}")
    # No checksum of eva_vit_g.pth is published: the first download's sha256 is recorded and checked after.
    vit = download_file(mirrored(spec.vit.url), (target or cache_dir()) / spec.vit.filename, md5=spec.vit.md5,
                        sha256=spec.vit.sha256, expected_size=spec.vit.size, progress=progress,
                        record_sha256=spec.vit.md5 is None and spec.vit.sha256 is None)
    ram = None
    if spec.ram is not None:
        say(f"[{next(step)}/{steps}] RAM tagger {spec.ram.repo_id}/{spec.ram.filename}")
        with _hub_progress(progress):
            ram = fetch_hub_file(spec.ram, target)
    for remote in vocabulary:
        # Always into the package cache: that is where the tagger looks for its vocabulary.
        say(f"[{next(step)}/{steps}] RAM vocabulary {Path(remote.filename).name}")
        download_file(mirrored(remote.url), cache_dir() / remote.filename, md5=remote.md5, sha256=remote.sha256,
                      expected_size=remote.size, progress=progress)
    write_official_config(config, bert_model=bert, vit_model=vit, llm_model=llm, pretrained=pretrained,
                          ram_model=ram, visual_input=spec.visual_input, extra=spec.extra_config)
    if config != cache_config:
        cache_config.parent.mkdir(parents=True, exist_ok=True)
        cache_config.write_text(config.read_text())
    say(f"[{next(step)}/{steps}] wrote {config}")
    return config
