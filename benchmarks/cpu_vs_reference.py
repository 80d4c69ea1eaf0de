"""lion-mllm against the authors' own LION code on CPU, same weights, side by side in one run.

    python benchmarks/cpu_vs_reference.py --size base \
        --ref-python /tmp/venv-ref/bin/python --official /tmp/lion-official

Four sides, each in its own process (so each one's peak RSS is its own):
  * `lion-mllm`: `Lion.from_official(OfficialPaths(...))`, SDPA attention, KV-cached decoding (defaults);
  * `lion-mllm (authors' flow)`: `Lion.from_official(..., attn_implementation="eager")` and
    `use_cache=False`, the authors' arithmetic and uncached decoding (their T5 copy never uses the
    cache under transformers 4.42);
  * `lion-mllm-bf16`: the first side loaded with `dtype="bfloat16"` (the CPU bf16 opt-in: weights and
    matrix products in bf16, on AMX where the CPU has it); its ids are compared with the authors' by
    agreement (identical sequences, common prefix), since bf16 rounds differently from float32;
  * `authors`: the official JiuTian-LION code (commit 7578437), run by `_reference_side.py` inside the
    reference environment (transformers 4.42.4, built from benchmarks/requirements-ref.txt)
    and loaded through their `models.load_model(..., device="cpu")`.

If the artifacts directory is empty, the authors' side first writes random artifacts in their five
file formats (`--size base`: ViT width 768 / 12 heads but the authors' fixed depth 39, T5-base shapes,
a bert-base Q-Former; `--size xl`: the real LION-FlanT5-XL shapes). Then every side loads them (load
time, RSS) and captions synthetic images: batch 1 and 8, greedy and 5 beams, exactly `--new-tokens`
new tokens (min and max length pinned), repetition penalty 1.5 (the authors' default). Repetitions are
interleaved (side A, side B, side C, then again), and medians are reported. Every side runs with the
same intra-op thread count (`--threads`, default 1). "same ids" compares the generated token ids of
every call with the authors'. With `--sequential` (needed at XL size: ~17 GB per side) the sides run one
after the other instead of side by side, so their repetitions cannot be interleaved.
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _reference_side import SIZES, artifact_paths, current_rss_gib, serve  # noqa: E402  (no torch at import time)

from lion_mllm.model.tasks import CAPTION_PROMPT  # noqa: E402  (imports nothing else)

SIDES = ("lion-mllm", "lion-mllm-authors-flow", "lion-mllm-bf16", "authors")
OUR_SIDES = SIDES[:3]
LABELS = {"lion-mllm": "lion-mllm", "lion-mllm-authors-flow": "lion-mllm, authors' flow (eager, no cache)",
          "lion-mllm-bf16": "lion-mllm, bfloat16 (opt-in)", "authors": "authors' code"}
QUESTION = CAPTION_PROMPT
TAGS = "airport, dog, luggage, man, terminal"


# ---------------------------------------------------------------------------------------------------
# Worker for our two sides (runs in a subprocess of this script, with lion-mllm's environment)


def our_worker(args: argparse.Namespace) -> None:
    """Load lion-mllm from the authors' files, then answer JSON requests like `_reference_side.py`."""
    serve(lambda: _load_ours(args))


def _load_ours(args: argparse.Namespace):
    t0 = time.time()
    import torch
    import transformers
    from PIL import Image

    from lion_mllm import Lion, OfficialPaths

    torch.set_num_threads(args.threads)
    import_s, rss_imports = time.time() - t0, current_rss_gib()
    files = artifact_paths(args.artifacts)
    paths = OfficialPaths(vit_model=Path(files["vit"]), llm_model=Path(files["t5"]),
                          bert_model=Path(files["bert"]), pretrained=Path(files["lion"]))
    heads = SIZES[args.size]["vit"]["heads"]
    authors_flow = args.worker == "lion-mllm-authors-flow"
    t = time.time()
    lion = Lion.from_official(paths, vision_num_heads=heads, attn_implementation="eager" if authors_flow else "sdpa",
                              dtype="bfloat16" if args.worker == "lion-mllm-bf16" else "float32")
    report = {"import_s": import_s, "load_s": time.time() - t, "rss_after_imports_gib": rss_imports,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__,
              "dtypes": sorted({str(p.dtype) for p in lion.model.parameters()})}

    def caption(req: dict) -> dict:
        n, b = req["new_tokens"], len(req["images"])
        t, cpu = time.perf_counter(), time.process_time()
        images = [Image.open(p).convert("RGB") for p in req["images"]]
        batch = lion.processor(images, [req["question"]] * b, ["caption"] * b, [req["tags"]] * b)
        ids = lion.model.generate(**batch, num_beams=req["num_beams"], max_new_tokens=n, min_length=n + 1,
                                  repetition_penalty=req["repetition_penalty"], do_sample=False,
                                  use_cache=not authors_flow)
        text = lion.processor.decode(ids)
        return {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - cpu, "ids": ids.tolist(),
                "text": text}

    return report, caption


# ---------------------------------------------------------------------------------------------------
# Driver


class Side:
    """One side's worker process, spoken to with one JSON line per request."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.stderr = open(log_dir / f"{name}.log", "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=env, cwd=str(ROOT))
        self.loaded: dict | None = None

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker died; see {self.stderr.name}")
        return json.loads(line)

    def ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict:
        final = self.ask({"cmd": "quit"})
        self.proc.wait(timeout=120)
        self.stderr.close()
        return final


def make_images(directory: Path, count: int = 8) -> list[str]:
    """Deterministic synthetic photos-to-be: gradients with coloured shapes, several sizes."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        w, h = [(640, 480), (480, 640), (500, 375), (224, 224)][i % 4]
        ramp = np.linspace(0, 1, w)[None, :, None] * rng.integers(0, 256, 3) \
            + np.linspace(1, 0, h)[:, None, None] * rng.integers(0, 256, 3)
        image = Image.fromarray(np.clip(ramp / 2, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            box = (x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2)))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        path = directory / f"img{i}.png"
        image.save(path)
        paths.append(str(path))
    return paths


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "mem_gib": round(mem / 2**20, 1),
            "python": platform.python_version(), "platform": platform.platform()}


def prepare(args: argparse.Namespace) -> None:
    if (Path(args.artifacts) / "artifacts.json").is_file():
        return
    print(f"writing random {args.size} artifacts in the authors' formats to {args.artifacts} ...", flush=True)
    t = time.time()
    subprocess.run([args.ref_python, str(HERE / "_reference_side.py"), "prepare", "--official", args.official,
                    "--harness", args.harness, "--size", args.size, "--out", args.artifacts,
                    "--threads", str(args.threads)], check=True)
    print(f"  done in {time.time() - t:.0f} s", flush=True)


def start(name: str, args: argparse.Namespace, log_dir: Path) -> Side:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false")
    if name == "authors":
        env.pop("PYTHONPATH", None)  # nothing of lion-mllm's environment on the authors' side
        cmd = [args.ref_python, str(HERE / "_reference_side.py"), "worker", "--official", args.official,
               "--harness", args.harness, "--size", args.size, "--artifacts", args.artifacts,
               "--threads", str(args.threads)]
    else:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--size", args.size,
               "--artifacts", args.artifacts, "--threads", str(args.threads)]
    return Side(name, cmd, env, log_dir)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run(args: argparse.Namespace) -> dict:
    from lion_mllm.model.cpu_inference import id_agreement

    prepare(args)
    sides = [s for s in SIDES if s in args.sides]
    cases = [(b, k) for b in args.batches for k in args.beams]
    log_dir = Path(tempfile.mkdtemp(prefix="lion-cpu-vs-ref-"))
    images = make_images(log_dir)
    result: dict = {"command": " ".join([Path(sys.executable).name] + sys.argv), "size": args.size,
                    "spec": SIZES[args.size], "machine": machine(), "threads": args.threads,
                    "new_tokens": args.new_tokens, "repetition_penalty": args.repetition_penalty,
                    "reps": args.reps, "sequential": args.sequential, "warmup": args.warmup,
                    "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "loadavg_start": os.getloadavg(), "sides": {}, "cases": {}}

    def request(b: int, k: int, n: int) -> dict:
        return {"cmd": "run", "images": images[:b], "question": QUESTION, "tags": TAGS, "num_beams": k,
                "new_tokens": n, "repetition_penalty": args.repetition_penalty}

    timings: dict[str, dict[str, list]] = {s: {f"b{b}_beams{k}": [] for b, k in cases} for s in sides}
    ids: dict[str, dict[str, list]] = {s: {f"b{b}_beams{k}": [] for b, k in cases} for s in sides}
    loads: list[float] = []
    call_loads: dict[str, dict[str, list]] = {s: {f"b{b}_beams{k}": [] for b, k in cases} for s in sides}
    # process CPU time of each call: with one intra-op thread per side, the other jobs of a shared machine
    # disturb it far less than wall time (they take the core away, which wall time counts and CPU time not)
    cpu_timings: dict[str, dict[str, list]] = {s: {f"b{b}_beams{k}": [] for b, k in cases} for s in sides}

    def measure(side: Side, rep: int) -> None:
        for b, k in cases:
            key = f"b{b}_beams{k}"
            answer = side.ask(request(b, k, args.new_tokens))
            timings[side.name][key].append(answer["seconds"])
            cpu_timings[side.name][key].append(answer["cpu_seconds"])
            ids[side.name][key].append(answer["ids"])
            loads.append(os.getloadavg()[0])
            call_loads[side.name][key].append(os.getloadavg())
            print(f"  rep {rep} {side.name:24s} {key:12s} {answer['seconds']:8.2f} s  cpu {answer['cpu_seconds']:8.2f} s  "
                  f"load {loads[-1]:.2f}  {answer['text'][0][:40]!r}", flush=True)

    def warm(side: Side) -> None:
        # one short call first: one-time costs (lazy inits, allocator growth) stay out of the timings
        if not args.warmup:
            return
        t = time.time()
        side.ask(request(1, 1, 2))
        result["sides"][side.name]["first_call_s"] = time.time() - t

    def finish(side: Side) -> None:
        result["sides"][side.name].update(side.close())

    if args.sequential:
        for name in sides:
            side = start(name, args, log_dir)
            side.loaded = side.read()
            result["sides"][name] = dict(side.loaded)
            print(f"{name}: loaded in {side.loaded['load_s']:.1f} s", flush=True)
            warm(side)
            for rep in range(args.reps):
                measure(side, rep)
            finish(side)
    else:
        running = {}
        for name in sides:  # one load at a time, so load timings do not compete with each other
            running[name] = start(name, args, log_dir)
            running[name].loaded = running[name].read()
            result["sides"][name] = dict(running[name].loaded)
            print(f"{name}: loaded in {running[name].loaded['load_s']:.1f} s", flush=True)
            warm(running[name])
        for rep in range(args.reps):
            for name in sides:
                measure(running[name], rep)
        for side in running.values():
            finish(side)

    for b, k in cases:
        key = f"b{b}_beams{k}"
        entry: dict = {"batch": b, "num_beams": k}
        for name in sides:
            med = median(timings[name][key])
            cpu_med = median(cpu_timings[name][key])
            entry[name] = {"seconds": timings[name][key], "median_s": med, "images_per_s": b / med,
                           "cpu_seconds": cpu_timings[name][key], "median_cpu_s": cpu_med,
                           "loadavg_after_each_call": call_loads[name][key]}
            if "authors" in sides and name != "authors":
                entry[name]["speedup_vs_authors"] = median(timings["authors"][key]) / med
                entry[name]["cpu_time_speedup_vs_authors"] = median(cpu_timings["authors"][key]) / cpu_med
                entry[name]["same_ids_as_authors"] = ids[name][key] == ids["authors"][key]
                entry[name]["agreement_with_authors"] = id_agreement(ids[name][key], ids["authors"][key])
            entry[name]["new_tokens_per_sequence"] = sorted({len(seq) - 1 for call in ids[name][key] for seq in call})
        entry["ids_first_call"] = {name: ids[name][key][0] for name in sides}
        result["cases"][key] = entry
    result["loadavg_end"] = os.getloadavg()
    result["loadavg_1min_during_calls"] = {"min": min(loads), "median": median(loads), "max": max(loads)}
    result["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return result


def print_table(result: dict) -> None:
    sides = list(result["sides"])
    print(f"\nsize {result['size']}, {result['threads']} thread(s) per side, {result['new_tokens']} new tokens, "
          f"median of {result['reps']}; machine {result['machine']['cpu']} x{result['machine']['logical_cpus']}, "
          f"load avg (1 min) during calls {result['loadavg_1min_during_calls']['median']:.2f}")
    print(f"{'side':44s} {'load s':>7s} {'peak RSS GiB':>12s} {'peak anon GiB':>13s}")
    for name in sides:
        s = result["sides"][name]
        print(f"{LABELS[name]:44s} {s['load_s']:7.1f} {s['peak_rss_gib']:12.2f} {s.get('peak_anon_gib', float('nan')):13.2f}")
    print(f"\n{'case':14s} {'side':44s} {'latency s':>9s} {'img/s':>7s} {'x authors':>9s} {'CPU s':>8s} "
          f"{'x authors':>9s} {'same ids':>9s}")
    for key, entry in result["cases"].items():
        for name in sides:
            e = entry[name]
            ratio = f"{e['speedup_vs_authors']:.2f}" if "speedup_vs_authors" in e else "1.00"
            cpu_ratio = f"{e['cpu_time_speedup_vs_authors']:.2f}" if "cpu_time_speedup_vs_authors" in e else "1.00"
            agree = e.get("agreement_with_authors")
            same = f"{agree['identical_sequences']}/{agree['sequences']}" if agree else "-"
            print(f"{key:14s} {LABELS[name]:44s} {e['median_s']:9.2f} {e['images_per_s']:7.3f} {ratio:>9s} "
                  f"{e['median_cpu_s']:8.2f} {cpu_ratio:>9s} {same:>9s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="base")
    ap.add_argument("--artifacts", help="the authors'-format files (default /tmp/lion-bench-SIZE)")
    ap.add_argument("--ref-python", default="/tmp/venv-ref/bin/python", help="the reference environment's python")
    ap.add_argument("--official", default="/tmp/lion-official", help="JiuTian-LION checkout at 7578437")
    ap.add_argument("--harness", default=str(ROOT.parent / "shared" / "tools" / "refharness"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repetition-penalty", type=float, default=1.5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--beams", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    ap.add_argument("--sequential", action="store_true", help="one side at a time (XL: memory)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the untimed 2-token call each side makes before the timed ones")
    ap.add_argument("--output", help="results JSON (default benchmarks/results/cpu_vs_reference_SIZE.json)")
    ap.add_argument("--worker", choices=OUR_SIDES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.artifacts = args.artifacts or f"/tmp/lion-bench-{args.size}"
    if args.worker:
        our_worker(args)
        return
    result = run(args)
    output = Path(args.output or HERE / "results" / f"cpu_vs_reference_{args.size}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"\nwritten {output}")


if __name__ == "__main__":
    main()
