"""Loading LION-FlanT5-XL from the authors' five-file layout: wall time, peak memory, and one caption.

    python benchmarks/load_xl.py prepare DIR          # random full-size files in the authors' formats
    python benchmarks/load_xl.py measure DIR [--dtype float32|bfloat16] [--output results/load_xl_X.json]

`prepare` writes an eva_vit_g.pth (float16, 39 blocks), a flan-t5-xl shaped directory (float32
safetensors in 3 shards, the golden set's tokenizer), a bert-base config with a 30522-entry vocab, and a
LION .pth holding the trainable tensors, as a LAVIS trainer saves them. `measure` (run it in a fresh
process) loads them with `Lion.from_official` and reports the wall time, the peak resident memory (all
of it, and the anonymous part: file pages of the memory-mapped checkpoints are counted in the first),
the final model's bytes and their ratio, then times one greedy 10-token caption. With `--output` the
result is also written there, with the command, the machine (CPU model, logical CPUs, the CPU's bf16
and AVX-512 flags), the versions and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
import transformers

from lion_mllm import Lion, LionModel, OfficialPaths
from lion_mllm.checkpoints.official import ours_to_official
from lion_mllm.model.config import flant5xl
from lion_mllm.model.tasks import CAPTION_PROMPT

GOLDEN_T5 = Path(__file__).resolve().parents[1] / "tests" / "golden" / "lion-a" / "assets" / "flan-t5-tiny"


def random_like(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32).normal_(0, 0.02).to(dtype)


def prepare(directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = LionModel(flant5xl())
    state = {k: v for k, v in model.state_dict().items() if "embed_tokens" not in k}
    official = ours_to_official(state)
    torch.manual_seed(0)

    vit = {k[len("visual_encoder."):]: random_like(tuple(v.shape), torch.float16)
           for k, v in official.items() if k.startswith("visual_encoder.")}
    torch.save(vit, directory / "eva_vit_g.pth")
    del vit

    t5_dir = directory / "flan-t5-xl"
    t5_dir.mkdir(exist_ok=True)
    t5_keys = [k for k in official if k.startswith("t5_model.") and ".adapter." not in k]
    shards, weight_map = [t5_keys[i::3] for i in range(3)], {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k[len("t5_model."):]: random_like(tuple(official[k].shape), torch.float32) for k in keys},
                  str(t5_dir / name))
        weight_map.update({k[len("t5_model."):]: name for k in keys})
    (t5_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    lang = flant5xl().language
    (t5_dir / "config.json").write_text(json.dumps({
        "model_type": "t5", "d_model": lang.d_model, "d_ff": lang.d_ff, "d_kv": lang.d_kv,
        "num_layers": lang.num_layers, "num_decoder_layers": lang.num_decoder_layers, "num_heads": lang.num_heads,
        "vocab_size": lang.vocab_size, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6, "dropout_rate": 0.1, "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}))
    for file in GOLDEN_T5.iterdir():
        if "token" in file.name or file.suffix == ".model":
            shutil.copy(file, t5_dir / file.name)

    bert_dir = directory / "bert-base-uncased"
    bert_dir.mkdir(exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (bert_dir / "vocab.txt").write_text("\n".join(specials + [f"w{i}" for i in range(30522 - 5)]) + "\n")
    (bert_dir / "config.json").write_text(json.dumps({
        "model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "max_position_embeddings": 512, "layer_norm_eps": 1e-12, "vocab_size": 30522}))
    (bert_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                                "do_lower_case": True}))

    lion = {k: random_like(tuple(v.shape), torch.float32) if v.is_floating_point() else torch.arange(512)[None]
            for k, v in ((k, official[k]) for k in official
                         if not k.startswith("visual_encoder.") and (not k.startswith("t5_model.")
                                                                     or ".adapter." in k))}
    lion["Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    torch.save({"model": lion}, directory / "LION-FlanT5-XL.pth")


class MemoryWatch:
    """Peak resident and anonymous memory of this process, sampled every 20 ms."""

    def __init__(self) -> None:
        self.peak_rss = self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> tuple[int, int]:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["RssAnon"].split()[0]) * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, anon = self.read()
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
            time.sleep(0.02)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(directory: Path, dtype: str) -> dict:
    paths = OfficialPaths(vit_model=directory / "eva_vit_g.pth", llm_model=directory / "flan-t5-xl",
                          bert_model=directory / "bert-base-uncased", pretrained=directory / "LION-FlanT5-XL.pth")
    baseline_rss, baseline_anon = MemoryWatch.read()
    with MemoryWatch() as watch:
        start = time.perf_counter()
        lion = Lion.from_official(paths, dtype=dtype)
        load_s = time.perf_counter() - start
    seen: set[int] = set()
    model_bytes = 0
    for tensor in [*lion.model.parameters(), *lion.model.buffers()]:
        if tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            model_bytes += tensor.untyped_storage().nbytes()
    from PIL import Image

    image = Image.new("RGB", (640, 480), (120, 80, 40))
    batch = lion.processor([image], [CAPTION_PROMPT], ["caption"], ["dog, man"])
    batch["pixel_values"] = batch["pixel_values"].to(lion.model.dtype)
    start = time.perf_counter()
    lion.model.generate(**batch, num_beams=1, max_new_tokens=10, min_new_tokens=10)
    caption_s = time.perf_counter() - start
    gib = 2**30
    result = {
        "dtype": dtype, "threads": torch.get_num_threads(), "load_s": load_s, "caption_10_tokens_s": caption_s,
        "model_gib": model_bytes / gib,
        "peak_rss_gib": (watch.peak_rss - baseline_rss) / gib, "peak_anon_gib": (watch.peak_anon - baseline_anon) / gib,
    }
    result["peak_rss_over_model"] = result["peak_rss_gib"] / result["model_gib"]
    result["peak_anon_over_model"] = result["peak_anon_gib"] / result["model_gib"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("prepare", "measure"))
    parser.add_argument("directory", type=Path)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--output", type=Path, default=None, help="measure: also write the result here")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.directory)
        return
    load_before = os.getloadavg()
    result = measure(args.directory, args.dtype)
    print(json.dumps(result, indent=1))
    if args.output is not None:
        from cpu_vs_reference import machine

        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
        report = {"command": "python " + " ".join(sys.argv),
                  "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "machine": {**machine(), "cpu_flags": sorted(f for f in flags if "bf16" in f or "avx512f" in f
                                                               or f in ("avx2", "amx_tile"))},
                  "torch": torch.__version__, "transformers": transformers.__version__,
                  "loadavg_before": load_before, "loadavg_after": os.getloadavg(), **result}
        args.output.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
