"""The decode engine on a GPU at LION-FlanT5-XL shapes, against transformers' `generate` (issue #25).

    PYTHONPATH=src python3 benchmarks/gpu_engine.py            # one H100 or H200, under 8 minutes
    python benchmarks/gpu_engine.py --size tiny --device cpu    # the same script on a tiny model (the test's)

Writes one JSON (default `benchmarks/results/gpu_engine_<card>.json`, `--output` to change). Random
weights at LION-FlanT5-XL's real sizes (EVA ViT-g, the Q-Former and aggregator, FlanT5-XL: d_model 2048,
24+24 layers, 32 heads, d_ff 5120, vocabulary 32128) in bfloat16; speed does not depend on the values.
Cases: greedy and 5 beams (repetition penalty 1.5, the authors' beam setting) at batch 1, 8 and 32, 40
prompt tokens, exactly 20 new tokens (`min_length` 21 keeps the end token away, so every sequence runs
20 steps). In each case, on the same weights and inputs in the same run:

- the engine (`DecodeEngine`, compiled: `torch.compile(mode="reduce-overhead")`, CUDA graphs per
  slot-count bucket), sized as `Lion.generate` sizes it (`Lion.MAX_SLOTS` slots, answer length and
  encoder positions rounded up as `Lion.decode_engine` does), one engine for all cases as a `Lion`
  keeps one; and the reference, `LionModel.generate` (transformers' `generate`);
- images/s end to end (encoders + decoding, inputs already on the device; median of `--repeats` calls
  after a warm-up call that is not timed);
- ms per decoder step: the engine's `step()` timed directly (median; search and beam bookkeeping
  included), the compiled model step alone, and the reference's (20 tokens - 1 token) / 19;
- compile seconds: the engine's `compile_seconds` for the buckets a case compiled first (its warm-up);
- the step against the weight-bandwidth floor: (decoder weights read per step + the K/V a step must
  read) / the card's device-to-device copy bandwidth measured here (bytes read + written per second),
  as a ratio (1.0 = the floor);
- token ids: engine against reference per sequence (bf16 near-ties may make a few differ: the share of
  identical sequences is reported, not hidden);
- peak GPU memory, and the slot cache's size (`DecodeEngine.cache_bytes`).

Robustness: a compile or CUDA-graph failure is recorded and that case runs on the eager engine (said so
in the JSON); after two failures the remaining cases go straight to the eager engine. `--budget-s`
(default 420) stops starting phases once spent (the remaining ones are listed as skipped); the JSON is
rewritten after every case, so a crash leaves the cases done so far. Warm-up is never timed and every
timed region is bracketed by `torch.cuda.synchronize()`.

Issue #25's goals: on an H200 >= 250 images/s at batch 32 greedy and a batch-1 decoder step <= 2 ms;
on an H100 >= 200 images/s and <= 2.5 ms (the JSON's `goals` compares the run against its card's).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from lion_mllm.engine import DecodeEngine, EngineOptions
from lion_mllm.lion import Lion
from lion_mllm.model.config import PRESETS, LionConfig
from lion_mllm.model.generation import DecodingSettings
from lion_mllm.model.modeling_lion import LionModel

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"xl": "flant5xl", "base": "base", "tiny": "tiny"}
PROMPT_TOKENS = 40  # as benchmarks/gpu_check.py, so its numbers and these describe the same inputs
QFORMER_TOKENS = 16
BEAM_REPETITION_PENALTY = 1.5  # the authors' default with beams (gpu_check.py's beam cases too)
# the goal cases first, so that a budget cut falls on the others
CASES: tuple[tuple[int, int], ...] = ((1, 1), (1, 32), (1, 8), (5, 1), (5, 8), (5, 32))  # (beams, batch)
GOALS = {"h200": {"batch32_greedy_images_per_s_at_least": 250.0, "batch1_greedy_step_ms_at_most": 2.0},
         "h100": {"batch32_greedy_images_per_s_at_least": 200.0, "batch1_greedy_step_ms_at_most": 2.5}}
MAX_COMPILE_FAILURES = 2  # then the remaining cases use the eager engine without trying again


@dataclass(frozen=True)
class Case:
    beams: int
    batch: int

    @property
    def name(self) -> str:
        return f"{'greedy' if self.beams == 1 else f'{self.beams} beams'}, batch {self.batch}"


class Clock:
    """Seconds since the script started, against the budget."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def spent(self) -> bool:
        return self.elapsed() > self.budget_s


class CudaGraphMessages(logging.Handler):
    """Collects inductor's 'skipping cudagraphs' warnings: they go to loggers that do not propagate
    unless TORCH_LOGS enables them, and a compiled step without its CUDA graph runs silently slower."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.messages and len(self.messages) < 20:
            self.messages.append(message[:500])


# -- the model and its inputs ------------------------------------------------------------------------


def random_model(config: LionConfig, device: torch.device, dtype: torch.dtype, seed: int = 0,
                 attn_implementation: str = "sdpa") -> LionModel:
    """A LionModel with random weights, built without checkpoints or a CPU-side initialisation
    (meta-built, small normal weights, unit norms, zero biases, the embedding at unit scale so prompts
    carry signal), then cast to `dtype`; the same values for every call with one seed. Also what
    benchmarks/gpu_check.py runs."""
    with torch.device("meta"):
        model = LionModel(config, attn_implementation=attn_implementation)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.lower() or name.endswith("scale"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=generator)
        model.language_model.shared.weight.normal_(0.0, 1.0, generator=generator)
        # the only buffer LionModel holds: to_empty left it uninitialised
        embeddings = model.qformer.embeddings
        embeddings.position_ids = torch.arange(embeddings.position_ids.shape[-1], device=device).expand(1, -1)
    language = model.language_model
    language.encoder.embed_tokens.weight = language.shared.weight
    language.decoder.embed_tokens.weight = language.shared.weight
    return model.to(dtype).eval().requires_grad_(False)


def make_inputs(config: LionConfig, batch: int, device: torch.device, dtype: torch.dtype,
                seed: int) -> dict[str, torch.Tensor]:
    """A processed batch as `LionProcessor` gives it (random pixels and ids, the soft tag prompt, both
    adapter routes), on the device."""
    generator = torch.Generator().manual_seed(seed)
    lang, size = config.language, config.vision.image_size
    ids = torch.randint(5, lang.vocab_size - 200, (batch, PROMPT_TOKENS), generator=generator)
    ids[:, 3] = lang.soft_prompt_token_id
    ids[:, -1] = lang.eos_token_id
    inputs = {
        "pixel_values": torch.randn(batch, 3, size, size, generator=generator).to(dtype),
        "input_ids": ids, "attention_mask": torch.ones_like(ids),
        "route_ids": torch.randint(0, 2, (batch,), generator=generator),
        "qformer_input_ids": torch.randint(5, config.qformer.vocab_size - 1, (batch, QFORMER_TOKENS),
                                           generator=generator),
        "qformer_attention_mask": torch.ones(batch, QFORMER_TOKENS, dtype=torch.long),
    }
    return {key: value.to(device) for key, value in inputs.items()}


def power_of_two(value: int, minimum: int) -> int:
    """As `Lion.decode_engine` rounds the engine's sizes (few distinct shapes to compile)."""
    size = minimum
    while size < value:
        size *= 2
    return size


def engine_options(config: LionConfig, new_tokens: int, slots: int, compile_step: bool) -> EngineOptions:
    """The options `Lion.decode_engine` would choose for these cases (one engine serves them all)."""
    return EngineOptions(slots=slots, max_length=power_of_two(new_tokens, 32),
                         max_source_length=config.num_visual_tokens + power_of_two(PROMPT_TOKENS, 128),
                         compile=compile_step)


def decoder_step_weight_bytes(model: LionModel) -> int:
    """Bytes of the weights one decoder step reads: every decoder block parameter but the cross-attention
    key/value projections (applied once per request at admission), the final norm and the lm_head (the
    embedding rows of the fed tokens are counted per sequence in `floor`)."""
    language = model.language_model
    total = 0
    for name, param in language.decoder.named_parameters():
        if name.startswith("embed_tokens") or re.search(r"EncDecAttention\.[kv]\.", name):
            continue
        total += param.numel() * param.element_size()
    return total + language.lm_head.weight.numel() * language.lm_head.weight.element_size()


# -- measuring ---------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(fn: Callable[[], Any], repeats: int, device: torch.device) -> list[float]:
    """Wall seconds of `repeats` calls, each bracketed by device synchronisation."""
    seconds = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def copy_bandwidth(device: torch.device, megabytes: int, repeats: int = 10) -> dict[str, float]:
    """Device-to-device copy of a large tensor: bytes read + written per second (the bandwidth the
    decoder's weight reads are compared against)."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device).random_(0, 255)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    if device.type == "cuda":  # CUDA events: a copy takes about a millisecond, near a host timer's overhead
        seconds = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(source)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
    else:
        seconds = timed_calls(lambda: target.copy_(source), repeats, device)
    return {"tensor_bytes": megabytes * 2**20, "median_s": statistics.median(seconds), "best_s": min(seconds),
            "bytes_per_s": 2 * megabytes * 2**20 / statistics.median(seconds),
            "counted": "bytes read + bytes written per copy, median of the copies"}


def trimmed(sequence: list[int], eos: int) -> list[int]:
    """A decoder sequence up to and with its first end token (transformers pads finished rows)."""
    for index in range(1, len(sequence)):
        if sequence[index] == eos:
            return list(sequence[: index + 1])
    return list(sequence)


def settings_for(case: Case, new_tokens: int) -> DecodingSettings:
    return DecodingSettings(max_new_tokens=new_tokens, num_beams=case.beams, min_length=new_tokens + 1,
                            repetition_penalty=BEAM_REPETITION_PENALTY if case.beams > 1 else 1.0)


def release_all(engine: DecodeEngine) -> None:
    """After a failure mid-decode: free every slot so the engine can run the next case."""
    for group in list(engine.groups):
        engine.release(group)


def error_text(error: BaseException) -> dict[str, str]:
    return {"error": f"{type(error).__name__}: {error}"[:2000],
            "traceback_tail": "".join(traceback.format_exception(error))[-3000:]}


def engine_phase(engine: DecodeEngine, inputs: dict[str, torch.Tensor], settings: DecodingSettings,
                 repeats: int, device: torch.device, eos: int) -> dict[str, Any]:
    """Warm-up (compiles the buckets this case needs first), timed calls, one call with every step
    timed, and the model step alone at this case's bucket."""
    batch = inputs["input_ids"].shape[0]
    compiled_before = dict(engine.compile_seconds)
    outputs: list[list[list[list[int]]]] = []

    def call() -> None:
        outputs.append(engine.generate(inputs, settings))

    first_call_s = timed_calls(call, 1, device)[0]
    compiled = {f"{s[0]} slots x {s[1]} x {s[2]}": seconds for s, seconds in engine.compile_seconds.items()
                if s not in compiled_before}
    seconds = timed_calls(call, repeats, device)
    latency = statistics.median(seconds)

    # every step of one more call, timed on its own (`step` shadowed on the instance for this call)
    step_seconds: list[float] = []
    active: list[int] = []
    original_step = engine.step

    def timed_step() -> Any:
        active.append(engine.options.slots - engine.free_slots)
        sync(device)
        start = time.perf_counter()
        moved = original_step()
        sync(device)
        step_seconds.append(time.perf_counter() - start)
        return moved

    engine.step = timed_step  # type: ignore[method-assign]
    try:
        call()
    finally:
        del engine.step
    ids = [trimmed(sample[0], eos) for sample in outputs[-1]]
    repeat_equal = all([[trimmed(s[0], eos) for s in out] == ids for out in outputs])
    bucket = next(size for size in engine.buckets() if size >= max(active))
    result: dict[str, Any] = {
        "latency_s": latency, "images_per_s": batch / latency, "latency_s_all": seconds,
        "first_call_s": first_call_s, "compile_seconds": compiled,
        "steps": len(step_seconds), "bucket": bucket, "mean_active_sequences": statistics.mean(active),
        "step_ms_median": 1e3 * statistics.median(step_seconds), "step_ms_mean": 1e3 * statistics.mean(step_seconds),
        "step_ms_min": 1e3 * min(step_seconds),
        "repeat_calls_same_ids": repeat_equal,
    }
    result.update(model_step(engine, bucket, repeats=30 if device.type == "cuda" else 5, device=device))
    return {**result, "ids": ids}


def model_step(engine: DecodeEngine, bucket: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """The decoder step alone (no search), replayed at this bucket with the cache's full lengths: for
    a compiled CUDA engine exactly the graph its steps replay (only shapes already compiled are run, so
    nothing is compiled here); for an eager one the largest lengths its steps read."""
    shape = (bucket, engine.options.max_length, engine.max_source_length)
    run = getattr(engine, "_run_step", None)
    if run is None:
        return {"model_step_ms": None, "model_step_note": "DecodeEngine._run_step is gone: not measured"}
    if engine.compile and shape not in engine.compile_seconds:
        return {"model_step_ms": None, "model_step_note": f"shape {shape} was not compiled by this case's steps"}
    with torch.no_grad():
        for _ in range(2):
            run(*shape)
        seconds = timed_calls(lambda: run(*shape), repeats, device)
    return {"model_step_ms": 1e3 * statistics.median(seconds), "model_step_shape": list(shape)}


def reference_phase(model: LionModel, inputs: dict[str, torch.Tensor], settings: DecodingSettings,
                    repeats: int, device: torch.device, eos: int, **extra: Any) -> dict[str, Any]:
    """`LionModel.generate` end to end, and its step as (20 tokens - 1 token) / 19."""
    batch = inputs["input_ids"].shape[0]
    kwargs = dict(num_beams=settings.num_beams, max_new_tokens=settings.max_new_tokens,
                  min_length=settings.min_length, repetition_penalty=settings.repetition_penalty,
                  do_sample=False, **extra)
    outputs: list[torch.Tensor] = []
    full = lambda: outputs.append(model.generate(**inputs, **kwargs))  # noqa: E731
    one = lambda: model.generate(**inputs, **{**kwargs, "max_new_tokens": 1, "min_length": 2})  # noqa: E731
    timed_calls(full, 1, device)  # warm-up
    seconds = timed_calls(full, repeats, device)
    timed_calls(one, 1, device)
    one_seconds = timed_calls(one, repeats, device)
    latency, latency_one = statistics.median(seconds), statistics.median(one_seconds)
    new_tokens = settings.max_new_tokens
    ids = [trimmed(row, eos) for row in outputs[-1].tolist()]
    return {"latency_s": latency, "images_per_s": batch / latency, "latency_s_all": seconds,
            "one_token_latency_s": latency_one,
            "step_ms": 1e3 * (latency - latency_one) / (new_tokens - 1) if new_tokens > 1 else None,
            "ids": ids}


def floor(weight_bytes: int, config: LionConfig, sequences: float, new_tokens: int, dtype_bytes: int,
          bandwidth: float) -> dict[str, float]:
    """The step's weight-bandwidth floor for `sequences` sequences decoding together: the decoder weights
    read once, plus per sequence its embedding row and the K/V a step must read (self-attention: on
    average (new_tokens + 1) / 2 positions over the answer; cross-attention: the visual tokens and the
    prompt), at the measured copy bandwidth."""
    lang = config.language
    per_position = lang.num_decoder_layers * 2 * lang.num_heads * lang.d_kv * dtype_bytes
    positions = (new_tokens + 1) / 2 + config.num_visual_tokens + PROMPT_TOKENS
    kv_bytes = sequences * per_position * positions
    total = weight_bytes + sequences * lang.d_model * dtype_bytes + kv_bytes
    return {"sequences": sequences, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "bytes": total,
            "floor_ms": 1e3 * total / bandwidth}


def engine_cache_read_bytes(engine: DecodeEngine, config: LionConfig, bucket: int, dtype_bytes: int) -> int:
    """K/V bytes a step at this bucket reads at the cache's full lengths (what a compiled CUDA step
    reads: its graph has fixed shapes), beside the floor's K/V: the difference is padding."""
    lang = config.language
    return (bucket * lang.num_decoder_layers * 2 * lang.num_heads * lang.d_kv * dtype_bytes
            * (engine.options.max_length + engine.max_source_length))


def memory(device: torch.device) -> dict[str, int] | None:
    if device.type != "cuda":
        return None
    return {"max_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "max_reserved_bytes": torch.cuda.max_memory_reserved(device)}


def inductor_counters() -> dict[str, int]:
    """Dynamo/inductor counters that say whether CUDA graphs ran (cudagraph_skips > 0: they did not)."""
    from torch._dynamo.utils import counters

    picked = {key: int(value) for key, value in counters["inductor"].items() if "cudagraph" in key}
    picked.update({f"stats.{key}": int(value) for key, value in counters["stats"].items()})
    return picked


# -- the run -----------------------------------------------------------------------------------------


def card_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device)
    found = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    return (found.group(1) if found else re.sub(r"[^A-Za-z0-9]+", "_", name)).lower()


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None  # the GPU machine's copy of the tree may have no .git


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "platform": platform.platform(), "git_commit": git_commit(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "pythonpath": os.environ.get("PYTHONPATH"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(card=torch.cuda.get_device_name(device), card_memory_bytes=props.total_memory,
                    multiprocessors=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version())
    else:
        info["card"] = None
    return info


def write(report: dict[str, Any], path: Path) -> None:
    """The whole report, replaced atomically (a crash mid-write leaves the previous version)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=1) + "\n")
    partial.replace(path)


def run_case(case: Case, model: LionModel, engines: dict[str, DecodeEngine | None], state: dict[str, Any],
             args: argparse.Namespace, device: torch.device, dtype: torch.dtype, clock: Clock,
             report: dict[str, Any]) -> dict[str, Any]:
    config, eos = model.config, model.config.language.eos_token_id
    settings = settings_for(case, args.new_tokens)
    result: dict[str, Any] = {"case": case.name, "beams": case.beams, "batch": case.batch,
                              "settings": {"max_new_tokens": settings.max_new_tokens, "min_length": settings.min_length,
                                           "repetition_penalty": settings.repetition_penalty}, "notes": []}
    inputs = make_inputs(config, case.batch, device, dtype, seed=case.batch * 10 + case.beams)
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    bandwidth = report["copy_bandwidth"]["bytes_per_s"]
    weight_bytes = report["model"]["decoder_step_weight_bytes"]

    # the engine: compiled where asked, the eager engine after a failure (or when not compiling)
    engine_result: dict[str, Any] | None = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    compiled = engines.get("compiled")
    compile_cost = compile_estimate(compiled, case) if compiled is not None else 0.0
    if compiled is not None and clock.elapsed() + compile_cost > clock.budget_s:
        result["notes"].append(f"no time left to compile this case's bucket (about {compile_cost:.0f} s, as the "
                               "slowest compile so far): it ran on the eager engine")
    elif compiled is not None and state["compile_failures"] < MAX_COMPILE_FAILURES:
        try:
            engine_result = {"mode": "compiled", **engine_phase(compiled, inputs, settings, args.repeats, device, eos)}
            engine_used = compiled
        except Exception as error:  # compile, graph capture or replay: recorded, then the eager engine
            state["compile_failures"] += 1
            release_all(compiled)
            result["compile_error"] = error_text(error)
            result["notes"].append("the compiled engine failed here: this case ran on the eager engine")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    elif compiled is not None:
        result["notes"].append(f"the compiled engine failed {MAX_COMPILE_FAILURES} times: eager engine, not tried")
    if engine_result is None and not clock.spent():
        if engines.get("eager") is None:
            engines["eager"] = DecodeEngine(model, engine_options(config, args.new_tokens, args.slots, False))
        engine_used = engines["eager"]
        try:
            mode = "eager (fallback)" if compiled is not None else "eager"
            engine_result = {"mode": mode, **engine_phase(engine_used, inputs, settings, args.repeats, device, eos)}
        except Exception as error:
            release_all(engine_used)
            result["engine_error"] = error_text(error)
    elif engine_result is None:
        result["notes"].append("budget spent: the eager engine was not run")
    engine_memory = memory(device)

    # the reference: transformers' generate on the same weights and inputs
    reference_result: dict[str, Any] | None = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if clock.spent():
        result["notes"].append("budget spent: the reference was not run")
    else:
        try:
            reference_result = reference_phase(model, inputs, settings, args.repeats, device, eos)
        except Exception as error:
            result["reference_error"] = error_text(error)
            if case.beams > 1:  # beams share cross-attention K/V through a cache argument transformers may not take
                try:
                    reference_result = reference_phase(model, inputs, settings, args.repeats, device, eos,
                                                       share_cross_attention=False)
                    result["notes"].append("reference ran with share_cross_attention=False after the error above")
                except Exception as second:
                    result["reference_error_unshared"] = error_text(second)
    reference_memory = memory(device)

    if engine_result is not None:
        engine_ids = engine_result.pop("ids")
        sequences_per_step = engine_result["mean_active_sequences"]
        engine_result["floor"] = floor(weight_bytes, config, sequences_per_step, args.new_tokens, dtype_bytes, bandwidth)
        engine_result["step_vs_floor"] = engine_result["step_ms_median"] / engine_result["floor"]["floor_ms"]
        if engine_result.get("model_step_ms"):
            engine_result["model_step_vs_floor"] = engine_result["model_step_ms"] / engine_result["floor"]["floor_ms"]
        engine_result["cache_read_bytes_at_full_lengths"] = engine_cache_read_bytes(
            engine_used, config, engine_result["bucket"], dtype_bytes)
        engine_result["peak_memory"] = engine_memory
        result["engine"] = engine_result
    if reference_result is not None:
        reference_ids = reference_result.pop("ids")
        reference_result["floor"] = floor(weight_bytes, config, case.batch * case.beams, args.new_tokens,
                                          dtype_bytes, bandwidth)
        if reference_result["step_ms"] is not None:
            reference_result["step_vs_floor"] = reference_result["step_ms"] / reference_result["floor"]["floor_ms"]
        reference_result["peak_memory"] = reference_memory
        result["reference"] = reference_result
    if engine_result is not None and reference_result is not None:
        same = [a == b for a, b in zip(engine_ids, reference_ids, strict=True)]
        result["ids"] = {"sequences": len(same), "identical": sum(same), "share_identical": sum(same) / len(same),
                         "all_equal": all(same), "lengths": sorted({len(s) for s in engine_ids + reference_ids})}
        result["speedup_images_per_s"] = engine_result["images_per_s"] / reference_result["images_per_s"]
    result["inductor_counters"] = inductor_counters()
    result["elapsed_at_end_s"] = clock.elapsed()
    return result


def compile_estimate(engine: DecodeEngine, case: Case) -> float:
    """Seconds this case's first call will spend compiling: 0 when its bucket is compiled already, else
    the slowest compile so far (60 s before any: a guess, only used to keep within the budget)."""
    per_wave = min(case.batch, max(1, engine.options.slots // case.beams)) * case.beams
    bucket = next((size for size in engine.buckets() if size >= per_wave), engine.options.slots)
    if any(shape[0] == bucket for shape in engine.compile_seconds):
        return 0.0
    return max(engine.compile_seconds.values(), default=60.0)


def goals(report: dict[str, Any], slug: str) -> dict[str, Any] | None:
    target = GOALS.get(slug)
    if target is None:
        return None
    by_case = {(c["beams"], c["batch"]): c for c in report["cases"] if "engine" in c}
    out: dict[str, Any] = {"card": slug, **target}
    if (1, 32) in by_case:
        images = by_case[(1, 32)]["engine"]["images_per_s"]
        out["batch32_greedy_images_per_s"] = images
        out["batch32_greedy_met"] = images >= target["batch32_greedy_images_per_s_at_least"]
    if (1, 1) in by_case:
        step = by_case[(1, 1)]["engine"]["step_ms_median"]
        out["batch1_greedy_step_ms"] = step
        out["batch1_greedy_step_met"] = step <= target["batch1_greedy_step_ms_at_most"]
    return out


def parse_cases(text: str | None) -> list[Case]:
    """'greedy:1,beams:32' -> those cases (in that order); None: all six, goal cases first."""
    if not text:
        return [Case(beams, batch) for beams, batch in CASES]
    cases = []
    for item in text.split(","):
        kind, _, batch = item.strip().partition(":")
        if kind not in ("greedy", "beams") or not batch.isdigit():
            raise SystemExit(f"--cases: expected greedy:N or beams:N, got {item!r}")
        cases.append(Case(1 if kind == "greedy" else 5, int(batch)))
    return cases


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="xl", help="model shapes (xl: LION-FlanT5-XL)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="compile the engine's step (auto: on CUDA only, as Lion.generate does)")
    parser.add_argument("--slots", type=int, default=Lion.MAX_SLOTS,
                        help="the engine's slots (default Lion.MAX_SLOTS: larger batches run in waves, as in Lion.generate)")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per path and case (after a warm-up)")
    parser.add_argument("--cases", help="e.g. greedy:1,greedy:32,beams:8 (default: all six)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="no phase starts after this many seconds from the start; the rest is listed as skipped")
    parser.add_argument("--output", type=Path, help="default benchmarks/results/gpu_engine_<card>[_<size>].json")
    args = parser.parse_args(argv)

    clock = Clock(args.budget_s)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --size tiny --device cpu to check the script)")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    compile_step = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    slug = card_slug(device)
    output = args.output or ROOT / "benchmarks" / "results" / (
        f"gpu_engine_{slug}.json" if args.size == "xl" else f"gpu_engine_{slug}_{args.size}.json")
    handler = CudaGraphMessages()
    for name in ("torch._inductor.cudagraph_utils.__cudagraphs", "torch._inductor.scheduler.__cudagraphs"):
        logging.getLogger(name).addHandler(handler)

    report: dict[str, Any] = {
        "benchmark": "gpu_engine (issue #25)",
        "command": " ".join(["python3", *sys.argv]) if argv is None else " ".join(["gpu_engine.py", *argv]),
        **environment(device), "device": str(device), "size": args.size, "preset": SIZES[args.size],
        "dtype": str(dtype).removeprefix("torch."), "weights": "random (seed 0)",
        "inputs": {"prompt_tokens": PROMPT_TOKENS, "qformer_tokens": QFORMER_TOKENS, "routes": "random per sample"},
        "new_tokens": args.new_tokens, "repeats": args.repeats, "budget_s": args.budget_s, "notes": [],
        "skipped": [], "cases": [],
    }

    with torch.no_grad():
        started = time.perf_counter()
        config = PRESETS[SIZES[args.size]]()
        model = random_model(config, device, dtype)
        sync(device)
        report["model"] = {
            "build_s": time.perf_counter() - started,
            "parameters": sum(p.numel() for p in model.parameters()),
            "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "decoder_step_weight_bytes": decoder_step_weight_bytes(model),
            "num_visual_tokens": config.num_visual_tokens,
            "language": {k: getattr(config.language, k) for k in
                         ("d_model", "num_layers", "num_decoder_layers", "num_heads", "d_kv", "d_ff", "vocab_size")},
        }
        report["copy_bandwidth"] = copy_bandwidth(device, 2048 if device.type == "cuda" else 64)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the copy's 4 GiB back to the device, for the CUDA graphs' own pool

        options = engine_options(config, args.new_tokens, args.slots, compile_step)
        engines: dict[str, DecodeEngine | None] = {"compiled": None, "eager": None}
        engine = DecodeEngine(model, options)
        engines["compiled" if compile_step else "eager"] = engine
        report["engine"] = {"slots": options.slots, "max_length": options.max_length,
                            "max_source_length": engine.max_source_length, "compile": compile_step,
                            "buckets": engine.buckets(), "cache_bytes": engine.cache_bytes,
                            "compile_mode": "torch.compile(mode='reduce-overhead') (CUDA graphs)"
                            if compile_step and device.type == "cuda" else None}
        state = {"compile_failures": 0}
        write(report, output)

        for case in parse_cases(args.cases):
            if clock.spent():
                report["skipped"].append({"case": case.name, "why": f"budget of {args.budget_s:.0f} s spent "
                                          f"({clock.elapsed():.0f} s elapsed)"})
                continue
            print(f"[{clock.elapsed():6.1f} s] {case.name} ...", flush=True)
            try:
                result = run_case(case, model, engines, state, args, device, dtype, clock, report)
            except Exception as error:  # inputs, memory: this case is lost, the others are not
                result = {"case": case.name, "beams": case.beams, "batch": case.batch, **error_text(error)}
                for candidate in engines.values():
                    if candidate is not None:
                        release_all(candidate)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            report["cases"].append(result)
            print(summary_line(result), flush=True)
            report["elapsed_s"] = clock.elapsed()
            write(report, output)

    if engines.get("eager") is not None and compile_step:
        report["engine"]["eager_fallback_cache_bytes"] = engines["eager"].cache_bytes
    # each phase resets the peak: the run's peak is the largest of the phases'
    phases = [phase["peak_memory"] for case in report["cases"] for phase in (case.get("engine"), case.get("reference"))
              if phase and phase.get("peak_memory")]
    report["peak_memory"] = {
        "max_allocated_bytes": max((m["max_allocated_bytes"] for m in phases), default=None),
        "max_reserved_bytes": max((m["max_reserved_bytes"] for m in phases), default=None),
        "slot_cache_bytes": report["engine"]["cache_bytes"] + report["engine"].get("eager_fallback_cache_bytes", 0),
        "model_parameter_bytes": report["model"]["parameter_bytes"],
    }
    report["cudagraph_messages"] = handler.messages
    report["goals"] = goals(report, slug)
    report["elapsed_s"] = clock.elapsed()
    write(report, output)
    print(f"wrote {output} ({clock.elapsed():.0f} s)", flush=True)
    return report


def summary_line(result: dict[str, Any]) -> str:
    parts = [f"  {result['case']}:"]
    if "engine" in result:
        e = result["engine"]
        parts.append(f"engine [{e['mode']}] {e['images_per_s']:.1f} img/s, step {e['step_ms_median']:.2f} ms "
                     f"(x{e['step_vs_floor']:.1f} floor)")
    if "reference" in result:
        r = result["reference"]
        step = f"{r['step_ms']:.2f} ms" if r["step_ms"] is not None else "-"
        parts.append(f"| reference {r['images_per_s']:.1f} img/s, step {step}")
    if "ids" in result:
        parts.append(f"| ids identical {result['ids']['identical']}/{result['ids']['sequences']}")
    for key in ("error", "compile_error", "engine_error", "reference_error"):
        if key in result:
            parts.append(f"| {key}: {result[key]['error'][:200] if isinstance(result[key], dict) else result[key][:200]}")
    return " ".join(parts)


if __name__ == "__main__":
    main()
