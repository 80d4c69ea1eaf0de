"""RAM's tagging path as an eval-only module: Swin -> image_proj; label queries -> tagging head -> fc."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..checkpoints.checkpoint_files import read_torch_file, shareable_file_mode
from ..errors import CheckpointError
from ..model.resample import resize
from .config import IMAGENET_MEAN, IMAGENET_STD, OFFICIAL_NUM_TAGS, RamConfig
from .vocabulary import RamVocabulary, resolve_vocabulary
from .weights import (
    layout_of_keys,
    ram_key_to_official,
    ram_state_from_official,
    ram_state_to_official,
    split_official_state_dict,
)

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


RAM_BUNDLE_WEIGHTS = "ram.safetensors"
_BUNDLE_TAG_LIST = "ram_tag_list.txt"
_BUNDLE_THRESHOLDS = "ram_tag_list_threshold.txt"


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
        ``tagger.load_report``; a missing or mis-shaped tagger weight raises :class:`CheckpointError`.
        """
        path = Path(checkpoint_path).expanduser()
        raw = read_torch_file(path)
        renamed = sum(k.startswith("vision_multi.") for k in raw)
        weights, skipped, unexpected = split_official_state_dict(raw)
        if config is None:
            try:
                config = RamConfig.from_state_dict(weights)
            except CheckpointError as err:
                raise CheckpointError(f"{path}: {err}") from err
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
        vocab = resolve_vocabulary(
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
        shareable_file_mode(weights)
        (directory / _BUNDLE_TAG_LIST).write_text("".join(f"{tag}\n" for tag in self.tag_list), encoding="utf-8")
        # float32 thresholds written exactly (repr of the float32 value reads back to the same float32)
        (directory / _BUNDLE_THRESHOLDS).write_text(
            "".join(f"{value!r}\n" for value in self.class_threshold.tolist()), encoding="utf-8")
        return {"type": "ram", "config": self.config.to_dict(), "weights": RAM_BUNDLE_WEIGHTS,
                "tag_list": _BUNDLE_TAG_LIST, "thresholds": _BUNDLE_THRESHOLDS}

    @staticmethod
    def bundle_entry(directory: PathLike, spec: Mapping[str, Any]) -> tuple[RamConfig, Path, Path, Path]:
        """(config, weights, tag list, thresholds) of a bundle's `tagger.json` RAM entry, checked without
        reading the weights; a broken entry is a CheckpointError naming `tagger.json`."""
        directory = Path(directory)
        where = directory / "tagger.json"
        try:
            config = RamConfig.from_dict(spec["config"])
            weights = directory / spec.get("weights", RAM_BUNDLE_WEIGHTS)
            tag_list = directory / spec.get("tag_list", _BUNDLE_TAG_LIST)
            thresholds = directory / spec.get("thresholds", _BUNDLE_THRESHOLDS)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{where}: not a RAM tagger entry (needs config, weights, tag_list, "
                                     f"thresholds): {err}") from None
        for path in (weights, tag_list, thresholds):
            if not path.is_file():
                raise CheckpointError(f"{where} names {path.name}, which is not in {directory}")
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
            raise CheckpointError(f"{tag_list}: {len(vocab)} tags, but the RAM config in {where} has {config.num_tags}")
        try:
            state = load_file(str(weights))
        except Exception as err:  # safetensors raises its own error types for a bad file
            raise CheckpointError(f"{weights}: not a readable safetensors file ({err})") from None
        with torch.device("meta"):
            model = cls(config, vocab.tags, vocab.thresholds)
        expected = {k: v for k, v in model.state_dict().items() if not k.endswith("relative_position_index")}
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{weights}: does not fit the RAM config in {where}: missing {missing[:5]}, "
                                     f"unexpected {unexpected[:5]}")
        for key, ref in expected.items():
            if tuple(state[key].shape) != tuple(ref.shape):
                raise CheckpointError(f"{weights}: {key} has shape {tuple(state[key].shape)}, the RAM config "
                                         f"in {where} expects {tuple(ref.shape)}")
        model.load_state_dict(state, strict=False, assign=True)
        model._recompute_buffers()
        model.requires_grad_(False)
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftover:
            raise CheckpointError(f"{weights}: no value for {leftover[:5]}")
        return model.to(device=device, dtype=dtype)

    def _load_official_weights(self, weights: Mapping[str, Tensor], path: Path) -> None:
        mapped = ram_state_from_official(weights, swin_layout=layout_of_keys(self.visual_encoder.state_dict().keys()))
        expected = {k: v for k, v in self.state_dict().items() if not k.endswith("relative_position_index")}
        missing = [k for k in expected if k not in mapped]
        if missing:
            names = sorted({ram_key_to_official(k)[0] for k in missing})
            raise CheckpointError(
                f"RAM checkpoint {path} is missing {len(names)} tagger weight(s): {', '.join(names[:8])}"
                + (" ..." if len(names) > 8 else "")
            )
        extra = sorted({ram_key_to_official(k)[0] for k in mapped if k not in expected})
        if extra:
            raise CheckpointError(
                f"RAM checkpoint {path} has tagger weights the config does not expect "
                f"(config {self.config.depths=}, {self.config.num_hidden_layers=}): {', '.join(extra[:8])}"
            )
        for key, ref in expected.items():
            if tuple(mapped[key].shape) != tuple(ref.shape):
                official = ram_key_to_official(key)[0]
                raise CheckpointError(
                    f"RAM checkpoint {path}: {official} has shape {tuple(weights[official].shape)}, which does not "
                    f"fit the config (our {key} expects {tuple(ref.shape)})"
                )
        # assign=True adopts the (memory-mapped) checkpoint tensors instead of copying into meta ones.
        self.load_state_dict(dict(mapped), strict=False, assign=True)
        self._recompute_buffers()
        self.requires_grad_(False)
        leftover = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if leftover:  # would mean transformers' Swin grew state this loader does not know
            raise CheckpointError(f"RAM checkpoint {path}: no value for {leftover[:5]}")

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
        return ram_state_to_official(self.state_dict())

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
