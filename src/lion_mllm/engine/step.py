"""One T5 decoder step over a preallocated slot cache: the arithmetic of the decode engine.

A slot holds one decoder sequence (a request, or one beam of one): its self-attention keys/values for
positions 0..T-1 and the cross-attention keys/values of its encoder output (S positions, computed once
when the sequence is admitted). A step feeds every slot of [0, n) one token at its own position:

    x = embed(token)                                                     (n, d)
    per layer:  x = x + SelfAttn(RMS(x))   keys 0..pos of the slot, T5's relative position bias
                x = x + CrossAttn(RMS(x))  the slot's encoder keys (padding masked)
                x = x + FFN(RMS(x)) + sum_k router_k[route] * adapter_k(x)
    logits = lm_head(RMS(x))                                             (n, V) float32

The T5 modules themselves (norms, projections, feed-forward, adapters) compute every part but the
attention, so the arithmetic and dtypes are transformers' own; only the cache handling is ours: keys
and values are written in place at (slot, position), so admitting or retiring a sequence never copies
the others, and the step has one shape per slot count n, which `torch.compile` turns into one kernel
sequence (a C++ wrapper on CPU, a CUDA graph on a GPU).

Cost per step, N_dec = decoder linear parameters without the cross-attention keys/values:
    FLOPs  ~ n x (2 N_dec + 2 d V + 4 inner (T + S) layers)
    bytes  ~ weights (N_dec + d V) x dtype  +  n x layers x 2 inner (T + S) x dtype (the slots' K/V)
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import T5ForConditionalGeneration

__all__ = ["SlotCache", "DecoderStep"]


class SlotCache:
    """The decoder's keys and values for `slots` sequences, preallocated, one tensor per layer (so that a
    compiled step writes each in place: a write into a stacked tensor would be copied back whole).

    self_keys/self_values[layer]  (slots, heads, T, d_kv): self-attention, written one position a step
    cross_keys/cross_values[layer] (slots, heads, S, d_kv): encoder keys/values, written at admission
    source_bias (slots, S): 0 over a slot's encoder positions, the dtype's minimum over its padding
    Memory: layers x slots x heads x d_kv x 2 (T + S) x dtype bytes (`nbytes`).
    """

    def __init__(self, layers: int, slots: int, heads: int, d_kv: int, max_length: int, max_source_length: int,
                 dtype: torch.dtype, device: torch.device):
        self.slots, self.max_length, self.max_source_length = slots, max_length, max_source_length

        def zeros(length: int) -> list[torch.Tensor]:
            # zeros, not empty: a masked position must hold a finite number (0 x NaN would poison a row)
            return [torch.zeros((slots, heads, length, d_kv), dtype=dtype, device=device) for _ in range(layers)]

        self.self_keys, self.self_values = zeros(max_length), zeros(max_length)
        self.cross_keys, self.cross_values = zeros(max_source_length), zeros(max_source_length)
        self.source_bias = torch.zeros((slots, max_source_length), dtype=dtype, device=device)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (*self.self_keys, *self.self_values, *self.cross_keys, *self.cross_values, self.source_bias)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def write_source(self, slot: int, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Encoder keys/values (layers, heads, length, d_kv) of one sequence into `slot`."""
        for layer, (cache_keys, cache_values) in enumerate(zip(self.cross_keys, self.cross_values)):
            cache_keys[slot, :, :length] = keys[layer]
            cache_values[slot, :, :length] = values[layer]
        self.source_bias[slot, :length] = 0
        self.source_bias[slot, length:] = torch.finfo(self.source_bias.dtype).min

    def copy_slots(self, targets: torch.Tensor, sources: torch.Tensor, length: int) -> None:
        """Beam search: slot targets[i] continues the sequence of slot sources[i] (self-attention only;
        a beam group shares one encoder output, so its cross-attention rows are already equal). Only the
        first `length` positions (those written so far) of the slots that change are copied: copying whole
        slots cost more than the eager step itself on lion-shapes."""
        changed = targets != sources
        if not bool(changed.any()):
            return
        targets, sources = targets[changed], sources[changed]
        for cache in (*self.self_keys, *self.self_values):
            written = cache[:, :, :length]
            written.index_copy_(0, targets, written.index_select(0, sources))  # the sources read before any write


def relative_position_buckets(model: T5ForConditionalGeneration, max_length: int) -> torch.Tensor:
    """(T, T) long: the bucket of T5's decoder self-attention bias for query position q and key position
    k (`relative_attention_bias` maps it to one bias per head), -1 where k > q (the causal mask)."""
    attention = model.decoder.block[0].layer[0].SelfAttention
    query = torch.arange(max_length)[:, None]
    key = torch.arange(max_length)[None, :]
    buckets = attention._relative_position_bucket(key - query, bidirectional=False,
                                                  num_buckets=attention.relative_attention_num_buckets,
                                                  max_distance=attention.relative_attention_max_distance)
    return buckets.masked_fill(key > query, -1)


class DecoderStep(nn.Module):
    """`forward(tokens, positions, routes, *cache tensors) -> logits`: one step of T5's decoder for slots
    [0, n) with n = len(tokens). Holds the model's own decoder modules (no copies of weights)."""

    def __init__(self, model: T5ForConditionalGeneration, max_length: int):
        super().__init__()
        self.embed = model.decoder.embed_tokens
        self.blocks = model.decoder.block
        self.final_norm = model.decoder.final_layer_norm
        self.lm_head = model.lm_head
        config = model.config
        self.heads, self.d_kv = config.num_heads, config.d_kv
        self.relative_bias = model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias
        # bucket indices only: the bias values are read from the (possibly training) weights at every step
        self.register_buffer("buckets", relative_position_buckets(model, max_length).to(self.relative_bias.weight.device),
                             persistent=False)
        # T5 v1.0 rescales its decoder output by d_model**-0.5 and FlanT5 (LION's) does not: transformers
        # reads `scale_decoder_outputs` (5.2x) or, before it existed, `tie_word_embeddings`
        self.scale_logits = bool(getattr(config, "scale_decoder_outputs", config.tie_word_embeddings))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, routes: torch.Tensor, length: int,
                source_length: int, *cache: torch.Tensor) -> torch.Tensor:
        """tokens, positions, routes (n,) long and the `SlotCache.tensors` -> logits (n, V) float32;
        writes each slot's keys/values at (slot, position). Attention reads the first `length` positions
        (> every slot's position) and `source_length` encoder positions (>= every slot's encoder length)
        only: the rest of the cache is masked anyway, and reading it would cost memory bandwidth."""
        layers = len(self.blocks)
        self_keys, self_values = cache[:layers], cache[layers:2 * layers]
        cross_keys, cross_values, source_bias = cache[2 * layers:3 * layers], cache[3 * layers:4 * layers], cache[-1]
        n = tokens.shape[0]
        slots = torch.arange(n, device=tokens.device)
        hidden = self.embed(tokens).unsqueeze(1)  # (n, 1, d)
        self_bias = self._self_attention_bias(positions, length)  # (n, heads, 1, length)
        cross_bias = source_bias[:n, None, None, :source_length]  # (n, 1, 1, source_length)
        for index, block in enumerate(self.blocks):
            # self-attention over the slot's own history, this position written first
            layer = block.layer[0]
            attention = layer.SelfAttention
            normed = layer.layer_norm(hidden)
            query = self._heads(attention.q(normed))  # (n, heads, 1, d_kv)
            self_keys[index][slots, :, positions] = self._heads(attention.k(normed))[:, :, 0]  # (n, heads, d_kv)
            self_values[index][slots, :, positions] = self._heads(attention.v(normed))[:, :, 0]
            out = self._attend(attention, query, self_keys[index][:n, :, :length], self_values[index][:n, :, :length],
                               self_bias)
            hidden = hidden + layer.dropout(out)
            # cross-attention over the slot's encoder output
            layer = block.layer[1]
            attention = layer.EncDecAttention
            query = self._heads(attention.q(layer.layer_norm(hidden)))
            out = self._attend(attention, query, cross_keys[index][:n, :, :source_length],
                               cross_values[index][:n, :, :source_length], cross_bias)
            hidden = hidden + layer.dropout(out)
            hidden = block.layer[-1].routed(hidden, routes)
        hidden = self.final_norm(hidden)
        if self.scale_logits:
            hidden = hidden * hidden.shape[-1] ** -0.5
        return self.lm_head(hidden)[:, 0].float()

    def _self_attention_bias(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """T5's relative position bias of each slot's query position over keys 0..length-1, with the
        dtype's minimum at the keys after it (as T5 adds its causal mask)."""
        buckets = self.buckets[positions, :length]  # (n, length)
        bias = self.relative_bias(buckets.clamp(min=0)).permute(0, 2, 1)  # (n, heads, T)
        bias = bias.masked_fill((buckets < 0).unsqueeze(1), torch.finfo(bias.dtype).min)
        return bias.unsqueeze(2)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (n, 1, heads x d_kv) -> (n, heads, 1, d_kv)
        return x.view(x.shape[0], 1, self.heads, self.d_kv).transpose(1, 2)

    @staticmethod
    def _attend(attention: nn.Module, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
        """T5 attention: no 1/sqrt(d) scaling, the bias (positions and mask) added to the scores."""
        scores = torch.matmul(query, keys.transpose(2, 3)) + bias
        weights = torch.softmax(scores.float(), dim=-1).type_as(scores)
        out = torch.matmul(weights, values)  # (n, heads, 1, d_kv)
        return attention.o(out.transpose(1, 2).reshape(out.shape[0], 1, -1))
