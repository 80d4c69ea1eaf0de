"""CPU inference paths: beams sharing their image's cross-attention keys/values (the default) and the
opt-in oneDNN linear layers give the token ids of the plain path, on the authors' golden models; the
bfloat16 opt-in computes float32's logits within bf16's precision."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import golden_paths
from test_golden import CASES, case_inputs, golden_lion
from torch import nn

from lion_mllm import Lion
from lion_mllm.model.cpu_inference import (
    OneDnnLinear,
    id_agreement,
    onednn_linear_available,
    use_onednn_linear,
    uses_onednn_linear,
)
from lion_mllm.model.modeling_lion import _SharedCrossAttentionCache

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="torch built without oneDNN")


def golden_batch(case_id: str, golden_spec: dict):
    lion = golden_lion("ALL", "tags")
    images, case, tags = case_inputs(golden_spec, case_id, "tags")
    return lion, lion.processor(images, case["questions"], [case["category"]], tags)


def beam_search(lion, batch, **kwargs):
    return lion.model.generate(**batch, num_beams=5, max_new_tokens=40, repetition_penalty=1.5,
                               output_scores=True, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("case_id", CASES)
def test_shared_cross_attention_beams_equal_transformers_beams(case_id, golden_spec):
    lion, batch = golden_batch(case_id, golden_spec)
    shared = beam_search(lion, batch)
    per_beam = beam_search(lion, batch, share_cross_attention=False)
    assert shared.sequences.tolist() == per_beam.sequences.tolist()
    torch.testing.assert_close(shared.sequences_scores, per_beam.sequences_scores, rtol=0, atol=0)
    for ours, theirs in zip(shared.scores, per_beam.scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_shared_cross_attention_computes_keys_once_per_image(golden_spec):
    lion, batch = golden_batch("cap_a0", golden_spec)
    key_rows: list[int] = []
    projection = lion.model.language_model.decoder.block[0].layer[1].EncDecAttention.k
    handle = projection.register_forward_hook(lambda module, args, out: key_rows.append(args[0].shape[0]))
    try:
        for share in (True, False):
            lion.model.generate(**batch, num_beams=5, max_new_tokens=3, share_cross_attention=share)
    finally:
        handle.remove()
    batch_size = batch["pixel_values"].shape[0]
    assert key_rows == [batch_size, batch_size * 5]


def test_shared_cross_attention_only_in_plain_cached_beam_search(golden_spec):
    lion, _ = golden_batch("cap_a0", golden_spec)
    model = lion.model
    assert model._shared_cross_attention_beams({"num_beams": 5}) == 5
    for kwargs in ({"num_beams": 1}, {"num_beams": 5, "use_cache": False}, {"num_beams": 5, "do_sample": True},
                   {"num_beams": 5, "num_return_sequences": 2}, {"num_beams": 5, "cache_implementation": "static"}):
        assert model._shared_cross_attention_beams(kwargs) == 0, kwargs


def test_shared_cache_reorders_only_self_attention():
    from transformers.cache_utils import DynamicCache

    self_attention, cross = DynamicCache(), DynamicCache()
    self_attention.update(torch.arange(4.0).view(4, 1, 1, 1), torch.arange(4.0).view(4, 1, 1, 1), 0)
    cross.update(torch.arange(4.0).view(4, 1, 1, 1), torch.arange(4.0).view(4, 1, 1, 1), 0)
    cache = _SharedCrossAttentionCache(self_attention, cross)
    cache.reorder_cache(torch.tensor([1, 1, 3, 2]))
    assert cache.self_attention_cache.layers[0].keys.flatten().tolist() == [1.0, 1.0, 3.0, 2.0]
    assert cache.cross_attention_cache.layers[0].keys.flatten().tolist() == [0.0, 1.0, 2.0, 3.0]


@needs_onednn
@pytest.mark.parametrize("case_id", CASES)
def test_onednn_linear_gives_the_authors_ids(case_id, golden_spec, golden_results):
    """Greedy and 5-beam ids with every linear layer on oneDNN equal the authors' recorded ids."""
    lion = golden_lion("ALL", "tags")
    images, case, tags = case_inputs(golden_spec, case_id, "tags")
    recorded = golden_results["configs"]["ALL.tags"]["cases"][case_id]
    greedy_batch = lion.processor(images, case["questions"], ["image_level"], tags)
    beam_batch = lion.processor(images, case["questions"], [recorded["beam"]["category"]], tags)
    assert use_onednn_linear(lion.model) > 0
    try:
        assert uses_onednn_linear(lion.model)
        greedy = lion.model.generate(**greedy_batch, num_beams=1, max_new_tokens=24, repetition_penalty=1.0,
                                     do_sample=False)
        beams = lion.model.generate(**beam_batch, num_beams=5, max_new_tokens=256, repetition_penalty=1.5)
    finally:
        use_onednn_linear(lion.model, False)
    assert not uses_onednn_linear(lion.model)
    assert greedy.tolist() == recorded["greedy"]["image_level"]["output_ids"]
    assert beams.tolist() == recorded["beam"]["output_ids"]


@needs_onednn
def test_onednn_linear_is_nn_linear_under_autograd():
    torch.manual_seed(0)
    plain = nn.Linear(16, 8)
    fast = nn.Linear(16, 8)
    fast.load_state_dict(plain.state_dict())
    container = nn.Sequential(fast)
    use_onednn_linear(container)
    assert type(fast) is OneDnnLinear and fast.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(3, 5, 16)
    plain(x).square().sum().backward()
    fast(x).square().sum().backward()  # training: F.linear, bit for bit
    assert torch.equal(plain.weight.grad, fast.weight.grad) and torch.equal(plain.bias.grad, fast.bias.grad)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
        bf16 = x.bfloat16()
        fast.bfloat16(), plain.bfloat16()
        assert torch.equal(fast(bf16), plain(bf16))  # another dtype: F.linear, bit for bit


@functools.cache
def golden_lion_bf16() -> Lion:
    return Lion.from_official(golden_paths("ALL", True), vision_num_heads=2, dtype="bfloat16")


def test_id_agreement_counts_the_prefix_before_the_first_difference():
    ours = [[[0, 5, 6, 7, 1], [0, 5, 6, 7, 1]], [[0, 2, 3]]]
    reference = [[[0, 5, 6, 7, 1], [0, 5, 9, 7, 1]], [[0, 4, 3]]]
    assert id_agreement(ours, reference) == {"sequences": 3, "identical_sequences": 1,
                                             "mean_common_prefix": (1.0 + 0.25 + 0.0) / 3}


def test_bfloat16_on_cpu_agrees_with_float32_on_the_goldens(golden_spec):
    """The bf16 opt-in (`dtype="bfloat16"`) computes float32's logits to within bf16's precision, on every
    golden case and route, at every greedy step (24 tokens) where both decode the same prefix.

    Why this and not a count of identical sequences: x86 kernels (AMX, AVX512-BF16, or AVX2 converting to
    fp32) accumulate bf16 products in fp32, so the error's size is set by rounding weights and activations
    to bf16's 8 significant bits, whatever the CPU. Which sequences part is not: the random weights leave
    near ties (float32 top-two gaps of 0.17-0.22 where two decodings parted, against errors up to 0.95),
    and a tie flips with the kernel's summation order -- 9 of 12 sequences identical on an Intel Xeon with
    AMX, 7 of 12 on an AMD EPYC with AVX2. Measured on the AMD: largest error 4.1 % of the step's largest
    logit; the bound, 2**-3, leaves 3x margin and fails a path that loses precision (a product rounded
    to bf16 before it is summed, say)."""
    fp32, bf16 = golden_lion("ALL", "tags"), golden_lion_bf16()
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    for case_id in CASES:
        images, case, tags = case_inputs(golden_spec, case_id, "tags")
        for category in ("image_level", "region_level"):
            runs = [lion.model.generate(**lion.processor(images, case["questions"], [category], tags), num_beams=1,
                                        max_new_tokens=24, repetition_penalty=1.0, do_sample=False,
                                        output_logits=True, return_dict_in_generate=True) for lion in (fp32, bf16)]
            ours, reference = runs[1].sequences[0].tolist(), runs[0].sequences[0].tolist()
            # logits[i] predicts token i + 1 from tokens 0..i: comparable up to the first differing token.
            parted = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), len(runs[0].logits))
            for step in range(parted):
                exact, rounded = runs[0].logits[step][0], runs[1].logits[step][0].float()
                error, scale = (rounded - exact).abs().max().item(), exact.abs().max().item()
                assert error <= scale / 8, (case_id, category, step, error, scale)
