"""The authors' side of `cpu_vs_reference.py`: runs inside the reference environment (transformers
4.42.4, timm 0.4.12; see shared/tools/refharness/README.md), never inside lion-mllm's.

    _reference_side.py prepare --official REPO --harness DIR --out ARTIFACTS --size base|xl
    _reference_side.py worker  --official REPO --harness DIR --artifacts ARTIFACTS --size base|xl

`prepare` writes random artifacts in the authors' five-file formats (RAM is not needed: every
caption gets explicit tags). `worker` loads the authors' model through their own entry point,
`models.load_model("lion_t5", ..., is_eval=True, device="cpu")`, and then answers JSON requests
(one per line on stdin, answers on the original stdout; everything the official code prints goes
to stderr). Nothing of the official repository is copied: it is imported from the checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable

# Sizes. The authors' ViT factory fixes depth 39 (the aggregator taps blocks 38/28/18), so "base"
# keeps depth 39 and only narrows the width (the refharness's `eva_width` patch).
SIZES = {
    "base": {"vit": {"width": 768, "heads": 12, "img_size": 224},
             "t5": {"model_vocab": 32128, "d_model": 768, "d_kv": 64, "d_ff": 2048, "num_layers": 12,
                    "num_decoder_layers": 12, "num_heads": 12}},
    "xl": {"vit": {"width": 1408, "heads": 16, "img_size": 224},
           "t5": {"model_vocab": 32128, "d_model": 2048, "d_kv": 64, "d_ff": 5120, "num_layers": 24,
                  "num_decoder_layers": 24, "num_heads": 32}},
}
NAMES = {"t5": "flan-t5", "bert": "bert-base-uncased", "vit": "eva_vit_g.pth", "lion": "LION-FlanT5.pth"}


def artifact_paths(root: str) -> dict[str, str]:
    """Where `prepare` puts the five files (RAM is a placeholder: tags are always given)."""
    paths = {k: os.path.join(root, v) for k, v in NAMES.items()}
    paths["ram"] = os.path.join(root, "ram-not-used.pth")
    return paths


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


class AnonPeak:
    """Peak anonymous resident memory (RssAnon), sampled every 50 ms by a daemon thread. ru_maxrss
    also counts file pages of memory-mapped checkpoints, which lion-mllm's loader reads through."""

    def __init__(self, interval: float = 0.05):
        import threading

        self.peak = 0.0
        self._interval = interval
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def read_gib() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 2**20
        return float("nan")

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.read_gib())
            time.sleep(self._interval)


def serve(load: Callable[[], tuple[dict, Callable[[dict], dict]]]) -> None:
    """The worker end of every side-by-side benchmark here. `load()` builds the side and returns its load
    report and its request handler; then one JSON request per stdin line is answered by one JSON line on
    the original stdout until {"cmd": "quit"} (anything the loaded code prints goes to stderr). Memory
    figures (peak RSS, and peak anonymous memory sampled from before `load()`) are added to the report,
    to every answer and to the final line."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    anon = AnonPeak()
    report, handle = load()
    report.update(rss_after_load_gib=current_rss_gib(), peak_rss_after_load_gib=peak_rss_gib(),
                  peak_anon_after_load_gib=anon.peak)
    out.write(json.dumps(report) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "quit":
            out.write(json.dumps({"peak_rss_gib": peak_rss_gib(), "peak_anon_gib": anon.peak}) + "\n")
            break
        out.write(json.dumps({**handle(req), "peak_rss_gib": peak_rss_gib()}) + "\n")


def _import(args: argparse.Namespace):
    sys.path.insert(0, os.path.abspath(args.harness))
    from lionref import official  # noqa: E402  (the harness, beside the official checkout)

    official.import_official(args.official)
    return official


def prepare(args: argparse.Namespace) -> None:
    """Random artifacts of one size, built with the harness's asset code and the official factories."""
    import torch

    official = _import(args)
    from lionref import assets
    from lionref.corpus import make_corpus

    torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    os.makedirs(args.out, exist_ok=True)
    paths = artifact_paths(args.out)
    lines = make_corpus(seed=7)
    log: dict[str, float] = {}
    t = time.time()
    assets.build_t5_tokenizer(paths["t5"], lines, 1000)
    log["t5_params"] = assets.build_t5_dir(paths["t5"], size["t5"], seed=100)
    # bert-base config, and a 30522-entry vocab (the corpus's WordPiece list padded with unused
    # entries) so that the Q-Former's word embedding has bert-base-uncased's shape
    from transformers import BertConfig, BertTokenizer
    os.makedirs(paths["bert"], exist_ok=True)
    vocab = assets.wordpiece_vocab(lines, 600)
    vocab += [f"[unused{i}]" for i in range(30522 - len(vocab))]
    vocab_file = os.path.join(paths["bert"], "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizer(vocab_file, do_lower_case=True).save_pretrained(paths["bert"])
    BertConfig(architectures=["BertForMaskedLM"]).save_pretrained(paths["bert"])
    log["vit_params"] = assets.build_eva_vit(paths["vit"], size["vit"], seed=200)
    sd, trainable = assets.build_lion_checkpoint(paths["lion"], paths, size["vit"], seed=400)
    log["lion_keys"] = len(sd)
    log["prepare_s"] = time.time() - t
    with open(os.path.join(args.out, "artifacts.json"), "w") as f:
        json.dump({"size": args.size, "spec": size, **log}, f, indent=1)
    print(json.dumps(log))
    del official


class Worker:
    """The authors' model, loaded once, answering timing requests."""

    def __init__(self, args: argparse.Namespace):
        t0 = time.time()
        import torch

        self.torch = torch
        self.official = _import(args)
        torch.set_num_threads(args.threads)
        import models
        from lionref.assets import lion_cfg
        from omegaconf import OmegaConf
        from preprocessors.lion_preprocessors import ImageEvalProcessor

        self.import_s = time.time() - t0
        self.rss_after_imports = current_rss_gib()
        spec = SIZES[args.size]["vit"]
        paths = artifact_paths(args.artifacts)
        self.tmp = tempfile.mkdtemp(prefix="lion-ref-bench-")
        yaml_path = os.path.join(self.tmp, "bench.yaml")
        cfg = lion_cfg(paths, pretrained=paths["lion"])
        OmegaConf.save(OmegaConf.create({"model": cfg}), yaml_path)
        t = time.time()
        # the width patch must be active while the official ViT factory runs
        with self.official.eva_width(spec["width"], spec["heads"]), \
                self.official.pretrained_config("bench", yaml_path):
            self.model = models.load_model("lion_t5", "bench", is_eval=True, device="cpu")
        self.load_s = time.time() - t
        self.preprocess = ImageEvalProcessor()
        self.ids: list = []
        inner = self.model.t5_model.generate

        def spy(*a, **k):  # records the ids the official generate decodes; changes nothing
            out = inner(*a, **k)
            self.ids.append(out)
            return out

        self.model.t5_model.generate = spy

    def loaded(self) -> dict:
        return {"import_s": self.import_s, "load_s": self.load_s, "rss_after_imports_gib": self.rss_after_imports,
                "threads": self.torch.get_num_threads(), "torch": self.torch.__version__,
                "transformers": __import__("transformers").__version__,
                "dtypes": sorted({str(p.dtype) for p in self.model.parameters()})}

    def run(self, req: dict) -> dict:
        from PIL import Image

        torch = self.torch
        n = req["new_tokens"]
        t, cpu = time.perf_counter(), time.process_time()
        images = [Image.open(p).convert("RGB") for p in req["images"]]
        pixels = torch.stack([self.preprocess(im) for im in images])
        b = len(images)
        samples = {"image": pixels, "question": [req["question"]] * b, "tags": [req["tags"]] * b,
                   "category": "image_level"}
        self.ids.clear()
        with torch.no_grad():
            # their generate passes max_length as max_new_tokens and min_length as the minimum total
            # decoder length, which counts the decoder start token: N+1 forces exactly N new tokens
            text = self.model.generate(samples, num_beams=req["num_beams"], max_length=n, min_length=n + 1,
                                       repetition_penalty=req["repetition_penalty"])
        seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - cpu
        return {"seconds": seconds, "cpu_seconds": cpu_seconds, "ids": self.ids[-1].tolist(), "text": text}


def worker(args: argparse.Namespace) -> None:
    def load() -> tuple[dict, Callable[[dict], dict]]:
        w = Worker(args)
        return w.loaded(), w.run

    serve(load)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["prepare", "worker"])
    ap.add_argument("--official", required=True, help="checkout of JiuTian-LION at 7578437")
    ap.add_argument("--harness", required=True, help="shared/tools/refharness")
    ap.add_argument("--size", choices=sorted(SIZES), default="base")
    ap.add_argument("--out", help="prepare: where to write the artifacts")
    ap.add_argument("--artifacts", help="worker: the artifacts written by prepare")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    prepare(args) if args.what == "prepare" else worker(args)


if __name__ == "__main__":
    main()
