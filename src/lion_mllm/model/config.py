"""Typed configuration of a LION model, with the authors' exact FlanT5-XL/XXL presets.

The XL and XXL presets' numbers are the authors' (docs/authors-code.md, "Model sizes").
A config round-trips through JSON (`to_dict`/`from_dict`), which is what `save_pretrained` writes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .tasks import TAG_PROMPT

VisualInput = Literal["all", "qformer", "aggregator"]
VISUAL_INPUTS: tuple[str, ...] = ("all", "qformer", "aggregator")


@dataclass
class VisionConfig:
    """EVA ViT-g/14 as in BLIP-2/LAVIS, last block dropped (39 blocks), no final norm."""

    hidden_size: int = 1408
    intermediate_size: int = 6144  # int(1408 * 4.3637)
    num_hidden_layers: int = 39
    num_attention_heads: int = 16  # head_dim 88
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class QFormerConfig:
    """Instruction-aware Q-Former: BERT-base shape, cross-attention every second layer."""

    vocab_size: int = 30523  # bert-base-uncased 30522 + the [DEC] token LION adds
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    num_query_tokens: int = 32
    max_text_length: int = 128
    dropout: float = 0.1


@dataclass
class AggregatorConfig:
    """The vision aggregator: post-LN BERT layers (self-attention, cross-attention, FFN) over ViT taps.

    `hidden_layer` is the ViT block (0-based output) whose tokens are refined; block k of the
    aggregator cross-attends to `cross_layers[k]`. Defaults: block 38 attends to 28, then to 18.
    """

    num_attention_heads: int = 16
    intermediate_size: int = 3072  # a default BertConfig's, not 4 x width: the authors' quirk
    layer_norm_eps: float = 1e-12
    hidden_layer: int = 38
    cross_layers: tuple[int, ...] = (28, 18)
    projection_size: int = 5632  # the MLP into T5: width -> 5632 -> d_model
    norm_eps: float = 1e-5  # ln_adapter (torch default eps, unlike the ViT's 1e-6)
    dropout: float = 0.1

    def __post_init__(self) -> None:
        self.cross_layers = tuple(int(i) for i in self.cross_layers)


@dataclass
class LanguageConfig:
    """FlanT5 (exact-GELU gated FFN) plus a mixture of bottleneck adapters in every FFN."""

    vocab_size: int = 32128
    d_model: int = 2048
    d_ff: int = 5120
    d_kv: int = 64
    num_layers: int = 24
    num_decoder_layers: int = 24
    num_heads: int = 32
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dropout_rate: float = 0.1
    decoder_start_token_id: int = 0
    pad_token_id: int = 0
    eos_token_id: int = 1
    soft_prompt_token_id: int = 32099  # <extra_id_0> in the T5 vocabulary
    adapter_bottleneck: int = 64
    max_text_length: int = 128
    max_output_text_length: int = 128


@dataclass
class LionConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    visual_input: VisualInput = "all"
    enable_semantic_tags: bool = True
    ln_vision_eps: float = 1e-5
    tag_prompt: str = TAG_PROMPT

    def __post_init__(self) -> None:
        self.visual_input = self.visual_input.lower()  # the authors' YAML says "ALL"
        if self.visual_input not in VISUAL_INPUTS:
            raise ValueError(f"visual_input must be one of {VISUAL_INPUTS}, got {self.visual_input!r}")
        taps = (self.aggregator.hidden_layer, *self.aggregator.cross_layers)
        if self.uses_aggregator and max(taps) >= self.vision.num_hidden_layers:
            raise ValueError(f"aggregator taps {taps} exceed the ViT's {self.vision.num_hidden_layers} blocks")
        if self.uses_aggregator and self.vision.hidden_size % self.aggregator.num_attention_heads:
            raise ValueError("the ViT width must be a multiple of the aggregator's attention heads")

    @property
    def uses_qformer(self) -> bool:
        return self.visual_input in ("all", "qformer")

    @property
    def uses_aggregator(self) -> bool:
        return self.visual_input in ("all", "aggregator")

    @property
    def num_adapters(self) -> int:
        """Two adapters (region-level 0, image-level 1) with routers in `all`; one otherwise."""
        return 2 if self.visual_input == "all" else 1

    @property
    def num_visual_tokens(self) -> int:
        n = self.qformer.num_query_tokens if self.uses_qformer else 0
        return n + (self.vision.num_positions if self.uses_aggregator else 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LionConfig:
        data = dict(data)
        if data.get("tagger", "absent") is None:
            del data["tagger"]  # an always-null field of bundles written before the tagger got its own file
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown LionConfig fields: {sorted(unknown)}")
        parts = {"vision": VisionConfig, "qformer": QFormerConfig, "aggregator": AggregatorConfig,
                 "language": LanguageConfig}
        for name, kind in parts.items():
            if name in data and isinstance(data[name], dict):
                data[name] = kind(**data[name])
        return cls(**data)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> LionConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def flant5xl(**overrides: Any) -> LionConfig:
    """LION-FlanT5-XL ("LION-4B"): d_model 2048, 24+24 layers, 32 heads."""
    return LionConfig(language=LanguageConfig(), **overrides)


def flant5xxl(**overrides: Any) -> LionConfig:
    """LION-FlanT5-XXL ("LION-12B"): d_model 4096, d_ff 10240, 64 heads."""
    return LionConfig(language=LanguageConfig(d_model=4096, d_ff=10240, num_heads=64), **overrides)


def base(**overrides: Any) -> LionConfig:
    """A CPU-benchmark size: about ViT-B, a BERT-base Q-Former and T5-base, random weights."""
    return LionConfig(
        vision=VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        aggregator=AggregatorConfig(hidden_layer=11, cross_layers=(8, 5), projection_size=3072),
        qformer=QFormerConfig(),
        language=LanguageConfig(d_model=768, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12),
        **overrides,
    )


def tiny(**overrides: Any) -> LionConfig:
    """A few-hundred-thousand-parameter model for tests (random weights); its vocabularies fit the
    golden set's tiny tokenizers (T5: 1100 tokens, `<extra_id_0>` = 1099; BERT: 600 + [DEC])."""
    return LionConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                            image_size=56),
        aggregator=AggregatorConfig(num_attention_heads=4, intermediate_size=64, hidden_layer=3,
                                    cross_layers=(2, 1), projection_size=64, dropout=0.0),
        qformer=QFormerConfig(vocab_size=601, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, num_query_tokens=4, dropout=0.0),
        language=LanguageConfig(vocab_size=1128, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2,
                                num_heads=4, adapter_bottleneck=8, dropout_rate=0.0,
                                soft_prompt_token_id=1099),
        **overrides,
    )


PRESETS = {"flant5xl": flant5xl, "flant5xxl": flant5xxl, "base": base, "tiny": tiny}
