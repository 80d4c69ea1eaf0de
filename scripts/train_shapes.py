#!/usr/bin/env python
"""Train the built-in `lion-shapes` demo model from scratch on the synthetic shapes world (CPU).

    python scripts/train_shapes.py --out runs/shapes --steps 3500 --seed 0 --curriculum 300 \
        --eval-every 400 --deadline <unix time> --ship src/lion_mllm/assets/models/lion-shapes

A LionModel (ViT with aggregator taps, Q-Former, aggregator, T5 with the mixture of adapters and
routers, soft-prompt tags) with small dimensions and the world's own tokenizers. Everything is
trainable (nothing is pretrained). Data are generated on the fly from scene seeds below
`HELD_OUT_SEED_BASE`; the held-out evaluation uses seeds from it on. Each image is encoded by the ViT
once and its caption, VQA and referring samples are trained together on the shared ViT taps. A
training-only dense head on the aggregator's patch tokens (what object is centred in each patch, and
its box) speeds up learning where things are; it is not part of the shipped model.
The loop is written here on `LionModel`'s parts (the training package's schedule and LION-part init
are reused: `lion_mllm.train.stages.WarmupCosineSchedule`, `init_lion_parts`) because from scratch
it needs what `lion train` does not do: the auxiliary dense loss (grounding stays at a constant box
without it), one ViT pass shared by an image's samples, data generated on the fly, and bf16 autocast
on CPU (the trainer autocasts on GPU only). Once the model knows the world, `lion train` with
`configs/shapes_finetune.yaml` (stage 4 + `run.unfreeze`) continues it on data written to disk.
The best model so far (by held-out score) is written, in float16, to `<out>/best` and to `--ship`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lion_mllm import shapes  # noqa: E402
from lion_mllm.config import AggregatorConfig, LanguageConfig, LionConfig, QFormerConfig, VisionConfig  # noqa: E402
from lion_mllm.modeling_lion import LionModel  # noqa: E402
from lion_mllm.processing import LionProcessor  # noqa: E402
from lion_mllm.train.stages import WarmupCosineSchedule, init_lion_parts  # noqa: E402


def shapes_config(t5_vocab: int, qformer_vocab: int, soft_prompt_id: int) -> LionConfig:
    """The demo model's dimensions: 128 px / patch 16 (65 ViT tokens), ViT 192 x 4, T5 256 x (3+3)."""
    return LionConfig(
        vision=VisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                            image_size=128, patch_size=16),
        aggregator=AggregatorConfig(num_attention_heads=4, intermediate_size=384, hidden_layer=3, cross_layers=(2, 1),
                                    projection_size=512, dropout=0.0),
        qformer=QFormerConfig(vocab_size=qformer_vocab, hidden_size=192, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=384, max_position_embeddings=128, cross_attention_frequency=1,
                              num_query_tokens=16, max_text_length=64, dropout=0.0),
        language=LanguageConfig(vocab_size=t5_vocab, d_model=256, d_ff=512, d_kv=32, num_layers=3,
                                num_decoder_layers=3, num_heads=8, dropout_rate=0.0, adapter_bottleneck=32,
                                soft_prompt_token_id=soft_prompt_id, max_text_length=128, max_output_text_length=48),
        visual_input="all", enable_semantic_tags=True,
    )


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """(grid*grid, width) fixed 2-D sine-cosine position codes (half the channels for x, half for y)."""
    quarter = width // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    out = [torch.sin(xs.flatten()[:, None] * omega), torch.cos(xs.flatten()[:, None] * omega),
           torch.sin(ys.flatten()[:, None] * omega), torch.cos(ys.flatten()[:, None] * omega)]
    return torch.cat(out, dim=1)


def value_code(values: torch.Tensor, width: int) -> torch.Tensor:
    """(N, width) smooth code of scalars in [0, 1]: nearby values get nearby vectors (unit RMS)."""
    freqs = torch.linspace(0.5, 40.0, width // 2)
    angles = values[:, None] * freqs[None, :] * math.pi
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


@torch.no_grad()
def initialise(model: LionModel, tokenizer) -> None:
    """From-scratch init: ViT N(0, 0.02) with 2-D sine-cosine positions (transformers' vision default,
    1e-10, would leave it dead; the raw modules get torch defaults and randn positions), LION's own parts
    as the authors, T5 as transformers initialises it but lm_head at d_model^-0.5, and the coordinate
    tokens' embeddings and output rows from their value."""
    vit = model.vision_model
    for module in vit.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
    grid = model.config.vision.image_size // model.config.vision.patch_size
    emb = vit.embeddings
    emb.class_embedding.normal_(0.0, 0.02)
    emb.position_embedding[0, 0].zero_()
    emb.position_embedding[0, 1:] = sincos_2d(grid, model.config.vision.hidden_size)
    init_lion_parts(model)
    lm = model.language_model
    d_model = model.config.language.d_model
    lm.lm_head.weight.normal_(0.0, d_model ** -0.5)
    vocab = tokenizer.get_vocab()
    ids, values = [], []
    for text in shapes.coordinate_tokens():
        for piece in (text, "\u2581" + text):
            if piece in vocab:
                ids.append(vocab[piece])
                values.append(float(text))
    code = value_code(torch.tensor(values), d_model)
    lm.shared.weight[ids] = code
    lm.lm_head.weight[ids] = code * d_model ** -0.5


# ----------------------------------------------------------------------------------------------------
# Data


def make_batch(processor: LionProcessor, seeds: list[int], num_objects, rng: random.Random, vqa_per_image: int,
               rec_per_image: int, tag_noise: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One caption, `vqa_per_image` VQA and `rec_per_image` referring samples per scene; returns the model
    batch (images once each) and the image index of every sample."""
    images, questions, tasks, tags, answers, index = [], [], [], [], [], []
    for i, seed in enumerate(seeds):
        scene = shapes.make_scene(seed, num_objects)
        images.append(shapes.render(scene))
        words = shapes.scene_tags(scene).split(", ")
        if rng.random() < tag_noise and len(words) > 1:  # the tagger may miss a word: do not trust tags blindly
            words.pop(rng.randrange(len(words)))
        records = shapes.scene_samples(scene, "", rng, vqa_per_image=vqa_per_image, rec_per_image=rec_per_image)
        for record in records:
            questions.append(record["question"])
            tasks.append("grounding" if record["category"] == "region_level" else "vqa")
            tags.append(", ".join(words))
            answers.append(record["answer"])
            index.append(i)
    pixels = processor.image_processor(images)
    batch = processor(pixels[torch.tensor(index)], questions, tasks, tags, answers)
    batch["pixel_values"] = pixels
    batch["dense"] = dense_targets([shapes.make_scene(seed, num_objects) for seed in seeds],
                                   processor.config.vision.patch_size)
    return batch, torch.tensor(index)


COLOUR_IDS = {c: i + 1 for i, c in enumerate(shapes.COLOURS)}  # 0 = no object centred in this patch
SHAPE_IDS = {s: i for i, s in enumerate(shapes.SHAPES)}
SIZE_IDS = {s: i for i, s in enumerate(shapes.SIZES)}


def dense_targets(scenes: list, patch: int) -> dict[str, torch.Tensor]:
    """Per patch: colour (0 = none), shape, size and normalised box of the object centred in it (shapes are
    >= 19 px apart, so no patch holds two centres); -100 where there is no object."""
    grid = scenes[0].size // patch
    colour = torch.zeros(len(scenes), grid * grid, dtype=torch.long)
    shape = torch.full_like(colour, -100)
    size = torch.full_like(colour, -100)
    box = torch.zeros(len(scenes), grid * grid, 4)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            cx, cy = obj.centre
            cell = int(cy // patch) * grid + int(cx // patch)
            colour[i, cell] = COLOUR_IDS[obj.colour]
            shape[i, cell] = SHAPE_IDS[obj.shape]
            size[i, cell] = SIZE_IDS[obj.size]
            box[i, cell] = torch.tensor(obj.normalised_box(scene.size, scene.size))
    return {"colour": colour, "shape": shape, "size": size, "box": box}


class DenseHead(nn.Module):
    """Training-only auxiliary head on the aggregator's patch tokens (not part of the shipped model): it
    predicts what object is centred in each patch and its box, which teaches the ViT and aggregator
    object- and position-aware features far sooner than the text loss alone (grounding stayed at the
    constant-box level without it in the prototype and in the first 400 steps here)."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, len(COLOUR_IDS) + 1 + len(SHAPE_IDS) + len(SIZE_IDS) + 4)

    def loss(self, tokens: torch.Tensor, target: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.proj(tokens[:, 1:].float())  # drop the CLS token
        nc, ns, nz = len(COLOUR_IDS) + 1, len(SHAPE_IDS), len(SIZE_IDS)
        colour, shape, size = out[..., :nc], out[..., nc:nc + ns], out[..., nc + ns:nc + ns + nz]
        box = out[..., nc + ns + nz:].sigmoid()
        has = target["colour"] > 0
        loss = F.cross_entropy(colour.flatten(0, 1), target["colour"].flatten())
        loss = loss + F.cross_entropy(shape.flatten(0, 1), target["shape"].flatten(), ignore_index=-100)
        loss = loss + F.cross_entropy(size.flatten(0, 1), target["size"].flatten(), ignore_index=-100)
        return loss + 10.0 * (box[has] - target["box"][has]).abs().mean()


def shared_forward(model: LionModel, batch: dict[str, torch.Tensor], index: torch.Tensor,
                   head: DenseHead | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`LionModel.forward`'s loss with the ViT and the aggregator (text-independent) run once per image and
    shared by that image's samples; plus the auxiliary dense loss of `head` (0 without one)."""
    per_image = model.vision_model(batch["pixel_values"], model.vision_taps())
    cfg = model.config
    agg = cfg.aggregator
    fused = model.aggregator(per_image[agg.hidden_layer], [per_image[i] for i in agg.cross_layers])
    aux = head.loss(fused, batch["dense"]) if head is not None else torch.zeros(())
    spatial = model.aggregator_projection(model.aggregator_norm(fused))[index]
    blocks = {k: v[index] for k, v in per_image.items()}
    image_embeds = model.ln_vision(blocks[cfg.vision.num_hidden_layers - 1])
    queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    qmask = batch["qformer_attention_mask"]
    out = model.qformer(input_ids=batch["qformer_input_ids"],
                        attention_mask=torch.cat([torch.ones(queries.shape[:2], dtype=qmask.dtype), qmask], 1),
                        query_embeds=queries, encoder_hidden_states=image_embeds)
    semantic = model.qformer_projection(out.last_hidden_state[:, : queries.shape[1]])
    text = model.embed_prompt(batch["input_ids"])
    embeds = torch.cat([semantic.to(text.dtype), spatial.to(text.dtype), text], dim=1)
    mask = torch.cat([torch.ones(embeds.shape[0], semantic.shape[1] + spatial.shape[1], dtype=torch.long),
                      batch["attention_mask"]], dim=1)
    with model.routing(batch["route_ids"]):
        output = model.language_model(inputs_embeds=embeds, attention_mask=mask, labels=batch["labels"],
                                      decoder_attention_mask=batch["decoder_attention_mask"])
    text_loss = F.cross_entropy(output.logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    return text_loss, aux


# ----------------------------------------------------------------------------------------------------
# Held-out evaluation (the project's metrics)


def generate(model: LionModel, processor: LionProcessor, images, questions, tasks, tags, max_new_tokens: int = 40
             ) -> list[str]:
    batch = processor(images, questions, tasks, tags)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids = model.generate(**batch, num_beams=1, do_sample=False, max_new_tokens=max_new_tokens,
                             repetition_penalty=1.0)
    return processor.decode(ids)


def save_bundle(model: LionModel, processor: LionProcessor, directory: Path, card: str | None = None) -> None:
    """A `Lion.from_pretrained` bundle with float16 weights and the world's tagger (`tagger.json`), written
    to a temporary folder, then swapped in."""
    from lion_mllm import Lion

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    Lion(model, processor, shapes.ShapesTagger()).save_pretrained(tmp, dtype=torch.float16)
    for file in tmp.rglob("*"):
        if file.is_file():
            file.chmod(0o644)  # safetensors writes 0600; package data must be readable by everyone
    if card is not None:
        (tmp / "MODEL_CARD.md").write_text(card)
    elif (directory / "MODEL_CARD.md").is_file():
        shutil.copy(directory / "MODEL_CARD.md", tmp / "MODEL_CARD.md")
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--images-per-step", type=int, default=12)
    parser.add_argument("--vqa-per-image", type=int, default=1)
    parser.add_argument("--rec-per-image", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--curriculum", type=int, default=400, help="steps of 1-2-object scenes first")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-count", type=int, default=100)
    parser.add_argument("--eval-start", type=int, default=500, help="selection scenes: HELD_OUT_SEED_BASE + this on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--aux-weight", type=float, default=1.0, help="weight of the dense auxiliary loss")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=None, help="unix time: stop (and keep the best) then")
    parser.add_argument("--init-from", type=Path, default=None, help="start from this bundle instead of scratch")
    parser.add_argument("--first-scene", type=int, default=0, help="first training scene seed (continue a run)")
    parser.add_argument("--min-score", type=float, default=-1.0, help="save only checkpoints scoring above this")
    parser.add_argument("--ship", type=Path, default=None, help="also write the best bundle here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # about 2x on this CPU: denormals appear after a few steps otherwise
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    tokenizer, qformer_tokenizer = shapes.build_tokenizers()
    soft = tokenizer.convert_tokens_to_ids("<extra_id_0>")
    config = shapes_config(-(-len(tokenizer) // 8) * 8, len(qformer_tokenizer), soft)
    if args.init_from is not None:  # continue from a bundle (fresh optimiser, its own warm-up and cosine)
        from lion_mllm import Lion

        loaded = Lion.from_pretrained(args.init_from)
        model, config = loaded.model, loaded.model.config
        tokenizer, qformer_tokenizer = loaded.processor.tokenizer, loaded.processor.qformer_tokenizer
    else:
        model = LionModel(config)
        initialise(model, tokenizer)
    processor = LionProcessor(config, tokenizer, qformer_tokenizer)
    for p in model.parameters():
        p.requires_grad_(True)  # stage 3 and more: ViT and T5 too, since nothing here is pretrained
    total = sum(p.numel() for p in model.parameters())
    print(f"parameters: {total / 1e6:.2f} M", flush=True)

    head = DenseHead(config.vision.hidden_size)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    decay += list(head.parameters())
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98))
    schedule = WarmupCosineSchedule(optimizer, args.lr, args.lr * 0.1, args.steps, args.warmup, 1e-6)
    log = (args.out / "log.jsonl").open("a")
    best, seed_counter, start, losses, aux_losses = args.min_score, args.first_scene, time.time(), [], []
    for step in range(1, args.steps + 1):
        model.train()
        seeds = list(range(seed_counter, seed_counter + args.images_per_step))
        seed_counter += args.images_per_step
        counts = (1, 2) if step <= args.curriculum else (1, 2, 2, 3, 3, 4, 4)
        batch, index = make_batch(processor, [args.seed * 10_000_000 + s for s in seeds], counts, rng,
                                  args.vqa_per_image, args.rec_per_image, tag_noise=0.15)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            text_loss, aux_loss = shared_forward(model, batch, index, head)
        loss = text_loss + args.aux_weight * aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if args.deadline is not None:
            # Shared CPU, speed unknown in advance: the cosine follows whichever of steps or wall time
            # (to the deadline, less a reserve for the last evaluation) is further along.
            by_time = (time.time() - start) / max(1.0, args.deadline - 120 - start)
            schedule.step_count = max(schedule.step_count, min(args.steps, int(by_time * args.steps)))
            schedule.apply()
        losses.append(text_loss.item())
        aux_losses.append(aux_loss.item())
        if step % 25 == 0:
            entry = {"step": step, "loss": sum(losses) / len(losses), "aux_loss": sum(aux_losses) / len(aux_losses),
                     "lr": schedule.get_last_lr()[0],
                     "elapsed_s": round(time.time() - start, 1), "images": seed_counter}
            losses, aux_losses = [], []
            print(json.dumps(entry), flush=True)
            log.write(json.dumps(entry) + "\n")
            log.flush()
        last = step == args.steps or (args.deadline is not None and time.time() > args.deadline)
        if step % args.eval_every == 0 or last:
            model.eval()
            metrics = shapes.evaluate_model(model, processor, args.eval_count,
                                            start=shapes.HELD_OUT_SEED_BASE + args.eval_start)
            score = metrics["rec_acc50"] + metrics["vqa_exact"] + metrics["caption_objects"]
            entry = {"step": step, "eval": metrics, "elapsed_s": round(time.time() - start, 1)}
            print(json.dumps(entry), flush=True)
            log.write(json.dumps(entry) + "\n")
            log.flush()
            if score > best:
                best = score
                save_bundle(model, processor, args.out / "best")
                (args.out / "best_step.json").write_text(json.dumps(entry) + "\n")
                if args.ship is not None:
                    save_bundle(model, processor, args.ship)
        if last:
            break
    print(f"done: {step} steps in {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
