"""Quickstart on the golden stand-in files: the authors' five-file layout, loaded as users load theirs.

    python examples/quickstart.py [--shared ../shared]

Writes an authors'-format YAML pointing at the tiny stand-ins in shared/golden/lion-a, loads it with
`lion_mllm.load_model`, captions and grounds an image, and checks the texts against what the
authors' own code produced from the same files. (The weights are random, so the text is gibberish;
what matters is that it is the authors' gibberish, token for token.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

from lion_mllm import load_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    golden = parser.parse_args().shared / "golden" / "lion-a"
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
        lion = load_model(str(path))
    recorded = json.loads((golden / "outputs" / "results.json").read_text())["configs"]["ALL.tags"]["cases"]

    caption = lion.caption(golden / "images" / "a0.png", tags="box, circle, red, blue, gradient")
    grounding = lion.ground(golden / "images" / "a1.png", "the green triangle above the orange line",
                            tags="triangle, green, stripes, line, orange")
    print(f"caption:   {caption[:70]}...")
    print(f"grounding: {grounding.text[:70]}... box={grounding.box}")
    same = caption == recorded["cap_a0"]["beam"]["text"][0] and grounding.text == recorded["rec_a1"]["beam"]["text"][0]
    print("matches the authors' outputs token for token" if same else "DIFFERS from the authors' outputs")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
