"""The `lion` command on a tiny model taught three fixed answers (so outputs can be checked exactly).

A few tests run `python -m lion_mllm.cli` as a subprocess (entry point, exit codes, a killed batch
run); the rest call `lion_mllm.cli.main(argv)` in-process to keep the file fast.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN, REPO, make_tiny_lion
from PIL import Image

from lion_mllm.cli import main
from lion_mllm.drawing import BOX_COLORS, draw_grounding
from lion_mllm.model.tasks import CAPTION_PROMPT, GROUNDING_TEMPLATE

TAGS = "green, square"
CAPTION = "a green square"
ANSWER = "green"
QUESTION = "What colour is it?"
PHRASE = "the square"
BOX = (0.25, 0.125, 0.75, 0.625)
BOX_TEXT = "[0.250,0.125,0.750,0.625]"
SIZE = (120, 80)
BOX_PIXELS = (30.0, 10.0, 90.0, 50.0)
BACKGROUND, SQUARE = (200, 200, 200), (30, 180, 40)
FAST = ["--num-beams", "1", "--max-new-tokens", "24", "--tags", TAGS, "-q"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test image and a tiny bundle over-fitted to caption / answer / ground it with fixed texts."""
    root = tmp_path_factory.mktemp("cli")
    image = Image.new("RGB", SIZE, BACKGROUND)
    image.paste(SQUARE, tuple(int(v) for v in BOX_PIXELS))
    image_path = root / "square.png"
    image.save(image_path)
    lion = make_tiny_lion()
    batch = lion.processor([image] * 3, [CAPTION_PROMPT, QUESTION, GROUNDING_TEMPLATE.format(phrase=PHRASE)],
                           ["caption", "vqa", "grounding"], [TAGS] * 3, answers=[CAPTION, ANSWER, BOX_TEXT])
    model = lion.model.train()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 5e-3:
            break
    model.eval()
    bundle = lion.save_pretrained(root / "bundle")
    broken = root / "broken.png"
    broken.write_text("not an image")
    return {"root": root, "image": image_path, "bundle": bundle, "broken": broken}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LION_MODEL"}
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # see one_thread
    env.update(extra)
    return env


def _lion(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lion_mllm.cli", *args], check=False, capture_output=True, text=True,
                          env=env or _env(), timeout=timeout)


def _run_main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------- subprocess


def test_entry_point_caption_and_exit_codes(assets: dict[str, Path], tmp_path: Path) -> None:
    done = _lion("caption", str(assets["image"]), "--model", str(assets["bundle"]), *FAST[:-1])
    assert done.returncode == 0, done.stderr
    assert done.stdout == CAPTION + "\n"
    assert "loading" in done.stderr and "model ready" in done.stderr  # progress on stderr

    # A published model that was never downloaded: one line, exit 1.
    missing = _lion("caption", str(assets["image"]), "--model", "lion-flant5xxl",
                    env=_env(LION_MLLM_CACHE=str(tmp_path)))
    assert missing.returncode == 1
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1, missing.stderr
    assert lines[0] == "lion: error: model 'lion-flant5xxl' is not downloaded; run `lion download lion-flant5xxl` first"


def test_python_m_lion_mllm_is_the_lion_command(assets: dict[str, Path]) -> None:
    package = subprocess.run([sys.executable, "-m", "lion_mllm", "caption", str(assets["image"]), "--model",
                              str(assets["bundle"]), *FAST[:-1]], check=False, capture_output=True, text=True,
                             env=_env(), timeout=120)
    assert package.returncode == 0 and package.stdout == CAPTION + "\n", package.stderr
    unknown = subprocess.run([sys.executable, "-m", "lion_mllm", "nonsense"], check=False, capture_output=True,
                             text=True, env=_env(), timeout=60)
    assert unknown.returncode == 2 and "lion: error:" in unknown.stderr


def test_killed_run_resumes_without_loss_or_duplicates(assets: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    tasks = tmp_path / "tasks.jsonl"
    ids = [f"t{i}" for i in range(24)]
    tasks.write_text("".join(json.dumps({"id": i, "image": str(assets["image"]), "task": "vqa",
                                         "prompt": f"{QUESTION} ({i})"}) + "\n" for i in ids))
    out = tmp_path / "results.jsonl"
    args = ["run", "--input", str(tasks), "--output", str(out), "--model", str(assets["bundle"]),
            "--batch-size", "2", "--num-beams", "3", "--max-new-tokens", "16", "--tags", TAGS, "--no-progress"]
    process = subprocess.Popen([sys.executable, "-m", "lion_mllm.cli", *args], env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            if out.exists() and out.stat().st_size:  # the first batch is on disk: kill at once
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run should still have been busy"
    before = len(out.read_text().splitlines())
    assert 2 <= before < len(ids)
    code, stdout, _ = _run_main(capsys, *args, "--json", "-q")
    assert code == 0 and json.loads(stdout)["skipped"] >= 2
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(ids)  # none lost, none twice
    assert all("answer" in r for r in records)


# ---------------------------------------------------------------------------------------- in-process


def test_caption_json_and_several_images(assets: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    model = ["--model", str(assets["bundle"])]
    code, out, _ = _run_main(capsys, "caption", str(assets["image"]), *model, *FAST, "--json")
    assert code == 0 and json.loads(out) == {"image": str(assets["image"]), "caption": CAPTION}
    code, out, _ = _run_main(capsys, "caption", str(assets["image"]), str(assets["image"]), *model, *FAST,
                             "--batch-size", "1")
    assert code == 0 and out.splitlines() == [f"{assets['image']}: {CAPTION}"] * 2


def test_ask(assets: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    args = ["ask", str(assets["image"]), QUESTION, "--model", str(assets["bundle"]), *FAST]
    code, out, _ = _run_main(capsys, *args)
    assert (code, out) == (0, ANSWER + "\n")
    code, out, _ = _run_main(capsys, *args, "--json")
    assert json.loads(out) == {"image": str(assets["image"]), "question": QUESTION, "answer": ANSWER}


def test_ground_prints_the_box_and_draws_it(assets: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    drawn = tmp_path / "drawn.png"
    args = ["ground", str(assets["image"]), PHRASE, "--model", str(assets["bundle"]), *FAST]
    code, out, _ = _run_main(capsys, *args, "--draw", str(drawn))
    assert code == 0
    assert out.splitlines() == ["box (normalised): 0.250 0.125 0.750 0.625",
                                "box (pixels):     30.0 10.0 90.0 50.0  (image 120x80)"]
    code, out, _ = _run_main(capsys, *args, "--json")
    record = json.loads(out)
    assert record == {"image": str(assets["image"]), "phrase": PHRASE, "answer": BOX_TEXT, "width": 120,
                      "height": 80, "box": list(BOX), "box_pixels": list(BOX_PIXELS)}
    # The outline lies on the printed pixel box: edge pixels red, just outside untouched.
    picture = Image.open(drawn).convert("RGB")
    x0, y0, x1, y1 = (int(v) for v in BOX_PIXELS)
    for y in range(y0 + 2, y1 - 1, 4):
        assert picture.getpixel((x0, y)) == BOX_COLORS[0] and picture.getpixel((x1, y)) == BOX_COLORS[0]
        assert picture.getpixel((x0 - 1, y)) == BACKGROUND and picture.getpixel((x1 + 1, y)) == BACKGROUND
    for x in range(x0, x1 + 1, 4):
        assert picture.getpixel((x, y1)) == BOX_COLORS[0] and picture.getpixel((x, y1 + 1)) == BACKGROUND
    assert picture.getpixel((x1 - 3, y0)) == BOX_COLORS[0]  # top edge, right of the label
    assert picture.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == SQUARE  # inside untouched
    label = [picture.getpixel((x, y)) for x in range(x0, x1) for y in range(y0 + 20)]
    assert any(_is_text(p) for p in label)  # the phrase on its tag at the box's top-left corner
    # An answer cut before its box closes: reported, exit 0; with --draw nothing is written, exit 1.
    short = [a if a != "24" else "3" for a in args]
    code, out, _ = _run_main(capsys, *short, "--json")
    assert code == 0 and json.loads(out)["box"] is None and json.loads(out)["box_pixels"] is None
    code, out, err = _run_main(capsys, *short, "--draw", str(tmp_path / "none.png"))
    assert code == 1 and out.startswith("no box in the answer: [0.2") and "none.png not written" in err
    assert not (tmp_path / "none.png").exists()


def _is_text(pixel: tuple[int, int, int]) -> bool:
    """Light (anti-aliased white) label text on the red tag."""
    return pixel[0] == 255 and pixel[1] >= 220 and pixel[2] >= 220


def test_draw_grounding_label_inside_when_no_room_above() -> None:
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    drawn = draw_grounding(image, (20, 0, 180, 90), "a long phrase")
    assert drawn.size == image.size and image.getpixel((20, 50)) == (0, 0, 0)  # original unchanged
    assert drawn.getpixel((20, 50)) == BOX_COLORS[0] and drawn.getpixel((180, 50)) == BOX_COLORS[0]
    assert drawn.getpixel((100, 90)) == BOX_COLORS[0] and drawn.getpixel((179, 0)) == BOX_COLORS[0]
    inside = [drawn.getpixel((x, y)) for x in range(22, 120) for y in range(2, 30)]
    assert any(_is_text(p) for p in inside)  # label text below the top edge
    assert not any(_is_text(drawn.getpixel((x, y))) for x in range(200) for y in range(91, 100))


def test_tag_with_a_ram_checkpoint(capsys: pytest.CaptureFixture) -> None:
    from lion_mllm.ram import RamTagger

    ckpt, ram_dir = GOLDEN / "assets" / "ram_swin_tiny_14m.pth", GOLDEN / "assets" / "ram"
    images = [GOLDEN / "images" / "a0.png", GOLDEN / "images" / "a1.png"]
    expected = RamTagger.from_official(ckpt, config=ram_dir).tag([Image.open(p) for p in images])
    code, out, _ = _run_main(capsys, "tag", *map(str, images), "--ram", str(ckpt), "--ram-config", str(ram_dir),
                             "--device", "cpu", "--json", "-q")
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in records] == list(map(str, images))
    assert [", ".join(r["tags"]) for r in records] == expected
    code, out, _ = _run_main(capsys, "tag", str(images[0]), "--ram", str(ckpt), "--ram-config", str(ram_dir), "-q")
    assert (code, out) == (0, expected[0] + "\n")


def test_usage_and_runtime_errors(assets: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    model = ["--model", str(assets["bundle"]), "-q"]
    code, _, err = _run_main(capsys, "caption", str(assets["image"]), *model)  # tags model, no tags, no RAM
    assert code == 2 and err.strip().startswith("lion: error: this model puts image tags in its prompt")
    code, _, err = _run_main(capsys, "caption", str(assets["broken"]), *model, "--tags", TAGS)
    lines = err.strip().splitlines()  # one line naming the file (the reason's wording is the image loader's)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("lion: error: ") and str(assets["broken"]) in lines[0]
    assert "image" in lines[0]
    code, _, err = _run_main(capsys, "ask", str(assets["image"]), "q", "--model", str(assets["root"] / "nope"))
    assert code == 1 and "no such file or directory" in err
    code, _, err = _run_main(capsys, "tag", str(assets["image"]), *model)
    assert code == 2 and "pass --ram" in err
    code, _, err = _run_main(capsys, "caption", "--num-beams", "0", str(assets["image"]))
    assert code == 2 and "lion: error: argument --num-beams: must be an integer of at least 1, got 0" in err
    code, _, err = _run_main(capsys, "frobnicate")
    assert code == 2 and "lion: error: argument COMMAND: invalid choice" in err
    code, _, err = _run_main(capsys, "ground", str(assets["image"]), "x", *model, "--draw", "out.unknownext")
    assert code == 2 and "unknown image file extension" in err


def _write_tasks(path: Path, assets: dict[str, Path]) -> dict[str, int]:
    """A task file with good lines and every kind of bad one; returns id -> line number."""
    image = str(assets["image"])
    lines = [
        json.dumps({"id": "cap", "image": image, "task": "caption"}),
        json.dumps({"id": "vqa", "image": image, "task": "vqa", "prompt": QUESTION}),
        "{not json",
        json.dumps({"id": "box", "image": image, "task": "grounding", "phrase": PHRASE}),
        json.dumps({"id": "broken", "image": str(assets["broken"]), "task": "caption"}),
        json.dumps({"id": "gone", "image": "missing.png", "task": "vqa", "prompt": "?"}),
        json.dumps({"id": "weird", "image": image, "task": "dance"}),
        json.dumps({"image": image, "task": "caption"}),
        json.dumps({"id": 7, "image": "square.png", "task": "vqa", "prompt": QUESTION, "tags": ["green", "square"]}),
        "",
        json.dumps({"id": "cap", "image": image, "task": "caption"}),  # duplicate id: skipped
    ]
    path.write_text("\n".join(lines) + "\n")
    return {"cap": 1, "vqa": 2, "box": 4, "broken": 5, "gone": 6, "weird": 7, "7": 9}


def test_run_batches_resumes_and_records_errors(assets: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    tasks, out = tmp_path / "tasks.jsonl", tmp_path / "out" / "results.jsonl"
    line_of = _write_tasks(tasks, assets)
    base = ["run", "--input", str(tasks), "--output", str(out), "--model", str(assets["bundle"]), *FAST,
            "--batch-size", "3"]
    # A relative image path is looked up in the working directory, then beside the task file.
    (tmp_path / "square.png").write_bytes(assets["image"].read_bytes())
    code, stdout, _ = _run_main(capsys, *base, "--max-batches", "1", "--json")
    assert code == 0 and json.loads(stdout)["complete"] is False
    assert len(out.read_text().splitlines()) == 3  # one batch of three, flushed
    code, stdout, err = _run_main(capsys, *base, "--json")
    summary = json.loads(stdout)
    assert code == 0 and summary["complete"] and summary["skipped"] == 3
    assert "duplicate id 'cap'" in err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_id = {str(r["id"]): r for r in records if r["id"] is not None}
    assert len(records) == 9 and len(by_id) == 7  # 7 ids + 2 id-less bad lines, each once
    assert by_id["cap"] == {"id": "cap", "task": "caption", "image": str(assets["image"]), "answer": CAPTION}
    assert by_id["vqa"]["answer"] == ANSWER and by_id["7"]["answer"] == ANSWER
    assert by_id["box"]["box"] == list(BOX) and by_id["box"]["box_pixels"] == list(BOX_PIXELS)
    for key, needle in (("broken", str(assets["broken"])), ("gone", "missing.png"), ("weird", "dance")):
        assert by_id[key]["error"].startswith(f"{tasks}:{line_of[key]}: ") and needle in by_id[key]["error"]
    nameless = sorted((r["line"], r["error"]) for r in records if r["id"] is None)
    assert [n for n, _ in nameless] == [3, 8]
    assert nameless[0][1].startswith(f"{tasks}:3: not valid JSON")
    # A run killed while writing leaves a torn last line: it is dropped and that task redone.
    kept = [line for line in out.read_text().splitlines() if not line.startswith('{"id": "vqa"')]
    out.write_text("".join(line + "\n" for line in kept) + '{"id": "vqa", "task": "vq')
    code, stdout, err = _run_main(capsys, *base, "--json")
    assert code == 0 and json.loads(stdout)["answered"] == 1 and "incomplete last line" in err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 9 and sorted(str(r["id"]) for r in records).count("vqa") == 1
    # --retry-errors tries the failed tasks again (and they fail again, once each).
    code, stdout, _ = _run_main(capsys, *base, "--json", "--retry-errors")
    assert code == 0 and json.loads(stdout)["errors"] == 5
    assert len(out.read_text().splitlines()) == 9


def test_convert_official_yaml_to_a_bundle(tmp_path: Path, assets: dict[str, Path],
                                           capsys: pytest.CaptureFixture) -> None:
    from lion_mllm.checkpoints.hub import write_official_config

    assets_dir = GOLDEN / "assets"
    config = write_official_config(tmp_path / "official.yaml", bert_model=assets_dir / "bert-tiny-uncased",
                                   vit_model=assets_dir / "eva_vit_g_tiny.pth", llm_model=assets_dir / "flan-t5-tiny",
                                   pretrained=assets_dir / "LION-FlanT5-tiny.pth", ram_model=None,
                                   extra={"vit_num_heads": 2})
    out = tmp_path / "bundle"
    code, stdout, _ = _run_main(capsys, "convert", "--config", str(config), "--out", str(out), "-q")
    assert (code, stdout) == (0, f"{out}\n")
    assert (out / "config.json").is_file()
    from lion_mllm import Lion

    image = GOLDEN / "images" / "a0.png"
    official = Lion.from_official(config).caption(image, num_beams=1, max_new_tokens=6, tags=["dog, grass"])
    code, stdout, _ = _run_main(capsys, "caption", str(image), "--model", str(out), "--num-beams", "1",
                                "--max-new-tokens", "6", "--tags", "dog,grass", "-q")
    assert (code, stdout) == (0, official + "\n")
    code, _, err = _run_main(capsys, "convert", "--config", str(config), "--out", str(out), "-q")
    assert code == 1 and "not empty" in err


def test_eval_subcommand_is_mounted(capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run_main(capsys, "eval")
    assert code == 2 and "--task and --ann are required" in err


def test_run_puts_questions_into_the_models_templates_like_the_api(tmp_path: Path):
    """`lion run` answers a vqa line, a grounding phrase and a bare caption as `ask`/`ground`/`caption` do."""
    from lion_mllm import load_model, shapes
    from lion_mllm.run import run_batch

    lion = load_model("lion-shapes")
    scene = shapes.make_scene(shapes.HELD_OUT_SEED_BASE + 27)  # a scene where the template changes the answer
    image = tmp_path / "scene.png"
    shapes.render(scene).save(image)
    question = "Is there a red square?"
    phrase, _ = shapes.referring_expressions(scene)[0]
    lines = [{"id": "q", "image": str(image), "task": "vqa", "prompt": question},
             {"id": "g", "image": str(image), "task": "grounding", "phrase": phrase},
             {"id": "c", "image": str(image), "task": "caption"}]
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    run_batch(lion, tasks, out, progress=False)
    answers = {r["id"]: r["answer"] for r in map(json.loads, out.read_text().splitlines())}
    assert answers == {"q": lion.ask(str(image), question), "g": lion.ground(str(image), phrase).text,
                       "c": lion.caption(str(image))}
    assert answers["q"] != lion.generate([str(image)], [question], "vqa")[0]  # the question as typed answers otherwise
