"""Generative ranking: the log-likelihood LION gives each candidate answer (VisDial's 100 options).

The image, the Q-Former and the T5 encoder run once per query, as in `LionModel.generate`; only
the T5 decoder runs once per candidate (teacher-forced, in chunks), under the query's adapter
route. A candidate's score is the sum of its tokens' log-probabilities, end-of-sequence token
included, so a candidate must also end where the model would stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["candidate_log_likelihoods"]


def candidate_log_likelihoods(lion: Any, images: Sequence[Any], prompts: Sequence[str],
                              candidates: Sequence[Sequence[str]], tasks: Sequence[str],
                              chunk_size: int = 100) -> list[list[float]]:
    """Sum of token log-probabilities of each candidate answer, per query.

    Args:
        lion: a loaded `lion_mllm.Lion` (its model, processor and tagger are used).
        images: one PIL image per query.
        prompts: one prompt per query (the tag prompt is added as in `Lion.generate`).
        candidates: the candidate answers of each query.
        tasks: the route of each query ("vqa", "caption", "grounding").
        chunk_size: candidates per decoder pass.
    """
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    if not len(images) == len(prompts) == len(candidates) == len(tasks):
        raise ValueError("images, prompts, candidates and tasks must have one entry per query")
    model, processor = lion.model, lion.processor
    tags = lion.tag(list(images)) if model.config.enable_semantic_tags else None
    device = next(model.parameters()).device
    pixels = processor.image_processor(list(images))
    batch = processor(pixels, list(prompts), list(tasks), tags)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    out: list[list[float]] = []
    with torch.no_grad():
        embeds, mask = model.encoder_inputs(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                            batch.get("qformer_input_ids"), batch.get("qformer_attention_mask"))
        with model.routing(batch["route_ids"]):
            encoded = model.language_model.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        for q, options in enumerate(candidates):
            scores: list[float] = []
            for start in range(0, len(options), chunk_size):
                chunk = list(options[start:start + chunk_size])
                n = len(chunk)
                # The processor's training targets: the same tokenisation, EOS and padding as fine-tuning.
                targets = processor(pixels[q:q + 1].expand(n, -1, -1, -1), [prompts[q]] * n, [tasks[q]] * n,
                                    None if tags is None else [tags[q]] * n, answers=chunk, truncate_prompt=False)
                labels = targets["labels"].to(device)
                decoder_mask = targets["decoder_attention_mask"].to(device)
                with model.routing(batch["route_ids"][q:q + 1].expand(n)):
                    logits = model.language_model(
                        encoder_outputs=BaseModelOutput(last_hidden_state=encoded[q:q + 1].expand(n, -1, -1)),
                        attention_mask=mask[q:q + 1].expand(n, -1), labels=labels,
                        decoder_attention_mask=decoder_mask,
                    ).logits
                log_probs = torch.log_softmax(logits.float(), dim=-1)
                picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                scores.extend((picked * (labels != -100)).sum(dim=-1).tolist())
            out.append(scores)
    return out
