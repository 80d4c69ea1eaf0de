"""Throughput of `lion run --engine ray` with 1 and 2 model replicas against single-process `lion run`.

    OMP_NUM_THREADS=1 python benchmarks/scale_run.py --scenes 32 --output benchmarks/results/scale_run.json

The same task file (lion-shapes scenes: a caption, a question and a grounding phrase each) is answered
in one run by `lion run` in its own process with 1 thread, and by the Ray engine on a local cluster of
2 CPUs with 1 replica x 1 thread and 2 replicas x 1 thread: equal thread budgets (1, and 2 against
`lion run` with 2 threads, measured on the small file only since two threads oversubscribe this shared
machine). Every configuration's records are checked equal to `lion run`'s.

Each configuration runs the small task file (the first `--small` scenes), the full one, and the small
one again. Reported: the wall seconds of the full job (process or Ray job start, model loads, all items)
and its items/s, and the marginal rate, (full items - small items) / (full wall - faster small wall):
items/s once start-up and model loading are paid, which is what a long job runs at (the faster of two
small runs, since start-up varies most on a shared machine). Also the CPU cost of the decode
stage per image (what sizes the CPU side of a GPU node).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def make_tasks(directory: Path, scenes: int, small: int) -> tuple[Path, Path]:
    from lion_mllm import shapes

    base = shapes.HELD_OUT_SEED_BASE + 5000
    lines = shapes.write_run_tasks(directory, range(base, base + scenes))
    small_lines = [line for line in lines if int(str(line["id"])[1:]) < small]  # the first `small` scenes
    tasks, first = directory / "tasks.jsonl", directory / "small.jsonl"
    tasks.write_text("".join(json.dumps(line) + "\n" for line in lines))
    first.write_text("".join(json.dumps(line) + "\n" for line in small_lines))
    return first, tasks


def run_local(tasks: Path, output: Path, threads: int, batch_size: int) -> dict[str, Any]:
    """`lion run` in a fresh process with `threads` intra-op threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "lion_mllm.cli", "run", "--input", str(tasks), "--output",
                           str(output), "--batch-size", str(batch_size), "--json", "-q"],
                          env=env, capture_output=True, text=True, check=True)
    wall = time.monotonic() - started
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 2), "batch_loop_s": report["seconds"], "answered": report["answered"]}


def run_on_ray(tasks: Path, output: Path, replicas: int, batch_size: int) -> dict[str, Any]:
    from lion_mllm.scale import run_ray

    started = time.monotonic()
    # Logical CPUs: the replicas and a decode task fit the 2-CPU cluster together (one thread each).
    summary = run_ray("lion-shapes", tasks, output, replicas=replicas, threads=1, replica_cpus=0.75, decode_cpus=0.25,
                      batch_size=batch_size, rows_per_shard=batch_size, output_format="jsonl", progress=False)
    wall = time.monotonic() - started
    return {"wall_s": round(wall, 2), "answered": summary.done}


def records(path: Path) -> dict[str, dict[str, Any]]:
    from lion_mllm.scale import read_results

    if path.is_dir():
        return {r["id"]: {k: v for k, v in r.items() if k not in ("key", "tags")} for r in read_results(path)}
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def decode_cost(tasks: Path, repeats: int = 200) -> dict[str, float]:
    """CPU seconds per image of the decode stage (load_image + the RGB bytes shipped to a replica), on
    the benchmark's scenes and on a 1024x768 JPEG photo-sized image."""
    import numpy as np
    from PIL import Image

    from lion_mllm.model.images import decode_image

    scene = Path(json.loads(tasks.read_text().splitlines()[0])["image"]).read_bytes()
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (768, 1024, 3), dtype=np.uint8)).save(
        buffer, "JPEG", quality=90)
    out = {}
    for name, data in (("scene_png_ms", scene), ("jpeg_1024x768_ms", buffer.getvalue())):
        started = time.process_time()
        for _ in range(repeats):
            decode_image(data).tobytes()
        out[name] = round((time.process_time() - started) / repeats * 1000, 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=32, help="scenes of the full task file (about 3 tasks each)")
    parser.add_argument("--small", type=int, default=8, help="scenes of the small task file")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster (the token file is per account)
    import ray

    work = Path(tempfile.mkdtemp(prefix="scale-run-"))
    small, tasks = make_tasks(work, args.scenes, args.small)
    items = len(tasks.read_text().splitlines())
    load_before = os.getloadavg()
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    sizes = (("small", small), ("full", tasks), ("small again", small))
    runs["lion run, 1 thread"] = {size: run_local(path, work / f"local-{size}.jsonl", 1, args.batch_size)
                                  for size, path in sizes}
    # Two threads on two shared cores oversubscribe them: measured on the small file only (it is slow).
    two_threads = run_local(small, work / "local2-small.jsonl", 2, args.batch_size)
    reference = records(work / "local-full.jsonl")
    ray.init(num_cpus=2, object_store_memory=200 * 1024 ** 2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="lionray-", dir="/tmp"))
    try:
        for replicas in (1, 2):
            runs[f"ray, {replicas} replica(s) x 1 thread"] = {
                size: run_on_ray(path, work / f"ray{replicas}-{size}", replicas, args.batch_size)
                for size, path in sizes}
            assert records(work / f"ray{replicas}-full") == reference, f"{replicas} replica(s): not lion run's records"
    finally:
        ray.shutdown()
    assert records(work / "local2-small.jsonl") == records(work / "local-small.jsonl")
    results: dict[str, Any] = {"lion run, 2 threads (small file only)": {
        "items": two_threads["answered"], "wall_s": two_threads["wall_s"],
        "items_per_s": round(two_threads["answered"] / two_threads["wall_s"], 2),
        "batch_loop_items_per_s": round(two_threads["answered"] / two_threads["batch_loop_s"], 2)}}
    for name, run in runs.items():
        full, first = run["full"], min(run["small"], run["small again"], key=lambda r: r["wall_s"])
        results[name] = {"items": full["answered"], "wall_s": full["wall_s"],
                         "items_per_s": round(full["answered"] / full["wall_s"], 2),
                         "small_items": first["answered"],
                         "small_wall_s": [run["small"]["wall_s"], run["small again"]["wall_s"]],
                         "marginal_items_per_s": round((full["answered"] - first["answered"])
                                                       / (full["wall_s"] - first["wall_s"]), 2)}
        if "batch_loop_s" in full:
            results[name]["batch_loop_items_per_s"] = round(full["answered"] / full["batch_loop_s"], 2)
    report = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/scale_run.py " + " ".join(sys.argv[1:]),
        "items": items, "batch_size": args.batch_size, "model": "lion-shapes (float32, CPU)",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ray": ray.__version__, "results": results, "decode_cost": decode_cost(tasks),
        "records_equal_lion_run": True,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
