"""Tests for lion_mllm.ram (RAM tags) against the official-code goldens in tests/golden/lion-a."""

from __future__ import annotations

import json
import math
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN, RAM_VOCABULARY
from PIL import Image
from safetensors.torch import load_file
from skip_policy import needs_cuda

from lion_mllm.checkpoints.checkpoint_files import read_torch_file
from lion_mllm.checkpoints.downloads import DownloadError, file_digest
from lion_mllm.errors import CheckpointError
from lion_mllm.ram import (
    OFFICIAL_NUM_TAGS,
    LazyRamTagger,
    RamConfig,
    RamTagger,
    RamVocabulary,
    fetch_ram_vocabulary_files,
    installed_swin_layout,
    preprocess_images,
    ram_state_from_official,
    ram_state_to_official,
    split_official_state_dict,
)
from lion_mllm.ram import weights as ram_weights

RAM_CKPT = GOLDEN / "assets" / "ram_swin_tiny_14m.pth"
RAM_DIR = GOLDEN / "assets" / "ram"
TINY_TAGS = RAM_DIR / "data" / "ram_tag_list.txt"
TINY_THRESHOLDS = RAM_DIR / "data" / "ram_tag_list_threshold.txt"
REAL_TAGS = RAM_VOCABULARY / "ram_tag_list.txt"
REAL_THRESHOLDS = RAM_VOCABULARY / "ram_tag_list_threshold.txt"
IMAGE_NAMES = ("a0", "a1", "a2")  # the goldens' batch order (results.json -> ram.batch_generate_tags.images)


def golden_images() -> dict[str, Image.Image]:
    return {name: Image.open(GOLDEN / "images" / f"{name}.png") for name in IMAGE_NAMES}


@pytest.fixture(scope="module")
def ram_results() -> dict:
    return json.loads((GOLDEN / "outputs" / "results.json").read_text(encoding="utf-8"))["ram"]


@pytest.fixture(scope="module")
def tiny_tagger() -> RamTagger:
    return RamTagger.from_official(RAM_CKPT, TINY_TAGS, TINY_THRESHOLDS, RamConfig.from_official_dir(RAM_DIR))


@pytest.fixture(scope="module")
def raw_checkpoint() -> dict[str, torch.Tensor]:
    return read_torch_file(RAM_CKPT)


# ---------------------------------------------------------------------------------------------- golden


def test_pixel_values_match_golden() -> None:
    ref = load_file(GOLDEN / "outputs" / "preprocess.safetensors")["ram_pixel_values.a0"]
    ours = preprocess_images([golden_images()["a0"]])
    assert ours.shape == (1, 3, 384, 384) and ours.dtype == torch.float32
    torch.testing.assert_close(ours[0], ref, atol=1e-6, rtol=0)


def test_golden_logits_and_tags(tiny_tagger: RamTagger, ram_results: dict) -> None:
    ref = load_file(GOLDEN / "outputs" / "ram.safetensors")
    images = golden_images()
    assert ram_results["batch_generate_tags"]["images"] == list(IMAGE_NAMES)
    for name, image in images.items():
        logits = tiny_tagger.logits(tiny_tagger.preprocess([image]))
        torch.testing.assert_close(logits[0], ref[f"{name}.logits"], atol=1e-5, rtol=0)
        assert tiny_tagger.tags_from_logits(logits) == ram_results["per_image"][name]["generate_tags"]
    batch = [images[n] for n in IMAGE_NAMES]
    logits = tiny_tagger.logits(tiny_tagger.preprocess(batch))
    torch.testing.assert_close(logits, ref["batch.logits"], atol=1e-5, rtol=0)
    tags = tiny_tagger.tag(batch)  # the public path: PIL images in, strings out, one forward
    assert tags == ram_results["batch_generate_tags"]["tags"]
    # the authors' raw " | " strings, turned into LION's format, give the same strings
    assert tags == [t.replace(" |", ",") for t in ram_results["raw_generate_tag"]["english"]]
    assert all(t for t in tags)  # a check that can fail: the goldens do fire tags


def test_thresholds_are_the_authors_float32_values(tiny_tagger: RamTagger, ram_results: dict) -> None:
    assert tiny_tagger.class_threshold.dtype == torch.float32
    assert torch.equal(tiny_tagger.class_threshold, torch.tensor(ram_results["class_threshold"]))
    assert len(tiny_tagger.tag_list) == ram_results["tag_list_len"] == tiny_tagger.num_tags


def test_eval_only_and_deterministic(tiny_tagger: RamTagger) -> None:
    tiny_tagger.train()  # what LION.train() would do to a registered submodule
    assert not any(m.training for m in tiny_tagger.modules())
    assert not any(p.requires_grad for p in tiny_tagger.parameters())
    pv = tiny_tagger.preprocess([golden_images()["a1"]])
    first = tiny_tagger.logits(pv)
    assert not first.requires_grad
    assert torch.equal(first, tiny_tagger.logits(pv))


def test_bfloat16_runs_and_returns_float32_logits() -> None:
    tagger = RamTagger.from_official(RAM_CKPT, TINY_TAGS, TINY_THRESHOLDS, dtype=torch.bfloat16)
    assert tagger.image_proj.weight.dtype == torch.bfloat16
    assert tagger.class_threshold.dtype == torch.float32
    ref = load_file(GOLDEN / "outputs" / "ram.safetensors")["batch.logits"]
    images = golden_images()
    logits = tagger.logits(tagger.preprocess([images[n] for n in IMAGE_NAMES]))
    assert logits.dtype == torch.float32
    assert (logits - ref).abs().max() < 0.5  # bf16 rounding, but the same function


@needs_cuda
def test_golden_on_cuda(ram_results: dict) -> None:
    tagger = RamTagger.from_official(RAM_CKPT, TINY_TAGS, TINY_THRESHOLDS, device="cuda")
    images = [golden_images()[n] for n in IMAGE_NAMES]
    logits = tagger.logits(tagger.preprocess(images))
    assert logits.device.type == "cuda"
    ref = load_file(GOLDEN / "outputs" / "ram.safetensors")["batch.logits"]
    torch.testing.assert_close(logits.cpu(), ref, atol=1e-4, rtol=0)
    assert tagger.tag(images) == ram_results["batch_generate_tags"]["tags"]


# ------------------------------------------------------------------------------------------- config


def test_config_from_folder_equals_config_from_shapes(raw_checkpoint, tiny_tagger: RamTagger) -> None:
    from_dir = RamConfig.from_official_dir(RAM_DIR)
    assert from_dir.embed_dim == 12 and from_dir.depths == (1, 2, 2, 2) and from_dir.num_heads == (1, 2, 2, 4)
    assert from_dir.num_tags == 287 and from_dir.hidden_size == 48 and from_dir.vision_width == 96
    assert RamConfig.from_state_dict(raw_checkpoint) == from_dir
    assert tiny_tagger.config == from_dir
    # with config=None the loader infers it; the tagger is the same
    inferred = RamTagger.from_official(RAM_CKPT, TINY_TAGS, TINY_THRESHOLDS)
    assert inferred.config == from_dir


def test_config_folder_brings_its_vocabulary(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _offline(monkeypatch)
    tagger = RamTagger.from_official(RAM_CKPT, config=RAM_DIR)
    assert tagger.tag_list == RamVocabulary.from_files(TINY_TAGS, TINY_THRESHOLDS, verify=False).tags
    assert calls == []


def test_config_dict_round_trip() -> None:
    cfg = RamConfig.swin_large()
    data = json.loads(json.dumps(cfg.to_dict()))
    assert RamConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match="unknown RamConfig keys"):
        RamConfig.from_dict({**data, "hiden_size": 1})


def test_swin_large_preset_shapes_and_inference() -> None:
    cfg = RamConfig.swin_large()
    assert (cfg.embed_dim, cfg.depths, cfg.num_heads, cfg.window_size, cfg.image_size) == (
        192,
        (2, 2, 18, 2),
        (6, 12, 24, 48),
        12,
        384,
    )
    assert cfg.vision_width == 1536 and cfg.num_tags == OFFICIAL_NUM_TAGS
    with torch.device("meta"):  # shapes only, no memory
        model = RamTagger(cfg, ["t"] * cfg.num_tags, [0.5] * cfg.num_tags)
    official = model.official_state_dict()
    expect = {
        "visual_encoder.patch_embed.proj.weight": (192, 3, 4, 4),
        "visual_encoder.layers.2.blocks.17.attn.qkv.weight": (3 * 768, 768),
        "visual_encoder.layers.3.blocks.1.attn.relative_position_bias_table": (529, 48),
        "visual_encoder.layers.2.downsample.reduction.weight": (1536, 3072),
        "visual_encoder.norm.weight": (1536,),
        "image_proj.weight": (512, 1536),
        "label_embed": (4585, 512),
        "wordvec_proj.weight": (768, 512),
        "tagging_head.encoder.layer.1.crossattention.self.key.weight": (768, 512),
        "tagging_head.encoder.layer.1.intermediate.dense.weight": (3072, 768),
        "fc.weight": (1, 768),
    }
    for key, shape in expect.items():
        assert tuple(official[key].shape) == shape, key
    assert "visual_encoder.layers.3.downsample.reduction.weight" not in official
    assert RamConfig.from_state_dict(official) == cfg


# -------------------------------------------------------------------------------------- key mapping


def test_split_skips_unused_weights_by_name(raw_checkpoint) -> None:
    weights, skipped, unexpected = split_official_state_dict(raw_checkpoint)
    assert unexpected == []
    assert set(weights) | set(skipped) == set(raw_checkpoint)
    assert not set(weights) & set(skipped)
    assert all(
        k.startswith(("text_decoder.", "tag_encoder.")) or k.endswith((".attn_mask", ".relative_position_index"))
        for k in skipped
    )
    assert any(k.startswith("text_decoder.") for k in skipped) and any(k.startswith("tag_encoder.") for k in skipped)
    assert any(k.endswith(".attn_mask") for k in skipped)
    assert any(k.startswith("tagging_head.") for k in weights) and "label_embed" in weights


@pytest.mark.parametrize("layout", ["proj", "legacy"])
def test_official_key_mapping_round_trips(raw_checkpoint, layout: str) -> None:
    weights, _, _ = split_official_state_dict(raw_checkpoint)
    ours = ram_state_from_official(weights, swin_layout=layout)
    assert not any(k.startswith("visual_encoder.layers.") for k in ours)  # every Swin key was mapped
    back = ram_state_to_official(ours)
    assert set(back) == set(weights)
    for key, value in weights.items():
        assert torch.equal(back[key], value), key


def test_authors_layout_round_trips_through_our_modules(tiny_tagger: RamTagger, raw_checkpoint) -> None:
    weights, _, _ = split_official_state_dict(raw_checkpoint)
    back = tiny_tagger.official_state_dict()
    assert set(back) == set(weights)
    for key, value in weights.items():
        assert torch.equal(back[key].cpu(), value), key
    # the fused qkv really is split q | k | v along the output dimension
    layout = installed_swin_layout()
    qkv = weights["visual_encoder.layers.1.blocks.1.attn.qkv.weight"]
    c = qkv.shape[0] // 3
    prefix = "visual_encoder.encoder.layers.1.blocks.1."
    q_key, k_key, v_key = ram_weights._BLOCK_QKV[layout]
    sd = tiny_tagger.state_dict()
    assert torch.equal(sd[f"{prefix}{q_key}.weight"], qkv[:c])
    assert torch.equal(sd[f"{prefix}{k_key}.weight"], qkv[c : 2 * c])
    assert torch.equal(sd[f"{prefix}{v_key}.weight"], qkv[2 * c :])


def test_legacy_vision_multi_prefix(tmp_path: Path, raw_checkpoint, tiny_tagger: RamTagger) -> None:
    legacy = {
        ("vision_multi." + k[len("tagging_head.") :] if k.startswith("tagging_head.") else k): v
        for k, v in raw_checkpoint.items()
    }
    path = tmp_path / "legacy.pth"
    torch.save({"model": legacy}, path)
    tagger = RamTagger.from_official(path, TINY_TAGS, TINY_THRESHOLDS)
    assert tagger.load_report is not None and tagger.load_report.renamed_legacy == 32
    pv = tiny_tagger.preprocess([golden_images()["a0"]])
    assert torch.equal(tagger.logits(pv), tiny_tagger.logits(pv))


def test_load_report_lists_skipped_keys(tiny_tagger: RamTagger, raw_checkpoint) -> None:
    report = tiny_tagger.load_report
    assert report is not None and report.checkpoint == RAM_CKPT
    assert report.unexpected == [] and report.renamed_legacy == 0
    assert report.loaded + len(report.skipped) == len(raw_checkpoint)
    assert "text_decoder.bert.embeddings.word_embeddings.weight" in report.skipped


# --------------------------------------------------------------------------------------- thresholds


def test_per_class_thresholds_and_override(tiny_tagger: RamTagger) -> None:
    thr = tiny_tagger.class_threshold
    low = int((thr == torch.tensor(0.65)).nonzero()[0])
    high = int((thr == torch.tensor(0.8)).nonzero()[0])
    logits = torch.full((tiny_tagger.num_tags,), -30.0)
    logits[[low, high]] = math.log(0.7 / 0.3)  # sigmoid = 0.7: above 0.65, below 0.8
    names = tiny_tagger.tag_list
    assert tiny_tagger.tags_from_logits(logits) == [names[low]]
    # the override replaces every class threshold for this call only
    assert tiny_tagger.tags_from_logits(logits, threshold=0.75) == [""]
    both = ", ".join(names[i] for i in sorted([low, high]))  # tag-list index order
    assert tiny_tagger.tags_from_logits(logits[None].repeat(2, 1), threshold=0.6) == [both, both]
    assert tiny_tagger.tags_from_logits(logits) == [names[low]]


def test_threshold_is_strict() -> None:
    tags = ["a", "b"]
    cfg = RamConfig(embed_dim=4, depths=(1,), num_heads=(1,), window_size=2, image_size=16, num_tags=2,
                    hidden_size=8, intermediate_size=8, embed_width=8)  # fmt: skip
    logit = torch.tensor([0.3, 0.3])
    p = float(torch.sigmoid(logit)[0])
    just_below = float(torch.nextafter(torch.tensor(p), torch.tensor(0.0)))  # float32 neighbour
    tagger = RamTagger(cfg, tags, [p, just_below])
    assert tagger.tags_from_logits(logit) == ["b"]  # equal to its threshold: does not fire
    assert tagger.tags_from_logits(logit, threshold=p) == [""]
    # a class threshold of 1.0 (10 real classes have it) can never fire, even for a huge logit
    never = RamTagger(cfg, tags, [1.0, 1.0])
    assert never.tags_from_logits(torch.tensor([100.0, 100.0])) == [""]


# --------------------------------------------------------------------------------------- vocabulary


def test_real_vocabulary_files_verify_and_load() -> None:
    vocab = RamVocabulary.from_files(REAL_TAGS, REAL_THRESHOLDS, verify=True)
    assert len(vocab.tags) == OFFICIAL_NUM_TAGS and len(vocab.thresholds) == OFFICIAL_NUM_TAGS
    assert all(0.0 < t <= 1.0 for t in vocab.thresholds)
    assert sum(t == 1.0 for t in vocab.thresholds) == 10
    # the goldens' 287-line files are every 16th line of the official ones
    tiny = RamVocabulary.from_files(TINY_TAGS, TINY_THRESHOLDS, verify=False)
    assert tiny.tags == vocab.tags[::16] and tiny.thresholds == vocab.thresholds[::16]


def test_corrupted_vocabulary_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "ram_tag_list.txt"
    bad.write_bytes(REAL_TAGS.read_bytes().replace(b"zombie", b"zomb1e"))
    with pytest.raises(CheckpointError) as excinfo:
        RamVocabulary.from_files(bad, REAL_THRESHOLDS)
    msg = str(excinfo.value)
    assert str(bad) in msg and "204f1d83085e9cf76333e70c5af83b3e" in msg and file_digest(bad) in msg
    bad_thr = tmp_path / "ram_tag_list_threshold.txt"
    bad_thr.write_bytes(REAL_THRESHOLDS.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="46a53b3d3bce330871412aa627ae4b1c"):
        RamVocabulary.from_files(REAL_TAGS, bad_thr)


def test_tiny_vocabulary_is_refused_when_verification_is_forced() -> None:
    with pytest.raises(CheckpointError, match="md5"):
        RamTagger.from_official(RAM_CKPT, TINY_TAGS, TINY_THRESHOLDS, verify_tag_files=True)


def _offline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def no_network(request, *args, **kwargs):
        calls.append(getattr(request, "full_url", str(request)))
        raise urllib.error.URLError("tests must not touch the network")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    return calls


def test_vocabulary_fetch_reuses_verified_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _offline(monkeypatch)
    monkeypatch.setenv("LION_MLLM_CACHE", str(tmp_path))
    (tmp_path / "ram").mkdir()
    shutil.copy(REAL_TAGS, tmp_path / "ram" / "ram_tag_list.txt")
    shutil.copy(REAL_THRESHOLDS, tmp_path / "ram" / "ram_tag_list_threshold.txt")
    tags, thresholds = fetch_ram_vocabulary_files()
    assert (tags, thresholds) == (
        tmp_path / "ram" / "ram_tag_list.txt",
        tmp_path / "ram" / "ram_tag_list_threshold.txt",
    )
    assert len(RamVocabulary.official()) == OFFICIAL_NUM_TAGS
    assert calls == []
    # no tag files given -> the cached official vocabulary is used, and must fit the checkpoint
    with pytest.raises(CheckpointError, match="4585 tags but the checkpoint has 287"):
        RamTagger.from_official(RAM_CKPT)
    assert calls == []


def test_corrupt_cached_vocabulary_triggers_a_new_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _offline(monkeypatch)
    monkeypatch.setenv("LION_MLLM_CACHE", str(tmp_path))
    (tmp_path / "ram").mkdir()
    (tmp_path / "ram" / "ram_tag_list.txt").write_text("not the list\n")
    with pytest.raises(DownloadError, match="ram_tag_list.txt"):
        fetch_ram_vocabulary_files()
    assert calls and calls[0].startswith("https://raw.githubusercontent.com/xinyu1205/recognize-anything/")
    assert not (tmp_path / "ram" / "ram_tag_list.txt").exists()  # the bad copy is not kept


# ------------------------------------------------------------------------------------------- errors


def test_truncated_checkpoint_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ram_swin_large_14m.pth"
    data = RAM_CKPT.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="ram_swin_large_14m.pth.*truncated"):
        RamTagger.from_official(path, TINY_TAGS, TINY_THRESHOLDS)
    path.write_bytes(b"definitely not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=str(path)):
        RamTagger.from_official(path, TINY_TAGS, TINY_THRESHOLDS)


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nowhere.pth: no such file"):
        RamTagger.from_official(tmp_path / "nowhere.pth", TINY_TAGS, TINY_THRESHOLDS)


@pytest.mark.parametrize(
    "key",
    [
        "visual_encoder.layers.1.blocks.0.attn.qkv.weight",
        "visual_encoder.layers.0.downsample.norm.bias",
        "tagging_head.encoder.layer.1.crossattention.self.value.bias",
        "fc.bias",
    ],
)
def test_missing_tagger_key_is_named(tmp_path: Path, raw_checkpoint, key: str) -> None:
    path = tmp_path / "incomplete.pth"
    torch.save({"model": {k: v for k, v in raw_checkpoint.items() if k != key}}, path)
    with pytest.raises(CheckpointError) as excinfo:
        RamTagger.from_official(path, TINY_TAGS, TINY_THRESHOLDS, RamConfig.from_official_dir(RAM_DIR))
    assert key in str(excinfo.value) and str(path) in str(excinfo.value)


def test_shape_mismatch_is_named(tmp_path: Path, raw_checkpoint) -> None:
    path = tmp_path / "wrong.pth"
    torch.save({"model": raw_checkpoint}, path)
    cfg = RamConfig.from_official_dir(RAM_DIR)
    cfg.intermediate_size = 64
    with pytest.raises(CheckpointError, match="intermediate.dense.weight"):
        RamTagger.from_official(path, TINY_TAGS, TINY_THRESHOLDS, cfg)


# ------------------------------------------------------------------------------------------ laziness


def test_lazy_tagger_reads_weights_only_on_first_tags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ram_results
) -> None:
    path = tmp_path / "later.pth"  # does not exist yet: constructing must not touch it
    lazy = LazyRamTagger(path, TINY_TAGS, TINY_THRESHOLDS)
    assert not lazy.is_loaded
    shutil.copy(RAM_CKPT, path)

    real_load = torch.load
    loads: list[str] = []

    def counting_load(f, *args, **kwargs):
        loads.append(str(f))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    assert lazy.tag([]) == [] and loads == []  # no image, no weights
    image = golden_images()["a2"]
    assert lazy.tag([image]) == ram_results["per_image"]["a2"]["generate_tags"]
    assert lazy.is_loaded and loads == [str(path)]
    lazy.tag([image, image])
    assert loads == [str(path)]  # loaded once


def test_preprocess_converts_modes_and_sizes() -> None:
    gray = Image.new("L", (50, 70), color=128)
    rgba = Image.new("RGBA", (10, 10), color=(255, 0, 0, 0))
    pv = preprocess_images([gray, rgba], image_size=32)
    assert pv.shape == (2, 3, 32, 32)
    expected_gray = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(pv[0, :, 5, 5], expected_gray)
    assert preprocess_images([]).shape == (0, 3, 384, 384)
