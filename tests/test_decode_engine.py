"""The decode engine (`lion_mllm.engine`) gives the token ids of the reference path (`LionModel.generate`,
transformers' `generate`) on the authors' golden models and on lion-shapes, in greedy, beam and mixed-task
batches; its slots are admitted, released and reused without disturbing other sequences; its requests are
checked before they take a slot; seeded sampling repeats; a compiled step gives the eager step's tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_lion
from test_golden import CASES, CONFIGS, case_inputs, golden_lion

from lion_mllm import load_model
from lion_mllm.engine import DecodeEngine, EngineFull, EngineOptions
from lion_mllm.model.generation import DecodingSettings
from lion_mllm.shapes import make_scene, render

pytestmark = pytest.mark.usefixtures("one_thread")


def trimmed(sequence: list[int], eos: int = 1) -> list[int]:
    """A decoder sequence up to and with its first end token (transformers pads finished rows after it)."""
    for index in range(1, len(sequence)):
        if sequence[index] == eos:
            return list(sequence[: index + 1])
    return list(sequence)


def reference(lion, batch, settings: DecodingSettings) -> list[list[int]]:
    kwargs = dict(num_beams=settings.num_beams, max_new_tokens=settings.max_new_tokens,
                  min_length=settings.min_length, repetition_penalty=settings.repetition_penalty,
                  length_penalty=settings.length_penalty, num_return_sequences=settings.num_return_sequences,
                  do_sample=False)
    return [trimmed(s) for s in lion.model.generate(**batch, **kwargs).tolist()]


def engine_ids(engine: DecodeEngine, batch, settings) -> list[list[int]]:
    return [trimmed(s) for sample in engine.generate(batch, settings) for s in sample]


def golden_batch(lion, golden_spec, tags: str):
    """Every golden case in both routes, as one mixed-task batch of six samples."""
    images, questions, tasks, all_tags = [], [], [], []
    for case_id in CASES:
        case_images, case, case_tags = case_inputs(golden_spec, case_id, tags)
        for category in ("image_level", "region_level"):
            images += case_images
            questions += case["questions"]
            tasks.append(category)
            all_tags += case_tags or [None]
    return lion.processor(images, questions, tasks, all_tags if tags == "tags" else None)


@pytest.mark.parametrize("mode,tags", CONFIGS)
def test_golden_ids_equal_the_reference_greedy_and_beams(mode, tags, golden_spec):
    lion = golden_lion(mode, tags)
    batch = golden_batch(lion, golden_spec, tags)
    assert set(batch["route_ids"].tolist()) == {0, 1}  # both routes in one batch
    engine = DecodeEngine(lion.model, EngineOptions(slots=16, max_length=64))
    for settings in (DecodingSettings(24), DecodingSettings(40, num_beams=5, repetition_penalty=1.5),
                     DecodingSettings(30, num_beams=3, length_penalty=0.6, min_length=5)):
        ours = engine_ids(engine, batch, settings)
        assert ours == reference(lion, batch, settings)
        assert engine.free_slots == 16 and not engine.groups


@pytest.fixture(scope="module")
def shapes():
    return load_model("lion-shapes")


@pytest.fixture(scope="module")
def shapes_batch(shapes):
    images = [render(make_scene(seed)) for seed in range(8)]
    config = shapes.generation_config
    questions = [config.prompt("caption"), config.prompt("vqa", "How many shapes are there?"),
                 config.prompt("grounding", "the red circle"), config.prompt("vqa", "What colour is the square?")] * 2
    tasks = ["caption", "vqa", "grounding", "vqa"] * 2
    return shapes.processor(images, questions, tasks, shapes.fill_tags(images, None))


@pytest.mark.parametrize("settings", [DecodingSettings(40), DecodingSettings(40, num_beams=4),
                                      DecodingSettings(40, num_beams=3, num_return_sequences=2)],
                         ids=["greedy", "beams", "beams-two-returned"])
def test_lion_shapes_ids_equal_the_reference(shapes, shapes_batch, settings):
    engine = DecodeEngine(shapes.model, EngineOptions(slots=32, max_length=64))
    ours = engine_ids(engine, shapes_batch, settings)
    assert ours == reference(shapes, shapes_batch, settings)
    assert any(len(s) > 12 for s in ours)  # captions and boxes: long enough to matter


def test_a_batch_larger_than_the_cache_runs_in_waves_with_the_same_ids(shapes, shapes_batch):
    wide = DecodeEngine(shapes.model, EngineOptions(slots=32, max_length=64))
    narrow = DecodeEngine(shapes.model, EngineOptions(slots=3, max_length=64))
    for settings in (DecodingSettings(40), DecodingSettings(20, num_beams=3)):
        assert engine_ids(narrow, shapes_batch, settings) == engine_ids(wide, shapes_batch, settings)
        assert narrow.free_slots == 3


def test_per_sample_settings_in_one_batch(shapes, shapes_batch):
    engine = DecodeEngine(shapes.model, EngineOptions(slots=32, max_length=64))
    settings = [DecodingSettings(40), DecodingSettings(5), DecodingSettings(40, num_beams=3),
                DecodingSettings(40, repetition_penalty=1.3)] * 2
    together = engine.generate(shapes_batch, settings)
    for row, row_settings in enumerate(settings):
        single = {k: v[row:row + 1] for k, v in shapes_batch.items()}
        assert together[row] == engine.generate(single, row_settings)[0]
    assert len(together[1][0]) <= 6  # 5 tokens at most after the start token


def test_a_released_request_frees_its_slots_and_the_others_go_on(shapes, shapes_batch):
    engine = DecodeEngine(shapes.model, EngineOptions(slots=4, max_length=64))
    encoded = engine.encode(shapes_batch)
    alone = engine.generate({k: v[:1] for k, v in shapes_batch.items()}, DecodingSettings(40))[0][0]
    kept = engine.admit(encoded, 0, DecodingSettings(40))
    dropped = engine.admit(encoded, 2, DecodingSettings(40, num_beams=3))
    assert engine.free_slots == 0
    with pytest.raises(EngineFull):
        engine.admit(encoded, 1, DecodingSettings(40))
    for _ in range(3):
        engine.step()
    engine.release(dropped)
    assert engine.free_slots == 3
    late = engine.admit(encoded, 3, DecodingSettings(40))  # takes a slot the beams left
    while not (kept.done and late.done):
        engine.step()
    assert kept.results[0] == alone
    assert late.results[0] == engine.generate({k: v[3:4] for k, v in shapes_batch.items()},
                                              DecodingSettings(40))[0][0]
    assert engine.free_slots == 4 and not engine.groups


def test_requests_that_cannot_fit_are_refused_before_taking_a_slot(shapes, shapes_batch):
    engine = DecodeEngine(shapes.model, EngineOptions(slots=4, max_length=32, max_source_length=90))
    encoded = engine.encode(shapes_batch)
    with pytest.raises(ValueError, match="exceeds the engine's slot length 32"):
        engine.admit(encoded, 0, DecodingSettings(33))
    with pytest.raises(ValueError, match="exceed the engine's 4 slots"):
        engine.admit(encoded, 0, DecodingSettings(8, num_beams=5))
    with pytest.raises(ValueError, match="prompt is too long"):
        engine.admit(encoded, 1, DecodingSettings(8))  # 81 visual tokens + the question's > 90
    with pytest.raises(ValueError, match="decoding settings: max_new_tokens"):
        DecodingSettings(0)
    assert engine.free_slots == 4 and not engine.groups


def test_seeded_sampling_repeats_alone_or_in_company(shapes, shapes_batch):
    engine = DecodeEngine(shapes.model, EngineOptions(slots=16, max_length=64))
    one = {k: v[:1] for k, v in shapes_batch.items()}
    sampled = DecodingSettings(30, do_sample=True, temperature=1.5, top_p=0.95, seed=7, num_return_sequences=3)
    first = engine.generate(one, sampled)[0]
    assert engine.generate(one, sampled)[0] == first
    together = engine.generate(shapes_batch, [sampled] + [DecodingSettings(30)] * 7)
    assert together[0] == first  # other requests in the batch do not move its draws
    assert len(first) == 3 and len({tuple(s) for s in first}) > 1  # three different draws
    assert engine.generate(one, sampled.replace(seed=8))[0] != first


def test_an_engine_made_in_inference_mode_serves_plain_calls(shapes, shapes_batch):
    one = {k: v[:1] for k, v in shapes_batch.items()}
    with torch.inference_mode():
        engine = DecodeEngine(shapes.model, EngineOptions(slots=2, max_length=64))
        inside = engine.generate(one, DecodingSettings(20))
    with torch.no_grad():
        assert engine.generate(one, DecodingSettings(20)) == inside


def test_the_engine_reads_the_weights_as_they_are_now():
    """A model trained after its engine was made (in-training evaluation) decodes with its new weights."""
    lion = make_tiny_lion(seed=4)
    batch = lion.processor(*_tiny_inputs())
    engine = DecodeEngine(lion.model, EngineOptions(slots=4, max_length=16))
    settings = DecodingSettings(12)
    before = engine_ids(engine, batch, settings)
    with torch.no_grad():
        lion.model.language_model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(-3)
        lion.model.language_model.decoder.block[1].layer[-1].adapter.router_ratio1.add_(1.0)
    after = engine_ids(engine, batch, settings)
    assert after == reference(lion, batch, settings) and after != before


def _tiny_inputs():
    from PIL import Image

    images = [Image.new("RGB", (40 + 20 * i, 30), (50 * i, 100, 200 - 40 * i)) for i in range(3)]
    return images, ["what is it?", "where is the cup?", "describe it"], ["vqa", "grounding", "caption"], \
        ["red", "cup, table", "sky"]


def test_cache_size_is_stated_and_bounded(shapes):
    engine = DecodeEngine(shapes.model, EngineOptions(slots=8, max_length=64, max_source_length=128))
    language = shapes.config.language
    per_slot = language.num_decoder_layers * language.num_heads * language.d_kv * 2 * (64 + 128) * 4
    assert engine.cache_bytes == 8 * per_slot + 8 * 128 * 4  # keys/values + the encoder padding bias


@pytest.mark.slow  # minutes: run by `python -m pytest -m slow` (.ci/run)
def test_compiled_step_gives_the_eager_tokens(shapes, shapes_batch):
    """One compiled bucket (the step for 4 slots) against the eager step: same token ids. The compile
    time is paid once and reported per shape."""
    eager = DecodeEngine(shapes.model, EngineOptions(slots=4, max_length=16, compile=False))
    compiled = DecodeEngine(shapes.model, EngineOptions(slots=4, max_length=16, compile=True))
    first = {k: v[:4] for k, v in shapes_batch.items()}
    settings = DecodingSettings(16)
    assert engine_ids(compiled, first, settings) == engine_ids(eager, first, settings)
    assert compiled.compile_seconds and all(s > 0 for s in compiled.compile_seconds.values())
    shapes_compiled = set(compiled.compile_seconds)
    engine_ids(compiled, first, settings)
    assert set(compiled.compile_seconds) == shapes_compiled  # paid once, not per request
