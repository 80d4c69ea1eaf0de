"""How `lion-shapes` is trained from scratch by `lion train` (configs/shapes_from_scratch.yaml).

Three pieces the training package looks up by name:

* the model preset `shapes` (`model.preset: shapes`): :func:`build_shapes_lion`, LION at toy size with the
  world's tokenizers and a from-scratch initialisation (:func:`initialise`);
* the streamed data source `shapes` (`train_datasets: [{stream: shapes, ...}]`): :class:`ShapesStream`,
  scenes generated on the fly, each image with its caption, questions and referring phrases;
* the objective `shapes_dense` (`run.objectives: [{name: shapes_dense}]`): :class:`DenseObjective`, a
  training-only head on the aggregator's patch tokens (not part of the exported model).

The fourth, the held-out score `shapes` (`run.eval_tasks: [{task: shapes}]`), is
:func:`lion_mllm.shapes.scoring.training_scores`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..model.tasks import SHORT_TAG_PROMPT, SOFT_PROMPT_TOKEN
from .tagger import ShapesTagger
from .tokenizers import build_tokenizers, coordinate_tokens
from .world import (
    COLOURS,
    HELD_OUT_SEED_BASE,
    PROMPTS,
    SHAPES,
    SIZES,
    Scene,
    make_scene,
    render,
    scene_samples,
    scene_tags,
)

# The decoding the model was evaluated with: greedy, no repetition penalty (captions and boxes repeat words
# and digits), answers of at most 40 tokens.
SHAPES_DECODING = {"num_beams": 1, "max_new_tokens": 40, "repetition_penalty": 1.0}


def shapes_config(t5_vocab: int, qformer_vocab: int, soft_prompt_id: int) -> Any:
    """The demo model's dimensions: 128 px / patch 16 (65 ViT tokens), ViT 192 x 4, T5 256 x (3+3)."""
    from ..model.config import (
        AggregatorConfig,
        LanguageConfig,
        LionConfig,
        QFormerConfig,
        VisionConfig,
    )

    return LionConfig(
        vision=VisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                            image_size=128, patch_size=16),
        aggregator=AggregatorConfig(num_attention_heads=4, intermediate_size=384, hidden_layer=3, cross_layers=(2, 1),
                                    projection_size=512, dropout=0.0),
        qformer=QFormerConfig(vocab_size=qformer_vocab, hidden_size=192, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=384, max_position_embeddings=128, cross_attention_frequency=1,
                              num_query_tokens=8, max_text_length=64, dropout=0.0),
        language=LanguageConfig(vocab_size=t5_vocab, d_model=256, d_ff=512, d_kv=32, num_layers=3,
                                num_decoder_layers=3, num_heads=8, dropout_rate=0.0, adapter_bottleneck=32,
                                soft_prompt_token_id=soft_prompt_id, max_text_length=128, max_output_text_length=48),
        visual_input="all", enable_semantic_tags=True, tag_prompt=SHORT_TAG_PROMPT,
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
def initialise(model: Any, tokenizer: Any) -> None:
    """From-scratch init: ViT N(0, 0.02) with 2-D sine-cosine positions (transformers' vision default,
    1e-10, would leave it dead; the raw modules get torch defaults and randn positions), LION's own parts
    as the authors, T5 as transformers initialises it but lm_head at d_model^-0.5, and the coordinate
    tokens' embeddings and output rows from their value."""
    from ..train.stages import init_lion_parts

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
    for text in coordinate_tokens():
        for piece in (text, "\u2581" + text):
            if piece in vocab:
                ids.append(vocab[piece])
                values.append(float(text))
    code = value_code(torch.tensor(values), d_model)
    lm.shared.weight[ids] = code
    lm.lm_head.weight[ids] = code * d_model ** -0.5


def build_shapes_lion(seed: int) -> Any:
    """The `shapes` preset: a freshly initialised shapes LION (float32, CPU) with the world's tokenizers,
    its pixel tagger, greedy decoding defaults and the templates its samples are written with, as a `Lion`.

    The global generator is seeded and left where initialisation ends, so that training-only heads made
    next (the objectives) draw the numbers they drew in the original recipe."""
    from ..lion import Lion
    from ..model.generation import GenerationDefaults
    from ..model.modeling_lion import LionModel
    from ..model.processing import LionProcessor

    tokenizer, qformer_tokenizer = build_tokenizers()
    soft = tokenizer.convert_tokens_to_ids(SOFT_PROMPT_TOKEN)
    config = shapes_config(-(-len(tokenizer) // 8) * 8, len(qformer_tokenizer), soft)
    torch.manual_seed(seed)
    model = LionModel(config)
    initialise(model, tokenizer)
    processor = LionProcessor(config, tokenizer, qformer_tokenizer)
    return Lion(model, processor, ShapesTagger(), GenerationDefaults(**SHAPES_DECODING, prompts=PROMPTS))


# ----------------------------------------------------------------------------------------------------
# The streamed data source


class ShapesStream:
    """Scenes generated on the fly for `lion train` (the `shapes` stream): each group is
    `images_per_batch` scenes, each scene one caption, `vqa_per_image` questions and `rec_per_image`
    referring phrases (the samples share the image's ViT pass in training).

    Scene seeds: `seed * 10_000_000 + first_scene + group * images_per_batch + i`, always below
    `HELD_OUT_SEED_BASE`. Curriculum: `curriculum_objects` shapes per scene for the first `curriculum_steps`
    steps (few objects first: the model learns words before relations), then `objects`. Tags are the scene's
    words with one dropped `tag_noise` of the time, so the model does not trust them blindly."""

    def __init__(self, seed: int, images_per_batch: int = 12, vqa_per_image: int = 1, rec_per_image: int = 2,
                 tag_noise: float = 0.15, first_scene: int = 0, curriculum_steps: int = 0,
                 curriculum_objects: Sequence[int] = (1, 2), objects: Sequence[int] = (1, 2, 2, 3, 3, 4, 4),
                 dense_targets: bool = True, samples_per_image: int | None = None):
        if images_per_batch < 1 or vqa_per_image < 0 or rec_per_image < 0 or not 0.0 <= tag_noise <= 1.0:
            raise ValueError("shapes stream: images_per_batch >= 1, vqa/rec_per_image >= 0, tag_noise in [0, 1]")
        if samples_per_image is not None and samples_per_image < 1:
            raise ValueError(f"shapes stream: samples_per_image must be at least 1, got {samples_per_image}")
        self.samples_per_image = samples_per_image
        self.base = seed * 10_000_000 + first_scene
        self.images_per_batch, self.vqa_per_image, self.rec_per_image = images_per_batch, vqa_per_image, rec_per_image
        self.tag_noise, self.curriculum_steps = tag_noise, curriculum_steps
        self.curriculum_objects, self.objects = tuple(curriculum_objects), tuple(objects)
        self.dense_targets = dense_targets

    def group(self, index: int, step: int, rng: random.Random
              ) -> tuple[list[Any], list[dict[str, Any]], dict[str, torch.Tensor]]:
        """Group `index` drawn at optimizer step `step` (1-based): (images, records with an `image` index
        into them, extra batch tensors: the dense objective's targets)."""
        counts = self.curriculum_objects if step <= self.curriculum_steps else self.objects
        first = self.base + index * self.images_per_batch
        if first + self.images_per_batch > HELD_OUT_SEED_BASE:
            raise ValueError("shapes stream: training scene seeds would reach the held-out seeds")
        scenes = [make_scene(first + i, counts) for i in range(self.images_per_batch)]
        images, records = [], []
        for i, scene in enumerate(scenes):
            images.append(render(scene))
            words = scene_tags(scene).split(", ")
            if rng.random() < self.tag_noise and len(words) > 1:
                words.pop(rng.randrange(len(words)))
            samples = scene_samples(scene, "", rng, self.vqa_per_image, self.rec_per_image)
            if self.samples_per_image is not None:  # a random few of them: more images for the same T5 work
                samples = rng.sample(samples, min(self.samples_per_image, len(samples)))
            for record in samples:
                records.append({**record, "image": i, "tags": ", ".join(words)})
        return images, records, dense_targets(scenes) if self.dense_targets else {}


COLOUR_IDS = {c: i + 1 for i, c in enumerate(COLOURS)}  # 0 = no object centred in this patch
SHAPE_IDS = {s: i for i, s in enumerate(SHAPES)}
SIZE_IDS = {s: i for i, s in enumerate(SIZES)}
PATCH = 16  # the shapes model's ViT patch side


def dense_targets(scenes: list[Scene], patch: int = PATCH) -> dict[str, torch.Tensor]:
    """Per patch: colour (0 = none), shape, size and normalised box of the object centred in it (shapes are
    >= 19 px apart, so no patch holds two centres); -100 where there is no object. Tensors (images, patches)
    and (images, patches, 4), named `dense_*` (the batch keys :class:`DenseObjective` reads)."""
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
    return {"dense_colour": colour, "dense_shape": shape, "dense_size": size, "dense_box": box}


class DenseObjective(nn.Module):
    """The `shapes_dense` objective: a training-only linear head on the aggregator's patch tokens that
    predicts what object is centred in each patch and its box (cross-entropy for colour-or-none, shape and
    size, plus 10 x L1 on the box). It teaches the ViT and aggregator object- and position-aware features
    far sooner than the text loss alone: without it grounding stayed at a constant box (REC 0.01) for the
    first 400-800 steps from scratch. Not part of the exported model."""

    feature = "aggregator_tokens"  # (images, 1 + patches, width): the aggregator's output before its norm
    batch_keys = ("dense_colour", "dense_shape", "dense_size", "dense_box")

    def __init__(self, model_config: Any, box_weight: float = 10.0):
        super().__init__()
        self.box_weight = box_weight
        width = model_config.vision.hidden_size
        self.proj = nn.Linear(width, len(COLOUR_IDS) + 1 + len(SHAPE_IDS) + len(SIZE_IDS) + 4)

    def forward(self, tokens: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.proj(tokens[:, 1:].float())  # drop the CLS token: (images, patches, outputs)
        nc, ns, nz = len(COLOUR_IDS) + 1, len(SHAPE_IDS), len(SIZE_IDS)
        colour, shape, size = out[..., :nc], out[..., nc:nc + ns], out[..., nc + ns:nc + ns + nz]
        box = out[..., nc + ns + nz:].sigmoid()
        has = batch["dense_colour"] > 0
        loss = F.cross_entropy(colour.flatten(0, 1), batch["dense_colour"].flatten())
        loss = loss + F.cross_entropy(shape.flatten(0, 1), batch["dense_shape"].flatten(), ignore_index=-100)
        loss = loss + F.cross_entropy(size.flatten(0, 1), batch["dense_size"].flatten(), ignore_index=-100)
        return loss + self.box_weight * (box[has] - batch["dense_box"][has]).abs().mean()
