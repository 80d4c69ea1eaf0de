"""The authors' side of `tagger_vs_reference.py`: runs inside the reference environment (torch 2.14,
torchvision, transformers 4.42.4, timm 0.4.12; see shared/tools/refharness/README.md), never inside
lion-mllm's.

    _reference_tagger_side.py prepare --official REPO --harness DIR --out ARTIFACTS --size full|tiny \
        --calib IMG [IMG ...]
    _reference_tagger_side.py worker  --official REPO --harness DIR --artifacts ARTIFACTS

`prepare` builds a random RAM with the authors' own builder, `ram.models.ram(pretrained='',
image_size=384, vit='swin_l', text_encoder_type=BERT_DIR)` (the call LION's `_init_ram` makes, minus
the checkpoint), through the refharness's `assets.build_ram`: the constant initial values are jittered,
the label embeddings (all zeros in the builder's eval stage, which would give every tag the same logit)
get random rows, and `fc.bias` is calibrated on the benchmark's images so that each gets a handful of
tags under RAM's per-class thresholds. It saves `{'model': state_dict}` like `ram_swin_large_14m.pth`,
plus a bert-base-uncased-shaped tokenizer folder (the builder loads a `BertTokenizer`) and, for `tiny`,
a RAM config folder with a narrow Swin and a subset of the tag lists. `full` uses the checkout's own
`ram/` folder (configs/swin/config_swinL_384.json, q2l_config.json, med_config.json, the 4585 tags).

`worker` loads that file the way LION does: it runs LION's own `LIONT5InstructAdapter._init_ram`
(`ram(pretrained=PATH, image_size=384, vit="swin_l", text_encoder_type=...)`, which goes through their
`load_checkpoint_swinlarge`) and then tags with LION's own `generate_tags(img)`, one PIL image per call,
as their playground notebook does. The two functions run unchanged on a small holder object that has
the attributes they read (`ram_path`, `bert_model`, `ram_model`, `device`); no LLM is built. The one
deliberate difference: `ram_model.eval()` is called after loading (`--mode eval`, the default), while
LION never calls it, so in LION the tags come from a train-mode network (drop-path 0.1, dropout 0.1)
and change from call to call. `--mode train` keeps LION's behaviour. Autograd stays on as in LION's
`generate_tags` (it has no `no_grad`), unless `--no-grad`.

Answers are JSON lines on the original stdout; whatever the official code prints goes to stderr.
Nothing of the official repository is copied: it is imported from the checkout at run time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _reference_side import _import, current_rss_gib, serve

# `full`: the real ram_swin_large_14m shapes, read from the checkout's ram/configs.
# `tiny`: for developing and testing the benchmark only (the refharness golden set A's RAM sizes).
# label_embed_norm / fc_std / target_tags_per_image: the randomisation of assets.build_ram.
SIZES = {
    "full": {"pth": "ram_swin_large_14m.pth", "label_embed_norm": 1.5, "fc_std": 4.0, "target_tags_per_image": 10},
    "tiny": {"pth": "ram_swin_tiny_14m.pth", "label_embed_norm": 1.5, "fc_std": 4.0, "target_tags_per_image": 10,
             "swin": {"embed_dim": 12, "depths": [1, 2, 2, 2], "num_heads": [1, 2, 2, 4], "window_size": 12},
             "med": {"hidden": 48, "layers": 2, "heads": 4, "intermediate": 96},
             "q2l": {"hidden": 48, "layers": 2, "heads": 4, "intermediate": 96},
             "tag_stride": 16, "tag_offset": 0},
}
BERT_VOCAB = 30522  # bert-base-uncased


def write_bert_dir(path: str) -> None:
    """A bert-base-uncased-shaped tokenizer folder (RAM's builder only needs the tokenizer)."""
    from lionref import assets
    from lionref.corpus import make_corpus
    from transformers import BertConfig, BertTokenizer

    os.makedirs(path, exist_ok=True)
    vocab = assets.wordpiece_vocab(make_corpus(seed=7), 600)
    vocab += [f"[unused{i}]" for i in range(BERT_VOCAB - len(vocab))]
    vocab_file = os.path.join(path, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizer(vocab_file, do_lower_case=True).save_pretrained(path)
    BertConfig(architectures=["BertForMaskedLM"]).save_pretrained(path)


def prepare(args: argparse.Namespace) -> None:
    import torch
    from PIL import Image

    repo = _import(args).resolve_repo(args.official)
    from lionref import assets

    torch.set_num_threads(args.threads)
    spec = SIZES[args.size]
    os.makedirs(args.out, exist_ok=True)
    t = time.time()
    bert_dir = os.path.join(args.out, "bert-base-uncased")
    write_bert_dir(bert_dir)
    if args.size == "full":
        ram_dir = os.path.join(repo, "ram")  # the authors' own configs and 4585-tag lists
    else:
        ram_dir = os.path.join(args.out, "ram")
        assets.write_ram_dir(ram_dir, repo, spec, BERT_VOCAB)
    pth = os.path.join(args.out, spec["pth"])
    calib = [Image.open(p).convert("RGB") for p in args.calib]
    params, bias = assets.build_ram(pth, ram_dir, bert_dir, spec, seed=300, calib_images=calib)
    with open(os.path.join(ram_dir, "data", "ram_tag_list.txt"), encoding="utf-8") as f:
        num_tags = len(f.read().splitlines())
    info = {"size": args.size, "pth": pth, "pth_bytes": os.path.getsize(pth), "bert_dir": bert_dir,
            "ram_dir": ram_dir, "num_tags": num_tags, "state_dict_numel": params, "fc_bias": bias,
            "calib_images": [os.path.basename(p) for p in args.calib], "prepare_s": time.time() - t,
            "torch": torch.__version__, "built_with": "ram.models.ram(pretrained='', image_size=384, vit='swin_l')"}
    with open(os.path.join(args.out, "artifacts.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info))


class Worker:
    """The authors' RAM, loaded by LION's `_init_ram`, tagging with LION's `generate_tags`."""

    def __init__(self, args: argparse.Namespace):
        t0 = time.time()
        import torch

        self.torch = torch
        official = _import(args)
        torch.set_num_threads(args.threads)
        from models import lion_t5

        self.import_s = time.time() - t0
        self.rss_after_imports = current_rss_gib()
        with open(os.path.join(args.artifacts, "artifacts.json")) as f:
            info = json.load(f)

        class Holder:
            """What LION's two functions read from `self`; the functions themselves are LION's."""

            _init_ram = lion_t5.LIONT5InstructAdapter._init_ram
            generate_tags = lion_t5.LIONT5InstructAdapter.generate_tags

            def __init__(self):
                self.ram_path = info["pth"]
                self.bert_model = info["bert_dir"]
                self.ram_model = None
                self.device = torch.device("cpu")

        self.lion = Holder()
        t = time.time()
        with official.ram_assets(info["ram_dir"]):  # their config folder, and .cuda() as a no-op
            self.lion._init_ram()
        self.load_s = time.time() - t
        self.mode = args.mode
        self.no_grad = args.no_grad
        if args.mode == "eval":
            self.lion.ram_model.eval()  # LION never does this (see the module docstring)
        self.logits: list = []
        self.lion.ram_model.fc.register_forward_hook(
            lambda m, a, out: self.logits.append(out.detach().squeeze(-1).float()))

    def loaded(self) -> dict:
        m = self.lion.ram_model
        return {"import_s": self.import_s, "load_s": self.load_s, "rss_after_imports_gib": self.rss_after_imports,
                "threads": self.torch.get_num_threads(),
                "torch": self.torch.__version__, "transformers": __import__("transformers").__version__,
                "params": sum(p.numel() for p in m.parameters()), "training": m.training,
                "mode": self.mode, "grad_enabled": not self.no_grad,
                "dtypes": sorted({str(p.dtype) for p in m.parameters()})}

    def run(self, req: dict) -> dict:
        """One `generate_tags` call per image (a PIL image, as the notebook passes), each timed from
        opening the file to the tag string."""
        import contextlib

        from PIL import Image

        torch = self.torch
        seconds, tags = [], []
        self.logits.clear()
        for path in req["images"]:
            t = time.perf_counter()
            with torch.no_grad() if self.no_grad else contextlib.nullcontext():
                img = Image.open(path).convert("RGB")
                tags += self.lion.generate_tags(img)
            seconds.append(time.perf_counter() - t)
        logits = torch.cat(self.logits).tolist()
        return {"seconds": seconds, "tags": tags, "logits": logits}


def worker(args: argparse.Namespace) -> None:
    def load():
        w = Worker(args)
        return w.loaded(), w.run

    serve(load)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["prepare", "worker"])
    ap.add_argument("--official", required=True, help="checkout of JiuTian-LION at 7578437")
    ap.add_argument("--harness", required=True, help="shared/tools/refharness")
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--out", help="prepare: where to write the artifacts")
    ap.add_argument("--calib", nargs="+", default=[], help="prepare: images that calibrate fc.bias")
    ap.add_argument("--artifacts", help="worker: the folder written by prepare")
    ap.add_argument("--mode", choices=["eval", "train"], default="eval",
                    help="worker: eval() the RAM model (default) or leave it in train mode as LION does")
    ap.add_argument("--no-grad", action="store_true", help="worker: wrap each call in torch.no_grad()")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    prepare(args) if args.what == "prepare" else worker(args)


if __name__ == "__main__":
    main()
