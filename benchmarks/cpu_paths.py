"""lion-mllm's float32 CPU inference paths side by side, in one process, on the same inputs.

    python benchmarks/cpu_paths.py --reps 3 --new-tokens 16 --threads 1

Paths (the same model object, switched between calls, so the weights are the same tensors):
  * `previous default`: our default path before issue #17 (`LionModel.generate(...,
    share_cross_attention=False)`: transformers computes the decoder's cross-attention keys and values
    for every beam and copies them at every beam reorder), `nn.Linear` -> `F.linear` (MKL sgemm);
  * `default`: our default path now: beams share their image's cross-attention keys and values;
  * `default + onednn`: the same with every `nn.Linear` switched to oneDNN
    (`lion_mllm.model.cpu_inference.use_onednn_linear`, opt-in).

Models: `base` (`lion_mllm.model.config.base()`: ViT 768 wide x 12 blocks, bert-base Q-Former, T5-base shapes,
random weights, seed 0, random pixels and prompt ids) and `lion-shapes` (the shipped trained model, on
its three example images with its caption prompt). Cases: greedy batch 1 and 8, 5 beams batch 1, exactly
`--new-tokens` new tokens (min and max length pinned), repetition penalty 1.5. Each timed call is
`LionModel.generate` on prepared tensors (encoders + T5 + decoding). Repetitions alternate the paths
(previous default, default, default + onednn, then again); medians are reported, with each path's speed
relative to the previous default path and whether every generated id of every call equals its ids.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from lion_mllm.model.cpu_inference import use_onednn_linear
from lion_mllm.model.modeling_lion import IMAGE_ROUTE, LionModel

ROOT = Path(__file__).resolve().parent.parent
CASES = (("greedy, batch 1", 1, 1), ("greedy, batch 8", 8, 1), ("5 beams, batch 1", 1, 5))


def base_model_and_inputs(batch: int) -> tuple[LionModel, dict[str, torch.Tensor]]:
    from lion_mllm.model.config import base

    torch.manual_seed(0)
    model = LionModel(base()).eval()
    return model, base_inputs(model, batch)


def base_inputs(model: LionModel, batch: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    size = model.config.vision.image_size
    prompt, instruction = 24, 16
    return {
        "pixel_values": torch.randn(batch, 3, size, size, generator=generator),
        "input_ids": torch.randint(2, 32000, (batch, prompt), generator=generator),
        "attention_mask": torch.ones(batch, prompt, dtype=torch.long),
        "qformer_input_ids": torch.randint(1000, 30000, (batch, instruction), generator=generator),
        "qformer_attention_mask": torch.ones(batch, instruction, dtype=torch.long),
        "route_ids": torch.full((batch,), IMAGE_ROUTE, dtype=torch.long),
    }


def shapes_inputs(lion, batch: int) -> dict[str, torch.Tensor]:
    from PIL import Image

    examples = sorted((ROOT / "src/lion_mllm/assets/examples").glob("shapes-*.png"))
    images = [Image.open(examples[i % len(examples)]).convert("RGB") for i in range(batch)]
    prompt = lion.generation_config.prompt("caption", None) if hasattr(lion.generation_config, "prompt") else None
    questions = [prompt or "Describe the image."] * batch
    tags = lion._complete_tags(images, None)
    return dict(lion.processor(images, questions, ["caption"] * batch, tags))


# (name, beams share their image's cross-attention keys/values, every nn.Linear on oneDNN)
PATHS = (("previous default", False, False), ("default", True, False), ("default + onednn", True, True))


def run_case(model: LionModel, inputs: dict[str, torch.Tensor], beams: int, new_tokens: int, reps: int) -> dict:
    calls: dict[str, list[float]] = {name: [] for name, _, _ in PATHS}
    ids: dict[str, list[list[list[int]]]] = {name: [] for name, _, _ in PATHS}

    def call(share: bool, tokens: int) -> tuple[float, list[list[int]]]:
        t = time.perf_counter()
        out = model.generate(**inputs, num_beams=beams, max_new_tokens=tokens, min_length=tokens + 1,
                             repetition_penalty=1.5, do_sample=False, share_cross_attention=share)
        return time.perf_counter() - t, out.tolist()

    for _, share, onednn in PATHS:  # untimed warm-up of every path (2 tokens)
        use_onednn_linear(model, onednn)
        call(share, 2)
    for _ in range(reps):  # interleaved: every path sees the same machine load
        for name, share, onednn in PATHS:
            use_onednn_linear(model, onednn)
            seconds, tokens = call(share, new_tokens)
            calls[name].append(seconds)
            ids[name].append(tokens)
    use_onednn_linear(model, False)
    lengths = {len(seq) for path in ids.values() for call_ids in path for seq in call_ids}
    med = {name: statistics.median(times) for name, times in calls.items()}
    baseline = ids["previous default"][0]
    return {"seconds": calls, "median_s": med,
            "speed_vs_previous_default": {name: med["previous default"] / m for name, m in med.items()},
            "same_ids_as_previous_default": {name: all(t == baseline for t in path) for name, path in ids.items()},
            "sequence_lengths": sorted(lengths), "ids_first_call": baseline, "loadavg_after": os.getloadavg()}


# (rows, in, out): ViT MLP over 257 tokens, T5-base attention over 8 x 313 encoder positions, a decoder
# feed-forward step at batch 1 and at 5 beams, the vocabulary projection at batch 8
GEMM_SHAPES = ((257, 768, 3072), (2504, 768, 768), (1, 768, 2048), (5, 768, 2048), (8, 768, 32128))


def gemm_rates(reps: int = 20) -> dict[str, dict[str, float]]:
    """GFLOP/s of one float32 linear layer, F.linear (our default path) against oneDNN, same operands."""
    import torch.nn.functional as F

    rates = {}
    generator = torch.Generator().manual_seed(0)
    for rows, width_in, width_out in GEMM_SHAPES:
        x = torch.randn(rows, width_in, generator=generator)
        weight, bias = torch.randn(width_out, width_in, generator=generator), torch.randn(width_out, generator=generator)
        # the operands are bound as defaults: each lambda keeps this shape's tensors
        kernels = {"F.linear": lambda x=x, w=weight, b=bias: F.linear(x, w, b),
                   "onednn": lambda x=x, w=weight, b=bias: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")}
        seconds = {name: [] for name in kernels}
        for kernel in kernels.values():  # warm-up
            kernel()
        for _ in range(reps):
            for name, kernel in kernels.items():
                t = time.perf_counter()
                kernel()
                seconds[name].append(time.perf_counter() - t)
        flop = 2.0 * rows * width_in * width_out
        rates[f"{rows}x{width_in}x{width_out}"] = {name: flop / statistics.median(s) / 1e9 for name, s in seconds.items()}
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=["base", "lion-shapes"], choices=["base", "lion-shapes"])
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/cpu_paths.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    report = {"command": "python " + " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
              "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "loadavg_start": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "results": {}}
    report["gemm_gflops"] = gemm_rates()
    for shape, rates in report["gemm_gflops"].items():
        print(f"linear {shape:17s} F.linear {rates['F.linear']:6.1f} GFLOP/s   onednn {rates['onednn']:6.1f} GFLOP/s",
              flush=True)
    for name in args.models:
        if name == "base":
            model, _ = base_model_and_inputs(1)
            make_inputs = lambda b, m=model: base_inputs(m, b)  # noqa: E731
        else:
            from lion_mllm import load_model

            lion = load_model("lion-shapes")
            model = lion.model.eval()
            make_inputs = lambda b, l=lion: shapes_inputs(l, b)  # noqa: E731
        with torch.inference_mode():
            for label, batch, beams in CASES:
                result = run_case(model, make_inputs(batch), beams, args.new_tokens, args.reps)
                report["results"][f"{name}: {label}"] = result
                cells = "   ".join(f"{path} {result['median_s'][path]:7.3f} s "
                                   f"({result['speed_vs_previous_default'][path]:.2f}x, same ids "
                                   f"{'yes' if result['same_ids_as_previous_default'][path] else 'NO'})"
                                   for path, _, _ in PATHS)
                print(f"{name:11s} {label:17s} {cells}   load {os.getloadavg()[0]:.1f}", flush=True)
        del model
    report["loadavg_end"] = os.getloadavg()
    report["ended"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    Path(args.output).write_text(json.dumps(report, indent=1))
    print("wrote", args.output)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
