"""RAM checkpoint keys: the authors' layout (fused qkv, their Swin names) <-> ours (transformers' Swin),
and reading their ``.pth``."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------------------------------
# State-dict key mapping (authors' layout <-> ours)
# --------------------------------------------------------------------------------------------------

# Our transformers-Swin key layout. transformers 5.x ("proj": attention.q_proj/k_proj/v_proj/o_proj,
# attention.relative_position_bias.relative_position_bias_table, mlp.fc1/fc2) and the older BERT-like
# layout ("legacy": attention.self.query/..., attention.output.dense, intermediate/output.dense) are
# both supported; which one applies is read off the installed SwinModel.
_BLOCK_MODULES: dict[str, dict[str, str]] = {
    "proj": {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.o_proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    },
    "legacy": {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    },
}
_BLOCK_TABLE = {
    "proj": "attention.relative_position_bias.relative_position_bias_table",
    "legacy": "attention.self.relative_position_bias_table",
}
_BLOCK_QKV = {
    "proj": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    "legacy": ("attention.self.query", "attention.self.key", "attention.self.value"),
}
_TOP_SWIN = {  # official module prefix under visual_encoder -> ours
    "patch_embed.proj": "embeddings.patch_embeddings.projection",
    "patch_embed.norm": "embeddings.norm",
    "norm": "layernorm",
}
_HEAD_PREFIXES = ("image_proj.", "wordvec_proj.", "fc.", "tagging_head.encoder.layer.")
_OFFICIAL_BLOCK = re.compile(r"^visual_encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_OFFICIAL_DOWNSAMPLE = re.compile(r"^visual_encoder\.layers\.(\d+)\.downsample\.(.+)$")
_OURS_BLOCK = re.compile(r"^visual_encoder\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_OURS_DOWNSAMPLE = re.compile(r"^visual_encoder\.encoder\.layers\.(\d+)\.downsample\.(.+)$")


@lru_cache(maxsize=1)
def installed_swin_layout() -> str:
    """Which key layout the installed transformers' SwinModel uses ("proj" or "legacy")."""
    from transformers import SwinConfig, SwinModel

    with torch.device("meta"):  # shapes only: no memory, no init cost
        keys = SwinModel(SwinConfig(embed_dim=8, depths=[1], num_heads=[1], window_size=2, image_size=8)).state_dict()
    return layout_of_keys(keys)


def layout_of_keys(keys: Iterable[str]) -> str:
    for key in keys:
        if ".attention.q_proj." in key:
            return "proj"
        if ".attention.self.query." in key:
            return "legacy"
    raise ValueError("cannot tell the Swin key layout (no q_proj / self.query keys)")


def rename_legacy_key(key: str) -> str:
    # Older RAM checkpoints call the tagging head "vision_multi" (the authors' loader renames it too).
    return "tagging_head." + key[len("vision_multi.") :] if key.startswith("vision_multi.") else key


def _ram_keys_from_official(key: str, layout: str) -> list[str]:
    """Our key(s) for one official tagger key (three for a fused qkv tensor)."""
    if key == "label_embed" or key.startswith(_HEAD_PREFIXES):
        return [key]
    m = _OFFICIAL_BLOCK.match(key)
    if m:
        stage, block, rest = m.groups()
        prefix = f"visual_encoder.encoder.layers.{stage}.blocks.{block}."
        if rest == "attn.relative_position_bias_table":
            return [prefix + _BLOCK_TABLE[layout]]
        module, _, param = rest.rpartition(".")
        if module == "attn.qkv":
            return [f"{prefix}{name}.{param}" for name in _BLOCK_QKV[layout]]
        if module in _BLOCK_MODULES[layout]:
            return [f"{prefix}{_BLOCK_MODULES[layout][module]}.{param}"]
        raise KeyError(key)
    m = _OFFICIAL_DOWNSAMPLE.match(key)
    if m:
        return [f"visual_encoder.encoder.layers.{m.group(1)}.downsample.{m.group(2)}"]
    if key.startswith("visual_encoder."):
        module, _, param = key[len("visual_encoder.") :].rpartition(".")
        if module in _TOP_SWIN:
            return [f"visual_encoder.{_TOP_SWIN[module]}.{param}"]
    raise KeyError(key)


def ram_key_to_official(key: str) -> tuple[str, int | None]:
    """Official key for one of our keys, and the q/k/v slot (0/1/2) when it is part of a fused qkv."""
    if key == "label_embed" or key.startswith(_HEAD_PREFIXES):
        return key, None
    m = _OURS_BLOCK.match(key)
    if m:
        stage, block, rest = m.groups()
        prefix = f"visual_encoder.layers.{stage}.blocks.{block}."
        for layout in ("proj", "legacy"):
            if rest == _BLOCK_TABLE[layout]:
                return prefix + "attn.relative_position_bias_table", None
            module, _, param = rest.rpartition(".")
            if module in _BLOCK_QKV[layout]:
                return f"{prefix}attn.qkv.{param}", _BLOCK_QKV[layout].index(module)
            for official, ours in _BLOCK_MODULES[layout].items():
                if module == ours:
                    return f"{prefix}{official}.{param}", None
        raise KeyError(key)
    m = _OURS_DOWNSAMPLE.match(key)
    if m:
        return f"visual_encoder.layers.{m.group(1)}.downsample.{m.group(2)}", None
    if key.startswith("visual_encoder."):
        module, _, param = key[len("visual_encoder.") :].rpartition(".")
        for official, ours in _TOP_SWIN.items():
            if module == ours:
                return f"visual_encoder.{official}.{param}", None
    raise KeyError(key)


def split_official_state_dict(
    state_dict: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Split an official RAM state dict into (tagger weights, skipped keys, unexpected keys).

    The legacy ``vision_multi.`` prefix is renamed to ``tagging_head.``. Skipped by name, because the
    tagger never uses them: ``text_decoder.*`` and ``tag_encoder.*`` (captioning / tag-encoding BERTs),
    the Swin buffers ``attn_mask`` / ``relative_position_index`` (recomputed from the config, as the
    authors' loader does), and tagging-head embeddings / self-attention / pooler (RAM deletes them).
    Anything else that is not a tagger weight is returned as unexpected (the authors' loader ignores
    such keys as well, with ``strict=False``).
    """
    tagger: dict[str, Tensor] = {}
    skipped: list[str] = []
    unexpected: list[str] = []
    for key, value in state_dict.items():
        name = rename_legacy_key(key)
        if (
            name.startswith(("text_decoder.", "tag_encoder.", "tagging_head.embeddings.", "tagging_head.pooler."))
            or name.endswith((".attn_mask", ".relative_position_index"))
            or re.match(r"tagging_head\.encoder\.layer\.\d+\.attention\.", name)
        ):
            skipped.append(key)
            continue
        try:
            _ram_keys_from_official(name, "proj")
        except KeyError:
            unexpected.append(key)
            continue
        tagger[name] = value
    return tagger, skipped, unexpected


def ram_state_from_official(state_dict: Mapping[str, Tensor], *, swin_layout: str | None = None) -> dict[str, Tensor]:
    """Map official tagger keys (as from :func:`split_official_state_dict`) to our module keys.

    Fused ``attn.qkv`` tensors are split into thirds (q, k, v; views, no copy). ``swin_layout``
    defaults to the installed transformers' layout. A key that is not a tagger weight raises KeyError.
    """
    layout = swin_layout or installed_swin_layout()
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        targets = _ram_keys_from_official(rename_legacy_key(key), layout)
        if len(targets) == 3:
            if value.shape[0] % 3:
                raise ValueError(f"{key}: first dimension {value.shape[0]} is not divisible by 3")
            for target, part in zip(targets, value.chunk(3, dim=0)):
                out[target] = part
        else:
            out[targets[0]] = value
    return out


def ram_state_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`ram_state_from_official`: our tagger keys back to the authors' layout (q/k/v re-fused).

    Keys of our modules that the authors do not store (none besides recomputed buffers) are dropped.
    """
    out: dict[str, Tensor] = {}
    fused: dict[str, list[Tensor | None]] = {}
    for key, value in state_dict.items():
        if key.endswith("relative_position_index"):
            continue  # buffer recomputed from the window size, not a weight
        official, slot = ram_key_to_official(key)
        if slot is None:
            out[official] = value
        else:
            fused.setdefault(official, [None, None, None])[slot] = value
    for official, parts in fused.items():
        if any(p is None for p in parts):
            raise KeyError(f"{official}: q, k and v are needed to rebuild it (got {sum(p is not None for p in parts)})")
        out[official] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    return out
