"""RAM (Recognize Anything) image tagger, as LION uses it, on current PyTorch / transformers.

LION prompts its LLM with image tags from RAM (``ram_swin_large_14m.pth``). This module rebuilds the
part of RAM that produces those tags and loads the authors' checkpoint as users have it:

* backbone: Swin-L 384 on transformers' :class:`~transformers.SwinModel` (the authors' Swin keys are
  mapped: fused ``qkv`` split into q/k/v, relative position tables, patch merging, norms); its output is
  ``cat(mean over tokens, tokens)`` after the final norm, (B, 1 + 144, 1536) for Swin-L 384;
* ``image_proj`` (1536 -> 512), the label embeddings (4585 x 512) and their projection into label
  queries ``relu(wordvec_proj(label_embed))`` (-> 768);
* the tagging head: two cross-attention-only BERT layers (label queries attend to the image tokens;
  RAM deletes their self-attention and embeddings), written here on
  :func:`torch.nn.functional.scaled_dot_product_attention`; then ``fc`` (768 -> 1) gives one logit per tag;
* tag decision: tag *i* fires when ``sigmoid(logit_i) > class_threshold[i]`` (strict), with RAM's
  per-class thresholds (``ram_tag_list_threshold.txt``). The authors' ``generate_tag`` ignores the
  single ``threshold`` passed to it (LION passes 0.85 for nothing); we replicate that by default and
  let a caller override it per call with ``threshold=``;
* output per image: English tags in tag-list index order, formatted exactly as LION's
  ``generate_tags`` (``' | '.join(tags).replace(' |', ',')``, i.e. ``"tag1, tag2, ..."``).

Determinism (a deliberate difference from the authors' code): LION never calls ``.eval()`` on RAM,
so the official tags come from a train-mode network (stochastic depth in Swin, dropout in the
tagging head) and change from run to run. Here the tagger is always in eval mode (``train()`` is a
no-op) and runs under ``torch.no_grad()``: the same image always gives the same tags.

Configuration: :class:`RamConfig` holds every size. ``RamConfig.swin_large()`` is the real model;
``RamConfig.from_official_dir()`` reads RAM's own config folder layout
(``configs/swin/config_swinL_384.json`` + ``configs/q2l_config.json``); and when no config is given,
:meth:`RamTagger.from_official` infers it from the checkpoint's tensor shapes
(:meth:`RamConfig.from_state_dict`). Shapes cannot tell the tagging head's number of attention
heads (RAM always uses 4) nor, without the stored ``attn_mask`` buffers, the image size (384 for
window 12, 224 for window 7, as in RAM's two Swin-L configs); both can be overridden.

Vocabulary: the 4585 English tags and their thresholds are not in the checkpoint; they are public
files of RAM's repository, fetched (md5-verified) into the package cache by
:func:`fetch_ram_vocabulary_files`, or read from local paths (or from ``<dir>/data/`` when ``config``
is a RAM config folder).

Precision: float32 reproduces the authors' logits to float32 noise (a few 1e-6); in bfloat16 the
logits move by ~1e-2..1e-1, enough to flip tags whose probability sits next to its threshold.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .downloads import RemoteFile, cache_dir, file_digest
from .errors import CheckpointError
from .resample import resize

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OFFICIAL_NUM_TAGS",
    "RAM_TAG_LIST_FILE",
    "RAM_THRESHOLDS_FILE",
    "RAM_BUNDLE_WEIGHTS",
    "LazyRamTagger",
    "RamCheckpointError",
    "RamConfig",
    "RamLoadReport",
    "RamTagger",
    "RamTaggingHead",
    "RamVocabulary",
    "RamVocabularyError",
    "fetch_ram_vocabulary_files",
    "installed_swin_layout",
    "load_official_state_dict",
    "official_to_ours",
    "ours_to_official",
    "preprocess_images",
    "split_official_state_dict",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_NUM_TAGS = 4585

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
RAM_BUNDLE_WEIGHTS = "ram.safetensors"
_BUNDLE_TAG_LIST = "ram_tag_list.txt"
_BUNDLE_THRESHOLDS = "ram_tag_list_threshold.txt"


class RamCheckpointError(CheckpointError, RuntimeError):
    """The RAM checkpoint cannot be read or does not fit the tagger (message names the file). A
    CheckpointError like every other loading problem; still a RuntimeError for older callers."""


class RamVocabularyError(CheckpointError):
    """A tag list / threshold file is not the expected one or cannot be parsed."""


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class RamConfig:
    """Sizes of RAM's tagging path. Defaults are the real ``ram_swin_large_14m`` (Swin-L 384)."""

    # Swin backbone (RAM: patch 4, mlp_ratio 4, qkv bias, no absolute position embedding, LN eps 1e-5)
    image_size: int = 384
    patch_size: int = 4
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    mlp_ratio: float = 4.0
    swin_layer_norm_eps: float = 1e-5
    # width of image_proj's output and of the label embeddings (RAM hard-codes 512, the CLIP text width)
    embed_width: int = 512
    num_tags: int = OFFICIAL_NUM_TAGS
    # tagging head (RAM's q2l_config.json)
    hidden_size: int = 768
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    # preprocessing (RAM's get_transform: bilinear resize, ImageNet statistics)
    image_mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    image_std: tuple[float, ...] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        # JSON gives lists; keep tuples so configs compare and hash predictably.
        self.depths = tuple(int(d) for d in self.depths)
        self.num_heads = tuple(int(h) for h in self.num_heads)
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} differ in length")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2**i) % heads:
                raise ValueError(f"Swin stage {i} width {self.embed_dim * 2**i} is not divisible by {heads} heads")

    @property
    def vision_width(self) -> int:
        """Width of the Swin output (1536 for Swin-L)."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RamConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they are most likely typos)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RamConfig keys: {unknown}")
        return cls(**dict(data))

    @classmethod
    def swin_large(cls) -> RamConfig:
        """The real ``ram_swin_large_14m`` configuration (Swin-L 384, 4585 tags)."""
        return cls()

    @classmethod
    def from_official_dir(cls, ram_dir: PathLike, *, image_size: int = 384, num_tags: int | None = None) -> RamConfig:
        """Read RAM's config folder layout (``<ram_dir>/configs/swin/config_swinL_<image_size>.json``
        and ``<ram_dir>/configs/q2l_config.json``).

        ``num_tags`` defaults to the number of lines of ``<ram_dir>/data/ram_tag_list.txt`` when that
        file exists (RAM sizes its label embeddings from it), else 4585.
        """
        ram_dir = Path(ram_dir)
        swin_path = ram_dir / "configs" / "swin" / f"config_swinL_{image_size}.json"
        q2l_path = ram_dir / "configs" / "q2l_config.json"
        try:
            swin = json.loads(swin_path.read_text(encoding="utf-8"))
            q2l = json.loads(q2l_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise RamCheckpointError(f"cannot read RAM config folder {ram_dir} (it needs configs/q2l_config.json and "
                                     f"configs/swin/config_swinL_{image_size}.json): {err}") from err
        if num_tags is None:
            tag_file = ram_dir / "data" / "ram_tag_list.txt"
            num_tags = (
                len(tag_file.read_text(encoding="utf-8").splitlines()) if tag_file.is_file() else OFFICIAL_NUM_TAGS
            )
        config = cls(
            image_size=int(swin["image_res"]),
            embed_dim=int(swin["embed_dim"]),
            depths=tuple(swin["depths"]),
            num_heads=tuple(swin["num_heads"]),
            window_size=int(swin["window_size"]),
            num_tags=num_tags,
            hidden_size=int(q2l["hidden_size"]),
            num_hidden_layers=int(q2l["num_hidden_layers"]),
            num_attention_heads=int(q2l["num_attention_heads"]),
            intermediate_size=int(q2l["intermediate_size"]),
            layer_norm_eps=float(q2l.get("layer_norm_eps", 1e-12)),
            hidden_act=str(q2l.get("hidden_act", "gelu")),
            # q2l's own encoder_width is overwritten by RAM with 512 (ram.py), so it is not read here.
        )
        if "vision_width" in swin and int(swin["vision_width"]) != config.vision_width:
            raise ValueError(
                f"{swin_path}: vision_width {swin['vision_width']} != embed_dim * 2**(stages-1) = {config.vision_width}"
            )
        return config

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, Tensor],
        *,
        num_attention_heads: int = 4,
        image_size: int | None = None,
    ) -> RamConfig:
        """Infer the configuration from an official-layout RAM state dict (tensor shapes only).

        The tagging head's head count is not visible in shapes (RAM: 4). The image size comes from a
        stored Swin ``attn_mask`` buffer if there is one, else from the window (12 -> 384, 7 -> 224).
        """
        sd = {_rename_legacy(k): v for k, v in state_dict.items()}

        def need(key: str) -> Tensor:
            if key not in sd:
                raise RamCheckpointError(f"cannot infer the RAM config: the state dict has no {key!r}")
            return sd[key]

        proj = need("visual_encoder.patch_embed.proj.weight")
        embed_dim, patch_size = int(proj.shape[0]), int(proj.shape[-1])
        blocks: dict[int, int] = {}
        for key in sd:
            m = re.match(r"visual_encoder\.layers\.(\d+)\.blocks\.(\d+)\.", key)
            if m:
                s, b = int(m.group(1)), int(m.group(2))
                blocks[s] = max(blocks.get(s, 0), b + 1)
        if not blocks or sorted(blocks) != list(range(len(blocks))):
            raise RamCheckpointError(f"cannot infer the Swin stages from the state dict (found {sorted(blocks)})")
        depths = tuple(blocks[s] for s in range(len(blocks)))
        tables = [need(f"visual_encoder.layers.{s}.blocks.0.attn.relative_position_bias_table") for s in blocks]
        num_heads = tuple(int(t.shape[1]) for t in tables)
        side = math.isqrt(int(tables[0].shape[0]))
        if side * side != tables[0].shape[0] or side % 2 == 0:
            raise RamCheckpointError(f"relative position table of {tables[0].shape[0]} rows is not (2W-1)^2")
        window = (side + 1) // 2
        fc1 = need("visual_encoder.layers.0.blocks.0.mlp.fc1.weight")
        mlp_ratio = fc1.shape[0] / embed_dim
        if image_size is None:
            image_size = _image_size_from_attn_masks(sd, window, patch_size)
        if image_size is None:
            image_size = {12: 384, 7: 224}.get(window)
            if image_size is None:
                raise RamCheckpointError(f"cannot infer the image size for window {window}; pass a RamConfig")
        label_embed = need("label_embed")
        wordvec = need("wordvec_proj.weight")
        layers = {
            int(m.group(1)) for k in sd if (m := re.match(r"tagging_head\.encoder\.layer\.(\d+)\.crossattention\.", k))
        }
        inter = need("tagging_head.encoder.layer.0.intermediate.dense.weight")
        return cls(
            image_size=image_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depths=depths,
            num_heads=num_heads,
            window_size=window,
            mlp_ratio=float(mlp_ratio),
            embed_width=int(label_embed.shape[1]),
            num_tags=int(label_embed.shape[0]),
            hidden_size=int(wordvec.shape[0]),
            num_hidden_layers=len(layers),
            num_attention_heads=num_attention_heads,
            intermediate_size=int(inter.shape[0]),
        )

    def swin_config(self):  # -> transformers.SwinConfig
        """The transformers ``SwinConfig`` reproducing RAM's Swin (dropout and drop-path off: inference only)."""
        from transformers import SwinConfig

        return SwinConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=3,
            embed_dim=self.embed_dim,
            depths=list(self.depths),
            num_heads=list(self.num_heads),
            window_size=self.window_size,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=True,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            drop_path_rate=0.0,
            hidden_act="gelu",
            use_absolute_embeddings=False,
            layer_norm_eps=self.swin_layer_norm_eps,
        )


def _image_size_from_attn_masks(sd: Mapping[str, Tensor], window: int, patch_size: int) -> int | None:
    # attn_mask of a shifted block in stage s has (H_s / W)^2 windows; H_s = image / patch / 2^s.
    for key, value in sd.items():
        m = re.match(r"visual_encoder\.layers\.(\d+)\.blocks\.\d+\.attn_mask$", key)
        if m and value.dim() == 3:
            per_side = math.isqrt(int(value.shape[0]))
            if per_side * per_side == value.shape[0]:
                return per_side * window * 2 ** int(m.group(1)) * patch_size
    return None


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
    return _layout_of_keys(keys)


def _layout_of_keys(keys: Iterable[str]) -> str:
    for key in keys:
        if ".attention.q_proj." in key:
            return "proj"
        if ".attention.self.query." in key:
            return "legacy"
    raise ValueError("cannot tell the Swin key layout (no q_proj / self.query keys)")


def _rename_legacy(key: str) -> str:
    # Older RAM checkpoints call the tagging head "vision_multi" (the authors' loader renames it too).
    return "tagging_head." + key[len("vision_multi.") :] if key.startswith("vision_multi.") else key


def _official_to_ours_key(key: str, layout: str) -> list[str]:
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


def _ours_to_official_key(key: str) -> tuple[str, int | None]:
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
        name = _rename_legacy(key)
        if (
            name.startswith(("text_decoder.", "tag_encoder.", "tagging_head.embeddings.", "tagging_head.pooler."))
            or name.endswith((".attn_mask", ".relative_position_index"))
            or re.match(r"tagging_head\.encoder\.layer\.\d+\.attention\.", name)
        ):
            skipped.append(key)
            continue
        try:
            _official_to_ours_key(name, "proj")
        except KeyError:
            unexpected.append(key)
            continue
        tagger[name] = value
    return tagger, skipped, unexpected


def official_to_ours(state_dict: Mapping[str, Tensor], *, swin_layout: str | None = None) -> dict[str, Tensor]:
    """Map official tagger keys (as from :func:`split_official_state_dict`) to our module keys.

    Fused ``attn.qkv`` tensors are split into thirds (q, k, v; views, no copy). ``swin_layout``
    defaults to the installed transformers' layout. A key that is not a tagger weight raises KeyError.
    """
    layout = swin_layout or installed_swin_layout()
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        targets = _official_to_ours_key(_rename_legacy(key), layout)
        if len(targets) == 3:
            if value.shape[0] % 3:
                raise ValueError(f"{key}: first dimension {value.shape[0]} is not divisible by 3")
            for target, part in zip(targets, value.chunk(3, dim=0)):
                out[target] = part
        else:
            out[targets[0]] = value
    return out


def ours_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`official_to_ours`: our tagger keys back to the authors' layout (q/k/v re-fused).

    Keys of our modules that the authors do not store (none besides recomputed buffers) are dropped.
    """
    out: dict[str, Tensor] = {}
    fused: dict[str, list[Tensor | None]] = {}
    for key, value in state_dict.items():
        if key.endswith("relative_position_index"):
            continue  # buffer recomputed from the window size, not a weight
        official, slot = _ours_to_official_key(key)
        if slot is None:
            out[official] = value
        else:
            fused.setdefault(official, [None, None, None])[slot] = value
    for official, parts in fused.items():
        if any(p is None for p in parts):
            raise KeyError(f"{official}: q, k and v are needed to rebuild it (got {sum(p is not None for p in parts)})")
        out[official] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    return out


def load_official_state_dict(path: PathLike) -> dict[str, Tensor]:
    """Read an official RAM ``.pth`` (``{'model': state_dict}`` or a bare state dict), memory-mapped.

    Raises FileNotFoundError for a missing file and :class:`RamCheckpointError` naming the file for a
    truncated / corrupt / non-checkpoint file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"RAM checkpoint not found: {path}")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            # mmap needs the zip format (torch >= 1.6); an old-format file loads without it.
            if "mmap can only be used" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError / UnpicklingError / EOFError ... for bad files
        raise RamCheckpointError(
            f"cannot read the RAM checkpoint {path}: the file is truncated, corrupt or not a PyTorch "
            f"checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    sd = obj.get("model", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise RamCheckpointError(f"{path} does not hold a RAM state dict (expected {{'model': {{name: tensor}}}})")
    return dict(sd)


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
                    raise RamVocabularyError(
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
                raise RamVocabularyError(f"{thr_path}:{lineno}: not a number: {line!r}") from None
        if len(tags) != len(values):
            raise RamVocabularyError(f"{tag_path} has {len(tags)} tags but {thr_path} has {len(values)} thresholds")
        return cls(tags=tags, thresholds=tuple(values))

    @classmethod
    def official(cls, directory: PathLike | None = None, *, progress: bool = False) -> RamVocabulary:
        """RAM's official 4585-tag vocabulary, fetched into the cache if needed."""
        tag_path, thr_path = fetch_ram_vocabulary_files(directory, progress=progress)
        return cls.from_files(tag_path, thr_path, verify=True)


def _resolve_vocabulary(
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
        raise RamVocabularyError(f"the vocabulary has {len(vocab)} tags but the checkpoint has {num_tags} classes")
    return vocab


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------


def preprocess_images(
    images: Sequence[Image.Image],
    image_size: int = 384,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """RAM's eval transform, bit-for-bit: RGB, bilinear resize to a square, /255, normalise.

    Returns a float32 tensor (B, 3, image_size, image_size). torchvision's ``Resize`` on a PIL image
    calls PIL's own ``resize``: the authors' Pillow 9.4 pixels come from ``resample.resize`` whatever
    Pillow is installed; ``ToTensor`` divides a uint8 tensor by 255 in float32.
    """
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    out = []
    for img in images:
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        pixels = resize(np.asarray(rgb, dtype=np.uint8), (image_size, image_size), "bilinear")
        x = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)
        out.append(x.sub(mean_t).div(std_t))
    return torch.stack(out) if out else torch.empty(0, 3, image_size, image_size)


# --------------------------------------------------------------------------------------------------
# Tagging head
# --------------------------------------------------------------------------------------------------


class _QKV(nn.Module):
    def __init__(self, hidden: int, kv_width: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)


class _DenseAddNorm(nn.Module):
    """BERT's output sublayer: LayerNorm(dense(x) + residual)."""

    def __init__(self, in_features: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)  # name kept: it is the checkpoint key

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _CrossAttention(nn.Module):
    def __init__(self, config: RamConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.self = _QKV(config.hidden_size, config.embed_width)
        self.output = _DenseAddNorm(config.hidden_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, hidden: Tensor, image_embeds: Tensor) -> Tensor:
        b, n, d = hidden.shape
        h = self.num_heads

        def heads(x: Tensor) -> Tensor:
            return x.view(x.shape[0], x.shape[1], h, d // h).transpose(1, 2)

        q = heads(self.self.query(hidden))
        k = heads(self.self.key(image_embeds))
        v = heads(self.self.value(image_embeds))
        # RAM's image attention mask is all ones (an additive 0), so no mask is needed;
        # default scale 1/sqrt(head_dim) as in BERT. No dropout: inference only.
        ctx = F.scaled_dot_product_attention(q, k, v)
        ctx = ctx.transpose(1, 2).reshape(b, n, d)
        return self.output(ctx, hidden)


class _Intermediate(nn.Module):
    def __init__(self, config: RamConfig) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]  # "gelu" = exact erf GELU, as in RAM's BERT

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class RamTaggingLayer(nn.Module):
    """One RAM tagging-head layer: cross-attention (labels -> image) + feed-forward, post-LN."""

    def __init__(self, config: RamConfig) -> None:
        super().__init__()
        self.crossattention = _CrossAttention(config)
        self.intermediate = _Intermediate(config)
        self.output = _DenseAddNorm(config.intermediate_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, hidden: Tensor, image_embeds: Tensor) -> Tensor:
        attn = self.crossattention(hidden, image_embeds)
        return self.output(self.intermediate(attn), attn)


class _Encoder(nn.Module):
    def __init__(self, config: RamConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(RamTaggingLayer(config) for _ in range(config.num_hidden_layers))


class RamTaggingHead(nn.Module):
    """RAM's ``tagging_head``: label queries (B, T, hidden) attend to image tokens (B, L, embed_width)."""

    def __init__(self, config: RamConfig) -> None:
        super().__init__()
        self.encoder = _Encoder(config)

    def forward(self, queries: Tensor, image_embeds: Tensor) -> Tensor:
        hidden = queries
        for layer in self.encoder.layer:
            hidden = layer(hidden, image_embeds)
        return hidden


# --------------------------------------------------------------------------------------------------
# Tagger
# --------------------------------------------------------------------------------------------------


@dataclass
class RamLoadReport:
    """What :meth:`RamTagger.from_official` did with the checkpoint's keys."""

    checkpoint: Path
    loaded: int
    skipped: list[str]
    unexpected: list[str]
    renamed_legacy: int


def _relative_position_index(window: tuple[int, int]) -> Tensor:
    # Standard Swin lookup: (dh + Wh - 1) * (2 Ww - 1) + (dw + Ww - 1) for every token pair of a window.
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


class RamTagger(nn.Module):
    """RAM's tagging path (Swin -> image_proj; label queries -> tagging head -> fc), eval-only."""

    def __init__(self, config: RamConfig, tag_list: Sequence[str], thresholds: Sequence[float] | Tensor) -> None:
        super().__init__()
        from transformers import SwinModel

        if len(tag_list) != config.num_tags or len(thresholds) != config.num_tags:
            raise ValueError(
                f"config has {config.num_tags} tags but got {len(tag_list)} names and {len(thresholds)} thresholds"
            )
        self.config = config
        self.visual_encoder = SwinModel(config.swin_config(), add_pooling_layer=True)
        self.image_proj = nn.Linear(config.vision_width, config.embed_width)
        self.label_embed = nn.Parameter(torch.zeros(config.num_tags, config.embed_width))
        self.wordvec_proj = nn.Linear(config.embed_width, config.hidden_size)
        self.tagging_head = RamTaggingHead(config)
        self.fc = nn.Linear(config.hidden_size, 1)
        self.tag_list: tuple[str, ...] = tuple(tag_list)
        # Not a buffer: thresholds must stay float32 on the CPU whatever .to(dtype) does to the
        # weights, so the comparison is the authors' float32 one (0.65 is 0.64999997...).
        self.class_threshold = torch.as_tensor(thresholds, dtype=torch.float32, device="cpu").clone()
        self.load_report: RamLoadReport | None = None
        self.requires_grad_(False)
        self.train(False)

    # The authors leave RAM in train mode, which makes its tags random; this tagger is inference-only.
    def train(self, mode: bool = True) -> RamTagger:
        """Always stays in eval mode (the tagger is inference-only and must be deterministic)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.image_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_proj.weight.dtype

    @property
    def num_tags(self) -> int:
        return self.config.num_tags

    # ---- construction from the authors' files ----

    @classmethod
    def from_official(
        cls,
        checkpoint_path: PathLike,
        tag_list: PathLike | None = None,
        thresholds: PathLike | None = None,
        config: RamConfig | PathLike | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        verify_tag_files: bool | None = None,
        progress: bool = False,
    ) -> RamTagger:
        """Build the tagger from ``ram_swin_large_14m.pth`` (or a stand-in of the same layout).

        ``tag_list`` / ``thresholds``: local files, or both ``None`` to fetch RAM's official files into
        the cache (md5-verified). ``config``: a :class:`RamConfig`, a RAM config folder (see
        :meth:`RamConfig.from_official_dir`; its ``data/`` tag files are used when no tag files are
        given), or ``None`` to infer it from the checkpoint shapes.
        ``verify_tag_files``: md5-check local tag files against the official ones; ``None`` (default)
        does so when the checkpoint has the official 4585 classes. Skipped checkpoint keys are in
        ``tagger.load_report``; a missing or mis-shaped tagger weight raises :class:`RamCheckpointError`.
        """
        path = Path(checkpoint_path).expanduser()
        raw = load_official_state_dict(path)
        renamed = sum(k.startswith("vision_multi.") for k in raw)
        weights, skipped, unexpected = split_official_state_dict(raw)
        if config is None:
            try:
                config = RamConfig.from_state_dict(weights)
            except RamCheckpointError as err:
                raise RamCheckpointError(f"{path}: {err}") from err
            if replace(config, num_tags=OFFICIAL_NUM_TAGS) != RamConfig.swin_large():
                # Shapes cannot tell the tagging head's attention heads: a non-standard RAM may be misread.
                logger.warning("%s is not the standard ram_swin_large_14m: its config was inferred from tensor "
                               "shapes with %d tagging-head attention heads; give its config (--ram-config, or "
                               "ram_config in the model's YAML) if that is wrong", path, config.num_attention_heads)
        elif not isinstance(config, RamConfig):
            ram_dir = Path(config).expanduser()
            config = RamConfig.from_official_dir(ram_dir)
            if tag_list is None and thresholds is None and (ram_dir / "data" / "ram_tag_list.txt").is_file():
                # a RAM folder carries its own vocabulary (as the authors' code reads it from there)
                tag_list = ram_dir / "data" / "ram_tag_list.txt"
                thresholds = ram_dir / "data" / "ram_tag_list_threshold.txt"
        vocab = _resolve_vocabulary(
            tag_list, thresholds, num_tags=config.num_tags, verify=verify_tag_files, progress=progress
        )
        with torch.device("meta"):  # no allocation / random init for weights that are loaded next
            model = cls(config, vocab.tags, vocab.thresholds)
        model._load_official_weights(weights, path)
        model.load_report = RamLoadReport(
            checkpoint=path, loaded=len(weights), skipped=skipped, unexpected=unexpected, renamed_legacy=renamed
        )
        logger.info(
            "loaded RAM tagger from %s: %d tensors; skipped %d unused (%s); %d unexpected",
            path,
            len(weights),
            len(skipped),
            _summarize(skipped),
            len(unexpected),
        )
        if unexpected:
            logger.warning("%s: ignored %d unexpected keys: %s", path, len(unexpected), unexpected[:10])
        return model.to(device=device, dtype=dtype)

    # ---- a lion-mllm bundle's copy (safetensors weights in our layout, config and vocabulary as files) ----

    def save_bundle(self, directory: PathLike) -> dict[str, Any]:
        """Write the tagger into a model bundle; returns the `tagger.json` entry that finds it again."""
        from safetensors.torch import save_file

        directory = Path(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                 if not k.endswith("relative_position_index")}  # recomputed on loading
        weights = directory / RAM_BUNDLE_WEIGHTS
        save_file(state, str(weights), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        weights.chmod(0o666 & ~umask)  # safetensors writes 0600; bundles are shared like other files
        (directory / _BUNDLE_TAG_LIST).write_text("".join(f"{tag}\n" for tag in self.tag_list), encoding="utf-8")
        # float32 thresholds written exactly (repr of the float32 value reads back to the same float32)
        (directory / _BUNDLE_THRESHOLDS).write_text(
            "".join(f"{value!r}\n" for value in self.class_threshold.tolist()), encoding="utf-8")
        return {"type": "ram", "config": self.config.to_dict(), "weights": RAM_BUNDLE_WEIGHTS,
                "tag_list": _BUNDLE_TAG_LIST, "thresholds": _BUNDLE_THRESHOLDS}

    @staticmethod
    def bundle_entry(directory: PathLike, spec: Mapping[str, Any]) -> tuple[RamConfig, Path, Path, Path]:
        """(config, weights, tag list, thresholds) of a bundle's `tagger.json` RAM entry, checked without
        reading the weights; a broken entry is a RamCheckpointError naming `tagger.json`."""
        directory = Path(directory)
        where = directory / "tagger.json"
        try:
            config = RamConfig.from_dict(spec["config"])
            weights = directory / spec.get("weights", RAM_BUNDLE_WEIGHTS)
            tag_list = directory / spec.get("tag_list", _BUNDLE_TAG_LIST)
            thresholds = directory / spec.get("thresholds", _BUNDLE_THRESHOLDS)
        except (KeyError, TypeError, ValueError) as err:
            raise RamCheckpointError(f"{where}: not a RAM tagger entry (needs config, weights, tag_list, "
                                     f"thresholds): {err}") from None
        for path in (weights, tag_list, thresholds):
            if not path.is_file():
                raise RamCheckpointError(f"{where} names {path.name}, which is not in {directory}")
        return config, weights, tag_list, thresholds

    @classmethod
    def from_bundle(cls, directory: PathLike, spec: Mapping[str, Any], *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> RamTagger:
        """The tagger `save_bundle` wrote (`spec` is its `tagger.json` entry)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        where = directory / "tagger.json"
        config, weights, tag_list, thresholds = cls.bundle_entry(directory, spec)
        vocab = RamVocabulary.from_files(tag_list, thresholds, verify=False)
        if len(vocab) != config.num_tags:
            raise RamVocabularyError(f"{tag_list}: {len(vocab)} tags, but the RAM config in {where} has {config.num_tags}")
        try:
            state = load_file(str(weights))
        except Exception as err:  # safetensors raises its own error types for a bad file
            raise RamCheckpointError(f"{weights}: not a readable safetensors file ({err})") from None
        with torch.device("meta"):
            model = cls(config, vocab.tags, vocab.thresholds)
        expected = {k: v for k, v in model.state_dict().items() if not k.endswith("relative_position_index")}
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise RamCheckpointError(f"{weights}: does not fit the RAM config in {where}: missing {missing[:5]}, "
                                     f"unexpected {unexpected[:5]}")
        for key, ref in expected.items():
            if tuple(state[key].shape) != tuple(ref.shape):
                raise RamCheckpointError(f"{weights}: {key} has shape {tuple(state[key].shape)}, the RAM config "
                                         f"in {where} expects {tuple(ref.shape)}")
        model.load_state_dict(state, strict=False, assign=True)
        model._recompute_buffers()
        model.requires_grad_(False)
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftover:
            raise RamCheckpointError(f"{weights}: no value for {leftover[:5]}")
        return model.to(device=device, dtype=dtype)

    def _load_official_weights(self, weights: Mapping[str, Tensor], path: Path) -> None:
        mapped = official_to_ours(weights, swin_layout=_layout_of_keys(self.visual_encoder.state_dict().keys()))
        expected = {k: v for k, v in self.state_dict().items() if not k.endswith("relative_position_index")}
        missing = [k for k in expected if k not in mapped]
        if missing:
            names = sorted({_ours_to_official_key(k)[0] for k in missing})
            raise RamCheckpointError(
                f"RAM checkpoint {path} is missing {len(names)} tagger weight(s): {', '.join(names[:8])}"
                + (" ..." if len(names) > 8 else "")
            )
        extra = sorted({_ours_to_official_key(k)[0] for k in mapped if k not in expected})
        if extra:
            raise RamCheckpointError(
                f"RAM checkpoint {path} has tagger weights the config does not expect "
                f"(config {self.config.depths=}, {self.config.num_hidden_layers=}): {', '.join(extra[:8])}"
            )
        for key, ref in expected.items():
            if tuple(mapped[key].shape) != tuple(ref.shape):
                official = _ours_to_official_key(key)[0]
                raise RamCheckpointError(
                    f"RAM checkpoint {path}: {official} has shape {tuple(weights[official].shape)}, which does not "
                    f"fit the config (our {key} expects {tuple(ref.shape)})"
                )
        # assign=True adopts the (memory-mapped) checkpoint tensors instead of copying into meta ones.
        self.load_state_dict(dict(mapped), strict=False, assign=True)
        self._recompute_buffers()
        self.requires_grad_(False)
        leftover = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if leftover:  # would mean transformers' Swin grew state this loader does not know
            raise RamCheckpointError(f"RAM checkpoint {path}: no value for {leftover[:5]}")

    def _recompute_buffers(self) -> None:
        window = (self.config.window_size, self.config.window_size)
        for module in self.visual_encoder.modules():
            buf = module._buffers.get("relative_position_index")
            if buf is not None:
                # HF clamps windows larger than the feature map at run time, but the stored index
                # always belongs to config.window_size (this matches the table size (2W-1)^2).
                index = _relative_position_index(window).reshape(buf.shape)
                module._buffers["relative_position_index"] = index.to(device="cpu")

    def official_state_dict(self) -> dict[str, Tensor]:
        """Our weights in the authors' key layout (tagger keys only; q/k/v fused back into qkv)."""
        return ours_to_official(self.state_dict())

    # ---- inference ----

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """RAM's eval transform for a list of PIL images -> float32 (B, 3, S, S) on the CPU."""
        return preprocess_images(images, self.config.image_size, self.config.image_mean, self.config.image_std)

    @torch.no_grad()
    def image_embeddings(self, pixel_values: Tensor) -> Tensor:
        """``image_proj(cat(mean token, Swin tokens))`` -> (B, 1 + L, embed_width)."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        out = self.visual_encoder(pixel_values=pixel_values)
        # RAM's Swin returns cat(avgpool(norm(x)), norm(x)); HF's pooler is that average.
        tokens = torch.cat([out.pooler_output.unsqueeze(1), out.last_hidden_state], dim=1)
        return self.image_proj(tokens)

    @torch.no_grad()
    def logits(self, pixel_values: Tensor) -> Tensor:
        """Tag logits (B, num_tags) in float32 for preprocessed images (B, 3, S, S)."""
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")
        image_embeds = self.image_embeddings(pixel_values)
        queries = F.relu(self.wordvec_proj(self.label_embed))  # (T, hidden), input-independent
        queries = queries.unsqueeze(0).expand(image_embeds.shape[0], -1, -1)
        hidden = self.tagging_head(queries, image_embeds)
        return self.fc(hidden).squeeze(-1).float()

    forward = logits

    def tags_from_logits(self, logits: Tensor, threshold: float | None = None) -> list[str]:
        """Tag strings (one per row) from logits (B, T) or (T,).

        A tag fires when ``sigmoid(logit) > its class threshold`` (strict); ``threshold`` replaces all
        class thresholds by one value for this call.
        """
        probs = torch.sigmoid(logits.detach().float().cpu())
        if probs.dim() == 1:
            probs = probs.unsqueeze(0)
        if probs.shape[-1] != self.num_tags:
            raise ValueError(f"logits have {probs.shape[-1]} classes, the tagger has {self.num_tags}")
        limit = self.class_threshold if threshold is None else torch.full_like(self.class_threshold, float(threshold))
        fired = probs > limit
        out = []
        for row in fired:
            names = [self.tag_list[i] for i in row.nonzero().flatten().tolist()]
            # RAM joins with " | " and LION turns " |" into ","; identical to ", ".join for RAM's tags.
            out.append(" | ".join(names).replace(" |", ","))
        return out

    def tag(self, images: Sequence[Image.Image] | Image.Image, threshold: float | None = None) -> list[str]:
        """Tags for PIL images, one ``"tag1, tag2, ..."`` string per image (one batched forward).

        ``threshold=None`` uses RAM's per-class thresholds (the authors' behaviour); a float overrides them.
        """
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            return []
        return self.tags_from_logits(self.logits(self.preprocess(images)), threshold)


def _summarize(keys: Sequence[str]) -> str:
    groups: dict[str, int] = {}
    for k in keys:
        g = k.split(".")[0] if not k.endswith(("attn_mask", "relative_position_index")) else k.rsplit(".", 1)[-1]
        groups[g] = groups.get(g, 0) + 1
    return ", ".join(f"{g}: {n}" for g, n in sorted(groups.items()))


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
