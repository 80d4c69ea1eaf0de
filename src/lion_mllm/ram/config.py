"""RAM's sizes: :class:`RamConfig` (Swin-L 384 by default), read from RAM's config folder or inferred from
a checkpoint's tensor shapes."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import CheckpointError
from .weights import rename_legacy_key

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_NUM_TAGS = 4585

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
    def from_json_file(cls, path: PathLike) -> RamConfig:
        """A JSON file of :meth:`to_dict`'s fields; a CheckpointError naming the file otherwise."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, TypeError, ValueError, AttributeError) as error:
            raise CheckpointError(f"{path}: not a RAM config (lion_mllm.ram.RamConfig fields as JSON): "
                                  f"{error}") from None

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
            raise CheckpointError(f"cannot read RAM config folder {ram_dir} (it needs configs/q2l_config.json and "
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
        sd = {rename_legacy_key(k): v for k, v in state_dict.items()}

        def need(key: str) -> Tensor:
            if key not in sd:
                raise CheckpointError(f"cannot infer the RAM config: the state dict has no {key!r}")
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
            raise CheckpointError(f"cannot infer the Swin stages from the state dict (found {sorted(blocks)})")
        depths = tuple(blocks[s] for s in range(len(blocks)))
        tables = [need(f"visual_encoder.layers.{s}.blocks.0.attn.relative_position_bias_table") for s in blocks]
        num_heads = tuple(int(t.shape[1]) for t in tables)
        side = math.isqrt(int(tables[0].shape[0]))
        if side * side != tables[0].shape[0] or side % 2 == 0:
            raise CheckpointError(f"relative position table of {tables[0].shape[0]} rows is not (2W-1)^2")
        window = (side + 1) // 2
        fc1 = need("visual_encoder.layers.0.blocks.0.mlp.fc1.weight")
        mlp_ratio = fc1.shape[0] / embed_dim
        if image_size is None:
            image_size = _image_size_from_attn_masks(sd, window, patch_size)
        if image_size is None:
            image_size = {12: 384, 7: 224}.get(window)
            if image_size is None:
                raise CheckpointError(f"cannot infer the image size for window {window}; pass a RamConfig")
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
