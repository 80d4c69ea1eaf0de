"""LION: a FlanT5 fed by two views of an EVA ViT-g, one readable file.

    image (B,3,224,224) -> EVA ViT-g (39 blocks, frozen) -> block outputs 38, 28, 18
      semantic road:  LN(block 38) -> instruction-aware Q-Former (32 queries) -> Linear     -> (B, 32, d)
      spatial road:   aggregator(block 38 x-attends 28, then 18) -> LN -> MLP                -> (B, 257, d)
    T5 encoder input = [Q-Former tokens ; aggregator tokens ; prompt embeddings]
    every T5 feed-forward layer: x + FFN(RMSNorm(x)) + sum_k router_k[route] * adapter_k(x)

Parts that transformers ships exactly (docs/authors-code.md) come from it: the ViT layers, the Q-Former and
T5. The vision aggregator and the mixture of adapters are LION's own and are written here.

FLOPs per image (forward, multiply-add = 2 FLOPs), N = number of parameters a token passes through:
  ViT: 257 tokens x 2 x 0.99e9 + attention; Q-Former: (32 + text) tokens x 2 x 0.19e9;
  T5 encoder: (289 + prompt) tokens x 2 x N_enc; T5 decoder: 2 x N_dec per generated token per beam.
`LionModel.flops_per_image` computes these from the config.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    InstructBlipQFormerConfig,
    InstructBlipQFormerModel,
    InstructBlipVisionConfig,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.models.instructblip.modeling_instructblip import (
    InstructBlipEncoderLayer,
    InstructBlipVisionEmbeddings,
)
from transformers.models.t5.modeling_t5 import T5LayerFF

from .config import AggregatorConfig, LanguageConfig, LionConfig, QFormerConfig, VisionConfig

# transformers renamed the decoder cache argument (`past_key_values` -> `cache`) within 5.x (5.17 has the old)
_CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(T5ForConditionalGeneration.forward).parameters \
    else "past_key_values"

# Router rows: the authors' code sends region-level samples to row 0 and everything else to row 1.
REGION_ROUTE, IMAGE_ROUTE = 0, 1


def _distinct_rows(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The distinct rows of `batch` (B, ...) in order of first appearance, and for each row the index of
    its copy among them (None when all rows differ: nothing to share)."""
    if batch.shape[0] == 1:
        return batch, None
    flat = batch.flatten(1)
    # a fingerprint per row on the batch's own device; rows with equal prints are compared in full
    weights = torch.linspace(1.0, 2.0, flat.shape[1], device=flat.device)
    prints = (flat.float() * weights).sum(dim=1).tolist()
    keep: list[int] = []
    which: list[int] = []
    for row, key in enumerate(prints):
        same = next((i for i, kept in enumerate(keep) if prints[kept] == key and torch.equal(flat[kept], flat[row])),
                    None)
        if same is None:
            same = len(keep)
            keep.append(row)
        which.append(same)
    if len(keep) == batch.shape[0]:
        return batch, None
    return batch[keep], torch.tensor(which, device=batch.device)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (the authors' `ln_vision`/`ln_adapter`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Vision encoder


class LionVisionEncoder(nn.Module):
    """EVA ViT-g on transformers' InstructBLIP layers; returns the block outputs it is asked for.

    Only the blocks up to the deepest requested tap run, and only the taps are kept (not all 39).
    """

    def __init__(self, config: VisionConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        hf = InstructBlipVisionConfig(
            hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
            image_size=config.image_size, patch_size=config.patch_size, hidden_act="gelu",
            layer_norm_eps=config.layer_norm_eps, qkv_bias=True, attention_dropout=0.0,
        )
        hf._attn_implementation = attn_implementation
        self.embeddings = InstructBlipVisionEmbeddings(hf)
        self.layers = nn.ModuleList(InstructBlipEncoderLayer(hf) for _ in range(config.num_hidden_layers))

    def forward(self, pixel_values: torch.Tensor, taps: Sequence[int]) -> dict[int, torch.Tensor]:
        """pixel_values (B,3,H,W) -> {block index: (B, 257, width) output of that block (0-based)}."""
        hidden = self.embeddings(pixel_values)
        outputs: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.layers[: max(taps) + 1]):
            hidden = layer(hidden)
            if index in taps:
                outputs[index] = hidden
        return outputs


# ----------------------------------------------------------------------------------------------------
# Vision aggregator (the authors' FusionAdapter: two transformers BertLayers, post-LN, no masks).
# Attribute names mirror BertLayer so the authors' keys load unchanged under `aggregator.blocks.N.`.


class AggregatorAttention(nn.Module):
    """Multi-head attention; keys/values from `context` when given (cross-attention). Never causal:
    the authors' BertLayer is built with is_decoder=True but runs eager attention without a mask."""

    def __init__(self, width: int, num_heads: int, dropout: float, attn_implementation: str = "sdpa"):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.eager = attn_implementation == "eager"  # the authors' arithmetic, kept to check SDPA against
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))

    def forward(self, hidden: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = hidden if context is None else context
        batch, length, width = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, L, W) -> (B, heads, L, W/heads)
            return x.view(batch, x.shape[1], self.num_heads, width // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.query(hidden)), heads(self.key(context)), heads(self.value(context))
        dropout = self.dropout if self.training else 0.0
        if self.eager:
            probs = F.dropout(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1), dropout,
                              self.training)
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return out.transpose(1, 2).reshape(batch, length, width)


class AggregatorResidual(nn.Module):
    """Post-LN residual: LayerNorm(x + dropout(dense(sublayer_output)))."""

    def __init__(self, in_width: int, width: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, sublayer_output: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(sublayer_output)))


class AggregatorAttentionBlock(nn.Module):
    def __init__(self, width: int, config: AggregatorConfig, attn_implementation: str):
        super().__init__()
        self.self = AggregatorAttention(width, config.num_attention_heads, config.dropout, attn_implementation)
        self.output = AggregatorResidual(width, width, config.layer_norm_eps, config.dropout)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.self(hidden, context), hidden)


class AggregatorIntermediate(nn.Module):
    def __init__(self, width: int, size: int):
        super().__init__()
        self.dense = nn.Linear(width, size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(hidden))


class AggregatorLayer(nn.Module):
    def __init__(self, width: int, config: AggregatorConfig, attn_implementation: str):
        super().__init__()
        self.attention = AggregatorAttentionBlock(width, config, attn_implementation)
        self.crossattention = AggregatorAttentionBlock(width, config, attn_implementation)
        self.intermediate = AggregatorIntermediate(width, config.intermediate_size)
        self.output = AggregatorResidual(config.intermediate_size, width, config.layer_norm_eps, config.dropout)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        hidden = self.attention(hidden)
        hidden = self.crossattention(hidden, context)
        return self.output(self.intermediate(hidden), hidden)


class VisionAggregator(nn.Module):
    """Refines one ViT block's tokens by cross-attending to earlier blocks, one block per tap."""

    def __init__(self, width: int, config: AggregatorConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.blocks = nn.ModuleList(AggregatorLayer(width, config, attn_implementation) for _ in config.cross_layers)

    def forward(self, hidden: torch.Tensor, contexts: Sequence[torch.Tensor]) -> torch.Tensor:
        """hidden (B, N, W), contexts: one (B, N, W) per block -> (B, N, W)."""
        for block, context in zip(self.blocks, contexts, strict=True):
            hidden = block(hidden, context)
        return hidden


# ----------------------------------------------------------------------------------------------------
# Mixture of adapters in every T5 feed-forward layer, routed per sample


class RouteState:
    """The route (0 region-level, 1 image-level) of each sample of the batch being run, per call.

    Adapters sit deep inside T5, whose forward has no argument to carry a per-sample route, so every call
    of `LionModel.forward`/`generate` (or a `LionModel.routing` block) binds its routes in a context
    variable owned by this model. A context variable is local to the thread (and asyncio task) that set
    it, so two threads running the same model at once each see only their own routes.
    """

    def __init__(self) -> None:
        # one variable per model (not per module): the routes belong to a call, not to the class
        self._route_ids: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
            f"lion_route_ids_{id(self):x}", default=None)

    @property
    def route_ids(self) -> torch.Tensor | None:
        """The routes bound in the calling context (None outside any call)."""
        return self._route_ids.get()

    @contextlib.contextmanager
    def bound(self, route_ids: torch.Tensor | None) -> Iterator[None]:
        """Bind `route_ids` in the calling context for the duration of the block."""
        token = self._route_ids.set(route_ids)
        try:
            yield
        finally:
            self._route_ids.reset(token)

    def for_batch(self, batch: int) -> torch.Tensor:
        ids = self.route_ids
        if ids is None:
            raise RuntimeError("no route set: run LION through LionModel.forward/generate (or LionModel.routing)")
        if batch != ids.shape[0]:
            # generate expands each sample into consecutive beams/return sequences (repeat_interleave)
            if batch % ids.shape[0]:
                raise RuntimeError(f"batch {batch} is not a multiple of the {ids.shape[0]} routed samples")
            ids = ids.repeat_interleave(batch // ids.shape[0])
        return ids

    def __deepcopy__(self, memo: dict) -> RouteState:
        # a copied model gets its own (empty) routes; a ContextVar itself cannot be copied
        return RouteState()


class BottleneckAdapter(nn.Module):
    """scale * up(relu(down(x))); `scale` is a learnable (1,) tensor as in the authors' code."""

    def __init__(self, d_model: int, bottleneck: int):
        super().__init__()
        self.down_proj = nn.Linear(d_model, bottleneck)
        self.up_proj = nn.Linear(bottleneck, d_model)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up_proj(F.relu(self.down_proj(x))) * self.scale


class MixtureOfAdapters(nn.Module):
    """router_ratio1[route] * adapter0(x) + router_ratio2[route] * adapter1(x), per sample and channel.

    With one adapter (stage 1 / 2 models) it is that adapter alone. Key names are the authors'.
    """

    def __init__(self, d_model: int, bottleneck: int, num_adapters: int, route_state: RouteState):
        super().__init__()
        self.adapters = nn.ModuleList(BottleneckAdapter(d_model, bottleneck) for _ in range(num_adapters))
        if num_adapters == 2:
            self.router_ratio1 = nn.Parameter(torch.tensor([[1.0], [0.0]]).expand(2, d_model).clone())
            self.router_ratio2 = nn.Parameter(torch.tensor([[0.0], [1.0]]).expand(2, d_model).clone())
        elif num_adapters != 1:
            raise ValueError("LION has one or two adapters per feed-forward layer")
        self.route_state = route_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routes = None if len(self.adapters) == 1 else self.route_state.for_batch(x.shape[0]).to(x.device)
        return self.mix(x, routes)

    def mix(self, x: torch.Tensor, routes: torch.Tensor | None) -> torch.Tensor:
        """x (B, L, d_model), routes (B,) (None with one adapter) -> the routed sum of the adapters."""
        if len(self.adapters) == 1:
            return self.adapters[0](x)
        ratio1 = self.router_ratio1[routes].unsqueeze(1)  # (B, 1, d_model)
        ratio2 = self.router_ratio2[routes].unsqueeze(1)
        return self.adapters[0](x) * ratio1 + self.adapters[1](x) * ratio2


class T5LayerFFWithAdapters(nn.Module):
    """T5LayerFF plus a parallel mixture of adapters that reads the un-normalised residual input."""

    def __init__(self, feed_forward: T5LayerFF, adapter: MixtureOfAdapters):
        super().__init__()
        self.DenseReluDense = feed_forward.DenseReluDense
        self.layer_norm = feed_forward.layer_norm
        self.dropout = feed_forward.dropout
        self.adapter = adapter

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        forwarded = self.dropout(self.DenseReluDense(self.layer_norm(hidden_states)))
        return hidden_states + forwarded + self.adapter(hidden_states)

    def routed(self, hidden_states: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
        """`forward` with the routes given (B,) instead of read from the model's routing context (the
        decode engine passes each slot's route)."""
        forwarded = self.dropout(self.DenseReluDense(self.layer_norm(hidden_states)))
        return hidden_states + forwarded + self.adapter.mix(hidden_states, routes)


def build_language_model(config: LanguageConfig, num_adapters: int, route_state: RouteState,
                         attn_implementation: str = "sdpa") -> T5ForConditionalGeneration:
    t5_config = T5Config(
        vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv, d_ff=config.d_ff,
        num_layers=config.num_layers, num_decoder_layers=config.num_decoder_layers, num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        dropout_rate=config.dropout_rate, layer_norm_epsilon=config.layer_norm_epsilon,
        feed_forward_proj="gated-gelu", decoder_start_token_id=config.decoder_start_token_id,
        pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id,
        # FlanT5 (T5 v1.1) unties lm_head and does not rescale decoder outputs by d_model**-0.5
        tie_word_embeddings=False,
    )
    t5_config.dense_act_fn = "gelu"  # LION (like BLIP-2) replaces FlanT5's tanh GELU by the exact one
    t5_config._attn_implementation = attn_implementation
    model = T5ForConditionalGeneration(t5_config)
    # transformers 5 ties lm_head to the input embedding for every T5; FlanT5 has its own lm_head.
    model.lm_head.weight = nn.Parameter(model.shared.weight.detach().clone())
    for stack in (model.encoder, model.decoder):
        for block in stack.block:
            adapter = MixtureOfAdapters(config.d_model, config.adapter_bottleneck, num_adapters, route_state)
            block.layer[-1] = T5LayerFFWithAdapters(block.layer[-1], adapter)
    return model


def build_qformer(config: QFormerConfig, encoder_width: int, attn_implementation: str = "sdpa"
                  ) -> InstructBlipQFormerModel:
    hf = InstructBlipQFormerConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        hidden_act="gelu", max_position_embeddings=config.max_position_embeddings,
        layer_norm_eps=config.layer_norm_eps, cross_attention_frequency=config.cross_attention_frequency,
        encoder_hidden_size=encoder_width, hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
    )
    hf._attn_implementation = attn_implementation
    return InstructBlipQFormerModel(hf)


class _SharedCrossAttentionCache(EncoderDecoderCache):
    """An encoder-decoder cache whose cross-attention part is the same for every beam of an image: beam
    search's reordering (which moves beams only within their own image) is applied to the self-attention
    part alone, which saves copying the whole cross-attention cache at every step."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.self_attention_cache.reorder_cache(beam_idx)


# ----------------------------------------------------------------------------------------------------
# The whole model


class LionModel(nn.Module):
    """LION on tensors. `lion_mllm.Lion` wraps it with the processor, tagger and text in/out."""

    def __init__(self, config: LionConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        vision, d_model = config.vision, config.language.d_model
        self.vision_model = LionVisionEncoder(vision, attn_implementation)
        if config.uses_qformer:
            self.ln_vision = FP32LayerNorm(vision.hidden_size, eps=config.ln_vision_eps)
            self.qformer = build_qformer(config.qformer, vision.hidden_size, attn_implementation)
            self.query_tokens = nn.Parameter(torch.zeros(1, config.qformer.num_query_tokens, config.qformer.hidden_size))
            self.qformer_projection = nn.Linear(config.qformer.hidden_size, d_model)
        if config.uses_aggregator:
            self.aggregator = VisionAggregator(vision.hidden_size, config.aggregator, attn_implementation)
            self.aggregator_norm = FP32LayerNorm(vision.hidden_size, eps=config.aggregator.norm_eps)
            self.aggregator_projection = nn.Sequential(
                nn.Linear(vision.hidden_size, config.aggregator.projection_size), nn.GELU(),
                nn.Linear(config.aggregator.projection_size, d_model),
            )
        self.route_state = RouteState()
        self.language_model = build_language_model(config.language, config.num_adapters, self.route_state,
                                                   attn_implementation)
        if config.enable_semantic_tags:
            self.tag_prompt_embedding = nn.Parameter(torch.zeros(d_model))

    # -- helpers -------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device if self.config.uses_qformer else self.aggregator_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.shared.weight.dtype

    def routing(self, route_ids: torch.Tensor | None) -> contextlib.AbstractContextManager[None]:
        """Run the adapters with these per-sample routes (B,) inside the block, in this thread (and asyncio
        task) only; the previous ones after. Other threads running the model meanwhile keep theirs."""
        return self.route_state.bound(route_ids)

    def checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """`context_fn` for `torch.utils.checkpoint` (non-reentrant) around T5 blocks: a checkpointed block
        is recomputed in the backward pass, after `forward` has left `routing` and possibly on autograd's
        own thread; the recompute gets back the routes that its forward saw."""
        return contextlib.nullcontext(), self.routing(self.route_state.route_ids)

    def vision_taps(self) -> tuple[int, ...]:
        taps: set[int] = set()
        if self.config.uses_qformer:
            taps.add(self.config.vision.num_hidden_layers - 1)
        if self.config.uses_aggregator:
            taps.update((self.config.aggregator.hidden_layer, *self.config.aggregator.cross_layers))
        return tuple(sorted(taps))

    # -- the two visual roads ------------------------------------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor, qformer_input_ids: torch.Tensor | None = None,
                      qformer_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values (B,3,S,S), instruction tokens (B,L) -> visual tokens (B, 32 + 257, d_model).

        The ViT runs once per distinct image: several questions about one image (a batch of tasks, a
        training batch with an image's caption, questions and phrases) share its pass."""
        pixels = pixel_values.to(self.vision_model.embeddings.patch_embedding.weight.dtype)
        distinct, which = _distinct_rows(pixels)
        blocks = self.vision_model(distinct, self.vision_taps())
        if which is not None:
            blocks = {tap: out[which] for tap, out in blocks.items()}
        parts = []
        if self.config.uses_qformer:
            if qformer_input_ids is None:
                raise ValueError("the Q-Former needs the instruction tokens (qformer_input_ids)")
            image_embeds = self.ln_vision(blocks[self.config.vision.num_hidden_layers - 1])
            batch = image_embeds.shape[0]
            queries = self.query_tokens.expand(batch, -1, -1)
            if qformer_attention_mask is None:
                qformer_attention_mask = torch.ones_like(qformer_input_ids)
            query_mask = torch.ones(queries.shape[:2], dtype=qformer_attention_mask.dtype, device=queries.device)
            out = self.qformer(
                input_ids=qformer_input_ids, attention_mask=torch.cat([query_mask, qformer_attention_mask], dim=1),
                query_embeds=queries, encoder_hidden_states=image_embeds.to(queries.dtype),
            )
            parts.append(self.qformer_projection(out.last_hidden_state[:, : queries.shape[1]]))
        if self.config.uses_aggregator:
            agg = self.config.aggregator
            fused = self.aggregator(blocks[agg.hidden_layer], [blocks[i] for i in agg.cross_layers])
            parts.append(self.aggregator_projection(self.aggregator_norm(fused)))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def embed_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Prompt token ids (B,L) -> embeddings (B,L,d) with the soft tag prompt at `<extra_id_0>`."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if self.config.enable_semantic_tags:
            is_hint = (input_ids == self.config.language.soft_prompt_token_id).unsqueeze(-1)
            embeds = torch.where(is_hint, self.tag_prompt_embedding.to(embeds.dtype), embeds)
        return embeds

    def encoder_inputs(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       qformer_input_ids: torch.Tensor | None = None,
                       qformer_attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[visual tokens ; prompt embeddings] (B, n+L, d) and its mask (B, n+L)."""
        visual = self.encode_images(pixel_values, qformer_input_ids, qformer_attention_mask)
        text = self.embed_prompt(input_ids)
        embeds = torch.cat([visual.to(text.dtype), text], dim=1)
        visual_mask = torch.ones(visual.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        return embeds, torch.cat([visual_mask, attention_mask], dim=1)

    # -- training and generation ---------------------------------------------------------------------

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                route_ids: torch.Tensor, labels: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None, qformer_input_ids: torch.Tensor | None = None,
                qformer_attention_mask: torch.Tensor | None = None) -> Seq2SeqLMOutput:
        """Teacher-forced pass; `labels` (B,T) with -100 at padding give the mean token cross-entropy."""
        embeds, mask = self.encoder_inputs(pixel_values, input_ids, attention_mask, qformer_input_ids,
                                           qformer_attention_mask)
        with self.routing(route_ids):
            return self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels,
                                       decoder_attention_mask=decoder_attention_mask)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 route_ids: torch.Tensor, qformer_input_ids: torch.Tensor | None = None,
                 qformer_attention_mask: torch.Tensor | None = None, share_cross_attention: bool = True,
                 **generate_kwargs) -> torch.Tensor:
        """Decoded token ids (B * num_return_sequences, T), starting with the decoder start token.

        The image and the T5 encoder run once per sample; transformers' generate then shares the
        encoder output across beams and decodes with the KV cache (unless use_cache=False). In cached
        beam search the decoder's cross-attention keys and values are computed once per image and
        shared by its beams (`share_cross_attention=False`: once per beam, transformers' own way; the
        same token ids, kept to check and measure against).
        """
        embeds, mask = self.encoder_inputs(pixel_values, input_ids, attention_mask, qformer_input_ids,
                                           qformer_attention_mask)
        with self.routing(route_ids):
            encoded = self.language_model.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
            beams = self._shared_cross_attention_beams(generate_kwargs) if share_cross_attention else 0
            if beams > 1:
                generate_kwargs[_CACHE_ARGUMENT] = self.cross_attention_cache(encoded.last_hidden_state, beams)
            return self.language_model.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoded.last_hidden_state),
                attention_mask=mask, **generate_kwargs,
            )

    def _shared_cross_attention_beams(self, generate_kwargs: dict) -> int:
        """The beam count whose cross-attention keys/values `generate` can share per image, or 0 where this
        call is not a plain cached beam search (sampling, extra return sequences, a caller's own cache or
        generation config: those keep transformers' own cache handling)."""
        if (generate_kwargs.get("use_cache", True) is False or generate_kwargs.get("do_sample")
                or generate_kwargs.get("num_return_sequences", 1) not in (None, 1)
                or generate_kwargs.get("num_beam_groups", 1) not in (None, 1)
                or any(key in generate_kwargs for key in ("past_key_values", "cache", "cache_implementation",
                                                          "generation_config", "assistant_model"))):
            return 0
        beams = generate_kwargs.get("num_beams") or self.language_model.generation_config.num_beams or 1
        return beams if beams > 1 and not self.language_model.generation_config.do_sample else 0

    def cross_attention_cache(self, encoded: torch.Tensor, beams: int) -> EncoderDecoderCache:
        """A decoder cache whose cross-attention keys and values are computed once per image (B rows) and
        repeated for its `beams` consecutive beams, instead of once per beam (B * beams rows).

        Every beam of an image attends to the same encoder output, so the keys and values are the same
        rows; beam search only ever reorders beams within their own image, so the cross-attention part
        needs no reordering either (`_SharedCrossAttentionCache`)."""
        cross = DynamicCache()
        for index, block in enumerate(self.language_model.decoder.block):
            attention = block.layer[1].EncDecAttention
            shape = (*encoded.shape[:-1], -1, attention.key_value_proj_dim)
            keys = attention.k(encoded).view(shape).transpose(1, 2).repeat_interleave(beams, dim=0)
            values = attention.v(encoded).view(shape).transpose(1, 2).repeat_interleave(beams, dim=0)
            cross.update(keys, values, index)
        cache = _SharedCrossAttentionCache(DynamicCache(), cross)
        for index in range(len(self.language_model.decoder.block)):
            cache.is_updated[index] = True
        return cache

    # -- accounting -----------------------------------------------------------------------------------

    def flops_per_image(self, prompt_tokens: int = 64, text_tokens: int = 16) -> dict[str, float]:
        """Forward FLOPs for one image (2 per multiply-add; attention scores included), by stage,
        plus FLOPs per generated token per beam for the decoder."""
        c, v, lang = self.config, self.config.vision, self.config.language
        n_img = v.num_positions

        def linear_params(module: nn.Module) -> int:
            return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))

        per_block = linear_params(self.vision_model.layers[0])
        depth = max(self.vision_taps()) + 1
        flops = {"vision": 2.0 * n_img * per_block * depth + 4.0 * n_img * n_img * v.hidden_size * depth
                 + 2.0 * (n_img - 1) * v.hidden_size * 3 * v.patch_size**2}
        if c.uses_qformer:
            qf = c.qformer
            hidden, queries, tokens = qf.hidden_size, qf.num_query_tokens, qf.num_query_tokens + text_tokens
            cross_layers = len(range(0, qf.num_hidden_layers, qf.cross_attention_frequency))
            # every token: self-attention (4 H^2 + scores) and one of the two FFNs (2 H I)
            per_layer = 2.0 * tokens * (4 * hidden**2 + 2 * hidden * qf.intermediate_size) + 4.0 * tokens**2 * hidden
            # queries only, every `cross_attention_frequency` layers: q/o projections, k/v over the image, scores
            per_cross = 2.0 * queries * 2 * hidden**2 + 2.0 * n_img * 2 * hidden * v.hidden_size \
                + 4.0 * queries * n_img * hidden
            flops["qformer"] = per_layer * qf.num_hidden_layers + per_cross * cross_layers \
                + 2.0 * queries * hidden * lang.d_model  # projection into T5
        if c.uses_aggregator:
            flops["aggregator"] = 2.0 * n_img * (linear_params(self.aggregator)
                                                 + linear_params(self.aggregator_projection))
            flops["aggregator"] += 8.0 * n_img * n_img * v.hidden_size * len(c.aggregator.cross_layers)
        enc_tokens = c.num_visual_tokens + prompt_tokens
        inner = lang.num_heads * lang.d_kv
        flops["t5_encoder"] = 2.0 * enc_tokens * linear_params(self.language_model.encoder) \
            + 4.0 * enc_tokens * enc_tokens * inner * lang.num_layers
        # The cross-attention keys and values of the encoder output are computed once per image (cached), so
        # they are not part of a decoder step; a step at position t adds 4 t inner per layer of
        # self-attention scores over the prefix, left out here (small beside the rest for short answers).
        cross_kv = sum(layer.layer[1].EncDecAttention.k.weight.numel() + layer.layer[1].EncDecAttention.v.weight.numel()
                       for layer in self.language_model.decoder.block)
        flops["t5_cross_kv"] = 2.0 * enc_tokens * cross_kv
        flops["t5_decoder_per_token"] = 2.0 * (linear_params(self.language_model.decoder) - cross_kv
                                              + self.language_model.lm_head.weight.numel()) \
            + 4.0 * enc_tokens * inner * lang.num_decoder_layers
        return flops
