"""The four training stages: which parameters train, how they start, how one stage feeds the next.

    stage 1  visual_input qformer     Q-Former, query tokens, its projection, ln_vision, image-level adapter
    stage 2  visual_input aggregator  aggregator, its norm and MLP, region-level adapter
    stage 3  visual_input all         all of the above + the routers (mixture of adapters)
    stage 4  visual_input all         continues from a stage-3 checkpoint (e.g. the released one)

In every stage the ViT and T5's own weights are frozen (requires_grad False) and everything else in
the model trains, as in the authors' code (docs/authors-code.md); the tag soft prompt trains in every stage.
Going from stages 1 and 2 to stage 3 (`model.init_from`), each single adapter goes into its slot of
the mixture: stage 2's (region-level) -> `adapters.0`, stage 1's (image-level) -> `adapters.1`, the
router convention of the authors' code (region_level -> row 0).
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints.bundle import read_bundle_config
from ..checkpoints.checkpoint_files import read_safetensors, read_torch_file
from ..checkpoints.official import OfficialPaths, config_from_official, official_to_ours, ours_to_official
from ..errors import CheckpointError
from ..lion import Lion, resolve_dtype
from ..model.config import PRESETS, LionConfig
from ..model.modeling_lion import LionModel
from ..model.processing import LionProcessor
from ..model.tasks import SOFT_PROMPT_TOKEN
from ..named_imports import MODEL_BUILDERS, load_named
from .config import STAGE_VISUAL_INPUT, ModelSpec

logger = logging.getLogger("lion_mllm.train")

STAGE_DESCRIPTIONS = {
    1: "image-level: Q-Former, query tokens, projection, ln_vision, image-level adapter, tag soft prompt",
    2: "region-level: vision aggregator, its norm and MLP, region-level adapter, tag soft prompt",
    3: "image + region level: Q-Former, aggregator, MLPs, mixture of adapters and routers, tag soft prompt",
    4: "continued stage 3 from a stage-3 checkpoint: same trainable set as stage 3",
}
_ADAPTER_KEY = re.compile(r"^(language_model\..*\.adapter\.)adapters\.(\d+)\.(.+)$")
_ROUTER_KEY = re.compile(r"^language_model\..*\.adapter\.router_ratio[12]$")


def is_lion_parameter(name: str) -> bool:
    """LION's own parameters (everything but the ViT and T5's own weights): the trainable set."""
    if name.startswith("vision_model."):
        return False
    return not name.startswith("language_model.") or ".adapter." in name


def unused_parameters(model: nn.Module) -> list[str]:
    """LION parameters that never get a gradient: the Q-Former's last layer runs a feed-forward on the
    instruction's text positions whose output is discarded (only the query positions go on to T5).
    They stay frozen, so DDP needs no `find_unused_parameters`; the authors' optimizer lists them."""
    layers = getattr(getattr(getattr(model, "qformer", None), "encoder", None), "layer", None)
    if layers is None:
        return []
    last = f"qformer.encoder.layer.{len(layers) - 1}."
    return [n for n, _ in model.named_parameters() if n.startswith((last + "intermediate.", last + "output."))]


def is_trained_parameter(name: str, unfreeze: list[str] | tuple[str, ...] = ()) -> bool:
    """LION's own parameters plus those under an `unfreeze` prefix: what a run trains and checkpoints."""
    return is_lion_parameter(name) or name.startswith(tuple(unfreeze))


def configure_trainable(model: nn.Module, freeze: list[str] | tuple[str, ...] = (),
                        include_unused: bool = False, unfreeze: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Freeze the ViT and T5 (except names under an `unfreeze` prefix), train LION's own parameters except
    names starting with a `freeze` prefix (and, unless `include_unused`, the ones that never get a
    gradient). Returns the trainable names."""
    names = [n for n, _ in model.named_parameters()]
    unknown = [p for p in unfreeze if not any(n.startswith(p) for n in names)]
    if unknown:
        raise ValueError(f"run.unfreeze: no parameter name starts with {unknown} (e.g. vision_model., "
                         f"language_model.)")
    dead = set() if include_unused else set(unused_parameters(model))
    trainable = []
    for name, param in model.named_parameters():
        train = (is_trained_parameter(name, unfreeze) and name not in dead
                 and not any(name.startswith(p) for p in freeze))
        param.requires_grad_(train)
        if train:
            trainable.append(name)
    if not trainable:
        raise ValueError("nothing to train: every LION parameter is frozen (check run.freeze)")
    return trainable


def set_train_mode(model: nn.Module) -> None:
    """Train mode, except a frozen ViT: the authors keep it in eval mode."""
    model.train()
    if not any(p.requires_grad for p in model.vision_model.parameters()):
        model.vision_model.eval()


def lion_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """LION's own parameters (what a stage checkpoint stores), detached."""
    return {n: p.detach() for n, p in model.named_parameters() if is_lion_parameter(n)}


# ----------------------------------------------------------------------------------------------------
# Optimizer groups (the authors', docs/authors-code.md) and the learning-rate schedule


def optimizer_param_groups(model: nn.Module, weight_decay: float, lr_scale: float = 1.0,
                           boost_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """The authors' four AdamW groups over the trainable parameters: {non-aggregator, aggregator} x
    {matrices: weight decay, biases/norms/other 1-D tensors: none}. The aggregator (`fusion_adapter`,
    our `aggregator.*`) gets `lr_scale * boost_lr_scale`; `lr_scale` is a group key the schedule reads."""
    groups: dict[tuple[bool, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        boosted = name.startswith("aggregator.")
        decay = param.ndim >= 2 and not name.endswith("bias")
        group = groups.setdefault((boosted, decay), {
            "params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": lr_scale * (boost_lr_scale if boosted else 1.0),
            "group": ("aggregator" if boosted else "main") + ("" if decay else "_no_decay"),
        })
        group["params"].append(param)
        group["names"].append(name)
    order = [(False, True), (False, False), (True, True), (True, False)]  # the authors' order
    return [groups[key] for key in order if key in groups]


class WarmupCosineSchedule:
    """Linear warm-up from `warmup_lr` to `init_lr` over `warmup_steps`, then cosine to `min_lr` at
    `total_steps`. Each group's learning rate is this value times the group's own `lr_scale` (LAVIS's
    scheduler ignores `lr_scale`, so the authors' `boost_lr_scale` had no effect there)."""

    def __init__(self, optimizer: torch.optim.Optimizer, init_lr: float, min_lr: float, total_steps: int,
                 warmup_steps: int = 0, warmup_lr: float = 0.0):
        self.optimizer = optimizer
        self.init_lr, self.min_lr, self.warmup_lr = init_lr, min_lr, warmup_lr
        self.total_steps, self.warmup_steps = max(1, total_steps), max(0, warmup_steps)
        self.step_count = 0
        self.apply()

    def lr_at(self, step: int) -> float:
        """The base learning rate of optimizer update number `step` (0-based)."""
        if step < self.warmup_steps:
            return self.warmup_lr + (self.init_lr - self.warmup_lr) * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.init_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self) -> None:
        base = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = base * group.get("lr_scale", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self.apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "init_lr": self.init_lr, "min_lr": self.min_lr,
                "warmup_lr": self.warmup_lr, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        changed = {k: (state[k], getattr(self, k)) for k in ("init_lr", "min_lr", "total_steps", "warmup_steps")
                   if k in state and state[k] != getattr(self, k)}
        if changed:
            logger.warning("the schedule changed since the checkpoint (saved, now): %s", changed)
        self.step_count = int(state["step_count"])
        self.apply()


# ----------------------------------------------------------------------------------------------------
# Initialisation of LION's own parts, as the authors' code does it


@torch.no_grad()
def init_lion_parts(model: LionModel) -> None:
    """The authors' initialisation of LION's own modules (docs/authors-code.md): Q-Former BERT-style N(0, 0.02),
    query tokens N(0, 0.02), aggregator N(0, 0.02) with every residual `dense` zeroed, torch defaults for
    the projections, soft prompt N(0, 1), adapters with a zero up-projection (they start as no-ops)
    and identity routers."""

    def bert_init(module: nn.Module, zero_residual_dense: bool = False) -> None:
        for name, sub in module.named_modules():
            if isinstance(sub, nn.Linear):
                sub.weight.normal_(0.0, 0.02)
                if sub.bias is not None:
                    sub.bias.zero_()
                if zero_residual_dense and name.endswith("output.dense"):
                    sub.weight.zero_()
            elif isinstance(sub, nn.Embedding):
                sub.weight.normal_(0.0, 0.02)
            elif isinstance(sub, nn.LayerNorm):
                sub.weight.fill_(1.0)
                sub.bias.zero_()

    config = model.config
    if config.uses_qformer:
        bert_init(model.qformer)
        model.query_tokens.normal_(0.0, 0.02)
        model.qformer_projection.reset_parameters()
        model.ln_vision.reset_parameters()
    if config.uses_aggregator:
        bert_init(model.aggregator, zero_residual_dense=True)
        model.aggregator_norm.reset_parameters()
        for layer in model.aggregator_projection:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
    if config.enable_semantic_tags:
        model.tag_prompt_embedding.normal_(0.0, 1.0)
    for module in model.language_model.modules():
        if hasattr(module, "up_proj") and hasattr(module, "down_proj"):
            module.down_proj.reset_parameters()  # kaiming_uniform(a=sqrt(5)), as the authors
            module.down_proj.bias.zero_()
            module.up_proj.weight.zero_()
            module.up_proj.bias.zero_()
            module.scale.fill_(1.0)
        if hasattr(module, "router_ratio1"):
            module.router_ratio1.copy_(torch.tensor([[1.0], [0.0]]).expand_as(module.router_ratio1))
            module.router_ratio2.copy_(torch.tensor([[0.0], [1.0]]).expand_as(module.router_ratio2))


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    setattr(owner, attr, nn.Parameter(value, requires_grad=False))


def fresh_lion_state(config: LionConfig, seed: int) -> dict[str, torch.Tensor]:
    """LION's own parameters for `config`, initialised as the authors do, without building the ViT or
    T5 (they stay on the meta device): float32, on CPU."""
    with torch.device("meta"):
        model = LionModel(config)
    for name, param in list(model.named_parameters()):
        if is_lion_parameter(name):
            _set_parameter(model, name, torch.empty(param.shape, dtype=torch.float32))
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        init_lion_parts(model)
    finally:
        torch.random.set_rng_state(generator_state)
    return {n: p.detach() for n, p in model.named_parameters() if is_lion_parameter(n)}


# ----------------------------------------------------------------------------------------------------
# Building the model of a stage

def build_lion(spec: ModelSpec, stage: int, device: torch.device, dtype: torch.dtype | None = None,
               seed: int = 0) -> Lion:
    """The model a stage starts from (before `init_from`). `dtype` is the frozen parts' dtype; LION's own
    parameters are made float32 by the trainer (they are what the optimizer updates)."""
    visual_input = STAGE_VISUAL_INPUT[stage]
    dtype = resolve_dtype(device, dtype)
    if spec.preset in MODEL_BUILDERS:  # a model from scratch with its own tokenizers and init
        lion = load_named(MODEL_BUILDERS, spec.preset, "model preset")(seed)
        _check_visual_input(lion.config.visual_input, visual_input, f"model.preset {spec.preset}")
        lion.model.requires_grad_(False).to(device=device, dtype=dtype).eval()
        return lion
    if spec.preset is not None:
        return _build_preset(spec, visual_input, device, dtype, seed)
    if spec.pretrained is not None and spec.pretrained.is_dir():
        lion = Lion.from_pretrained(spec.pretrained, device=device, dtype=dtype)
        _check_visual_input(lion.config.visual_input, visual_input, spec.pretrained)
        return lion
    paths = OfficialPaths(vit_model=spec.vit_model, llm_model=spec.llm_model, bert_model=spec.bert_model,
                          pretrained=spec.pretrained, ram_model=None, visual_input=visual_input,
                          enable_semantic_tags=spec.enable_semantic_tags)
    for key in ("vit_model", "llm_model", "bert_model"):
        if getattr(paths, key) is None:
            raise CheckpointError(f"model.{key} is needed to build the model from the authors' files")
    if spec.pretrained is not None:
        lion = Lion.from_official(paths, device=device, dtype=dtype, round_like_reference=spec.round_like_reference,
                                  vision_num_heads=spec.vit_num_heads)
    else:
        lion = _build_from_scratch(paths, spec, device, dtype, seed)
    _apply_text_lengths(lion.config, spec)
    return lion


def _check_visual_input(found: str, wanted: str, source: Any) -> None:
    if found != wanted:
        raise CheckpointError(f"{source}: a `{found}` model, but this stage trains a `{wanted}` model; use "
                              "`init_from` to carry weights between stages")


def _apply_text_lengths(config: LionConfig, spec: ModelSpec) -> None:
    if spec.max_txt_len is not None:
        config.language.max_text_length = spec.max_txt_len
        config.qformer.max_text_length = spec.max_txt_len
    if spec.max_output_txt_len is not None:
        config.language.max_output_text_length = spec.max_output_txt_len


def _build_preset(spec: ModelSpec, visual_input: str, device: torch.device, dtype: torch.dtype,
                  seed: int) -> Lion:
    if spec.preset not in PRESETS:
        raise CheckpointError(f"model.preset {spec.preset!r}: not one of {sorted(PRESETS)}")
    if spec.llm_model is None:
        raise CheckpointError("model.preset needs llm_model (and bert_model) directories for the tokenizers")
    config = PRESETS[spec.preset](visual_input=visual_input, enable_semantic_tags=spec.enable_semantic_tags)
    if spec.config_overrides:
        merged = config.to_dict()
        for key, value in spec.config_overrides.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key].update(value)
            else:
                merged[key] = value
        config = LionConfig.from_dict(merged)
    _apply_text_lengths(config, spec)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the frozen random parts must be the same on every rank and after a resume
    try:
        model = LionModel(config)
        init_lion_parts(model)
    finally:
        torch.random.set_rng_state(generator_state)
    processor = LionProcessor.from_dirs(config, spec.llm_model, spec.bert_model if config.uses_qformer else None)
    config.language.soft_prompt_token_id = processor.tokenizer.convert_tokens_to_ids(SOFT_PROMPT_TOKEN)
    model.requires_grad_(False)
    return Lion(model.to(device=device, dtype=dtype).eval(), processor)


def _build_from_scratch(paths: OfficialPaths, spec: ModelSpec, device: torch.device, dtype: torch.dtype,
                        seed: int) -> Lion:
    """ViT and T5 from the authors' files, LION's own parts initialised as their code does. The fresh
    parts go through a temporary file in the authors' format so that the one checked loader
    (`Lion.from_official`: strict keys, the authors' rounding) builds the model."""
    config = config_from_official(paths, read_torch_file(paths.vit_model), spec.vit_num_heads)
    state = ours_to_official(fresh_lion_state(config, seed))
    with tempfile.TemporaryDirectory(prefix="lion-init-") as tmp:
        fresh = Path(tmp) / "lion_fresh_init.pth"
        torch.save(state, fresh)
        paths = OfficialPaths(**{**paths.__dict__, "pretrained": fresh})
        logger.info("stage starts from scratch: ViT %s, T5 %s, LION parts initialised (seed %d)",
                    paths.vit_model, paths.llm_model, seed)
        return Lion.from_official(paths, device=device, dtype=dtype,
                                  round_like_reference=spec.round_like_reference,
                                  vision_num_heads=spec.vit_num_heads)


# ----------------------------------------------------------------------------------------------------
# Carrying weights from stage to stage


def infer_visual_input(keys: list[str] | set[str]) -> str:
    """The visual_input of a model from its (our) parameter names."""
    keys = set(keys)
    if any(_ROUTER_KEY.match(k) for k in keys):
        return "all"
    has_qformer = any(k.startswith("qformer.") for k in keys)
    has_aggregator = any(k.startswith("aggregator.") for k in keys)
    if has_qformer and has_aggregator:
        return "all"
    if has_aggregator:
        return "aggregator"
    if has_qformer:
        return "qformer"
    raise CheckpointError("cannot tell which stage wrote this checkpoint (no Q-Former, aggregator or router keys)")


def read_lion_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """LION's own parameters (our names) and the visual_input of the model that wrote them, from: a
    checkpoint directory of this trainer, a `save_pretrained` bundle, a .safetensors file, or the
    authors' .pth."""
    path = Path(path)
    if path.is_dir():
        if (path / "lion_params.safetensors").is_file():
            state = read_safetensors([path / "lion_params.safetensors"])
            meta_file = path / "meta.json"
            visual_input = json.loads(meta_file.read_text())["visual_input"] if meta_file.is_file() else None
            return state, visual_input or infer_visual_input(state)
        if (path / "config.json").is_file():
            index = json.loads((path / "model.safetensors.index.json").read_text())
            files = sorted({path / f for f in index["weight_map"].values()})
            state = {k: v for k, v in read_safetensors(files).items() if is_lion_parameter(k)}
            return state, read_bundle_config(path).visual_input  # the bundle's own reader: any format version
        raise CheckpointError(f"{path}: neither a training checkpoint (lion_params.safetensors) nor a "
                              "save_pretrained bundle (config.json)")
    if path.suffix == ".safetensors":
        state = {k: v for k, v in read_safetensors([path]).items() if is_lion_parameter(k)}
        return state, infer_visual_input(state)
    raw = read_torch_file(path)
    mapped, unknown = official_to_ours(raw)
    if unknown:
        logger.info("%s: %d keys with no counterpart ignored, e.g. %s", path, len(unknown), unknown[:3])
    state = {k: v for k, v in mapped.items() if is_lion_parameter(k)}
    return state, infer_visual_input(state)


def map_between_stages(name: str, source: str, target: str) -> str | None:
    """Where a parameter of a `source` model goes in a `target` model (None: nowhere).

    Single-adapter models hold their adapter at `adapters.0`; in the mixture, slot 0 is the region-level
    adapter (stage 2, aggregator) and slot 1 the image-level one (stage 1, Q-Former)."""
    slot = {"aggregator": 0, "qformer": 1}
    if _ROUTER_KEY.match(name):
        return name if source == target == "all" else None
    match = _ADAPTER_KEY.match(name)
    if match is None or source == target:
        return name
    prefix, index, rest = match.group(1), int(match.group(2)), match.group(3)
    if source != "all" and target == "all":  # single -> its slot of the mixture
        return f"{prefix}adapters.{slot[source]}.{rest}"
    if source == "all" and target != "all":  # the mixture's slot for this road -> single
        return f"{prefix}adapters.0.{rest}" if index == slot[target] else None
    return None  # image-level adapter into a region-level model or back: different roles


@torch.no_grad()
def load_into(model: LionModel, path: Path) -> dict[str, list[str]]:
    """Copy LION's own parameters from a checkpoint (any `read_lion_checkpoint` format) into `model`,
    moving single adapters into their mixture slot. Parameters the checkpoint lacks keep their values.
    Returns {"loaded": [...], "skipped": [...]} (names in the checkpoint)."""
    state, source = read_lion_checkpoint(path)
    target = model.config.visual_input
    params = dict(model.named_parameters())
    loaded, skipped = [], []
    for name, tensor in state.items():
        destination = map_between_stages(name, source, target)
        param = params.get(destination) if destination else None
        if param is None or not is_lion_parameter(destination):
            skipped.append(name)
            continue
        if tuple(param.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, {destination} in this model "
                                  f"is {tuple(param.shape)} (another model size?)")
        param.copy_(tensor.to(device=param.device, dtype=param.dtype))
        loaded.append(name)
    if not loaded:
        raise CheckpointError(f"{path}: no parameter of this `{source}` checkpoint fits the `{target}` model")
    logger.info("init_from %s (a `%s` model): %d tensors loaded, %d not used by this `%s` model", path, source,
                len(loaded), len(skipped), target)
    return {"loaded": loaded, "skipped": skipped}
