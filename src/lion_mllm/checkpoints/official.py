"""The authors' five files (EVA ViT .pth, FlanT5 folder, BERT folder, LION .pth, their YAML) -> a LionModel.

The model is built on the meta device and every tensor is assigned straight from its file (read
through mmap, converted one tensor at a time), so loading needs about the final model's memory.
Unlike the authors' `strict=False`, every parameter must come from some file: a missing key names the
file that should have held it, and unexpected keys are an error unless the caller ignores them.
Nothing is unpickled beyond tensors (`weights_only=True`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import CheckpointError
from ..model.config import AggregatorConfig, LanguageConfig, LionConfig, QFormerConfig, VisionConfig
from ..model.modeling_lion import LionModel
from ..model.tasks import SOFT_PROMPT_TOKEN
from .bundle import T5_TIED_KEYS, expected_keys, materialise
from .checkpoint_files import read_hf_weights, read_torch_file

__all__ = ["OfficialPaths", "config_from_official", "load_official_model", "official_to_ours", "ours_to_official"]


# ----------------------------------------------------------------------------------------------------
# Key mapping between the authors' names and ours: one (authors' name, our name) pair a line, tried in
# order (specific before general) in both directions. A name ending in "." is a prefix, any other a whole
# key; `{block}` stands for a ViT block number, `{attention}` for a Q-Former layer's attention or
# cross-attention. The qkv bias is mapped apart (_QV_BIAS, _QKV_BIAS).

_NAME_PAIRS: list[tuple[str, str]] = [
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("visual_encoder.blocks.{block}.norm1.", "vision_model.layers.{block}.layer_norm1."),
    ("visual_encoder.blocks.{block}.norm2.", "vision_model.layers.{block}.layer_norm2."),
    ("visual_encoder.blocks.{block}.attn.qkv.weight", "vision_model.layers.{block}.self_attn.qkv.weight"),
    ("visual_encoder.blocks.{block}.attn.proj.", "vision_model.layers.{block}.self_attn.projection."),
    ("visual_encoder.blocks.{block}.mlp.", "vision_model.layers.{block}.mlp."),
    ("Qformer.bert.embeddings.LayerNorm.", "qformer.embeddings.layernorm."),
    ("Qformer.bert.{attention}.self.", "qformer.{attention}.attention."),
    ("Qformer.bert.", "qformer."),
    ("t5_proj.", "qformer_projection."),
    ("fusion_adapter.", "aggregator."),
    ("ln_adapter.", "aggregator_norm."),
    ("adapter_proj.", "aggregator_projection."),
    ("soft_prompt_hint", "tag_prompt_embedding"),
    ("t5_model.", "language_model."),
    ("ln_vision.", "ln_vision."),
    ("query_tokens", "query_tokens"),
]
_PLACEHOLDERS = {"{block}": r"(\d+)", "{attention}": r"(encoder\.layer\.\d+\.(?:cross)?attention)"}


def _rule(source: str, target: str) -> tuple[str, str]:
    """(pattern, replacement) rewriting a name shaped as `source` into `target`'s shape (one placeholder
    at most, so it is group 1)."""
    pattern, replacement = re.escape(source), target
    for placeholder, group in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape(placeholder), group)
        replacement = replacement.replace(placeholder, r"\1")
    return f"^{pattern}" + ("" if source.endswith(".") else "$"), replacement


_RULES = [_rule(authors, ours) for authors, ours in _NAME_PAIRS]
_INVERSE = [_rule(ours, authors) for authors, ours in _NAME_PAIRS]
_QV_BIAS = re.compile(r"^visual_encoder\.blocks\.(\d+)\.attn\.(q|v)_bias$")
_QKV_BIAS = re.compile(r"^vision_model\.layers\.(\d+)\.self_attn\.qkv\.bias$")
# Buffers the authors' state dicts carry that we recompute (non-persistent in transformers).
_DROPPED = re.compile(r"^Qformer\.bert\.embeddings\.position_ids$")


def _apply(rules: list[tuple[str, str]], name: str) -> str | None:
    for pattern, replacement in rules:
        new, count = re.subn(pattern, replacement, name)
        if count:
            return new
    return None


def official_to_ours(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Authors' names -> ours. Returns (mapped state, authors' keys with no counterpart)."""
    mapped: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    qv: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if _DROPPED.match(name):
            continue
        if match := _QV_BIAS.match(name):
            qv.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
            continue
        new = _apply(_RULES, name)
        if new is None:
            unknown.append(name)
        else:
            mapped[new] = tensor
    for block, parts in qv.items():
        if set(parts) != {"q", "v"}:
            unknown.extend(f"visual_encoder.blocks.{block}.attn.{p}_bias" for p in parts)
            continue
        # EVA has no key bias: the fused qkv bias is [q_bias, 0, v_bias]
        q, v = parts["q"], parts["v"]
        mapped[f"vision_model.layers.{block}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return mapped, unknown


def ours_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> the authors' (the inverse of `official_to_ours`)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if match := _QKV_BIAS.match(name):
            q, _, v = tensor.chunk(3)
            out[f"visual_encoder.blocks.{match.group(1)}.attn.q_bias"] = q
            out[f"visual_encoder.blocks.{match.group(1)}.attn.v_bias"] = v
            continue
        new = _apply(_INVERSE, name)
        if new is None:
            raise KeyError(f"no authors' name for {name}")
        out[new] = tensor
    return out


# ----------------------------------------------------------------------------------------------------
# The authors' YAML


# Keys of the authors' YAML that lion-mllm adds (the authors' own keys are read as they are). Paths are
# relative to the YAML's folder.
#   vit_num_heads: 16           attention heads of a ViT whose width is not EVA ViT-g's (head dim 88)
#   ram_config: PATH | {...}    the RAM tagger's sizes: RAM's config folder (configs/ + data/), a JSON file
#                               of lion_mllm.ram.RamConfig fields, or those fields inline
#   ram_tag_list: PATH          RAM's tag list and per-class thresholds (default: RAM's official files,
#   ram_tag_list_threshold: PATH  or the data/ folder of a ram_config folder)
#   generation: {...}           decoding defaults and prompt templates (lion_mllm.GenerationDefaults fields)
EXTRA_YAML_KEYS = ("vit_num_heads", "ram_config", "ram_tag_list", "ram_tag_list_threshold", "generation")


@dataclass
class OfficialPaths:
    """The five files of an authors' model config (`configs/models/lion_flant5xl.yaml`), plus the
    settings lion-mllm's documented extra keys give (`EXTRA_YAML_KEYS`)."""

    vit_model: Path
    llm_model: Path
    bert_model: Path
    pretrained: Path
    ram_model: Path | None = None
    visual_input: str = "all"
    enable_semantic_tags: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None  # the YAML these came from (named in error messages)

    @classmethod
    def from_yaml(cls, path: str | Path) -> OfficialPaths:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path}: not valid YAML: {error}") from None
        model = data.get("model", data) if isinstance(data, dict) else None
        if not isinstance(model, dict):
            raise CheckpointError(f"{path}: expected a `model:` mapping (the authors' configs/models/*.yaml layout)")

        def resolve(key: str, required: bool = True) -> Path | None:
            value = model.get(key)
            if value is None:
                if required:
                    raise CheckpointError(f"{path}: `model.{key}` is missing")
                return None
            if not isinstance(value, (str, Path)):
                raise CheckpointError(f"{path}: model.{key} must be a path, got {value!r}")
            candidate = Path(str(value)).expanduser()
            if not candidate.is_absolute():
                candidate = path.parent / candidate
            if not candidate.exists():
                raise CheckpointError(f"{path}: model.{key}: {value} does not exist")
            return candidate

        extra: dict[str, Any] = {}
        heads = model.get("vit_num_heads")
        if heads is not None:
            if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
                raise CheckpointError(f"{path}: model.vit_num_heads must be a positive integer, got {heads!r}")
            extra["vit_num_heads"] = heads
        ram_config = model.get("ram_config")
        if isinstance(ram_config, dict):
            extra["ram_config"] = dict(ram_config)
        elif ram_config is not None:
            extra["ram_config"] = resolve("ram_config")
        for key in ("ram_tag_list", "ram_tag_list_threshold"):
            if model.get(key) is not None:
                extra[key] = resolve(key)
        if ("ram_tag_list" in extra) != ("ram_tag_list_threshold" in extra):
            raise CheckpointError(f"{path}: give both model.ram_tag_list and model.ram_tag_list_threshold, or neither")
        generation = model.get("generation")
        if generation is not None:
            from ..model.generation import GenerationDefaults

            extra["generation"] = GenerationDefaults.from_dict(generation, f"{path}: model.generation")
        visual_input = str(model.get("visual_input", "ALL")).lower()
        if visual_input not in ("all", "qformer", "aggregator"):
            raise CheckpointError(f"{path}: model.visual_input must be ALL, QFORMER or AGGREGATOR, got "
                                  f"{model.get('visual_input')!r}")
        return cls(
            vit_model=resolve("vit_model"), llm_model=resolve("llm_model"), bert_model=resolve("bert_model"),
            pretrained=resolve("pretrained"), ram_model=resolve("ram_model", required=False),
            visual_input=visual_input, enable_semantic_tags=bool(model.get("enable_semantic_tags", True)),
            extra=extra, source=path,
        )

    def ram_tagger_options(self) -> dict[str, Any]:
        """`LazyRamTagger`/`RamTagger.from_official` keyword arguments from the YAML's RAM keys."""
        options: dict[str, Any] = {}
        config = self.extra.get("ram_config")
        if isinstance(config, dict):
            from ..ram import RamConfig

            try:
                options["config"] = RamConfig.from_dict(config)
            except (TypeError, ValueError) as error:
                raise CheckpointError(f"{self.source or 'config'}: model.ram_config: {error}") from None
        elif isinstance(config, Path) and config.suffix.lower() == ".json":
            from ..ram import RamConfig

            options["config"] = RamConfig.from_json_file(config)
        elif config is not None:
            options["config"] = config  # RAM's own config folder
        if "ram_tag_list" in self.extra:
            options["tag_list"] = self.extra["ram_tag_list"]
            options["thresholds"] = self.extra["ram_tag_list_threshold"]
        return options


def config_from_official(paths: OfficialPaths, vit_state: dict[str, torch.Tensor],
                         vision_num_heads: int | None = None) -> LionConfig:
    """Dimensions from the files themselves: T5 and BERT config.json, the ViT's tensor shapes."""
    t5 = json.loads((paths.llm_model / "config.json").read_text())
    bert = json.loads((paths.bert_model / "config.json").read_text())
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    if not all(k in vit_state for k in needed):
        raise CheckpointError(f"{paths.vit_model}: not an EVA ViT checkpoint (needs {list(needed)}; "
                              f"found e.g. {list(vit_state)[:3]})")
    width = vit_state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in vit_state if k.startswith("blocks."))
    heads = vision_num_heads or paths.extra.get("vit_num_heads")
    if heads is None:
        if width % 88:
            where = paths.source or "the model's YAML"
            raise CheckpointError(f"{paths.vit_model}: width {width} is not EVA ViT-g's (head dim 88), so its "
                                  f"attention heads cannot be inferred: add `vit_num_heads: N` under `model:` in "
                                  f"{where} (or pass vision_num_heads=N)")
        heads = width // 88
    patch = vit_state["patch_embed.proj.weight"].shape[-1]
    grid = int(round((vit_state["pos_embed"].shape[1] - 1) ** 0.5))
    vocab_file = paths.bert_model / "vocab.txt"
    bert_vocab = sum(1 for _ in vocab_file.open()) if vocab_file.is_file() else bert["vocab_size"]
    return LionConfig(
        vision=VisionConfig(hidden_size=width, intermediate_size=vit_state["blocks.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=min(depth, 39), num_attention_heads=heads,
                            image_size=grid * patch, patch_size=patch),
        aggregator=AggregatorConfig(projection_size=4 * width),  # the authors' MLP: width -> 4 x width -> d
        qformer=QFormerConfig(vocab_size=bert_vocab + 1, hidden_size=bert["hidden_size"],
                              num_hidden_layers=bert["num_hidden_layers"],
                              num_attention_heads=bert["num_attention_heads"],
                              intermediate_size=bert["intermediate_size"],
                              max_position_embeddings=bert["max_position_embeddings"],
                              layer_norm_eps=bert["layer_norm_eps"]),
        language=LanguageConfig(
            vocab_size=t5["vocab_size"], d_model=t5["d_model"], d_ff=t5["d_ff"], d_kv=t5["d_kv"],
            num_layers=t5["num_layers"], num_decoder_layers=t5.get("num_decoder_layers") or t5["num_layers"],
            num_heads=t5["num_heads"], relative_attention_num_buckets=t5["relative_attention_num_buckets"],
            relative_attention_max_distance=t5.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=t5["layer_norm_epsilon"], dropout_rate=t5["dropout_rate"],
            decoder_start_token_id=t5.get("decoder_start_token_id", 0), pad_token_id=t5.get("pad_token_id", 0),
            eos_token_id=t5.get("eos_token_id", 1),
        ),
        visual_input=paths.visual_input, enable_semantic_tags=paths.enable_semantic_tags,
    )


def source_of(key: str, paths: OfficialPaths) -> Path:
    """Which of the authors' files should hold one of our keys."""
    if key.startswith("vision_model."):
        return paths.vit_model
    if key.startswith("language_model.") and ".adapter." not in key:
        return paths.llm_model
    return paths.pretrained


def _is_vit_linear(name: str) -> bool:
    return bool(re.search(r"(patch_embedding\.|qkv\.weight|projection\.|mlp\.fc[12]\.)", name))


def soft_prompt_token_id(tokenizer: Any, where: str | Path, required: bool = True) -> int:
    """The id of `<extra_id_0>`, whose embedding LION replaces with its learned tag hint. A tokenizer
    without it (not a T5 vocabulary) cannot build LION's tag prompt."""
    token_id = tokenizer.convert_tokens_to_ids(SOFT_PROMPT_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id or SOFT_PROMPT_TOKEN not in tokenizer.get_vocab():
        if required:
            raise CheckpointError(f"{where}: the tokenizer has no {SOFT_PROMPT_TOKEN} token, which LION's tag prompt "
                                  "needs; use the FlanT5 tokenizer the model was trained with")
        return -1 if token_id is None else int(token_id)
    return int(token_id)


def _vit_state(vit_raw: dict[str, torch.Tensor], depth: int, where: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The ViT file's tensors under the authors' LION names, blocks beyond `depth` left out (and listed)."""
    state, skipped = {}, []
    for name, tensor in vit_raw.items():
        block = re.match(r"blocks\.(\d+)\.", name)
        if block and int(block.group(1)) >= depth:  # EVA-CLIP's 40th block: BLIP-2 and LION drop it
            skipped.append(f"{where.name}:{name}")
            continue
        state["visual_encoder." + name] = tensor
    return state, skipped


class _Converter:
    """One tensor of a file -> the dtype and device it has in the model, checked against the model's shape.

    With `round_like_reference`, T5 weights go through bfloat16 and the ViT's linear/conv weights through
    float16 first, as the authors' code loads them (their CPU path then computes in float32)."""

    def __init__(self, targets: dict[str, torch.Tensor], paths: OfficialPaths, t5_source: str,
                 device: torch.device, dtype: torch.dtype, round_like_reference: bool) -> None:
        self.targets, self.paths, self.t5_source = targets, paths, t5_source
        self.device, self.dtype, self.round_like_reference = device, dtype, round_like_reference

    def __call__(self, name: str, tensor: torch.Tensor, source: str) -> torch.Tensor:
        target = self.targets[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(target.shape)} (a checkpoint of another architecture?)")
        if not target.is_floating_point():
            return tensor.to(self.device)
        if self.round_like_reference:
            if source == str(self.paths.vit_model) and _is_vit_linear(name):
                tensor = tensor.to(torch.float16)
            elif source == self.t5_source or (name.startswith("language_model.") and ".adapter." not in name):
                tensor = tensor.to(torch.bfloat16)
        return tensor.to(device=self.device, dtype=self.dtype)


def _check_complete(state: dict[str, torch.Tensor], unexpected: list[str], model: LionModel, paths: OfficialPaths,
                    ignore_unexpected: bool) -> None:
    """Unexpected keys (unless ignored) and missing keys are errors; a missing key names its file."""
    if unexpected and not ignore_unexpected:
        raise CheckpointError(f"unexpected keys (pass ignore_unexpected=True to skip them): "
                              f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)} in all)")
    missing = [k for k in expected_keys(model) if k not in state]
    if missing:
        by_file: dict[Path, list[str]] = {}
        for key in missing:
            by_file.setdefault(source_of(key, paths), []).append(key)
        detail = "; ".join(f"{file}: {len(keys)} keys missing, e.g. {keys[:3]}" for file, keys in by_file.items())
        raise CheckpointError(f"weights missing: {detail}")


def load_official_model(paths: OfficialPaths, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, round_like_reference: bool = True,
                        ignore_unexpected: bool = False, vision_num_heads: int | None = None,
                        attn_implementation: str = "sdpa", t5_tokenizer: Any = None) -> tuple[LionModel, list[str]]:
    """Build LION from the authors' files. Returns (model in eval mode, keys skipped on purpose).

    The soft prompt's token id is read from `t5_tokenizer` (pass the one you already loaded from
    `paths.llm_model`), else from a tokenizer loaded here.

    `round_like_reference` rounds T5 weights to bfloat16 and the ViT's linear/conv weights to float16
    before computing in `dtype`, as the authors' code does (their CPU path computes in float32 with
    those rounded values); turn it off to use the files' full precision.
    """
    device = torch.device(device)
    vit_raw = read_torch_file(paths.vit_model)
    config = config_from_official(paths, vit_raw, vision_num_heads)
    vit_state, skipped = _vit_state(vit_raw, config.vision.num_hidden_layers, paths.vit_model)
    t5_raw, t5_source = read_hf_weights(paths.llm_model)
    with torch.device("meta"):
        model = LionModel(config, attn_implementation)
    convert = _Converter(model.state_dict(), paths, t5_source, device, dtype, round_like_reference)
    wanted = set(expected_keys(model)) | set(T5_TIED_KEYS)

    t5_ignorable = {"decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}
    # read lazily: each T5 tensor is loaded, converted and released before the next one
    t5_mapped = ((f"language_model.{k}", t5_raw[k]) for k in t5_raw if k not in t5_ignorable)
    vit_mapped, vit_unknown = official_to_ours(vit_state)
    lion_mapped, lion_unknown = official_to_ours(read_torch_file(paths.pretrained))
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    # Later files override earlier ones, as in the authors' loading order: ViT, T5, then the LION .pth.
    for source, mapped, unknown in ((str(paths.vit_model), vit_mapped.items(), vit_unknown),
                                    (t5_source, t5_mapped, []),
                                    (str(paths.pretrained), lion_mapped.items(), lion_unknown)):
        unexpected += [f"{Path(source).name}:{k}" for k in unknown]
        for name, tensor in mapped:
            if name not in wanted:  # reported under the file's own name for the key
                original = name[len("language_model."):] if source == t5_source else _apply(_INVERSE, name)
                unexpected.append(f"{Path(source).name}:{original or name}")
                continue
            if name in T5_TIED_KEYS:
                name = "language_model.shared.weight"
            state[name] = convert(name, tensor, source)
    _check_complete(state, unexpected, model, paths, ignore_unexpected)
    materialise(model, state, device)
    if t5_tokenizer is None:
        from transformers import AutoTokenizer

        t5_tokenizer = AutoTokenizer.from_pretrained(str(paths.llm_model))
    model.config.language.soft_prompt_token_id = soft_prompt_token_id(t5_tokenizer, paths.llm_model,
                                                                      model.config.enable_semantic_tags)
    model.requires_grad_(False)
    return model.eval(), skipped + [f"ignored {u}" for u in unexpected]
