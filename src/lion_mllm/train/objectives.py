"""Training-only objectives and the grouped training pass.

An objective is a small module with its own parameters that adds a loss on the model's intermediate
features (`run.objectives: [{name, weight, options}]`); it trains with the model, is saved in checkpoints
(exact resume) and is never exported. Objectives are looked up by name in
`lion_mllm.named_imports.OBJECTIVES` ("module:Class", imported when used). A class sets `feature` (the name of the feature it reads, see
`grouped_losses`) and `batch_keys` (the batch tensors it needs, produced by the data source), and its
`forward(features, batch)` returns a scalar loss.

`grouped_losses` is `LionModel.forward`'s teacher-forced pass for batches in which several samples share
one image: `pixel_values` (I,3,S,S) once per image and `image_index` (B,) naming each sample's image. The
ViT and the (text-independent) aggregator run once per image; the Q-Former and T5 run per sample. With
one image per sample it computes what `LionModel.forward` computes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..named_imports import OBJECTIVES, load_named


def build_objectives(specs: list[Any], model_config: Any) -> dict[str, nn.Module]:
    """One module per `run.objectives` entry (in order; their parameters are drawn from the global
    generator now), keyed by name."""
    built: dict[str, nn.Module] = {}
    for spec in specs:
        built[spec.name] = load_named(OBJECTIVES, spec.name, "objective")(model_config, **spec.options)
    return built


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed token cross-entropy (float32) of a batch: the training pass without grouped images or
    objectives, and the held-out loss."""
    output = model(**batch)
    labels = batch["labels"]
    return F.cross_entropy(output.logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                           reduction="sum")


class TrainingForward(nn.Module):
    """LION plus its training-only objectives as one module (what DDP wraps when objectives or grouped
    batches are used): `forward(**batch)` returns (summed token cross-entropy, weighted objective loss)."""

    def __init__(self, model: nn.Module, objectives: dict[str, nn.Module], weights: dict[str, float]):
        super().__init__()
        self.model = model
        self.objectives = nn.ModuleDict(objectives)
        self.weights = weights

    def forward(self, **batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grouped_losses(self.model, batch, self.objectives, self.weights)


def grouped_losses(model: Any, batch: dict[str, torch.Tensor], objectives: dict[str, nn.Module] | nn.ModuleDict,
                   weights: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token cross-entropy (float32), sum of weight x objective loss) of a batch, each image's
    vision encoding shared by its samples (`image_index`; absent: one image per sample)."""
    cfg = model.config
    if cfg.visual_input != "all":
        raise ValueError("grouped batches and objectives need a model with both visual roads (stage 3 or 4)")
    pixels = batch["pixel_values"]  # (I, 3, S, S)
    index = batch.get("image_index")
    if index is None:
        index = torch.arange(pixels.shape[0], device=pixels.device)
    per_image = model.vision_model(pixels.to(model.vision_model.embeddings.patch_embedding.weight.dtype),
                                   model.vision_taps())
    agg = cfg.aggregator
    fused = model.aggregator(per_image[agg.hidden_layer], [per_image[i] for i in agg.cross_layers])  # (I, N, W)
    features = {"aggregator_tokens": fused}
    aux = torch.zeros((), device=pixels.device)
    for name, objective in objectives.items():
        missing = [key for key in objective.batch_keys if key not in batch]
        if missing:  # the targets come from the data source (the shapes stream), not from annotation files
            raise ValueError(f"objective {name} needs the batch tensors {missing}, which this data source "
                             "does not provide")
        aux = aux + weights.get(name, 1.0) * objective(features[objective.feature], batch)
    spatial = model.aggregator_projection(model.aggregator_norm(fused))[index]  # (B, N, d_model)
    image_embeds = model.ln_vision(per_image[cfg.vision.num_hidden_layers - 1][index])  # (B, N, W)
    queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (B, Q, W_q)
    qmask = batch["qformer_attention_mask"]
    query_mask = torch.ones(queries.shape[:2], dtype=qmask.dtype, device=qmask.device)
    out = model.qformer(input_ids=batch["qformer_input_ids"], attention_mask=torch.cat([query_mask, qmask], 1),
                        query_embeds=queries, encoder_hidden_states=image_embeds.to(queries.dtype))
    semantic = model.qformer_projection(out.last_hidden_state[:, : queries.shape[1]])  # (B, Q, d_model)
    text = model.embed_prompt(batch["input_ids"])
    embeds = torch.cat([semantic.to(text.dtype), spatial.to(text.dtype), text], dim=1)
    visual_mask = torch.ones(embeds.shape[0], semantic.shape[1] + spatial.shape[1],
                             dtype=batch["attention_mask"].dtype, device=embeds.device)
    with model.routing(batch["route_ids"]):
        output = model.language_model(inputs_embeds=embeds, attention_mask=torch.cat([visual_mask,
                                      batch["attention_mask"]], dim=1), labels=batch["labels"],
                                      decoder_attention_mask=batch.get("decoder_attention_mask"))
    text_loss = F.cross_entropy(output.logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                                reduction="sum")
    return text_loss, aux
