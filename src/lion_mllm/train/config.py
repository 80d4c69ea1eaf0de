"""The training configuration: the authors' README shape (`model`, `run`, `train_datasets`) as typed data.

    model:            # the authors' model YAML block (bert_model, vit_model, llm_model, ram_model,
                      # pretrained, visual_input, enable_semantic_tags) plus our own keys
    run:              # optimisation, precision, output, checkpointing, bad-data policy
    train_datasets:   # [{ann_path, vis_root, is_train, sample_ratio}]

Relative input paths are looked up in the current directory first (the authors run from their
repository root), then beside the config file. `output_dir` is relative to the current directory.
Unknown keys are an error (a typo must not silently train with a default), except the LAVIS/authors'
keys listed in `IGNORED_*`, which are accepted and reported.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..named_imports import OBJECTIVES, STREAMS, VALIDATORS

logger = logging.getLogger("lion_mllm.train")

# Stage -> the model's visual_input (stage 1 Q-Former road, stage 2 aggregator road, 3/4 both: docs/authors-code.md).
STAGE_VISUAL_INPUT = {1: "qformer", 2: "aggregator", 3: "all", 4: "all"}

# Keys of the authors' model YAML / LAVIS run block that change nothing here: accepted so their files load,
# and each one present is named in a warning when the run starts (`TrainConfig.notes`).
IGNORED_MODEL_KEYS = {"arch", "model_type", "load_finetuned", "finetuned", "vit_precision", "img_size",
                      "drop_path_rate", "num_query_token", "freeze_vit", "prompt", "max_txt_len_eval"}
IGNORED_RUN_KEYS = {"task", "world_size", "dist_url", "distributed", "train_splits", "num_beams", "max_len",
                    "min_len", "runner", "iters_per_inner_epoch", "max_iters"}
# LAVIS run keys that would change what the run does: honoured (mapped) or refused, never dropped.
#   resume_ckpt_path -> resume from that checkpoint (this trainer's own checkpoints)
#   evaluate: True (evaluation only) -> refused, `lion eval` does that
#   valid_splits / test_splits (split names of LAVIS dataset builders) -> refused, use `valid_datasets`
#   lr_sched other than linear_warmup_cosine_lr, lr_layer_decay != 1 -> refused (not implemented)
LAVIS_SCHEDULE = "linear_warmup_cosine_lr"


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the key."""


@dataclass
class DatasetSpec:
    """One annotation file and the folder its image paths are relative to."""

    ann_path: Path
    vis_root: Path
    is_train: bool = True
    sample_ratio: float = 1.0
    tag_cache: Path | None = None  # JSON {image path: tags} made once by `lion tag`
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or self.ann_path.name


@dataclass
class AugmentConfig:
    """Training-time image augmentation. Boxes stay right: a flip rewrites every box of a region-level
    sample (x0, x1 -> 1-x1, 1-x0) and region-level samples are never cropped."""

    hflip: float = 0.0  # probability of a horizontal flip (the authors' LAVIS transform: 0.5, blind)
    random_resized_crop: tuple[float, float] | None = None  # area scale range, image-level samples only
    swap_left_right: bool = True  # a flipped sample's text says "right" where it said "left"

    def __post_init__(self) -> None:
        if not 0.0 <= self.hflip <= 1.0:
            raise ConfigError(f"run.augment.hflip must be a probability, got {self.hflip}")
        if self.random_resized_crop is not None:
            low, high = (float(v) for v in self.random_resized_crop)
            if not 0.0 < low <= high <= 1.0:
                raise ConfigError(f"run.augment.random_resized_crop must be [low, high] in (0, 1], got "
                                  f"{self.random_resized_crop}")
            self.random_resized_crop = (low, high)


@dataclass
class EvalTaskSpec:
    """A benchmark scored during training through `lion_mllm.evaluation` (the `lion eval` harness):
    generation with the model being trained on the first `limit` questions of `ann`."""

    task: str  # a `lion eval --task` name: vqav2, gqa, iconqa, refcoco, coco_caption, ...; or `shapes`
    ann: Path | None = None  # the benchmark's annotation file (`shapes` generates its held-out scenes instead)
    images: Path | None = None
    limit: int | None = 200
    batch_size: int = 8
    tags: str | None = None  # the same tags for every image (a model with tags and no tagger needs them)
    box_format: str = "auto"
    decoding: dict[str, Any] = field(default_factory=dict)  # num_beams, max_new_tokens, ... over the task's
    # `shapes` only: held-out scenes from this seed on (default lion_mllm.shapes.HELD_OUT_SEED_BASE + 500,
    # the selection scenes, never those the model card reports)
    first_seed: int | None = None

    @property
    def key(self) -> str:
        return f"val_{self.task}"


@dataclass
class ObjectiveSpec:
    """A training-only objective (`lion_mllm.named_imports.OBJECTIVES`): its loss times `weight` is added
    to the text loss; `options` go to its constructor."""

    name: str
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StreamSpec:
    """A `train_datasets` entry `{stream: NAME, ...}`: samples generated on the fly by the source NAME
    (`lion_mllm.named_imports.STREAMS`); the other keys are its options. It replaces annotation files."""

    stream: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelSpec:
    """Where the model comes from. Exactly one base:

    - `pretrained` = the authors' `.pth` (with vit_model, llm_model, bert_model) -> `Lion.from_official`;
    - `pretrained` = a directory written by `save_pretrained` (a finished run's `final/`) -> `Lion.from_pretrained`;
    - no `pretrained`: ViT and T5 from vit_model / llm_model, LION's own parts initialised as the authors'
      code does (stage 1 and 2 from scratch);
    - `preset` (tests, benchmarks): a random model of a `lion_mllm.model.config` preset, tokenizers from
      llm_model / bert_model; a preset of `lion_mllm.named_imports.MODEL_BUILDERS` is built by its own
      package: `preset: shapes` is the shapes world's model from scratch (its own tokenizers, tagger and
      initialisation: `lion_mllm.shapes.recipe`).
    Then `init_from` (earlier stages' checkpoints) overwrite LION's own parts; single adapters go into
    their slot of the mixture (stage 2's -> adapters.0 (region), stage 1's -> adapters.1 (image)).
    """

    vit_model: Path | None = None
    llm_model: Path | None = None
    bert_model: Path | None = None
    ram_model: Path | None = None  # not used by training (tags come from records or a tag cache)
    pretrained: Path | None = None
    visual_input: str | None = None
    enable_semantic_tags: bool = True
    init_from: list[Path] = field(default_factory=list)
    preset: str | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    round_like_reference: bool = True
    vit_num_heads: int | None = None
    max_txt_len: int | None = None
    max_output_txt_len: int | None = None
    boost_lr_scale: float | None = None
    use_grad_checkpoint: bool | None = None


@dataclass
class RunConfig:
    stage: int = 4
    init_lr: float = 1e-5
    min_lr: float = 0.0
    warmup_lr: float = 0.0  # learning rate at the first warm-up step's start (LAVIS `warmup_lr`)
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    lr_scale: float = 1.0
    boost_lr_scale: float = 1.0  # multiplies the aggregator's learning rate (authors' `boost_lr_scale`)
    max_epoch: int | None = None
    iters_per_epoch: int | None = None  # optimizer steps per epoch; default: one pass over the data
    max_steps: int | None = None  # total optimizer steps; overrides max_epoch * iters_per_epoch
    # time budget (training wall time of all invocations): when it is spent the run saves and stops,
    # marked incomplete (summary.json, last log line) and never shipped; `--resume` continues it. The
    # schedule is a function of the step alone, so a budget never changes what a completed run computes
    max_minutes: float | None = None
    warmup_steps: int = 0
    batch_size_train: int = 1  # per process and micro-batch
    accum_grad_iters: int = 1
    max_grad_norm: float | None = 1.0  # None: no clipping (LAVIS does not clip)
    mixed_precision: str = "bf16"  # bf16 (autocast on GPU; fp32 on CPU) | fp32
    activation_checkpointing: bool = False
    parallel: str = "ddp"  # ddp | fsdp2
    find_unused_parameters: bool = False
    device: str = "auto"  # auto | cuda | cpu
    seed: int = 42
    num_workers: int = 4
    num_threads: int | None = None  # torch intra-op threads (None: torch's default)
    stream_prefetch: int = 2  # a stream's micro-batches made ahead by a background thread (0: in the step)
    output_dir: str = "outputs/lion"
    run_name: str | None = None  # default: the last part of output_dir
    print_freq: int = 50
    save_every_steps: int | None = None  # also saved at every epoch end and at the end
    keep_checkpoints: int = 2
    export_final: bool = True  # write a `save_pretrained` bundle to <run dir>/final
    tensorboard: bool = True  # the same as naming tensorboard in `loggers`
    loggers: list[str] = field(default_factory=list)  # trackers beside metrics.jsonl: tensorboard, mlflow
    mlflow_tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else MLflow's own default
    mlflow_experiment: str | None = None  # default: the run name (the last part of output_dir)
    progress_bar: bool = True
    # evaluation on `valid_datasets` during training: every N steps (and at the end); None: at every
    # checkpoint save (when valid_datasets are given)
    eval_every_steps: int | None = None
    batch_size_eval: int | None = None  # per process; default batch_size_train
    eval_max_samples: int | None = None  # evaluate on the first N usable records of each file (None: all)
    keep_best: bool = True  # export the best model by `best_metric` to <run dir>/best
    eval_tasks: list[EvalTaskSpec] = field(default_factory=list)  # task scores at each evaluation
    # what `best` means: val_loss (lower is better) or val_<task> of eval_tasks (its score, higher is
    # better); default val_loss when there are valid_datasets, else the first task's score
    best_metric: str | None = None
    stop_after_steps: int | None = None  # save and stop after this many steps of this invocation
    max_bad_fraction: float = 0.01
    bad_check_min_samples: int = 200  # the bad fraction is only judged once this many samples were drawn
    missing_tags: str = "skip"  # a record without tags (model with tags on): skip | empty | error
    tag_cache: Path | None = None  # default tag cache for datasets that name none
    freeze: list[str] = field(default_factory=list)  # extra name prefixes to keep frozen
    # name prefixes frozen by default that train too (`vision_model.`, `language_model.`): for models
    # with nothing pretrained, such as the lion-shapes demo model
    unfreeze: list[str] = field(default_factory=list)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    objectives: list[ObjectiveSpec] = field(default_factory=list)  # training-only auxiliary losses
    # with mixed_precision bf16: autocast on CPU too (weights and optimizer stay float32); about 2x faster
    # for small models on CPUs with bf16 instructions, and what lion-shapes was trained with
    cpu_autocast: bool = False
    flush_denormal: bool = False  # flush denormal floats to zero (CPU): small models trained long slow ~2x
    # at the end of a complete run, copy its best model here (float16, with training.json and metrics.jsonl,
    # the MODEL_CARD.md there kept); an incomplete run is refused
    ship_best_to: Path | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGE_VISUAL_INPUT:
            raise ConfigError(f"run.stage must be 1, 2, 3 or 4, got {self.stage}")
        self.mixed_precision = {"no": "fp32", "none": "fp32", "float32": "fp32", "bfloat16": "bf16"}.get(
            str(self.mixed_precision).lower(), str(self.mixed_precision).lower())
        if self.mixed_precision not in ("bf16", "fp32"):
            raise ConfigError(f"run.mixed_precision must be bf16 or fp32 (fp16 overflows in T5), got "
                              f"{self.mixed_precision!r}")
        if self.parallel not in ("ddp", "fsdp2"):
            raise ConfigError(f"run.parallel must be ddp or fsdp2, got {self.parallel!r}")
        if self.missing_tags not in ("skip", "empty", "error"):
            raise ConfigError(f"run.missing_tags must be skip, empty or error, got {self.missing_tags!r}")
        if self.max_steps is None and self.max_epoch is None:
            raise ConfigError("run needs max_steps or max_epoch")
        for name in ("batch_size_train", "accum_grad_iters", "print_freq", "keep_checkpoints", "eval_every_steps",
                     "batch_size_eval", "eval_max_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"run.{name} must be at least 1")
        unknown_loggers = sorted(set(self.loggers) - {"tensorboard", "mlflow"})
        if unknown_loggers:
            raise ConfigError(f"run.loggers: unknown {unknown_loggers}; known: tensorboard, mlflow")
        if self.stream_prefetch < 0:
            raise ConfigError(f"run.stream_prefetch must be 0 or more, got {self.stream_prefetch}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"run.max_minutes must be positive, got {self.max_minutes}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"run.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")


@dataclass
class TrainConfig:
    model: ModelSpec
    run: RunConfig
    train_datasets: list[DatasetSpec]
    valid_datasets: list[DatasetSpec] = field(default_factory=list)  # held-out files: loss during training
    train_stream: StreamSpec | None = None  # samples generated on the fly instead of train_datasets' files
    source: Path | None = None  # the YAML this came from
    raw: dict[str, Any] = field(default_factory=dict)  # the mapping as read (after overrides)
    resume_from: Path | None = None  # LAVIS `run.resume_ckpt_path`: resume there when no --resume is given
    # what was accepted but changes nothing (ignored LAVIS keys...): logged as warnings when the run
    # starts, once logging writes to train.log (at load time nothing would show them)
    notes: list[str] = field(default_factory=list)

    @property
    def visual_input(self) -> str:
        return STAGE_VISUAL_INPUT[self.run.stage]

    def to_dict(self) -> dict[str, Any]:
        """The resolved config (absolute paths, every default), as written to the run directory."""

        def plain(value: Any) -> Any:
            if dataclasses.is_dataclass(value):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        return {"model": plain(self.model), "run": plain(self.run),
                "train_datasets": [plain(d) for d in self.train_datasets]
                + ([{"stream": self.train_stream.stream, **self.train_stream.options}] if self.train_stream else []),
                "valid_datasets": [plain(d) for d in self.valid_datasets]}


# ----------------------------------------------------------------------------------------------------
# Reading


def _number(value: Any) -> Any:
    """YAML 1.1 reads `1e-5` (no dot) as a string; the authors' configs are full of those."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def _build(kind: type, data: dict[str, Any], where: str, ignored: set[str] = frozenset(),
           notes: list[str] | None = None) -> Any:
    known = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - set(known) - set(ignored))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    skipped = sorted(set(data) & set(ignored))
    if skipped and notes is not None:
        notes.append(f"{where}: ignoring keys that mean nothing to this trainer: "
                     + ", ".join(f"{key}={data[key]!r}" for key in skipped))
    values = {}
    for name, value in data.items():
        if name not in known:
            continue
        kind_name = str(known[name].type)
        if isinstance(value, str) and any(t in kind_name for t in ("float", "int")):
            value = _number(value)
            if isinstance(value, str):
                raise ConfigError(f"{where}.{name}: expected a number, got {value!r}")
        if "float" in kind_name and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        values[name] = value
    try:
        return kind(**values)
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from None


class PathResolver:
    """Relative inputs: the current directory first (the authors' habit), then the config's folder."""

    def __init__(self, config_dir: Path | None):
        self.config_dir = config_dir

    def __call__(self, value: Any, key: str, must_exist: bool = True) -> Path | None:
        if value is None or value == "":
            return None
        path = Path(str(value)).expanduser()
        if path.is_absolute():
            candidates = [path]
        else:
            candidates = [Path.cwd() / path] + ([self.config_dir / path] if self.config_dir else [])
        for candidate in candidates:
            if candidate.exists():
                return candidate.resolve()
        if must_exist:
            tried = " or ".join(str(c) for c in candidates)
            raise ConfigError(f"{key}: {value} does not exist (looked for {tried})")
        return candidates[0]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`run.init_lr=1e-4`, `train_datasets.0.sample_ratio=2`: dotted paths, YAML values."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. run.init_lr=1e-4)")
        key, text = item.split("=", 1)
        value = yaml.safe_load(text) if text else None
        parts = key.strip().split(".")
        node: Any = data
        for part in parts[:-1]:
            if isinstance(node, list):
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value
    return data


def load_train_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> TrainConfig:
    """Read a training YAML (or an equivalent mapping), apply `--set` overrides and check every key."""
    data, path = _read_mapping(source)
    data = apply_overrides(data, overrides or [])
    unknown = sorted(set(data) - {"model", "run", "train_datasets", "datasets", "valid_datasets"})
    if unknown:
        raise ConfigError(f"unknown top-level keys {unknown}; expected model, run, train_datasets, valid_datasets")
    resolve = PathResolver(path.parent.resolve() if path else None)
    notes: list[str] = []
    model = _model_spec(dict(data.get("model") or {}), resolve, notes)
    run, resume_from = _run_config(dict(data.get("run") or {}), model, resolve, notes)
    _check_model_source(model, run)
    entries = data.get("train_datasets", data.get("datasets"))
    if not entries or not isinstance(entries, list):
        raise ConfigError("train_datasets: expected a list of {ann_path, vis_root, is_train, sample_ratio}")
    stream = _stream_spec(entries, run)
    datasets = [] if stream else _dataset_specs(entries, "train_datasets", resolve)
    if stream is None and not any(d.is_train for d in datasets):
        raise ConfigError("train_datasets: no entry has is_train: True")
    valid_entries = data.get("valid_datasets") or []
    if not isinstance(valid_entries, list):
        raise ConfigError("valid_datasets: expected a list of {ann_path, vis_root}")
    valid = _dataset_specs(valid_entries, "valid_datasets", resolve)
    _check_evaluation(run, bool(valid))
    if (stream or run.objectives) and (run.parallel == "fsdp2" or run.activation_checkpointing):
        raise ConfigError("streamed data and run.objectives use the grouped training pass, which supports "
                          "neither parallel: fsdp2 nor activation_checkpointing")
    return TrainConfig(model=model, run=run, train_datasets=datasets, valid_datasets=valid, source=path, raw=data,
                       resume_from=resume_from, notes=notes, train_stream=stream)


def _read_mapping(source: str | Path | dict[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """The config as a mapping (a copy when given one) and the file it came from."""
    if isinstance(source, dict):
        return copy.deepcopy(source), None
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with model, run, train_datasets")
    return data, path


def _model_spec(model_data: dict[str, Any], resolve: PathResolver, notes: list[str]) -> ModelSpec:
    """The `model` block, its paths resolved (the authors' `load_pretrained`, `freeze_vit` and
    `init_from` shapes accepted)."""
    load_pretrained = model_data.pop("load_pretrained", True)
    if model_data.get("freeze_vit") is False:
        notes.append("model.freeze_vit: False is ignored: the ViT always stays frozen (run.unfreeze trains it)")
        model_data.pop("freeze_vit")
    for key in ("vit_model", "llm_model", "bert_model", "pretrained"):
        model_data[key] = resolve(model_data.get(key), f"model.{key}")
    model_data["ram_model"] = resolve(model_data.get("ram_model"), "model.ram_model", must_exist=False)
    if not load_pretrained:
        model_data["pretrained"] = None
    init_from = model_data.get("init_from") or []
    if isinstance(init_from, (str, Path)):
        init_from = [init_from]
    if isinstance(init_from, dict):  # {stage1: path, stage2: path}: applied in key order
        init_from = list(init_from.values())
    model_data["init_from"] = [resolve(p, "model.init_from") for p in init_from]
    if isinstance(model_data.get("visual_input"), str):
        model_data["visual_input"] = model_data["visual_input"].lower()
    return _build(ModelSpec, model_data, "model", IGNORED_MODEL_KEYS, notes)


def _run_config(run_data: dict[str, Any], model: ModelSpec, resolve: PathResolver, notes: list[str]
                ) -> tuple[RunConfig, Path | None]:
    """The `run` block (LAVIS names mapped, the keys `model` may set for it taken over) and the checkpoint
    LAVIS's `resume_ckpt_path` names, if any."""
    if "amp" in run_data:  # LAVIS: amp: True -> bf16 here (fp16 is refused)
        amp = run_data.pop("amp")
        run_data.setdefault("mixed_precision", "bf16" if amp else "fp32")
    if "grad_clip" in run_data:
        run_data.setdefault("max_grad_norm", run_data.pop("grad_clip"))
    if "warmup_start_lr" in run_data:
        run_data.setdefault("warmup_lr", run_data.pop("warmup_start_lr"))
    resume_from = _lavis_run_keys(run_data, resolve)
    tasks = run_data.get("eval_tasks") or []
    if not isinstance(tasks, list):
        raise ConfigError("run.eval_tasks: expected a list of {task, ann, images, limit, ...}")
    run_data["eval_tasks"] = [_eval_task(entry, i, resolve) for i, entry in enumerate(tasks)]
    if isinstance(run_data.get("augment"), dict):
        run_data["augment"] = _build(AugmentConfig, run_data["augment"], "run.augment")
    if model.boost_lr_scale is not None:
        if "boost_lr_scale" in run_data and float(run_data["boost_lr_scale"]) != model.boost_lr_scale:
            raise ConfigError("boost_lr_scale is set differently in model and run; set it once")
        run_data["boost_lr_scale"] = model.boost_lr_scale
    if model.use_grad_checkpoint is not None:
        run_data.setdefault("activation_checkpointing", model.use_grad_checkpoint)
    run_data["tag_cache"] = resolve(run_data.get("tag_cache"), "run.tag_cache")
    run_data["objectives"] = _objectives(run_data.get("objectives") or [])
    if run_data.get("ship_best_to"):
        run_data["ship_best_to"] = resolve(run_data["ship_best_to"], "run.ship_best_to", must_exist=False)
    return _build(RunConfig, run_data, "run", IGNORED_RUN_KEYS, notes), resume_from


def _check_model_source(model: ModelSpec, run: RunConfig) -> None:
    """The model fits the stage and has exactly one base (see `ModelSpec`)."""
    stage_input = STAGE_VISUAL_INPUT[run.stage]
    if model.visual_input is not None and model.visual_input != stage_input:
        raise ConfigError(f"run.stage {run.stage} trains a `{stage_input}` model but model.visual_input is "
                          f"{model.visual_input!r}; stage 1 = QFORMER, 2 = AGGREGATOR, 3 and 4 = ALL")
    if model.preset is not None and model.pretrained is not None:
        raise ConfigError("model: `preset` builds a random model and `pretrained` loads one; give only one")
    if model.preset is None and model.llm_model is None and (model.pretrained is None or
                                                              model.pretrained.is_file()):
        raise ConfigError("model: give `pretrained` (authors' .pth or a bundle directory), or vit_model + "
                          "llm_model + bert_model, or a `preset`")


def _check_evaluation(run: RunConfig, has_valid: bool) -> None:
    """Evaluation during training: something to evaluate when it is scheduled, and `run.best_metric`
    (default: the first metric evaluated) one of the metrics evaluated."""
    if run.eval_every_steps is not None and not has_valid and not run.eval_tasks:
        raise ConfigError("run.eval_every_steps is set but there are no valid_datasets or run.eval_tasks")
    metrics = (["val_loss"] if has_valid else []) + [t.key for t in run.eval_tasks]
    if metrics and run.best_metric is None:
        run.best_metric = metrics[0]
    if (has_valid or run.eval_tasks) and run.best_metric not in metrics:
        raise ConfigError(f"run.best_metric: {run.best_metric!r} is not evaluated; choose one of {metrics}")
    if run.eval_tasks and run.parallel == "fsdp2":
        raise ConfigError("run.eval_tasks: generation during training is not supported with parallel: fsdp2 "
                          "(each process would need the whole model); evaluate the exported model with lion eval")


def _objectives(entries: Any) -> list[ObjectiveSpec]:
    if not isinstance(entries, list):
        raise ConfigError("run.objectives: expected a list of {name, weight, options}")
    specs = []
    for i, entry in enumerate(entries):
        entry = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or entry.get("name") not in OBJECTIVES:
            raise ConfigError(f"run.objectives[{i}]: expected {{name, weight, options}} with name one of "
                              f"{sorted(OBJECTIVES)}, got {entry!r}")
        specs.append(_build(ObjectiveSpec, entry, f"run.objectives[{i}]"))
    return specs


def _stream_spec(entries: list[Any], run: RunConfig) -> StreamSpec | None:
    """The `{stream: NAME, ...}` entry of train_datasets, if any (then it must be the only one)."""
    streams = [e for e in entries if isinstance(e, dict) and "stream" in e]
    if not streams:
        return None
    if len(entries) != 1:
        raise ConfigError("train_datasets: a `stream` entry cannot be mixed with other entries (yet)")
    options = dict(streams[0])
    name = options.pop("stream")
    if name not in STREAMS:
        raise ConfigError(f"train_datasets[0].stream: unknown stream {name!r}; known: {sorted(STREAMS)}")
    if run.max_steps is None:
        raise ConfigError("train_datasets: a stream has no epochs; set run.max_steps")
    return StreamSpec(name, options)


def _eval_task(entry: Any, index: int, resolve: PathResolver) -> EvalTaskSpec:
    where = f"run.eval_tasks[{index}]"
    if not isinstance(entry, dict) or "task" not in entry:
        raise ConfigError(f"{where}: expected a mapping with task and ann (and images, limit, tags, ...)")
    entry = dict(entry)
    from ..evaluation.tasks import BENCHMARKS

    if entry["task"] in VALIDATORS:  # its own scorer on data it generates: no files
        return _build(EvalTaskSpec, entry, where)
    if "ann" not in entry:
        raise ConfigError(f"{where}: expected a mapping with task and ann (and images, limit, tags, ...)")
    if entry["task"] not in BENCHMARKS:
        raise ConfigError(f"{where}.task: unknown task {entry['task']!r}; known: {sorted(BENCHMARKS)}")
    entry["ann"] = resolve(entry["ann"], f"{where}.ann")
    entry["images"] = resolve(entry.get("images"), f"{where}.images")
    return _build(EvalTaskSpec, entry, where)


def _dataset_specs(entries: list[Any], where: str, resolve: PathResolver) -> list[DatasetSpec]:
    specs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}[{i}]: expected a mapping")
        entry = dict(entry)
        for key in ("ann_path", "vis_root"):
            if key not in entry:
                raise ConfigError(f"{where}[{i}]: `{key}` is missing")
            entry[key] = resolve(entry[key], f"{where}[{i}].{key}")
        entry["tag_cache"] = resolve(entry.get("tag_cache"), f"{where}[{i}].tag_cache")
        spec = _build(DatasetSpec, entry, f"{where}[{i}]")
        if spec.sample_ratio <= 0:
            raise ConfigError(f"{where}[{i}].sample_ratio must be positive, got {spec.sample_ratio}")
        specs.append(spec)
    return specs


def _lavis_run_keys(run_data: dict[str, Any], resolve: PathResolver) -> Path | None:
    """Honour or refuse (never drop) the LAVIS run keys that change what a run does; pops them from
    `run_data`. Returns the checkpoint `resume_ckpt_path` names, if any."""
    if run_data.pop("evaluate", False):
        raise ConfigError("run.evaluate: True asks LAVIS for evaluation only; lion train trains. Evaluate a "
                          "model with `lion eval` (docs/evaluation.md), or held-out loss during training "
                          "with valid_datasets")
    for key in ("valid_splits", "test_splits"):
        splits = run_data.pop(key, None)
        if splits:
            raise ConfigError(f"run.{key}: {splits!r} names splits of LAVIS dataset builders, which this "
                              "trainer does not have; list held-out annotation files under valid_datasets "
                              "({ann_path, vis_root}) for evaluation during training")
    schedule = run_data.pop("lr_sched", LAVIS_SCHEDULE)
    if schedule != LAVIS_SCHEDULE:
        raise ConfigError(f"run.lr_sched: {schedule!r} is not implemented; this trainer's schedule is LAVIS's "
                          f"{LAVIS_SCHEDULE} (linear warm-up, then cosine to min_lr)")
    layer_decay = run_data.pop("lr_layer_decay", 1)
    if float(_number(layer_decay)) != 1.0:
        raise ConfigError(f"run.lr_layer_decay: {layer_decay} is not implemented (layer-wise learning-rate decay); "
                          "remove it or set 1")
    resume = run_data.pop("resume_ckpt_path", None)
    if not resume:
        return None
    path = resolve(resume, "run.resume_ckpt_path")
    if path.is_file():
        raise ConfigError(f"run.resume_ckpt_path: {path} is a file (a LAVIS checkpoint?); lion train resumes "
                          "its own checkpoints (a run directory or checkpoints/step_N). To start from a "
                          "model's weights, use model.init_from")
    return path
