"""Training throughput on CPU: one optimizer step of LION stage-3 training, three sides in one run.

    python benchmarks/train_throughput.py --size base --batches 4 8 --reps 3 --sequential
    python benchmarks/train_throughput.py --size base --sides lion-mllm lion-mllm-authors-flow --batches 4 \
        --reps 3 --output benchmarks/results/train_throughput_interleaved.json   # two sides, interleaved
    python benchmarks/train_throughput.py --size tiny            # a quick check (seconds)

One timed step is what `lion_mllm.train.loop.train()` does per step with one process and no gradient
accumulation: the loss (`objectives.token_loss_sum`, the trainer's own function: summed token
cross-entropy in float32), its backward scaled to the token mean, gradient clipping at the trainer's
default `max_grad_norm` 1.0, an AdamW step over the authors' parameter groups
(`stages.optimizer_param_groups`, weight decay 0.05, lr 1e-5), `zero_grad(set_to_none=True)` and the
schedule's step. Batches are built before the timer starts (the trainer builds them in DataLoader
workers). The sides, each in its own process (so each one's peak RSS is its own):

  * `lion-mllm`: the model exactly as the trainer builds it for stage 3 (`stages.build_lion` with a
    `preset`, then `configure_trainable`, float32 LION parameters, `model.train()` with the frozen
    ViT in eval mode); SDPA attention. The trainer's `mixed_precision: bf16` default autocasts on GPU
    only: on CPU it computes in float32, and so does this side.
  * `lion-mllm-authors-flow`: the same model and weights (same seed, same `init_lion_parts`) built
    with `attn_implementation="eager"`: the authors' attention arithmetic, float32.
  * `instructblip`: transformers' `InstructBlipForConditionalGeneration` with a T5 language model at
    the same dimensions (ViT, Q-Former and T5 sizes of the preset, 32 query tokens at `base`), no
    aggregator and no adapters, SDPA attention; the parts that correspond to LION's stage-3 trainable
    set train (query tokens, Q-Former, language projection); ViT and T5 frozen, as in LION.

There is no "authors' code" side: the authors released no training code (only inference and
evaluation), so their training step cannot be run.

Trainable in stage 3 (`stages.STAGE_DESCRIPTIONS[3]`, `configure_trainable`): the Q-Former, query
tokens, its projection, ln_vision, the vision aggregator with its norm and MLP, both adapters of the
mixture in every T5 feed-forward layer, the routers and the tag soft prompt. The ViT and T5's own
weights are frozen, and the Q-Former's last-layer text feed-forward (which never gets a gradient)
stays frozen as in the trainer.

Samples: `lion_mllm.train.synthetic.write_synthetic_dataset` (coloured squares, 224x224), read through
the trainer's own data path (`AnnotationDataset`, `MixtureSchedule` with both files at ratio 1,
`MixtureDataset`, `Collator`), so a batch alternates image-level samples (route 1: "What colour is the
square?") and region-level ones (route 0: locate the square, answered with a box). Every side gets
the same batches; the InstructBLIP side gets the same tensors with its 32 image placeholder tokens put
in front of the T5 prompt (where LION puts its visual tokens as embeddings) and no route ids.

Warm-up and order: each side first makes one untimed step per batch size, counted by torch's
`FlopCounterMode` (matmul, convolution and attention FLOPs of forward and backward). Then the
repetitions are interleaved (side A all batch sizes, side B, side C, then again), and medians are
reported. With `--sequential` (needed at `base` on a 23 GiB machine: a LION side peaks at about
11.6 GiB at batch 8) the sides run one after the other, so their repetitions are not interleaved.
Every side runs with the same intra-op thread count (`--threads`, default 1, plus OMP_NUM_THREADS).
`os.getloadavg()` is recorded at the start, at the end and after every step. The synthetic set has
max(--batches) images per file, and batch b is the first b samples of the stream, so the samples of
a batch size depend on the largest batch size of the run (the token lengths are in the results).

FLOPs per sample, two ways: `counted` (FlopCounterMode, every side) and, for LION, `model accounting`:
`LionModel.flops_per_image(prompt_tokens, text_tokens)` with the batch's padded lengths (forward:
vision + Q-Former + aggregator + T5 encoder + answer tokens x decoder-per-token), turned into training
FLOPs as forward + 2 x forward of the trained modules (Q-Former, aggregator: input and weight
gradients) + 1 x forward of the frozen T5 (input gradients only; the adapters are a small part) and no
backward through the frozen ViT (nothing before it needs a gradient).

`--recipe shapes` measures instead the step of `configs/shapes_from_scratch.yaml` (the lion-shapes model
trained from scratch, everything trainable) where its time goes, in one process:

    python benchmarks/train_throughput.py --recipe shapes --images 4 12 --precisions fp32 bf16 \
        --output benchmarks/results/train_throughput_shapes.json

Per step: `data` (the stream's micro-batch: scenes drawn and rendered, pixels, tokens -- what the
prefetching worker takes off the step), `forward` (the grouped pass with the dense objective), `backward`,
`optimizer` (clipping, AdamW, zero_grad), each in CPU seconds of this process (`time.process_time`: what
the step costs, whatever else the machine runs) and wall seconds; FLOPs per sample (FlopCounterMode) and
the CPU-time FLOP rate; the ten costliest operators (torch.profiler, fp32); whether torch has oneDNN bf16
kernels on this CPU. `bf16` is the recipe under `torch.autocast("cpu", bfloat16)` (`run.cpu_autocast`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(HERE))
from _reference_side import serve  # noqa: E402  (stdlib only)
from cpu_vs_reference import Side, machine, median  # noqa: E402

SIDES = ("lion-mllm", "lion-mllm-authors-flow", "instructblip")
LABELS = {"lion-mllm": "lion-mllm (trainer step, SDPA, fp32)",
          "lion-mllm-authors-flow": "lion-mllm, authors' flow (eager, fp32)",
          "instructblip": "transformers InstructBLIP-T5 (SDPA, fp32)"}
# Tokenizers for the presets' vocabularies: the golden set's tiny ones, and the 32128-id T5 / 30522-entry
# BERT tokenizer directories that `cpu_vs_reference.py` writes into its base artifacts folder.
TOKENIZERS = {"tiny": (SHARED / "golden" / "lion-a" / "assets" / "flan-t5-tiny",
                       SHARED / "golden" / "lion-a" / "assets" / "bert-tiny-uncased"),
              "base": (Path("/tmp/lion-bench-base/flan-t5"), Path("/tmp/lion-bench-base/bert-base-uncased"))}
INIT_LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-5, 0.05, 1.0  # the trainer's defaults (RunConfig)


# ---------------------------------------------------------------------------------------------------
# Worker: one side, in its own process


def _samples(config, data_dir: Path, count: int, seed: int) -> list:
    """The first `count` samples of the trainer's mixture stream over the synthetic set's two files."""
    from lion_mllm.train.config import AugmentConfig, DatasetSpec
    from lion_mllm.train.data import AnnotationDataset, MixtureDataset, MixtureSchedule

    specs = [DatasetSpec(ann_path=data_dir / name, vis_root=data_dir / "images")
             for name in ("image_level.json", "region_level.jsonl")]
    datasets = [AnnotationDataset(spec, need_tags=config.enable_semantic_tags) for spec in specs]
    schedule = MixtureSchedule([len(d) for d in datasets], [1.0, 1.0], seed)
    mixture = MixtureDataset(datasets, config.vision.image_size, AugmentConfig(), seed, 0)
    return [mixture[schedule.next()] for _ in range(count)]


def _digest(batch: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(batch):
        digest.update(key.encode())
        digest.update(batch[key].contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _lion_config_and_processor(args: argparse.Namespace):
    """The stage-3 preset config and its processor, as the trainer's `_build_preset` makes them."""
    from lion_mllm.model.config import PRESETS
    from lion_mllm.model.processing import LionProcessor
    from lion_mllm.model.tasks import SOFT_PROMPT_TOKEN
    from lion_mllm.train.config import STAGE_VISUAL_INPUT

    config = PRESETS[args.size](visual_input=STAGE_VISUAL_INPUT[3], enable_semantic_tags=True)
    processor = LionProcessor.from_dirs(config, args.t5_dir, args.bert_dir)
    config.language.soft_prompt_token_id = processor.tokenizer.convert_tokens_to_ids(SOFT_PROMPT_TOKEN)
    return config, processor


def _build_lion(args: argparse.Namespace, eager: bool):
    """(model, processor) as the trainer builds a stage-3 preset model; `eager`: the same weights with
    the authors' eager attention (the trainer's `_build_preset`, with the attention choice added)."""
    import torch

    from lion_mllm.model.modeling_lion import LionModel
    from lion_mllm.train.config import ModelSpec
    from lion_mllm.train.stages import build_lion, init_lion_parts

    if not eager:
        spec = ModelSpec(preset=args.size, llm_model=Path(args.t5_dir), bert_model=Path(args.bert_dir))
        lion = build_lion(spec, 3, torch.device("cpu"), None, seed=args.seed)
        return lion.model, lion.processor
    config, processor = _lion_config_and_processor(args)
    state = torch.random.get_rng_state()
    torch.manual_seed(args.seed)
    try:
        model = LionModel(config, attn_implementation="eager")
        init_lion_parts(model)
    finally:
        torch.random.set_rng_state(state)
    model.requires_grad_(False)
    return model.to(torch.float32).eval(), processor


def _prepare_lion_for_training(model) -> list[str]:
    """What `startup.start_run` does between building the model and the first step (one process, no FSDP)."""
    import torch

    from lion_mllm.train.stages import configure_trainable, is_lion_parameter

    trainable = configure_trainable(model, [])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_lion_parameter(name) and param.dtype != torch.float32:
                param.data = param.data.float()
    model.train()
    model.vision_model.eval()  # the authors keep the frozen ViT in eval mode
    return trainable


def _build_instructblip(lion_config, image_token_id: int):
    """InstructBLIP-T5 at LION's dimensions; trains query tokens, Q-Former and projection."""
    import torch
    from torch import nn
    from transformers import (
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
        T5Config,
    )

    v, qf, lang = lion_config.vision, lion_config.qformer, lion_config.language
    vision = InstructBlipVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                      num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                                      image_size=v.image_size, patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps)
    qformer = InstructBlipQFormerConfig(vocab_size=qf.vocab_size, hidden_size=qf.hidden_size,
                                        num_hidden_layers=qf.num_hidden_layers,
                                        num_attention_heads=qf.num_attention_heads,
                                        intermediate_size=qf.intermediate_size,
                                        max_position_embeddings=qf.max_position_embeddings,
                                        cross_attention_frequency=qf.cross_attention_frequency,
                                        encoder_hidden_size=v.hidden_size, hidden_dropout_prob=qf.dropout,
                                        attention_probs_dropout_prob=qf.dropout, layer_norm_eps=qf.layer_norm_eps)
    text = T5Config(vocab_size=lang.vocab_size, d_model=lang.d_model, d_kv=lang.d_kv, d_ff=lang.d_ff,
                    num_layers=lang.num_layers, num_decoder_layers=lang.num_decoder_layers, num_heads=lang.num_heads,
                    relative_attention_num_buckets=lang.relative_attention_num_buckets,
                    relative_attention_max_distance=lang.relative_attention_max_distance,
                    dropout_rate=lang.dropout_rate, layer_norm_epsilon=lang.layer_norm_epsilon,
                    feed_forward_proj="gated-gelu", decoder_start_token_id=lang.decoder_start_token_id,
                    pad_token_id=lang.pad_token_id, eos_token_id=lang.eos_token_id, tie_word_embeddings=False)
    config = InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=text,
                                num_query_tokens=qf.num_query_tokens, image_token_index=image_token_id)
    model = InstructBlipForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    lm = model.language_model
    if lm.lm_head.weight is lm.shared.weight:  # FlanT5 has its own lm_head (transformers 5 ties it here)
        lm.lm_head.weight = nn.Parameter(lm.shared.weight.detach().clone())
    last = f"qformer.encoder.layer.{qf.num_hidden_layers - 1}."
    dead = (last + "intermediate.", last + "output.")  # the text FFN of the last layer: no gradient
    trainable = []
    for name, param in model.named_parameters():
        train = name.startswith(("query_tokens", "qformer.", "language_projection.")) and not name.startswith(dead)
        param.requires_grad_(train)
        if train:
            trainable.append(name)
    model.to(torch.float32).train()
    model.vision_model.eval()
    attn = {part: getattr(model, part).config._attn_implementation
            for part in ("vision_model", "qformer", "language_model")}
    return model, trainable, attn


def _count_cpu_sdpa() -> None:
    """FlopCounterMode knows the GPU SDPA kernels but not the CPU flash kernel that SDPA picks here, so
    SDPA sides would count no attention FLOPs; give the CPU kernel (and its backward) the same formulas."""
    import torch
    from torch.utils import flop_counter

    aten = torch.ops.aten
    for op, formula in ((aten._scaled_dot_product_flash_attention_for_cpu, flop_counter.sdpa_flop),
                        (aten._scaled_dot_product_flash_attention_for_cpu_backward,
                         flop_counter.sdpa_backward_flop)):
        if op not in flop_counter.flop_registry and op.default not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op, get_raw=True)(formula)  # `formula` is shape-wrapped already


def worker(args: argparse.Namespace) -> None:
    """Build one side, then answer JSON requests (one per line) with timed training steps."""
    serve(lambda: _load_side(args))


def _load_side(args: argparse.Namespace):
    t0 = time.time()
    import torch
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    from lion_mllm.train.data import Collator
    from lion_mllm.train.objectives import token_loss_sum
    from lion_mllm.train.stages import WarmupCosineSchedule, optimizer_param_groups

    torch.set_num_threads(args.threads)
    _count_cpu_sdpa()
    import_s = time.time() - t0
    name = args.worker
    t = time.time()
    # the batches come from LION's processor on every side (the InstructBLIP side too)
    info: dict = {"side": name}
    if name == "instructblip":
        lion_config, processor = _lion_config_and_processor(args)
        image_token_id = lion_config.language.vocab_size - 1  # an id no tokenizer entry uses
        if len(processor.tokenizer) > image_token_id:
            raise SystemExit("the T5 tokenizer uses every id of the model's vocabulary")
        model, trainable, attn = _build_instructblip(lion_config, image_token_id)
        info.update(attn_implementation=attn, image_token_id=image_token_id)
    else:
        model, processor = _build_lion(args, eager=name == "lion-mllm-authors-flow")
        lion_config = model.config
        trainable = _prepare_lion_for_training(model)
        info["attn_implementation"] = "eager" if name.endswith("authors-flow") else "sdpa"
        with torch.no_grad():  # equal on both LION sides: the same weights
            info["weights_checksum"] = float(sum(p.sum(dtype=torch.float64) for p in model.parameters()))
    build_s = time.time() - t
    groups = optimizer_param_groups(model, WEIGHT_DECAY)
    optimizer = torch.optim.AdamW(groups, lr=INIT_LR, betas=(0.9, 0.999))
    scheduler = WarmupCosineSchedule(optimizer, INIT_LR, 0.0, total_steps=10_000)
    params = [p for p in model.parameters() if p.requires_grad]

    samples = _samples(lion_config, Path(args.data), max(args.batches), args.seed)
    collate = Collator(processor)
    batches, digests, shapes, routes = {}, {}, {}, {}
    for b in args.batches:
        batch = collate(samples[:b])["batch"]
        digests[b] = _digest(batch)
        shapes[b] = {"prompt_tokens": int(batch["input_ids"].shape[1]),
                     "qformer_text_tokens": int(batch["qformer_input_ids"].shape[1]),
                     "answer_tokens": int(batch["labels"].shape[1]),
                     "target_tokens": int((batch["labels"] != -100).sum())}
        routes[b] = batch["route_ids"].tolist()
        if name == "instructblip":
            n = lion_config.qformer.num_query_tokens
            batch = dict(batch)
            del batch["route_ids"]
            batch["input_ids"] = torch.cat([torch.full((b, n), image_token_id), batch["input_ids"]], dim=1)
            batch["attention_mask"] = torch.cat([torch.ones(b, n, dtype=batch["attention_mask"].dtype),
                                                 batch["attention_mask"]], dim=1)
        batches[b] = batch

    accounting = {}
    if name != "instructblip":
        for b, s in shapes.items():
            fwd = model.flops_per_image(prompt_tokens=s["prompt_tokens"], text_tokens=s["qformer_text_tokens"])
            decoder = fwd["t5_decoder_per_token"] * s["answer_tokens"]
            forward = fwd["vision"] + fwd["qformer"] + fwd["aggregator"] + fwd["t5_encoder"] + decoder
            training = forward + 2 * (fwd["qformer"] + fwd["aggregator"]) + fwd["t5_encoder"] + decoder
            accounting[b] = {"forward_per_sample": forward, "training_per_sample": training, "parts": fwd}

    torch.manual_seed(args.seed)  # dropout masks: as the trainer seeds before its first step

    def step(batch: dict) -> dict:
        tokens = float((batch["labels"] != -100).sum())
        start = time.perf_counter()
        loss_sum = token_loss_sum(model, batch)  # no autocast: the trainer's bf16 applies on GPU only
        forward_done = time.perf_counter()
        (loss_sum * (1.0 / tokens)).backward()
        backward_done = time.perf_counter()
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss = float(loss_sum.detach().double()) / tokens
        end = time.perf_counter()
        return {"seconds": end - start, "forward_s": forward_done - start, "backward_s": backward_done - forward_done,
                "optimizer_s": end - backward_done, "loss": loss, "grad_norm": float(norm)}

    n_train = sum(p.numel() for p in params)
    info.update({
        "import_s": import_s, "build_s": build_s, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "param_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()}),
        "compute_dtype": "float32 (no autocast)", "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": n_train, "trainable_tensors": len(trainable),
        "optimizer_groups": {g["group"]: len(g["params"]) for g in groups},
        "batch_digests": digests, "batch_shapes": shapes, "routes": routes, "flops_model_accounting": accounting,
    })

    def train_step(req: dict) -> dict:
        batch = batches[req["batch"]]
        if not req.get("count_flops"):
            return step(batch)
        with FlopCounterMode(display=False) as counter:
            answer = step(batch)
        return {**answer, "counted_flops": counter.get_total_flops()}

    return info, train_step


# ---------------------------------------------------------------------------------------------------
# Driver


def start(name: str, args: argparse.Namespace, data_dir: Path, log_dir: Path) -> Side:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--size", args.size,
           "--threads", str(args.threads), "--seed", str(args.seed), "--data", str(data_dir),
           "--t5-dir", args.t5_dir, "--bert-dir", args.bert_dir, "--batches", *map(str, args.batches)]
    return Side(name, cmd, env, log_dir)


def run(args: argparse.Namespace) -> dict:
    from lion_mllm.train.synthetic import write_synthetic_dataset

    sides = [s for s in SIDES if s in args.sides]
    log_dir = Path(tempfile.mkdtemp(prefix="lion-train-throughput-"))
    data_dir = log_dir / "data"
    write_synthetic_dataset(data_dir, n_images=max(args.batches), size=224, seed=args.seed)
    result: dict = {"command": " ".join([Path(sys.executable).name] + sys.argv), "size": args.size,
                    "machine": machine(), "threads": args.threads, "batches": args.batches, "reps": args.reps,
                    "sequential": args.sequential, "seed": args.seed,
                    "step": {"loss": "objectives.token_loss_sum / target tokens", "max_grad_norm": MAX_GRAD_NORM,
                             "optimizer": f"AdamW lr {INIT_LR}, weight decay {WEIGHT_DECAY} (matrices), "
                                          "betas (0.9, 0.999)",
                             "autocast": "none: the trainer's bf16 autocast applies on GPU only (startup.py)",
                             "activation_checkpointing": False, "accum_grad_iters": 1, "processes": 1},
                    "tokenizers": {"t5": args.t5_dir, "bert": args.bert_dir},
                    "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "loadavg_start": os.getloadavg(), "sides": {}, "cases": {}}
    timings: dict[str, dict[int, list[dict]]] = {s: {b: [] for b in args.batches} for s in sides}
    loads: list[float] = []

    def measure(side: Side, rep: int) -> None:
        for b in args.batches:
            answer = side.ask({"cmd": "step", "batch": b})
            timings[side.name][b].append(answer)
            loads.append(os.getloadavg()[0])
            print(f"  rep {rep} {side.name:24s} batch {b:2d} {answer['seconds']:8.2f} s "
                  f"(fwd {answer['forward_s']:.2f} bwd {answer['backward_s']:.2f} opt {answer['optimizer_s']:.2f}) "
                  f"loss {answer['loss']:.4f}  load {loads[-1]:.2f}", flush=True)

    def load(name: str) -> Side:
        side = start(name, args, data_dir, log_dir)
        result["sides"][name] = side.read()
        print(f"{name}: built in {result['sides'][name]['build_s']:.1f} s, "
              f"{result['sides'][name]['trainable_parameters']:,} trainable of "
              f"{result['sides'][name]['parameters']:,} parameters", flush=True)
        warm = result["sides"][name]["warmup"] = {}
        for b in args.batches:  # one untimed step per batch size (counted by FlopCounterMode)
            answer = side.ask({"cmd": "step", "batch": b, "count_flops": args.count_flops})
            warm[b] = answer
            print(f"  warm-up {name:24s} batch {b:2d} {answer['seconds']:8.2f} s  loss {answer['loss']:.4f}"
                  + (f"  counted {answer['counted_flops'] / b / 1e9:.1f} GFLOP/sample" if args.count_flops else ""),
                  flush=True)
        return side

    def finish(side: Side) -> None:
        result["sides"][side.name].update(side.close())

    if args.sequential:
        for name in sides:
            side = load(name)
            for rep in range(args.reps):
                measure(side, rep)
            finish(side)
    else:
        running = {name: load(name) for name in sides}  # one build at a time
        for rep in range(args.reps):
            for name in sides:
                measure(running[name], rep)
        for side in running.values():
            finish(side)

    reference = result["sides"][sides[0]]["batch_digests"]
    for b in args.batches:
        entry: dict = {"batch": b, "shapes": result["sides"][sides[0]]["batch_shapes"][str(b)],
                       "routes": result["sides"][sides[0]]["routes"][str(b)]}
        for name in sides:
            runs = timings[name][b]
            med = median([r["seconds"] for r in runs])
            e = entry[name] = {
                "seconds": [r["seconds"] for r in runs], "median_s": med, "samples_per_s": b / med,
                "median_forward_s": median([r["forward_s"] for r in runs]),
                "median_backward_s": median([r["backward_s"] for r in runs]),
                "median_optimizer_s": median([r["optimizer_s"] for r in runs]),
                "losses": [r["loss"] for r in runs], "grad_norms": [r["grad_norm"] for r in runs],
                "warmup_loss": result["sides"][name]["warmup"][b]["loss"],
                "peak_rss_gib_after_warmup": result["sides"][name]["warmup"][b]["peak_rss_gib"],
                "same_batch": result["sides"][name]["batch_digests"][str(b)] == reference[str(b)],
            }
            if args.count_flops:
                counted = result["sides"][name]["warmup"][b]["counted_flops"] / b
                e["counted_flops_per_sample"] = counted
                e["counted_flop_per_s"] = counted * b / med
            acc = result["sides"][name]["flops_model_accounting"].get(str(b))
            if acc:
                e["model_accounting_training_flops_per_sample"] = acc["training_per_sample"]
                e["model_accounting_forward_flops_per_sample"] = acc["forward_per_sample"]
                e["model_accounting_flop_per_s"] = acc["training_per_sample"] * b / med
            if name != sides[0]:
                e["speed_vs_" + sides[0]] = entry[sides[0]]["median_s"] / med
        result["cases"][f"b{b}"] = entry
    result["loadavg_end"] = os.getloadavg()
    result["loadavg_1min_during_steps"] = {"min": min(loads), "median": median(loads), "max": max(loads)}
    result["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["logs"] = str(log_dir)
    return result


def shapes_breakdown(args: argparse.Namespace) -> dict:
    """Where a step of the lion-shapes recipe goes (see the module docstring, `--recipe shapes`)."""
    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as run.flush_denormal
    result: dict = {"command": " ".join([Path(sys.executable).name] + sys.argv), "recipe": args.recipe,
                    "machine": machine(), "threads": args.threads, "reps": args.reps,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "onednn_bf16_kernels": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "loadavg_start": os.getloadavg(), "cases": {}}
    for precision in args.precisions:
        for images in args.images:
            case = _shapes_case(precision, images, args.reps, profile_step=precision == "fp32"
                                and images == args.images[0])
            result["cases"][f"{precision}-{images}"] = case
            part = {name: case["median"][name]["cpu_s"] for name in case["median"]}
            print(f"{precision:5s} {images:3d} images ({case['samples_per_step']} samples): CPU "
                  f"{case['cpu_s_per_step']:6.2f} s/step ({case['cpu_ms_per_sample']:5.1f} ms/sample; data "
                  f"{part['data']:.3f}, forward {part['forward']:.2f}, backward {part['backward']:.2f}, optimizer "
                  f"{part['optimizer']:.3f}), {case['flops_per_sample'] / 1e9:.2f} GFLOP/sample, "
                  f"{case['gflop_per_cpu_s']:.1f} GFLOP per CPU second, load {case['loadavg_1min']:.1f}", flush=True)
    result["loadavg_end"] = os.getloadavg()
    return result


def _shapes_case(precision: str, images: int, reps: int, profile_step: bool) -> dict:
    """One case of `--recipe shapes`: a fresh `shapes` preset model trained as the recipe trains it (the
    grouped pass with the dense objective, everything trainable, AdamW), a warm-up step counting FLOPs,
    then `reps` timed steps (and one profiled step)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from lion_mllm.shapes.recipe import DenseObjective, ShapesStream, build_shapes_lion
    from lion_mllm.train.data import StreamedBatches
    from lion_mllm.train.objectives import grouped_losses
    from lion_mllm.train.stages import configure_trainable, optimizer_param_groups

    lion = build_shapes_lion(0)  # the `shapes` preset, as `model.preset: shapes` builds it
    model = lion.model
    configure_trainable(model, [], unfreeze=["vision_model.", "language_model."])
    model.train()
    objectives = {"shapes_dense": DenseObjective(model.config)}
    head = list(objectives["shapes_dense"].parameters())
    optimizer = torch.optim.AdamW([*optimizer_param_groups(model, 0.01, 1.0, 1.0),
                                   {"params": head, "weight_decay": 0.01}], lr=6e-4, betas=(0.9, 0.98))
    trained = [p for p in model.parameters() if p.requires_grad]
    stream = StreamedBatches(ShapesStream(seed=0, images_per_batch=images, vqa_per_image=3, rec_per_image=2),
                             lion.processor, 0, 0, 1, 1)
    parts = ("data", "forward", "backward", "optimizer")

    def step(timed: list | None = None, count_flops: bool = False) -> float:
        marks = [(time.process_time(), time.perf_counter())]
        batch = next(stream)["batch"]
        marks.append((time.process_time(), time.perf_counter()))
        counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
        with counter, torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            text, aux = grouped_losses(model, batch, objectives, {"shapes_dense": 1.0})
            marks.append((time.process_time(), time.perf_counter()))
            (text / (batch["labels"] != -100).sum() + aux).backward()
        marks.append((time.process_time(), time.perf_counter()))
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append((time.process_time(), time.perf_counter()))
        if timed is not None:
            timed.append({part: {"cpu_s": b[0] - a[0], "wall_s": b[1] - a[1]} for part, a, b in
                          zip(parts, marks, marks[1:])}
                         | {"samples": int(batch["labels"].shape[0]), "loadavg_1min": os.getloadavg()[0]})
        return counter.get_total_flops() / batch["labels"].shape[0] if count_flops else 0.0

    flops_per_sample = step(count_flops=True)  # also the warm-up step
    timed: list[dict] = []
    for _ in range(reps):
        step(timed)
    per_step = {part: {kind: median([t[part][kind] for t in timed]) for kind in ("cpu_s", "wall_s")}
                for part in parts}
    cpu_step = sum(per_step[part]["cpu_s"] for part in parts)
    samples = timed[0]["samples"]
    case = {"precision": precision, "images_per_step": images, "samples_per_step": samples, "median": per_step,
            "cpu_s_per_step": cpu_step, "cpu_ms_per_sample": 1e3 * cpu_step / samples,
            "flops_per_sample": flops_per_sample, "gflop_per_cpu_s": flops_per_sample * samples / cpu_step / 1e9,
            "loadavg_1min": median([t["loadavg_1min"] for t in timed]), "steps": timed}
    if profile_step:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
        case["top_operators"] = [{"name": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
                                 for e in top]
    return case


def print_table(result: dict) -> None:
    sides = list(result["sides"])
    print(f"\nsize {result['size']}, {result['threads']} thread(s) per side, median of {result['reps']}; machine "
          f"{result['machine']['cpu']} x{result['machine']['logical_cpus']}, load avg (1 min) during steps "
          f"{result['loadavg_1min_during_steps']['median']:.2f}")
    print(f"{'side':42s} {'trainable':>12s} {'params':>12s} {'build s':>8s} {'peak RSS GiB':>12s}")
    for name in sides:
        s = result["sides"][name]
        print(f"{LABELS[name]:42s} {s['trainable_parameters']:12,d} {s['parameters']:12,d} {s['build_s']:8.1f} "
              f"{s['peak_rss_gib']:12.2f}")
    print(f"\n{'case':6s} {'side':42s} {'step s':>7s} {'samples/s':>9s} {'fwd s':>6s} {'bwd s':>6s} {'opt s':>6s} "
          f"{'GFLOP/sample':>12s} {'GFLOP/s':>8s} {'acct GFLOP':>10s}")
    for key, entry in result["cases"].items():
        for name in sides:
            e = entry[name]
            counted = e.get("counted_flops_per_sample", float("nan")) / 1e9
            rate = e.get("counted_flop_per_s", float("nan")) / 1e9
            acct = e.get("model_accounting_training_flops_per_sample", float("nan")) / 1e9
            print(f"{key:6s} {LABELS[name]:42s} {e['median_s']:7.2f} {e['samples_per_s']:9.3f} "
                  f"{e['median_forward_s']:6.2f} {e['median_backward_s']:6.2f} {e['median_optimizer_s']:6.2f} "
                  f"{counted:12.3f} {rate:8.2f} {acct:10.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(TOKENIZERS), default="base", help="a lion_mllm.model.config preset")
    ap.add_argument("--t5-dir", help="T5 tokenizer directory (default: see TOKENIZERS)")
    ap.add_argument("--bert-dir", help="BERT tokenizer directory for the Q-Former (default: see TOKENIZERS)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--sequential", action="store_true", help="one side at a time (memory)")
    ap.add_argument("--no-count-flops", dest="count_flops", action="store_false",
                    help="warm-up steps without FlopCounterMode")
    ap.add_argument("--output", help="results JSON (default benchmarks/results/train_throughput.json for base, "
                                     "train_throughput_SIZE.json otherwise)")
    ap.add_argument("--recipe", choices=["shapes"], help="where a step of configs/shapes_from_scratch.yaml goes "
                    "(see above) instead of the three sides")
    ap.add_argument("--images", type=int, nargs="+", default=[4], help="--recipe: images per step (6 samples each)")
    ap.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                    help="--recipe: float32, or bf16 autocast on CPU")
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    default_t5, default_bert = TOKENIZERS[args.size]
    args.t5_dir = str(args.t5_dir or default_t5)
    args.bert_dir = str(args.bert_dir or default_bert)
    if args.worker:
        worker(args)
        return
    if args.recipe:
        output = Path(args.output or HERE / "results" / f"train_throughput_{args.recipe}.json")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(shapes_breakdown(args), indent=1) + "\n")
        print(f"written {output}")
        return
    for path in (args.t5_dir, args.bert_dir):
        if not Path(path).is_dir():
            raise SystemExit(f"{path}: no such tokenizer directory (for base, run cpu_vs_reference.py once, "
                             "or pass --t5-dir/--bert-dir)")
    result = run(args)
    name = "train_throughput.json" if args.size == "base" else f"train_throughput_{args.size}.json"
    output = Path(args.output or HERE / "results" / name)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"\nwritten {output}")


if __name__ == "__main__":
    main()
