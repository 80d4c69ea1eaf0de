"""Where lion-mllm's float32 CPU time goes, on the shapes of `cpu_vs_reference.py --size base`.

    python benchmarks/cpu_profile.py --reps 3 --threads 1

The model is `lion_mllm.model.config.base()` at the authors' ViT depth (39 blocks; the aggregator taps blocks
38, 28 and 18), as in `cpu_vs_reference.py --size base`, with random weights (seed 0), random pixels and
prompt ids. Times are the process's CPU time (`time.process_time`, one intra-op thread), which the other
jobs of a shared machine disturb less than wall time; the load average is recorded with each number.

It measures:
  * `stages`: one greedy captioning call split into ViT, Q-Former + aggregator, T5 encoder, the first
    `generate` step (which also projects the cross-attention keys and values) and each later decoder step;
  * `decode_loop`: transformers' `generate` against a minimal greedy loop over the same cached T5 (the
    per-token Python work that a loop of our own could save);
  * `profile`: torch.profiler's operator table for the whole call;
  * `gemm`: GFLOP/s of one linear layer of each encoder and decoder shape: `F.linear` (MKL sgemm, the
    default), MKL with a prepacked weight (`torch.ops.mkl._mkl_linear`), oneDNN
    (`torch.ops.mkldnn._linear_pointwise`) and bf16 `F.linear` (oneDNN, AMX where present), and whether
    the float32 alternatives equal `F.linear` bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from lion_mllm.model.config import base
from lion_mllm.model.modeling_lion import LionModel

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cpu_paths import base_inputs

# (rows, in, out): ViT qkv / MLP over 257 tokens, T5 encoder over 313 positions, decoder steps at 1, 5 and
# 8 rows (greedy batch 1, 5 beams, greedy batch 8), the vocabulary projection
GEMM_SHAPES = ((257, 768, 2304), (257, 768, 3072), (257, 3072, 768), (313, 768, 768), (313, 768, 2048),
               (2056, 768, 3072), (1, 768, 768), (1, 768, 2048), (8, 768, 2048), (1, 768, 32128),
               (5, 768, 32128), (8, 768, 32128))


def cpu_seconds(fn: Callable[[], object], reps: int) -> float:
    """Median process CPU time of `fn` over `reps` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def depth39_model() -> LionModel:
    torch.manual_seed(0)
    config = base()
    config = dataclasses.replace(
        config, vision=dataclasses.replace(config.vision, num_hidden_layers=39),
        aggregator=dataclasses.replace(config.aggregator, hidden_layer=38, cross_layers=(28, 18)))
    return LionModel(config).eval()


@torch.no_grad()
def stages(model: LionModel, batch: int, reps: int, new_tokens: int) -> dict:
    inputs = base_inputs(model, batch)
    pixels, taps = inputs["pixel_values"], model.vision_taps()
    qformer = (inputs["qformer_input_ids"], inputs["qformer_attention_mask"])

    def generate(tokens: int) -> torch.Tensor:
        return model.generate(**inputs, num_beams=1, max_new_tokens=tokens, min_length=tokens + 1,
                              repetition_penalty=1.5, do_sample=False)

    vit = cpu_seconds(lambda: model.vision_model(pixels, taps), reps)
    visual = cpu_seconds(lambda: model.encode_images(pixels, *qformer), reps)
    embeds, mask = model.encoder_inputs(pixels, inputs["input_ids"], inputs["attention_mask"], *qformer)
    with model.routing(inputs["route_ids"]):
        t5_encoder = cpu_seconds(lambda: model.language_model.get_encoder()(inputs_embeds=embeds,
                                                                              attention_mask=mask), reps)
    one, full = cpu_seconds(lambda: generate(1), reps), cpu_seconds(lambda: generate(new_tokens), reps)
    return {"batch": batch, "new_tokens": new_tokens, "vit_s": vit, "qformer_and_aggregator_s": visual - vit,
            "t5_encoder_s": t5_encoder, "first_step_s": one - visual - t5_encoder,
            "later_step_s": (full - one) / (new_tokens - 1), "whole_call_s": full, "loadavg": os.getloadavg()}


@torch.no_grad()
def decode_loop(model: LionModel, batch: int, reps: int, new_tokens: int) -> dict:
    """Greedy decoding of the same encoder output by transformers' `generate` and by a minimal loop
    (no logits processors: the loop measures the floor of per-token Python work, not a replacement)."""
    inputs = base_inputs(model, batch)
    t5 = model.language_model
    embeds, mask = model.encoder_inputs(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"],
                                        inputs["qformer_input_ids"], inputs["qformer_attention_mask"])
    with model.routing(inputs["route_ids"]):
        encoded = t5.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state

        def generate(tokens: int) -> torch.Tensor:
            return t5.generate(encoder_outputs=BaseModelOutput(last_hidden_state=encoded), attention_mask=mask,
                               num_beams=1, max_new_tokens=tokens, min_length=tokens + 1, do_sample=False)

        def loop(tokens: int) -> torch.Tensor:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            ids = torch.full((batch, 1), t5.config.decoder_start_token_id)
            for _ in range(tokens):
                logits = t5(encoder_outputs=(encoded,), attention_mask=mask, decoder_input_ids=ids[:, -1:],
                            cache=cache, use_cache=True).logits
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            return ids

        result = {}
        for name, fn in (("generate", generate), ("minimal_loop", loop)):
            one, full = cpu_seconds(functools.partial(fn, 1), reps), cpu_seconds(functools.partial(fn, new_tokens), reps)
            result[name] = {"first_step_s": one, "later_step_s": (full - one) / (new_tokens - 1)}
    return {"batch": batch, **result, "loadavg": os.getloadavg()}


@torch.no_grad()
def operator_table(model: LionModel, new_tokens: int, rows: int = 20) -> str:
    from torch.profiler import ProfilerActivity, profile

    inputs = base_inputs(model, 1)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model.generate(**inputs, num_beams=1, max_new_tokens=new_tokens, min_length=new_tokens + 1,
                       repetition_penalty=1.5, do_sample=False)
    return prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows,
                                                              max_name_column_width=50, max_shapes_column_width=60)


def linear_kernels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """The same linear layer computed four ways (see the module docstring)."""
    rows = x.shape[0]
    # the prepacked MKL weight is packed for a row count; it computes any row count
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
    x16, weight16, bias16 = x.bfloat16(), weight.bfloat16(), bias.bfloat16()
    return {
        "F.linear": lambda: F.linear(x, weight, bias),
        "mkl_packed": lambda: torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows),
        "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], ""),
        "bf16": lambda: F.linear(x16, weight16, bias16),
    }


@torch.no_grad()
def gemm(reps: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rates = []
    for rows, width_in, width_out in GEMM_SHAPES:
        x = torch.randn(rows, width_in, generator=generator)
        weight = torch.randn(width_out, width_in, generator=generator) * 0.02
        bias = torch.randn(width_out, generator=generator)
        kernels = linear_kernels(x, weight, bias)
        flop = 2.0 * rows * width_in * width_out
        reference = kernels["F.linear"]()
        rates.append({
            "shape": [rows, width_in, width_out],
            "gflops": {name: flop / cpu_seconds(fn, reps) / 1e9 for name, fn in kernels.items()},
            "bit_equal_to_F.linear": {name: torch.equal(kernels[name](), reference) for name in ("mkl_packed", "onednn")},
            "packed_weight_size_vs_weight":
                torch.ops.mkl._mkl_reorder_linear_weight(weight, rows).numel() / weight.numel(),
            "loadavg": os.getloadavg(),
        })
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--stage-batches", type=int, nargs="+", default=[1])
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--output", default=str(HERE / "results" / "cpu_profile_base.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = depth39_model()
    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    result = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__, "threads": args.threads,
              "cpu": cpu,
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg_start": os.getloadavg()}
    result["stages"] = [stages(model, b, args.reps, args.new_tokens) for b in args.stage_batches]
    result["decode_loop"] = [decode_loop(model, b, args.reps, args.new_tokens) for b in args.decode_batches]
    table = operator_table(model, args.new_tokens)
    result["profile_greedy_batch1"] = table.splitlines()
    result["gemm"] = gemm(max(args.reps, 11))
    result["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["loadavg_end"] = os.getloadavg()
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("stages", "decode_loop")}, indent=1))
    print(table)
    for row in result["gemm"]:
        print(row["shape"], {k: round(v) for k, v in row["gflops"].items()}, row["bit_equal_to_F.linear"])
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
