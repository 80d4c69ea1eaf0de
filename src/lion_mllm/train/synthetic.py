"""A small synthetic instruction set (coloured squares) and a tiny-model training config, for smoke
tests of the trainer without real weights or data.

    from lion_mllm.train.synthetic import write_synthetic_dataset, tiny_train_config
    data = write_synthetic_dataset("/tmp/syn")
    cfg = tiny_train_config(data, stage=3, t5_dir=..., bert_dir=..., output_dir="/tmp/runs")

Image-level records ask for the square's colour (a JSON list); region-level records ask where it is,
answered with a box in the authors' format (JSON Lines). Both write tags into the records.

It stays apart from the shapes world (`lion_mllm.shapes`, which `write_dataset` also puts on disk) because
the trainer's tests need exactly this: both annotation layouts (a JSON list and JSON Lines), 48 px images
for the `tiny` preset built on the golden set's real T5 and BERT tokenizers (the shapes world has its own
tokenizers and 128 px images), and one record per line that the bad-data tests break line by line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image

from ..model.boxes import format_box
from ..model.tasks import GROUNDING_TEMPLATE

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 210, 20)}


def write_synthetic_dataset(root: str | Path, n_images: int = 8, size: int = 48, seed: int = 0) -> dict[str, Path]:
    """Images and two annotation files under `root`; returns {"vis_root", "image_level", "region_level"}."""
    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    image_level, region_level = [], []
    names = list(COLOURS)
    for i in range(n_images):
        colour = names[i % len(names)]
        side = rng.randint(size // 4, size // 2)
        x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
        image = Image.new("RGB", (size, size), (235, 235, 235))
        image.paste(COLOURS[colour], (x0, y0, x0 + side, y0 + side))
        name = f"img{i:03d}.png"
        image.save(images / name)
        tags = [colour, "square"]
        image_level.append({"image": name, "question": "What colour is the square?", "answer": colour,
                            "category": "image_level", "tags": tags, "id": f"cap{i}"})
        box = format_box((x0 / size, y0 / size, (x0 + side) / size, (y0 + side) / size))
        region_level.append({"image": name, "question": GROUNDING_TEMPLATE.format(phrase=f"the {colour} square"),
                             "answer": f"Answer: {box}", "category": "region_level", "tags": tags, "id": f"rec{i}"})
    image_file = root / "image_level.json"
    image_file.write_text(json.dumps(image_level, indent=1) + "\n")
    region_file = root / "region_level.jsonl"
    region_file.write_text("".join(json.dumps(r) + "\n" for r in region_level))
    return {"vis_root": images, "image_level": image_file, "region_level": region_file}


def tiny_train_config(data: dict[str, Path], stage: int, t5_dir: str | Path, bert_dir: str | Path,
                      output_dir: str | Path, **run: Any) -> dict[str, Any]:
    """A training config (as a mapping) for the `tiny` preset on `write_synthetic_dataset` output.
    Stage 1 uses the image-level file, stage 2 the region-level one, stages 3 and 4 both."""
    files = {1: ["image_level"], 2: ["region_level"], 3: ["image_level", "region_level"],
             4: ["image_level", "region_level"]}[stage]
    run_block = {"stage": stage, "init_lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "weight_decay": 0.05,
                 "max_steps": 20, "batch_size_train": 4, "accum_grad_iters": 1, "mixed_precision": "fp32",
                 "output_dir": str(output_dir), "seed": 0, "num_workers": 0, "print_freq": 5,
                 "progress_bar": False, "tensorboard": False, "device": "cpu"}
    run_block.update(run)
    return {
        "model": {"preset": "tiny", "llm_model": str(t5_dir), "bert_model": str(bert_dir),
                  "enable_semantic_tags": True},
        "run": run_block,
        "train_datasets": [{"ann_path": str(data[f]), "vis_root": str(data["vis_root"]), "is_train": True,
                            "sample_ratio": 1} for f in files],
    }
