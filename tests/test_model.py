"""Behaviour of the model on tiny random configurations: routing, decoding, attention, formats, errors."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import ASSETS, GOLDEN, golden_paths, make_tiny_lion
from PIL import Image

from lion_mllm import CheckpointError, ImageLoadError, Lion, LionConfig, LionModel, load_model
from lion_mllm.checkpoints.checkpoint_files import read_torch_file
from lion_mllm.checkpoints.official import official_to_ours, ours_to_official
from lion_mllm.lion import resolve_dtype
from lion_mllm.model.config import PRESETS, AggregatorConfig, flant5xl, flant5xxl, tiny


def images(n: int = 3) -> list[Image.Image]:
    colours = [(200, 30, 30), (20, 160, 60), (40, 40, 220), (240, 200, 10)]
    out = []
    for i in range(n):
        img = Image.new("RGB", (64 + 16 * i, 48), colours[i % 4])
        img.paste((255, 255, 255), (4 * i, 8, 20 + 4 * i, 30))
        out.append(img)
    return out


QUESTIONS = ["what colour is the square?", "In the image <image>, can you locate the square?", "describe it"]
TAGS = ["red, square", "green, square", "blue"]


def test_mixed_batch_equals_per_route_results(tiny_lion):
    """One batch mixing region- and image-level samples = each route run on its own."""
    tasks = ["vqa", "grounding", "caption"]
    mixed = tiny_lion.processor(images(), QUESTIONS, tasks, TAGS, answers=["red", "[0.1,0.2,0.3,0.4]", "x"])
    with torch.no_grad():
        mixed_logits = tiny_lion.model(**mixed).logits
        for i, task in enumerate(tasks):
            single = tiny_lion.processor(images()[i:i + 1], QUESTIONS[i:i + 1], [task], TAGS[i:i + 1],
                                         answers=[["red", "[0.1,0.2,0.3,0.4]", "x"][i]])
            logits = tiny_lion.model(**single).logits
            length = logits.shape[1]
            torch.testing.assert_close(mixed_logits[i, :length], logits[0], atol=1e-5, rtol=1e-5)
    # the routes really differ: the same sample through the other route gives other logits
    swapped = dict(mixed, route_ids=1 - mixed["route_ids"])
    with torch.no_grad():
        assert (tiny_lion.model(**swapped).logits - mixed_logits).abs().max() > 1e-3
    for beams in (1, 3):
        together = tiny_lion.generate(images(), QUESTIONS, tasks, TAGS, num_beams=beams, max_new_tokens=8)
        alone = [tiny_lion.generate(images()[i:i + 1], QUESTIONS[i:i + 1], tasks[i], TAGS[i:i + 1],
                                    num_beams=beams, max_new_tokens=8)[0] for i in range(3)]
        assert together == alone


@pytest.mark.parametrize("beams", [1, 4])
def test_cached_and_uncached_generation_give_identical_tokens(tiny_lion, beams):
    batch = tiny_lion.processor(images(), QUESTIONS, ["vqa", "grounding", "caption"], TAGS)
    kwargs = dict(num_beams=beams, max_new_tokens=12, repetition_penalty=1.5)
    cached = tiny_lion.model.generate(**batch, use_cache=True, **kwargs)
    uncached = tiny_lion.model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_sdpa_and_eager_attention_agree():
    sdpa, eager = make_tiny_lion(seed=3), make_tiny_lion(seed=3, attn_implementation="eager")
    assert eager.model.aggregator.blocks[0].attention.self.eager
    eager.model.load_state_dict(sdpa.model.state_dict())
    batch = sdpa.processor(images(), QUESTIONS, ["vqa", "grounding", "caption"], TAGS, answers=["a", "b", "c"])
    with torch.no_grad():
        a, b = sdpa.model(**batch).logits, eager.model(**batch).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_soft_prompt_replaces_the_extra_id_embedding(tiny_lion):
    model = tiny_lion.model
    ids = torch.tensor([[5, 1099, 7, 1]])
    embeds = model.embed_prompt(ids)
    torch.testing.assert_close(embeds[0, 1], model.tag_prompt_embedding)
    torch.testing.assert_close(embeds[0, 0], model.language_model.shared.weight[5])


def test_key_mapping_round_trips_the_authors_names():
    official = read_torch_file(GOLDEN / "assets" / "LION-FlanT5-tiny.pth")
    ours, unknown = official_to_ours(official)
    assert unknown == []
    back = ours_to_official(ours)
    # the Q-Former position ids are a recomputed buffer, not a weight: the only key not carried
    assert set(official) - set(back) == {"Qformer.bert.embeddings.position_ids"}
    assert all(torch.equal(back[k], official[k]) for k in back)
    vit = {"visual_encoder." + k: v for k, v in read_torch_file(GOLDEN / "assets" / "eva_vit_g_tiny.pth").items()}
    vit_back = ours_to_official(official_to_ours(vit)[0])
    assert vit_back.keys() == vit.keys() and all(torch.equal(vit_back[k], vit[k]) for k in vit)
    # and our whole model's state dict goes out to the authors' names and back unchanged
    model = make_tiny_lion().model
    state = {k: v for k, v in model.state_dict().items() if "embed_tokens" not in k}
    again, unknown = official_to_ours(ours_to_official(state))
    assert unknown == [] and again.keys() == state.keys()
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_presets_have_the_authors_parameter_counts():
    """Spec section 1.8, counted on the meta device (no memory)."""
    expected = {
        flant5xl: {"vision": 985_894_528, "t5": 2_849_757_184, "trainable": 281_570_400},
        flant5xxl: {"vision": 985_894_528, "t5": 11_135_332_352, "trainable": 320_439_392},
    }
    for preset, counts in expected.items():
        with torch.device("meta"):
            model = LionModel(preset())
        params = dict(model.named_parameters())  # tied parameters are listed once
        vision = sum(p.numel() for n, p in params.items() if n.startswith("vision_model."))
        # our fused qkv bias carries EVA's zero key bias as real entries: 39 blocks x 1408
        assert vision - 39 * 1408 == counts["vision"]
        t5 = sum(p.numel() for n, p in params.items() if n.startswith("language_model.") and ".adapter." not in n)
        assert t5 == counts["t5"]
        trainable = sum(p.numel() for n, p in params.items()
                        if not n.startswith("vision_model.") and (not n.startswith("language_model.")
                                                                  or ".adapter." in n))
        assert trainable == counts["trainable"]


def test_config_json_round_trip(tmp_path):
    for name, preset in PRESETS.items():
        config = preset(visual_input="qformer", enable_semantic_tags=False)
        config.to_json(tmp_path / f"{name}.json")
        assert LionConfig.from_json(tmp_path / f"{name}.json") == config
    assert flant5xl().aggregator.cross_layers == (28, 18) and flant5xl().aggregator.hidden_layer == 38
    with pytest.raises(ValueError, match="visual_input"):
        LionConfig(visual_input="both")
    with pytest.raises(ValueError, match="taps"):
        LionConfig(vision=tiny().vision, aggregator=AggregatorConfig(hidden_layer=9, cross_layers=(2, 1)))


def test_bundle_save_and_reload(tmp_path, tiny_lion):
    directory = tiny_lion.save_pretrained(tmp_path / "bundle")
    files = sorted(p.name for p in directory.iterdir())
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pth", ".pt", ".pkl")) for f in files)
    again = Lion.from_pretrained(f"local-dir:{directory}")
    for (name, a), (_, b) in zip(tiny_lion.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert again.model.language_model.encoder.embed_tokens.weight is again.model.language_model.shared.weight
    args = (images(2), QUESTIONS[:2], ["vqa", "grounding"], TAGS[:2])
    assert again.generate(*args, max_new_tokens=6) == tiny_lion.generate(*args, max_new_tokens=6)


def test_bundle_stored_in_float16_is_half_the_size_and_loads_as_float32(tmp_path, tiny_lion):
    full = tiny_lion.save_pretrained(tmp_path / "fp32")
    half = tiny_lion.save_pretrained(tmp_path / "fp16", dtype="float16")
    size = {d: sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in (full, half)}
    assert size[half] < 0.55 * size[full]
    again = Lion.from_pretrained(half)
    assert again.model.dtype == torch.float32
    for (name, a), (_, b) in zip(tiny_lion.model.state_dict().items(), again.model.state_dict().items()):
        expected = a.to(torch.float16).to(a.dtype) if a.is_floating_point() else a
        assert torch.equal(b, expected), name


def test_tags_come_from_the_tagger_once_per_batch():
    lion = make_tiny_lion()

    class CountingTagger:
        calls: list[int] = []

        def tag(self, pil_images):
            self.calls.append(len(pil_images))
            return [f"tag{i}, shape" for i in range(len(pil_images))]

    lion.tagger = CountingTagger()
    prompts = []
    original = lion.processor.build_prompt
    lion.processor.build_prompt = lambda q, t, nb=False: prompts.append(original(q, t, nb)) or prompts[-1]
    lion.generate(images(3), QUESTIONS, "vqa", [None, "given", None], num_beams=1, max_new_tokens=3)
    assert CountingTagger.calls == [2]
    assert "[tag0, shape]" in prompts[0] and "[given]" in prompts[1] and "[tag1, shape]" in prompts[2]
    lion.tagger = None
    with pytest.raises(ValueError, match="tagger"):
        lion.generate(images(1), QUESTIONS[:1], "vqa", num_beams=1, max_new_tokens=3)


def test_ground_returns_boxes_in_pixels(tiny_lion, monkeypatch):
    monkeypatch.setattr(tiny_lion, "generate", lambda *a, **k: ["Answer: [0.250,0.100,0.750,0.500]"])
    result = tiny_lion.ground(Image.new("RGB", (200, 100)), "the square", tags=None)
    assert result.box_pixels == pytest.approx((50.0, 10.0, 150.0, 50.0))


def test_official_yaml_is_read_as_it_is(tmp_path):
    paths = golden_paths()
    text = yaml.safe_dump({"model": {
        "arch": "lion_t5", "model_type": "flant5xl", "load_pretrained": True,
        "bert_model": str(paths.bert_model), "vit_model": str(paths.vit_model), "llm_model": str(paths.llm_model),
        "pretrained": str(paths.pretrained), "visual_input": "ALL", "enable_semantic_tags": True,
        "vit_num_heads": 2}})
    (tmp_path / "lion_flant5xl.yaml").write_text(text)
    lion = load_model(str(tmp_path / "lion_flant5xl.yaml"))
    assert lion.config.visual_input == "all" and lion.config.enable_semantic_tags
    bad = text.replace(str(paths.vit_model), "/path/to/eva_vit_g.pth")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(CheckpointError, match=r"bad.yaml: model.vit_model: /path/to/eva_vit_g.pth does not exist"):
        load_model(str(tmp_path / "bad.yaml"))
    with pytest.raises(CheckpointError, match="no such config file"):
        load_model(str(tmp_path / "missing.yaml"))


def test_truncated_checkpoint_is_named(tmp_path):
    data = (ASSETS / "LION-FlanT5-tiny.pth").read_bytes()
    (tmp_path / "LION.pth").write_bytes(data[: len(data) // 2])
    paths = golden_paths()
    paths.pretrained = tmp_path / "LION.pth"
    with pytest.raises(CheckpointError, match=r"LION.pth: not a readable PyTorch checkpoint"):
        Lion.from_official(paths, vision_num_heads=2)


def test_checkpoint_of_another_architecture_is_refused():
    paths = golden_paths()
    paths.pretrained = ASSETS / "ram_swin_tiny_14m.pth"  # RAM's file given as LION's
    with pytest.raises(CheckpointError, match="ram_swin_tiny_14m.pth: .* another architecture"):
        Lion.from_official(paths, vision_num_heads=2)
    paths = golden_paths()
    paths.vit_model = ASSETS / "LION-FlanT5-tiny.pth"
    with pytest.raises(CheckpointError, match="LION-FlanT5-tiny.pth"):
        Lion.from_official(paths, vision_num_heads=2)


def test_lion_checkpoint_without_qformer_names_the_file(tmp_path):
    state = read_torch_file(ASSETS / "LION-FlanT5-tiny.pth")
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("Qformer.")}}, tmp_path / "noq.pth")
    paths = golden_paths()
    paths.pretrained = tmp_path / "noq.pth"
    with pytest.raises(CheckpointError, match=r"noq.pth: \d+ keys missing, e.g. \['qformer\."):
        Lion.from_official(paths, vision_num_heads=2)


def test_pickled_code_is_never_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"model": {"x": Evil()}}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth"):
        read_torch_file(tmp_path / "evil.pth")


def test_not_an_image_is_named(tmp_path, tiny_lion):
    (tmp_path / "notes.jpg").write_text("hello")
    with pytest.raises(ImageLoadError, match="notes.jpg.*not .*image"):  # the reason's wording is the loader's
        tiny_lion.caption(tmp_path / "notes.jpg", tags="a")
    with pytest.raises(ImageLoadError, match="no such file"):
        tiny_lion.caption(tmp_path / "absent.png", tags="a")


def test_dtypes():
    assert resolve_dtype(torch.device("cpu"), None) == torch.float32
    assert resolve_dtype(torch.device("cuda"), None) == torch.bfloat16
    with pytest.raises(ValueError, match="float16 is refused"):
        resolve_dtype(torch.device("cuda"), "fp16")


def test_flops_accounting_matches_a_measured_count():
    """The model's own FLOP formula agrees with torch's FLOP counter on the same forward pass (eager
    attention: the counter does not see CPU SDPA kernels)."""
    from torch.utils.flop_counter import FlopCounterMode

    lion = make_tiny_lion(attn_implementation="eager")
    batch = lion.processor(images(1), ["what colour is the square here?"], ["vqa"], ["red"])
    text_tokens = batch["qformer_input_ids"].shape[1]
    flops = lion.model.flops_per_image(prompt_tokens=batch["input_ids"].shape[1], text_tokens=text_tokens)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        lion.model.encode_images(batch["pixel_values"], batch["qformer_input_ids"], batch["qformer_attention_mask"])
    measured = counter.get_total_flops()
    predicted = flops["vision"] + flops["qformer"] + flops["aggregator"]
    assert predicted == pytest.approx(measured, rel=1e-3)


def test_t5_flops_accounting_matches_a_measured_count():
    """The T5 formulas behind the published bounds: the encoder over [visual tokens; prompt], the cross-
    attention keys/values computed once per image, and one cached decoder step."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers.modeling_outputs import BaseModelOutput

    model = make_tiny_lion(attn_implementation="eager").model
    language, prompt_tokens = model.config.language, 21
    flops = model.flops_per_image(prompt_tokens=prompt_tokens)
    encoder_inputs = torch.randn(1, model.config.num_visual_tokens + prompt_tokens, language.d_model)
    lm = model.language_model
    with model.routing(torch.tensor([1])), torch.no_grad():
        with FlopCounterMode(display=False) as encoder_count:
            encoded = BaseModelOutput(last_hidden_state=lm.encoder(inputs_embeds=encoder_inputs).last_hidden_state)
        with FlopCounterMode(display=False) as first_count:  # the first step also projects the encoder output
            first = lm(encoder_outputs=encoded, decoder_input_ids=torch.tensor([[0]]), use_cache=True)
        with FlopCounterMode(display=False) as step_count:  # position 1: self-attention over 2 positions
            lm(encoder_outputs=encoded, decoder_input_ids=torch.tensor([[5]]), cache=first.past_key_values,
               use_cache=True)
    prefix_scores = 4.0 * 2 * language.num_heads * language.d_kv * language.num_decoder_layers
    assert encoder_count.get_total_flops() == flops["t5_encoder"]
    assert step_count.get_total_flops() == flops["t5_decoder_per_token"] + prefix_scores
    first_prefix = 4.0 * 1 * language.num_heads * language.d_kv * language.num_decoder_layers
    assert first_count.get_total_flops() == flops["t5_cross_kv"] + flops["t5_decoder_per_token"] + first_prefix


def test_ram_tagger_fills_the_prompt_with_the_authors_tags(golden_results):
    """RAM (the golden stand-in, read lazily) tags an image LION was given no tags for."""
    from lion_mllm.ram import LazyRamTagger

    lion = make_tiny_lion()
    lion.tagger = LazyRamTagger(ASSETS / "ram_swin_tiny_14m.pth", config=ASSETS / "ram")
    image = Image.open(GOLDEN / "images" / "a0.png").convert("RGB")
    prompts = []
    original = lion.processor.build_prompt
    lion.processor.build_prompt = lambda q, t, nb=False: prompts.append(original(q, t, nb)) or prompts[-1]
    lion.generate([image], ["describe"], "caption", num_beams=1, max_new_tokens=2)
    expected = golden_results["ram"]["per_image"]["a0"]["generate_tags"][0]
    assert prompts == [lion.config.tag_prompt.format(expected) + "describe"]
