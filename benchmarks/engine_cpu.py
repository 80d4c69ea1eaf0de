"""The decode engine on a CPU, side by side with the reference path, in one run (lion-shapes, 1 thread).

    python benchmarks/engine_cpu.py --output benchmarks/results/engine_cpu.json
    python benchmarks/engine_cpu.py --baseline /path/to/checkout-of-3148a99 ...   # + `lion run` old vs new

Decoder step: the reference is `LionModel.generate` (transformers' `generate`: what `Lion.generate` ran
before the engine); the engine runs eager and compiled (`torch.compile`, C++ wrapper). For each case (greedy
at batch 1 and 8, 5 beams at batch 1) every side decodes the same batch twice, 1 token and N tokens, with
`min_length` forcing all N; a step costs (time(N) - time(1)) / (N - 1), which leaves out the encoders. The
sides alternate within each repetition and the medians are reported, in CPU time of the thread (less
sensitive than wall time to other processes on a shared machine) and in wall time. Token ids of the three
sides are compared. Compile seconds are the engine's first call per shape (paid once per process).

`lion run` (with --baseline): the same 384 tasks (128 lion-shapes scenes: a caption, a question, a phrase)
answered by `lion run` of the baseline checkout and of this one, each in its own process with 1 thread,
alternating, `--run-reps` times; its own reported batch-loop seconds (model loading excluded) and the wall
time of the process; the answers are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def machine() -> dict[str, Any]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
            "load_before": os.getloadavg()}


def step_benchmark(reps: int, tokens: int) -> dict[str, Any]:
    import torch

    from lion_mllm import load_model
    from lion_mllm.engine import DecodeEngine, EngineOptions
    from lion_mllm.model.generation import DecodingSettings
    from lion_mllm.shapes import make_scene, render

    torch.set_num_threads(1)
    lion = load_model("lion-shapes")
    images = [render(make_scene(seed)) for seed in range(8)]
    prompt = lion.generation_config.prompt("caption")
    batch8 = lion.processor(images, [prompt] * 8, ["caption"] * 8, lion.fill_tags(images, None))
    engines = {"engine-eager": DecodeEngine(lion.model, EngineOptions(slots=8, max_length=64, compile=False)),
               "engine-compiled": DecodeEngine(lion.model, EngineOptions(slots=8, max_length=64, compile=True))}

    def reference(batch: dict, settings: DecodingSettings) -> list[list[int]]:
        with torch.no_grad():
            out = lion.model.generate(**batch, num_beams=settings.num_beams, max_new_tokens=settings.max_new_tokens,
                                      min_length=settings.min_length, repetition_penalty=1.0, do_sample=False)
        return [row[: settings.max_new_tokens + 1] for row in out.tolist()]

    def engine_side(name: str):
        def run(batch: dict, settings: DecodingSettings) -> list[list[int]]:
            return [seqs[0] for seqs in engines[name].generate(batch, settings)]
        return run

    sides = {"reference": reference, **{name: engine_side(name) for name in engines}}
    cases = {"greedy-b1": (1, 1), "greedy-b8": (8, 1), "beams5-b1": (1, 5)}
    results: dict[str, Any] = {}
    for case, (size, beams) in cases.items():
        batch = {k: v[:size] for k, v in batch8.items()}
        one = DecodingSettings(1, num_beams=beams, min_length=2)
        many = DecodingSettings(tokens, num_beams=beams, min_length=tokens + 1)
        ids = {}
        compile_started = time.perf_counter()
        for name, run in sides.items():  # warm-up (compiles the engine's shapes for this case)
            run(batch, one)
            ids[name] = run(batch, many)
        warm_s = time.perf_counter() - compile_started
        timings: dict[str, dict[str, list[float]]] = {name: {"cpu": [], "wall": []} for name in sides}
        for _ in range(reps):
            for name, run in sides.items():
                c0, w0 = time.thread_time(), time.perf_counter()
                run(batch, one)
                c1, w1 = time.thread_time(), time.perf_counter()
                run(batch, many)
                c2, w2 = time.thread_time(), time.perf_counter()
                timings[name]["cpu"].append(((c2 - c1) - (c1 - c0)) / (tokens - 1) * 1000)
                timings[name]["wall"].append(((w2 - w1) - (w1 - w0)) / (tokens - 1) * 1000)
        row: dict[str, Any] = {"batch": size, "beams": beams, "tokens": tokens, "warm_up_s": round(warm_s, 1)}
        for name, values in timings.items():
            row[name] = {"step_ms_cpu": round(statistics.median(values["cpu"]), 4),
                         "step_ms_wall": round(statistics.median(values["wall"]), 4),
                         "step_ms_cpu_min": round(min(values["cpu"]), 4)}
        ref = row["reference"]["step_ms_cpu"]
        for name in engines:
            row[name]["speedup_cpu"] = round(ref / row[name]["step_ms_cpu"], 2)
            row[name]["ids_equal_reference"] = ids[name] == ids["reference"]
        results[case] = row
        print(case, json.dumps(row), flush=True)
    results["compile_seconds"] = {str(k): round(v, 1) for k, v in engines["engine-compiled"].compile_seconds.items()}
    return results


def run_benchmark(baseline: Path, reps: int, scenes: int) -> dict[str, Any]:
    from lion_mllm import shapes

    work = Path(tempfile.mkdtemp(prefix="engine-run-"))
    base = shapes.HELD_OUT_SEED_BASE + 5000
    lines = shapes.write_run_tasks(work, range(base, base + scenes))
    tasks = work / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(line) + "\n" for line in lines))
    sides = {"baseline": baseline / "src", "this": ROOT / "src"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    timings: dict[str, dict[str, list[float]]] = {name: {"loop_s": [], "wall_s": []} for name in sides}
    answers: dict[str, dict[str, Any]] = {}
    for rep in range(reps):
        for name, src in (sides.items() if rep % 2 == 0 else reversed(sides.items())):
            output = work / f"{name}-{rep}.jsonl"
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "lion_mllm.cli", "run", "--input", str(tasks), "--output",
                                   str(output), "--json", "-q"], env={**env, "PYTHONPATH": str(src)},
                                  capture_output=True, text=True, check=True)
            timings[name]["wall_s"].append(time.perf_counter() - started)
            timings[name]["loop_s"].append(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])
            answers[name] = {r["id"]: r.get("answer") for r in map(json.loads, output.read_text().splitlines())}
            print("lion run", name, rep, timings[name]["loop_s"][-1], flush=True)
    summary = {name: {key: round(statistics.median(values), 2) for key, values in t.items()}
               for name, t in timings.items()}
    summary["tasks"] = len(lines)
    summary["speedup_loop"] = round(summary["baseline"]["loop_s"] / summary["this"]["loop_s"], 2)
    summary["speedup_wall"] = round(summary["baseline"]["wall_s"] / summary["this"]["wall_s"], 2)
    summary["same_answers"] = sum(answers["baseline"][k] == answers["this"].get(k) for k in answers["baseline"])
    summary["baseline_commit"] = subprocess.run(["git", "-C", str(baseline), "rev-parse", "--short", "HEAD"],
                                                capture_output=True, text=True).stdout.strip()
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each step measurement")
    parser.add_argument("--tokens", type=int, default=33, help="tokens decoded per measurement (N)")
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout to run `lion run` against")
    parser.add_argument("--run-reps", type=int, default=2)
    parser.add_argument("--scenes", type=int, default=128)
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine()}
    if not args.skip_steps:
        report["decoder_step"] = step_benchmark(args.reps, args.tokens)
    if args.baseline is not None:
        report["lion_run"] = run_benchmark(args.baseline, args.run_reps, args.scenes)
    report["machine"]["load_after"] = os.getloadavg()
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
