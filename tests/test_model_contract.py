"""A model is one complete thing: a bundle carries its tagger, decoding defaults and prompts, and every
command takes it the same way (issue #14).

* A bundle converted from the goldens' authors'-format files *with* RAM answers `lion tag`, `lion caption`,
  `lion eval` and `lion serve` with no extra flag, exactly as the YAML-loaded model does.
* `lion-shapes` answers with no decoding flags (CLI and API) exactly as its model card's evaluation decodes it.
* Every way a checkpoint, bundle or config can be wrong is one error type naming the file.
* `lion --help`, usage errors and bad paths answer without importing torch.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ASSETS, GOLDEN, REPO
from PIL import Image

from lion_mllm import CheckpointError, GenerationDefaults, load_model, shapes
from lion_mllm.checkpoints.official import OfficialPaths
from lion_mllm.cli import main
from lion_mllm.ram import LazyRamTagger, RamConfig, RamTagger

IMAGES = [GOLDEN / "images" / f"a{i}.png" for i in range(3)]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def write_golden_yaml(path: Path, **extra: object) -> Path:
    """The goldens' five files (and RAM) in the authors' YAML layout, plus lion-mllm's documented keys."""
    model = {"arch": "lion_t5", "model_type": "flant5xl", "bert_model": str(ASSETS / "bert-tiny-uncased"),
             "vit_model": str(ASSETS / "eva_vit_g_tiny.pth"), "llm_model": str(ASSETS / "flan-t5-tiny"),
             "ram_model": str(ASSETS / "ram_swin_tiny_14m.pth"), "ram_config": str(ASSETS / "ram"),
             "load_pretrained": True, "pretrained": str(ASSETS / "LION-FlanT5-tiny.pth"), "visual_input": "ALL",
             "enable_semantic_tags": True,
             "vit_num_heads": 2}  # the tiny ViT's width (32) says nothing about its heads
    model.update(extra)
    path.write_text(yaml.safe_dump({"model": model}, sort_keys=False))
    return path


def _run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contract")
    config = write_golden_yaml(root / "lion_tiny.yaml")
    out = root / "bundle"
    assert main(["convert", "--config", str(config), "--out", str(out), "-q"]) == 0
    return {"root": root, "yaml": config, "bundle": out}


@pytest.fixture(scope="module")
def from_yaml(converted: dict[str, Path]):
    return load_model(str(converted["yaml"]))


# ---------------------------------------------------------------------------------------- the bundle


def test_convert_writes_the_whole_model(converted: dict[str, Path]) -> None:
    bundle = converted["bundle"]
    config = json.loads((bundle / "config.json").read_text())
    assert config["model_type"] == "lion" and config["format_version"] == 2
    tagger = json.loads((bundle / "tagger.json").read_text())
    assert tagger["type"] == "ram" and RamConfig.from_dict(tagger["config"]) == RamConfig.from_official_dir(ASSETS / "ram")
    for name in ("ram.safetensors", "ram_tag_list.txt", "ram_tag_list_threshold.txt", "generation_config.json",
                 "tokenizer/tokenizer_config.json", "qformer_tokenizer/tokenizer_config.json"):
        assert (bundle / name).is_file(), name
    assert GenerationDefaults.load(bundle) == GenerationDefaults()  # the authors' defaults, recorded
    # Weights are shared like any other file: not the 0600 safetensors writes on its own.
    umask = os.umask(0)
    os.umask(umask)
    for weights in [*bundle.glob("model-*.safetensors"), bundle / "ram.safetensors"]:
        assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~umask, weights


def test_bundle_equals_the_yaml_model(converted: dict[str, Path], from_yaml) -> None:
    bundled = load_model(str(converted["bundle"]))
    assert isinstance(bundled.tagger, LazyRamTagger) and not bundled.tagger.is_loaded  # read when needed
    assert bundled.config == from_yaml.config
    ours, theirs = bundled.model.state_dict(), from_yaml.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    images = [Image.open(p) for p in IMAGES]
    tags = bundled.tag(images)
    assert tags == from_yaml.tag(images) and any(tags)
    # The RAM in the bundle is the one the YAML names, with the config the YAML gives.
    direct = RamTagger.from_official(ASSETS / "ram_swin_tiny_14m.pth", config=ASSETS / "ram")
    assert bundled.tagger.load().config == direct.config and tags == direct.tag(images)


def test_cli_tag_and_caption_on_the_bundle_need_no_flag(converted: dict[str, Path], from_yaml,
                                                        capsys: pytest.CaptureFixture) -> None:
    image = str(IMAGES[0])
    code, out, _ = _run(capsys, "tag", image, "--model", str(converted["bundle"]), "--json", "-q")
    assert code == 0
    expected_tags = from_yaml.tag([image])[0]
    assert json.loads(out)["tags"] == [t.strip() for t in expected_tags.split(",") if t.strip()]
    code, out, _ = _run(capsys, "caption", image, "--model", str(converted["bundle"]), "-q")
    assert code == 0
    # RAM tags the image and the authors' decoding (5 beams, repetition penalty 1.5) applies, as for the YAML.
    assert out == from_yaml.caption(image) + "\n"


def test_cli_eval_on_the_bundle_equals_the_yaml(converted: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "images"
    root.mkdir()
    for i, path in enumerate(IMAGES[:2]):
        shutil.copy(path, root / f"COCO_val2014_{i + 1:012d}.jpg")
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 1, "question": "What is in the image?", "question_id": 10},
        {"image_id": 2, "question": "How many things are there?", "question_id": 20}]}
    annotations = {"data_subtype": "val2014", "annotations": [
        {"question_id": q, "image_id": i, "answer_type": "other", "question_type": "what",
         "multiple_choice_answer": "x", "answers": [{"answer": "x", "answer_confidence": "yes", "answer_id": 1}]}
        for q, i in ((10, 1), (20, 2))]}
    qp, ap = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", tmp_path / "v2_mscoco_val2014_annotations.json"
    qp.write_text(json.dumps(questions))
    ap.write_text(json.dumps(annotations))
    answers = {}
    for name in ("bundle", "yaml"):
        out = tmp_path / f"out-{name}"
        code, _, err = _run(capsys, "eval", "--task", "vqav2", "--ann", str(qp), str(ap), "--images", str(root),
                            "--model", str(converted[name]), "--device", "cpu", "--out", str(out))
        assert code == 0, err
        (predictions,) = out.glob("*.predictions.jsonl")
        answers[name] = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(answers["bundle"]) == 2 and answers["bundle"] == answers["yaml"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_url(path: Path) -> str:
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_cli_serve_on_the_bundle_equals_the_yaml(converted: dict[str, Path], from_yaml) -> None:
    import httpx

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "LION_MODEL": ""}
    process = subprocess.Popen([sys.executable, "-m", "lion_mllm.cli", "serve", "--model", str(converted["bundle"]),
                                "--port", str(port), "--no-ui", "--log-level", "warning"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "lion serve did not come up"
            time.sleep(0.2)
        question = "What is in the image?"
        reply = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "lion", "task": "vqa", "messages": [{"role": "user", "content": [
                {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": _data_url(IMAGES[1])}}]}]})
        assert reply.status_code == 200, reply.text
        # no tags sent: the bundle's RAM tags the image, as RAM from the YAML does
        assert reply.json()["choices"][0]["message"]["content"] == from_yaml.ask(IMAGES[1], question)
        tags = httpx.post(url + "/v1/tags", timeout=60, json={"image": _data_url(IMAGES[1])})
        if tags.status_code == 200:  # the route's body layout belongs to the server; the tags are the model's
            assert from_yaml.tag([IMAGES[1]])[0] in json.dumps(tags.json())
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---------------------------------------------------------------------------------------- lion-shapes


@pytest.fixture(scope="module")
def shapes_lion():
    torch.set_flush_denormal(True)
    return load_model("lion-shapes")


def test_lion_shapes_carries_its_decoding_and_template(shapes_lion) -> None:
    config = shapes_lion.generation_config
    assert config.for_task("vqa") == {"num_beams": 1, "max_new_tokens": 40, "min_length": 1,
                                      "repetition_penalty": 1.0, "length_penalty": 1.0, "do_sample": False,
                                      "temperature": 1.0, "top_p": 0.9}
    assert config.prompts == shapes.PROMPTS  # asked in the words its training samples were written in
    assert config.prompt("vqa", "How many circles are there?") == "Question: How many circles are there? Short answer:"
    assert config.prompt("grounding", "the red circle") == ("In the image <image>, can you locate the red circle "
                                                             "and let me know its coordinates?")


def test_lion_shapes_api_and_cli_answer_as_the_model_card_evaluation(shapes_lion, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    count = 6
    # The model card's scores come from shapes.score_pipeline: Lion.generate with the card's greedy settings
    # and templates spelled out. With no decoding argument and the question as typed, ours must be the same.
    card = shapes.score_pipeline(shapes_lion, count=count, batch_size=1, return_outputs=True)
    items, outputs = card["items"], card["outputs"]
    for i, item in enumerate(items):
        assert shapes_lion.ask(item["image"], item["question"]) == outputs["vqa"][i]
        assert shapes_lion.caption(item["image"]) == outputs["caption"][i]
        assert shapes_lion.ground(item["image"], item["phrase"]).text == outputs["rec"][i]
    # The authors' decoding (the old default for every model) answers differently on some of them.
    authors = GenerationDefaults().for_task("vqa")
    changed = sum(shapes_lion.caption(item["image"], **authors) != outputs["caption"][i] for i, item in enumerate(items))
    assert changed >= 1
    # The command line: no decoding flag, the question as typed.
    item = items[0]
    path = tmp_path / "scene.png"
    item["image"].save(path)
    code, out, _ = _run(capsys, "ask", str(path), item["question"], "-q", "--device", "cpu")
    assert code == 0 and out.strip() == shapes_lion.ask(item["image"], item["question"])
    code, out, _ = _run(capsys, "tag", str(path), "-q")  # the default model's built-in tagger
    assert code == 0 and out.strip() == shapes.scene_tags(item["scene"])


def test_explicit_decoding_overrides_the_model_defaults(shapes_lion) -> None:
    image = shapes.render(shapes.make_scene(shapes.HELD_OUT_SEED_BASE + 3, 3))
    long = shapes_lion.caption(image)
    cut = shapes_lion.caption(image, max_new_tokens=2)
    assert len(shapes_lion.processor.tokenizer(cut).input_ids) <= 3 < len(shapes_lion.processor.tokenizer(long).input_ids)


# ---------------------------------------------------------------------------------------- generation config


def test_generation_config_validates_and_round_trips(tmp_path: Path) -> None:
    config = GenerationDefaults(num_beams=3, prompts={"vqa": "Q: {question} A:"},
                                task_decoding={"caption": {"max_new_tokens": 12}})
    assert config.for_task("ask")["num_beams"] == 3 and config.for_task("caption")["max_new_tokens"] == 12
    assert config.for_tasks(["vqa", "caption"]) == config.decoding_fields()  # disagreeing tasks: model-wide
    assert config.prompt("vqa", "why?") == "Q: why? A:"
    config.save(tmp_path)
    assert GenerationDefaults.load(tmp_path) == config
    for bad, message in (({"prompts": {"vqa": "no placeholder"}}, "lacks {question}"),
                         ({"prompts": {"grounding": "{expr}"}}, "not a valid template"),
                         ({"num_beams": 0}, "num_beams must be"),
                         ({"task_decoding": {"ocr": {}}}, "unknown task 'ocr'"),
                         ({"beams": 2}, "unknown generation settings")):
        with pytest.raises(CheckpointError, match=message):
            GenerationDefaults.from_dict(bad, tmp_path / "generation_config.json")


def test_yaml_generation_and_ram_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ram = {**RamConfig.from_official_dir(ASSETS / "ram").to_dict(), "num_attention_heads": 2}
    config = write_golden_yaml(tmp_path / "m.yaml", ram_config=ram,
                               ram_tag_list=str(ASSETS / "ram" / "data" / "ram_tag_list.txt"),
                               ram_tag_list_threshold=str(ASSETS / "ram" / "data" / "ram_tag_list_threshold.txt"),
                               generation={"num_beams": 1, "prompts": {"vqa": "Question: {question} Answer:"}})
    paths = OfficialPaths.from_yaml(config)
    assert paths.extra["generation"].num_beams == 1
    assert paths.ram_tagger_options()["config"].num_attention_heads == 2  # no longer guessed from shapes
    lion = load_model(str(config))
    assert lion.generation_config.prompt("vqa", "what?") == "Question: what? Answer:"
    assert lion.tagger.load().config.num_attention_heads == 2
    guessed = RamTagger.from_official(ASSETS / "ram_swin_tiny_14m.pth", tag_list=ASSETS / "ram" / "data" /
                                      "ram_tag_list.txt", thresholds=ASSETS / "ram" / "data" / "ram_tag_list_threshold.txt")
    assert guessed.config.num_attention_heads == 4
    # ... and says it guessed, since this is not the standard ram_swin_large_14m
    assert "inferred from tensor shapes with 4 tagging-head attention heads" in caplog.text


# ---------------------------------------------------------------------------------------- one error type


def _copy_bundle(converted: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(converted["bundle"], tmp_path / "bundle"))


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("damage, names, message", [
    (lambda b: _edit_json(b / "config.json", lambda d: d["language"].update(d_model=48)), "model-00001",
     "has shape"),
    (lambda b: _edit_json(b / "config.json", lambda d: d.update(colour="red")), "config.json", "colour"),
    (lambda b: _edit_json(b / "config.json", lambda d: d.update(vision=3)), "config.json", "schema"),
    (lambda b: (b / "config.json").write_text("{not json"), "config.json", "not a readable JSON"),
    (lambda b: _edit_json(b / "config.json", lambda d: d.update(model_type="t5")), "config.json", "model_type"),
    (lambda b: _edit_json(b / "config.json", lambda d: d.update(format_version=99)), "config.json", "upgrade"),
    (lambda b: _edit_json(b / "config.json", lambda d: d["qformer"].update(num_hidden_layers=1)), "bundle",
     "unexpected"),
    (lambda b: (b / "config.json").unlink(), "bundle", "no config.json"),
    (lambda b: _edit_json(b / "generation_config.json", lambda d: d.update(num_beams=-1)),
     "generation_config.json", "num_beams"),
    (lambda b: _edit_json(b / "tagger.json", lambda d: d.update(type="clip")), "tagger.json", "unknown tagger"),
    (lambda b: (shutil.rmtree(b / "tokenizer"), shutil.copytree(ASSETS / "bert-tiny-uncased", b / "tokenizer")),
     "tokenizer", "<extra_id_0>"),
], ids=["shape", "unknown-field", "bad-section", "not-json", "model-type", "newer-format", "extra-keys",
        "no-config", "generation", "tagger-kind", "no-soft-prompt-token"])
def test_every_broken_bundle_is_a_checkpoint_error(converted: dict[str, Path], tmp_path: Path, damage, names: str,
                                                   message: str, capsys: pytest.CaptureFixture) -> None:
    bundle = _copy_bundle(converted, tmp_path)
    damage(bundle)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_model(str(bundle))
    assert names in str(caught.value)
    code, _, err = _run(capsys, "caption", str(IMAGES[0]), "--model", str(bundle), "--tags", "x", "-q")
    assert code == 1 and len(err.strip().splitlines()) == 1 and names in err


def test_broken_ram_in_a_bundle_is_a_checkpoint_error(converted: dict[str, Path], tmp_path: Path) -> None:
    bundle = _copy_bundle(converted, tmp_path)
    _edit_json(bundle / "tagger.json", lambda d: d["config"].update(hidden_size=24, num_attention_heads=2))
    lion = load_model(str(bundle))  # RAM is read lazily ...
    with pytest.raises(CheckpointError, match="ram.safetensors.*has shape"):
        lion.tag([IMAGES[0]])  # ... and its shape mismatch names its file


def test_wrong_yaml_and_file_kinds_are_checkpoint_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    no_heads = tmp_path / "no_heads.yaml"
    write_golden_yaml(no_heads)
    data = yaml.safe_load(no_heads.read_text())
    del data["model"]["vit_num_heads"]
    no_heads.write_text(yaml.safe_dump(data))
    with pytest.raises(CheckpointError, match="add `vit_num_heads: N` under `model:` in .*no_heads.yaml"):
        load_model(str(no_heads))
    folder = write_golden_yaml(tmp_path / "folder.yaml", vit_model=str(ASSETS / "flan-t5-tiny"))
    with pytest.raises(CheckpointError, match="is a folder, expected a PyTorch checkpoint"):
        load_model(str(folder))
    bad_ram = write_golden_yaml(tmp_path / "ram.yaml", ram_config={"hiden_size": 3})
    with pytest.raises(CheckpointError, match="ram_config.*hiden_size"):
        load_model(str(bad_ram))
    # A checkpoint file given where a model is expected
    code, _, err = _run(capsys, "caption", str(IMAGES[0]), "--model", str(ASSETS / "LION-FlanT5-tiny.pth"), "-q")
    assert code == 1 and "is not a model" in err and "LION-FlanT5-tiny.pth" in err


# ---------------------------------------------------------------------------------------- fast answers


def _best_of(command: list[str], runs: int = 3) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, check=False, capture_output=True, env=env, timeout=120)
        best = min(best, time.perf_counter() - started)
    return best


def test_help_usage_errors_and_bad_paths_do_not_load_the_model_stack() -> None:
    baseline = _best_of([sys.executable, "-c", "pass"])
    help_time = _best_of([sys.executable, "-m", "lion_mllm.cli", "--help"])
    # Measured on the 2-core machine: 0.085 s against 0.015 s (6x); importing torch alone is over 100x.
    assert help_time / baseline < 25, (help_time, baseline)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    probe = ("import sys\nfrom lion_mllm.cli import main\n"
             "codes = [main(a) for a in (['caption', 'missing.png'], ['ask'], ['--help'], ['tag', 'missing.png'])]\n"
             "print(codes, [m for m in ('torch', 'transformers') if m in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "[2, 2, 0, 2] []", done.stdout + done.stderr
    assert "missing.png: no such image file" in done.stderr
    # `eval` builds its full options (the evaluation stack) only when it is the command
    done = subprocess.run([sys.executable, "-m", "lion_mllm.cli", "eval", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0 and "--ram" in done.stdout and "--task" in done.stdout


def test_device_and_dtype_are_checked_before_loading(capsys: pytest.CaptureFixture) -> None:
    if torch.cuda.is_available():
        bad = f"cuda:{torch.cuda.device_count()}"
    else:
        bad = "cuda"
    started = time.monotonic()
    code, _, err = _run(capsys, "caption", str(IMAGES[0]), "--device", bad)
    assert code == 2 and f"--device {bad}" in err and "available here: cpu" in err
    assert time.monotonic() - started < 5  # no model was loaded
    with pytest.raises(ValueError, match=f"device {bad}: .*available here: cpu"):
        load_model("lion-shapes", device=bad)  # the Python API checks the same, before loading
    code, _, err = _run(capsys, "caption", str(IMAGES[0]), "--dtype", "fp16")
    assert code == 2 and "invalid choice: 'fp16'" in err
    code, _, err = _run(capsys, "caption", str(IMAGES[0]), "--ram", "nowhere.pth")
    assert code == 2 and "--ram nowhere.pth: no such file" in err
