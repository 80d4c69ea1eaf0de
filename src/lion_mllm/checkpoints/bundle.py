"""Our bundle (config.json + sharded safetensors + tokenizers + tagger.json) and how a meta-built
LionModel is filled from a state dict (shared with the authors'-files loader in `official.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..model.config import LionConfig
from ..model.modeling_lion import LionModel
from .checkpoint_files import WEIGHTS_INDEX, LazySafetensors

__all__ = ["bundle_state", "expected_keys", "load_bundle_model", "materialise", "read_bundle_config",
           "write_bundle_config"]

# transformers' T5 stores the shared embedding once; these names are aliases of it.
T5_TIED_KEYS = ("language_model.encoder.embed_tokens.weight", "language_model.decoder.embed_tokens.weight")


def materialise(model: LionModel, state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Assign `state` (our names, final dtypes and device) into the meta-built model, re-tie T5's
    embedding and recompute the buffers that no file holds."""
    lm = model.language_model
    shared = state["language_model.shared.weight"]
    for alias in T5_TIED_KEYS:
        state[alias] = shared
    result = model.load_state_dict(state, strict=False, assign=True)
    assert not result.unexpected_keys, result.unexpected_keys  # callers filter before this point
    lm.encoder.embed_tokens.weight = lm.shared.weight
    lm.decoder.embed_tokens.weight = lm.shared.weight
    if model.config.uses_qformer:
        embeddings = model.qformer.embeddings
        embeddings.position_ids = torch.arange(embeddings.position_ids.shape[-1], device=device).expand(1, -1)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise RuntimeError(f"tensors with no value after loading: {leftovers[:5]}")


def expected_keys(model: LionModel) -> list[str]:
    """The state-dict keys a file must provide (tied aliases excluded)."""
    return [k for k in model.state_dict() if k not in T5_TIED_KEYS]


# config.json of a bundle: LionConfig's fields plus these two. Version 1 bundles (before the model type
# was written) hold LionConfig's fields only and still load.
BUNDLE_MODEL_TYPE = "lion"
BUNDLE_FORMAT_VERSION = 2


def write_bundle_config(config: LionConfig, directory: Path) -> Path:
    path = Path(directory) / "config.json"
    data = {"model_type": BUNDLE_MODEL_TYPE, "format_version": BUNDLE_FORMAT_VERSION, **config.to_dict()}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def read_bundle_config(directory: Path) -> LionConfig:
    """A bundle's config.json; every way it can be wrong is a CheckpointError naming the file."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json, so not a lion-mllm bundle (write one with "
                              "`lion convert` or Lion.save_pretrained)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    model_type = data.pop("model_type", BUNDLE_MODEL_TYPE)
    if model_type != BUNDLE_MODEL_TYPE:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not a lion-mllm bundle ({BUNDLE_MODEL_TYPE!r}); "
                              "a transformers model folder goes in the authors' YAML (llm_model), not --model")
    version = data.pop("format_version", 1)
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > BUNDLE_FORMAT_VERSION:
        raise CheckpointError(f"{path}: bundle format {version} is newer than this lion-mllm reads "
                              f"({BUNDLE_FORMAT_VERSION}); upgrade lion-mllm")
    try:
        return LionConfig.from_dict(data)
    except (TypeError, ValueError, AttributeError, KeyError) as error:
        raise CheckpointError(f"{path}: does not fit LionConfig's schema: {error}") from None


def load_bundle_model(directory: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      attn_implementation: str = "sdpa") -> LionModel:
    """A model saved by `Lion.save_pretrained`: no pickle, each tensor read once into its place."""
    device = torch.device(device)
    config = read_bundle_config(directory)
    index_file = directory / WEIGHTS_INDEX
    if not index_file.is_file():
        raise CheckpointError(f"{directory}: no {WEIGHTS_INDEX} (an incomplete bundle; write it again with "
                              "`lion convert` or Lion.save_pretrained)")
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        files = sorted({directory / f for f in weight_map.values()})
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{index_file}: not a safetensors index (needs a weight_map): {error}") from None
    absent = [f for f in files if not f.is_file()]
    if absent:
        raise CheckpointError(f"{index_file}: names {absent[0].name}, which is not in {directory}")
    try:
        with torch.device("meta"):
            model = LionModel(config, attn_implementation)
    except (ValueError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{directory / 'config.json'}: describes no buildable LION ({error})") from None
    targets = model.state_dict()
    lazy = LazySafetensors(files, device=device)
    expected = set(expected_keys(model))
    unexpected = sorted(set(lazy) - expected)
    missing = sorted(expected - set(lazy))
    if unexpected or missing:
        raise CheckpointError(f"{directory}: the weights do not match config.json: {len(missing)} missing "
                              f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]} (a config.json "
                              "from another model? write the bundle again with Lion.save_pretrained)")
    state = {}
    for key in lazy:  # one tensor at a time: a dtype change never holds two copies of the model
        tensor = lazy[key]
        if tuple(tensor.shape) != tuple(targets[key].shape):
            raise CheckpointError(f"{lazy.file_of(key)}: {key} has shape {tuple(tensor.shape)}, config.json "
                                  f"expects {tuple(targets[key].shape)} (a config.json from another model?)")
        state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    materialise(model, state, device)
    model.requires_grad_(False)
    return model.eval()


def bundle_state(model: LionModel) -> dict[str, torch.Tensor]:
    """What a bundle stores: the state dict without T5's tied embedding aliases."""
    return {k: v for k, v in model.state_dict().items() if k not in T5_TIED_KEYS}
