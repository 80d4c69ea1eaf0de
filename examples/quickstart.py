"""Quickstart on the golden stand-in files: the authors' five-file layout, loaded as users load theirs.

    python examples/quickstart.py [--golden tests/golden/lion-a]

Writes an authors'-format YAML pointing at the tiny stand-ins in tests/golden/lion-a (the repository's
copy of the golden set), loads it with `lion_mllm.load_model`, captions an image, grounds a phrase and
answers a question, and checks each answer against what the authors' own code produced from the same
files: the token ids (one level down, processor -> model, with the same inputs and decoding) and the
text the user-facing call returns. The weights are random, so the text is gibberish; what matters is
that it is the authors' gibberish, token for token.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

from lion_mllm import Lion, load_model
from lion_mllm.model.images import load_image

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden" / "lion-a"

# (the authors' recorded case, task, image, the phrase or question, the image's tags): spec.json's cases.
CASES = [
    ("cap_a0", "caption", "a0.png", None, "box, circle, red, blue, gradient"),
    ("rec_a1", "grounding", "a1.png", "the green triangle above the orange line", "triangle, green, stripes, line, orange"),
    ("vqa_a2", "vqa", "a2.png", "What color is the round shape in the middle?", "checkerboard, circle, yellow, black, white"),
]


def load_stand_in(golden: Path) -> Lion:
    """The stand-in files through the authors' YAML, as a user loads the real ones."""
    assets = golden / "assets"
    config = {"model": {
        "arch": "lion_t5", "model_type": "flant5xl", "load_pretrained": True,
        "bert_model": str(assets / "bert-tiny-uncased"), "vit_model": str(assets / "eva_vit_g_tiny.pth"),
        "llm_model": str(assets / "flan-t5-tiny"), "pretrained": str(assets / "LION-FlanT5-tiny.pth"),
        "visual_input": "ALL", "enable_semantic_tags": True,
        "vit_num_heads": 2,  # the stand-in ViT is 32 wide; the real one's heads follow from its width
    }}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lion_tiny.yaml"
        path.write_text(yaml.safe_dump(config))
        return load_model(str(path))


def user_answer(lion: Lion, task: str, image: Path, text: str | None, tags: str) -> str:
    if task == "caption":
        return lion.caption(image, tags=tags)
    if task == "grounding":
        return lion.ground(image, text, tags=tags).text  # .box: the parsed box (None: no box in gibberish)
    return lion.ask(image, text, tags=tags)


def token_ids(lion: Lion, task: str, image: Path, text: str | None, tags: str) -> list[int]:
    """The ids behind `user_answer`: the model's prompt and decoding defaults for the task, processor, model."""
    batch = lion.processor([load_image(image)], [lion.generation_config.prompt(task, text)], [task], [tags])
    # temperature and top_p only apply to sampling; the authors' models decode by beam search.
    decoding = {k: v for k, v in lion.generation_config.for_task(task).items() if k not in ("temperature", "top_p")}
    return lion.model.generate(**batch, **decoding)[0].tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golden", type=Path, default=GOLDEN, help="a golden set folder (default: %(default)s)")
    golden = parser.parse_args().golden
    lion = load_stand_in(golden)
    recorded = json.loads((golden / "outputs" / "results.json").read_text())["configs"]["ALL.tags"]["cases"]

    all_same = True
    for case, task, image_name, text, tags in CASES:
        image = golden / "images" / image_name
        answer = user_answer(lion, task, image, text, tags)
        ids = token_ids(lion, task, image, text, tags)
        theirs = recorded[case]["beam"]
        same_ids = ids == theirs["output_ids"][0]
        same_text = answer == theirs["text"][0] == lion.processor.decode([ids])[0]
        print(f"{task:9s} {len(ids)} tokens, ids {'equal' if same_ids else 'DIFFER'}, "
              f"text {'equal' if same_text else 'DIFFERS'}: {answer[:60]}...")
        all_same &= same_ids and same_text
    print("matches the authors' outputs token for token" if all_same else "DIFFERS from the authors' outputs")
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
