"""The GPU path at full XL shapes: bf16 vs fp32, and inference speed against the authors' data flow.

    python benchmarks/gpu_check.py [--golden DIR] [--out results.json]

Random weights at the real LION-FlanT5-XL shapes (speed does not depend on the values). Prints, side by
side in one run: images/s and latency for captioning at batch 1, 8, 32 (greedy and 5 beams) for
lion-mllm (SDPA, KV cache) and for the same model forced onto the authors' data flow (eager attention,
no KV cache); peak GPU memory; the fraction of the bf16 matrix peak reached by the image encoder; a
short greedy generation in bf16 compared with fp32; and, with --golden, the golden set on CUDA.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import gpu_engine  # benchmarks/: the random-weight recipe both GPU benchmarks use
import torch

from lion_mllm.model.config import PRESETS, LionConfig
from lion_mllm.model.modeling_lion import LionModel

NEW_TOKENS = 20
PROMPT_TOKENS = 40


CONFIG: LionConfig = PRESETS["flant5xl"]()
DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def random_model(attn: str, seed: int = 0) -> LionModel:
    """Small random weights in fp32 on DEVICE; the same values for every call with one seed."""
    return gpu_engine.random_model(CONFIG, DEVICE, torch.float32, seed, attn_implementation=attn)


def make_batch(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lang, size = CONFIG.language, CONFIG.vision.image_size
    ids = torch.randint(5, lang.vocab_size - 200, (batch, PROMPT_TOKENS), generator=g)
    ids[:, 3] = lang.soft_prompt_token_id  # the soft tag prompt
    ids[:, -1] = 1
    return {
        "pixel_values": torch.randn(batch, 3, size, size, generator=g),
        "input_ids": ids, "attention_mask": torch.ones_like(ids),
        "route_ids": torch.randint(0, 2, (batch,), generator=g),
        "qformer_input_ids": torch.randint(5, CONFIG.qformer.vocab_size - 1, (batch, 16), generator=g),
        "qformer_attention_mask": torch.ones(batch, 16, dtype=torch.long),
    }


def on(batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(DEVICE, dtype) if v.is_floating_point() else v.to(DEVICE)) for k, v in batch.items()}


def timed(fn, repeats: int) -> float:
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def generation_speed(model: LionModel, batch: int, beams: int, use_cache: bool, dtype: torch.dtype,
                     **extra) -> dict:
    inputs = on(make_batch(batch), dtype)
    kwargs = dict(num_beams=beams, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, use_cache=use_cache,
                  repetition_penalty=1.5 if beams > 1 else 1.0, **extra)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(lambda: model.generate(**inputs, **kwargs), repeats=3 if batch < 32 else 2)
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
    return {"latency_s": seconds, "images_per_s": batch / seconds, "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--golden", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--preset", default="flant5xl", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    global CONFIG, DEVICE
    CONFIG, DEVICE = PRESETS[args.preset](), args.device
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    report: dict = {"device": name, "preset": args.preset, "torch": torch.__version__}
    torch.backends.cuda.matmul.allow_tf32 = False

    start = time.perf_counter()
    fp32 = random_model("sdpa")
    report["build_s"] = time.perf_counter() - start
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    eager_bf16 = random_model("eager").to(torch.bfloat16)
    eager_bf16.load_state_dict(bf16.state_dict())

    # bf16 against fp32: logits of one forward, and a short greedy generation
    inputs32, inputs16 = on(make_batch(4, seed=1), torch.float32), on(make_batch(4, seed=1), torch.bfloat16)
    labels = torch.randint(5, CONFIG.language.vocab_size - 200, (4, 8), device=DEVICE)
    with torch.no_grad():
        logits32 = fp32(**inputs32, labels=labels).logits.float()
        logits16 = bf16(**inputs16, labels=labels).logits.float()
    tokens32 = fp32.generate(**inputs32, num_beams=1, max_new_tokens=10, min_new_tokens=10)
    tokens16 = bf16.generate(**inputs16, num_beams=1, max_new_tokens=10, min_new_tokens=10)
    report["bf16_vs_fp32"] = {
        "max_abs_logit_diff": (logits32 - logits16).abs().max().item(),
        "max_abs_logit": logits32.abs().max().item(),
        "argmax_agreement": (logits32.argmax(-1) == logits16.argmax(-1)).float().mean().item(),
        "greedy_tokens_equal_fraction": (tokens32 == tokens16).float().mean().item(),
    }
    del fp32
    if DEVICE == "cuda":
        torch.cuda.empty_cache()

    # image encoder throughput against the bf16 matrix peak (FLOPs counted by the model)
    flops = bf16.flops_per_image(prompt_tokens=PROMPT_TOKENS)
    enc = on(make_batch(32), torch.bfloat16)
    with torch.no_grad():
        seconds = timed(lambda: bf16.encode_images(enc["pixel_values"], enc["qformer_input_ids"],
                                                   enc["qformer_attention_mask"]), repeats=5)
    vision_flops = flops["vision"] + flops["qformer"] + flops["aggregator"]
    report["encode_images_b32"] = {"images_per_s": 32 / seconds, "tflops": 32 * vision_flops / seconds / 1e12,
                                   "fraction_of_790_bf16_tflops": 32 * vision_flops / seconds / 790e12}
    report["flops_per_image"] = flops

    rows = []
    for beams in (1, 5):
        for batch in (1, 8, 32):
            ours = generation_speed(bf16, batch, beams, use_cache=True, dtype=torch.bfloat16)
            authors = generation_speed(eager_bf16, batch, beams, use_cache=False, dtype=torch.bfloat16)
            rows.append({"beams": beams, "batch": batch, "ours": ours, "authors_flow": authors,
                         "speedup": ours["images_per_s"] / authors["images_per_s"]})
            print(f"beams {beams} batch {batch:2d}: ours {ours['images_per_s']:7.2f} img/s "
                  f"({ours['latency_s'] * 1000:7.1f} ms, {ours['peak_gib']:.1f} GiB) | authors' flow "
                  f"{authors['images_per_s']:7.2f} img/s ({authors['latency_s'] * 1000:7.1f} ms, "
                  f"{authors['peak_gib']:.1f} GiB) | x{rows[-1]['speedup']:.2f}", flush=True)
    report["generation"] = rows

    # A static KV cache lets transformers compile the decoder step (CUDA graphs): the small-batch case.
    static_rows = []
    for beams, batch in ((1, 1), (1, 8), (5, 8)):
        try:
            start = time.perf_counter()
            ours = generation_speed(bf16, batch, beams, use_cache=True, dtype=torch.bfloat16,
                                    cache_implementation="static")
            ours["first_call_s"] = time.perf_counter() - start
            same = {"beams": beams, "batch": batch}
            dynamic = next(r["ours"] for r in rows if r["beams"] == beams and r["batch"] == batch)
            authors = next(r["authors_flow"] for r in rows if r["beams"] == beams and r["batch"] == batch)
            static_rows.append({**same, "ours_static": ours, "vs_dynamic": ours["images_per_s"] / dynamic["images_per_s"],
                                "vs_authors_flow": ours["images_per_s"] / authors["images_per_s"]})
            print(f"static cache, beams {beams} batch {batch}: {ours['images_per_s']:.2f} img/s "
                  f"(x{static_rows[-1]['vs_authors_flow']:.2f} vs authors' flow)", flush=True)
        except Exception as error:  # report and go on: the other numbers still count
            static_rows.append({"beams": beams, "batch": batch, "error": f"{type(error).__name__}: {error}"[:500]})
            print("static cache failed:", static_rows[-1]["error"], flush=True)
    report["generation_static_cache"] = static_rows

    if args.golden:
        from PIL import Image

        from lion_mllm import Lion, OfficialPaths

        results = json.loads((args.golden / "outputs" / "results.json").read_text())
        assets = args.golden / "assets"
        paths = OfficialPaths(vit_model=assets / "eva_vit_g_tiny.pth", llm_model=assets / "flan-t5-tiny",
                              bert_model=assets / "bert-tiny-uncased", pretrained=assets / "LION-FlanT5-tiny.pth")
        lion = Lion.from_official(paths, device=DEVICE, dtype=torch.float32, vision_num_heads=2)
        spec = json.loads((args.golden / "spec.json").read_text())
        matches = {}
        for case in spec["cases"]:
            beam = results["configs"]["ALL.tags"]["cases"][case["id"]]["beam"]
            images = [Image.open(args.golden / "images" / f"{n}.png") for n in case["images"]]
            text = lion.generate(images, case["questions"], beam["category"], case["tags"])
            matches[case["id"]] = text == beam["text"]
        report["golden_cuda_fp32_beam_text_equal"] = matches
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
