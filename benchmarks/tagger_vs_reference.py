"""lion-mllm's RAM tagger against the authors' RAM code on CPU, same weights, side by side in one run.

    python benchmarks/tagger_vs_reference.py --size full --images 8 --reps 2 \
        --ref-python /tmp/venv-ref/bin/python --official /tmp/lion-official

Three sides, each in its own process (so each one's load time and peak RSS are its own):
  * `lion-mllm`: `RamTagger.from_official(pth, tag_list, thresholds)` (config inferred from the
    checkpoint), `tagger.tag(images)`: all N images in one batched call;
  * `lion-mllm, authors' flow`: the same tagger, `tagger.tag(image)` once per image (how LION's
    playground notebook calls `generate_tags`);
  * `authors`: the official JiuTian-LION code (commit 7578437) with its `ram` package, run by
    `_reference_tagger_side.py` inside the reference environment: LION's own `_init_ram` loads the
    file through their `ram(pretrained=...)` builder, and LION's own `generate_tags(img)` tags one PIL
    image per call. Their model is put in eval mode for a deterministic comparison; LION itself never
    calls `eval()` on RAM (so there the tags come from a train-mode network and vary between calls).
    Autograd stays on, as in LION's `generate_tags`.

If the artifacts folder is empty, the authors' side first writes random weights with the authors' RAM
builder (`pretrained=''`; `--size full`: Swin-L 384, 4585 tags, their own config files; `--size tiny`:
a narrow Swin and 287 tags, for developing this script), saved as `{'model': state_dict}` like
`ram_swin_large_14m.pth`. Each timed call runs from opening the image files to the tag strings
(preprocessing, Swin, tagging head, thresholds). Each side first makes one untimed one-image call;
then repetitions are interleaved (side A, side B, side C, then again) and medians are reported. Every
side runs with the same intra-op thread count (`--threads`, default 1). The logits of every image of
every timed call are captured with a forward hook on `fc` (on both sides) and compared with the
authors' for the same image and repetition: "same tags" means every tag string was equal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _reference_side import current_rss_gib, serve
from _reference_tagger_side import SIZES
from cpu_vs_reference import Side, machine, make_images, median

SIDES = ("lion-mllm", "lion-mllm-per-image", "authors")
LABELS = {"lion-mllm": "lion-mllm (one batched call)", "lion-mllm-per-image": "lion-mllm, authors' flow (1 image/call)",
          "authors": "authors' code (1 image/call)"}
LOGIT_TOL = 1e-4


# ---------------------------------------------------------------------------------------------------
# Worker for our two sides (runs in a subprocess of this script, with lion-mllm's environment)


def vocabulary_files(args: argparse.Namespace, info: dict) -> tuple[str, str]:
    """Full size: RAM's public files (shared/ram, md5-checked by our loader); tiny: the subset that
    `prepare` wrote beside the checkpoint (the same files the authors' side reads)."""
    base = Path(args.vocab_dir) if info["size"] == "full" else Path(info["ram_dir"]) / "data"
    return str(base / "ram_tag_list.txt"), str(base / "ram_tag_list_threshold.txt")


def our_worker(args: argparse.Namespace) -> None:
    """Load lion-mllm's tagger from the authors' file, then answer JSON requests."""
    serve(lambda: _load_ours(args))


def _load_ours(args: argparse.Namespace):
    t0 = time.time()
    import torch
    import transformers
    from PIL import Image

    from lion_mllm.ram import RamConfig, RamTagger

    torch.set_num_threads(args.threads)
    import_s, rss_imports = time.time() - t0, current_rss_gib()
    info = json.loads((Path(args.artifacts) / "artifacts.json").read_text())
    tag_list, thresholds = vocabulary_files(args, info)
    t = time.time()
    tagger = RamTagger.from_official(info["pth"], tag_list, thresholds)
    load_s = time.time() - t
    logits: list = []
    tagger.fc.register_forward_hook(lambda m, a, o: logits.append(o.detach().squeeze(-1).float()))
    report = {"import_s": import_s, "load_s": load_s, "rss_after_imports_gib": rss_imports,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "params": sum(p.numel() for p in tagger.parameters()),
              "config": tagger.config.to_dict(), "config_is_swin_large": tagger.config == RamConfig.swin_large(),
              "tag_list": tag_list, "dtypes": sorted({str(p.dtype) for p in tagger.parameters()})}
    per_image = args.worker == "lion-mllm-per-image"

    def tag(req: dict) -> dict:
        logits.clear()
        seconds, tags = [], []
        if per_image:
            for path in req["images"]:
                t = time.perf_counter()
                tags += tagger.tag(Image.open(path).convert("RGB"))
                seconds.append(time.perf_counter() - t)
        else:
            t = time.perf_counter()
            tags = tagger.tag([Image.open(p).convert("RGB") for p in req["images"]])
            seconds.append(time.perf_counter() - t)
        return {"seconds": seconds, "tags": tags, "logits": torch.cat(logits).tolist()}

    return report, tag


# ---------------------------------------------------------------------------------------------------
# Driver


def prepare(args: argparse.Namespace, images: list[str]) -> dict:
    info_file = Path(args.artifacts) / "artifacts.json"
    if not info_file.is_file():
        print(f"writing random {args.size} RAM weights with the authors' builder to {args.artifacts} ...", flush=True)
        t = time.time()
        subprocess.run([args.ref_python, str(HERE / "_reference_tagger_side.py"), "prepare", "--official",
                        args.official, "--harness", args.harness, "--size", args.size, "--out", args.artifacts,
                        "--threads", str(args.threads), "--calib", *images], check=True,
                       env=_env(args, authors=True))
        print(f"  done in {time.time() - t:.0f} s", flush=True)
    info = json.loads(info_file.read_text())
    if info["size"] != args.size:
        raise SystemExit(f"{args.artifacts} holds {info['size']} weights, not {args.size}")
    return info


def _env(args: argparse.Namespace, authors: bool) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false")
    if authors:
        env.pop("PYTHONPATH", None)  # nothing of lion-mllm's environment on the authors' side
    else:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def start(name: str, args: argparse.Namespace, log_dir: Path) -> Side:
    if name == "authors":
        cmd = [args.ref_python, str(HERE / "_reference_tagger_side.py"), "worker", "--official", args.official,
               "--harness", args.harness, "--artifacts", args.artifacts, "--threads", str(args.threads),
               "--mode", args.authors_mode] + (["--no-grad"] if args.authors_no_grad else [])
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--size", args.size,
               "--artifacts", args.artifacts, "--vocab-dir", args.vocab_dir, "--threads", str(args.threads)]
    return Side(name, cmd, _env(args, authors=name == "authors"), log_dir)


def compare(ours: dict, theirs: dict) -> dict:
    """Tag strings and logits of one call of ours against the authors' call on the same images."""
    import numpy as np

    a, b = np.asarray(ours["logits"], dtype=np.float64), np.asarray(theirs["logits"], dtype=np.float64)
    diff = np.abs(a - b)
    return {"same_tags": ours["tags"] == theirs["tags"],
            "same_tags_per_image": [x == y for x, y in zip(ours["tags"], theirs["tags"])],
            "max_abs_logit_diff": float(diff.max()), "max_abs_logit_diff_per_image": diff.max(axis=1).tolist()}


def threshold_margin(call: dict, thresholds: list[float]) -> float:
    """Smallest |sigmoid(logit) - class threshold| over every image and tag of one call: how close the
    nearest tag decision was (a logit difference can only flip a tag whose margin is that small)."""
    import numpy as np

    z = np.asarray(call["logits"], dtype=np.float64)
    return float(np.abs(1 / (1 + np.exp(-z)) - np.asarray(thresholds)[None, :]).min())


def run(args: argparse.Namespace) -> dict:
    log_dir = Path(tempfile.mkdtemp(prefix="lion-tagger-vs-ref-"))
    images = make_images(log_dir, args.images)
    info = prepare(args, images)
    thresholds = [float(s.strip()) for s in Path(vocabulary_files(args, info)[1]).read_text().splitlines() if s.strip()]
    sides = [s for s in SIDES if s in args.sides]
    from PIL import Image

    result: dict = {"command": " ".join([Path(sys.executable).name] + sys.argv), "size": args.size,
                    "artifacts": info, "machine": machine(), "threads": args.threads, "images": args.images,
                    "image_sizes": [list(Image.open(p).size) for p in images], "reps": args.reps,
                    "warmup": args.warmup, "authors_mode": args.authors_mode,
                    "authors_grad_enabled": not args.authors_no_grad,
                    "note": ("the authors' RAM is put in eval mode here for a deterministic comparison; LION itself "
                             "never calls eval() on RAM, so its tags come from a train-mode network and vary"
                             if args.authors_mode == "eval" else
                             "the authors' RAM is left in train mode, as LION leaves it: its tags are random"),
                    "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "loadavg_start": os.getloadavg(), "sides": {}}
    calls: dict[str, list[dict]] = {s: [] for s in sides}
    loads: list[float] = []
    running: dict[str, Side] = {}
    for name in sides:  # one load at a time, so load timings do not compete with each other
        running[name] = start(name, args, log_dir)
        running[name].loaded = running[name].read()
        result["sides"][name] = dict(running[name].loaded)
        print(f"{name}: loaded in {running[name].loaded['load_s']:.1f} s", flush=True)
        if args.warmup:  # one untimed one-image call: lazy inits, mmap page-ins, allocator growth
            t = time.time()
            running[name].ask({"cmd": "run", "images": images[:1]})
            result["sides"][name]["first_call_s"] = time.time() - t
    for rep in range(args.reps):
        for name in sides:
            answer = running[name].ask({"cmd": "run", "images": images})
            calls[name].append(answer)
            loads.append(os.getloadavg()[0])
            print(f"  rep {rep} {name:22s} {sum(answer['seconds']):8.2f} s for {len(images)} images "
                  f"({len(answer['seconds'])} call(s))  load {loads[-1]:.2f}  tags[0] {answer['tags'][0][:50]!r}",
                  flush=True)
    for name, side in running.items():
        result["sides"][name].update(side.close())

    for name in sides:
        totals = [sum(c["seconds"]) for c in calls[name]]
        per_call = [s for c in calls[name] for s in c["seconds"]]
        e = result["sides"][name]
        e.update({"seconds_per_rep": totals, "seconds_per_call": [c["seconds"] for c in calls[name]],
                  "calls_per_rep": len(calls[name][0]["seconds"]), "median_s_for_all_images": median(totals),
                  "images_per_s": args.images / median(totals), "median_call_latency_s": median(per_call),
                  "tags_first_rep": calls[name][0]["tags"],
                  "tags_per_image_first_rep": [len(t.split(", ")) if t else 0 for t in calls[name][0]["tags"]],
                  "min_threshold_margin": min(threshold_margin(c, thresholds) for c in calls[name])})
    if "authors" in sides:
        theirs = calls["authors"]
        a = result["sides"]["authors"]
        a["same_tags_across_reps"] = all(c["tags"] == theirs[0]["tags"] for c in theirs)
        a["max_abs_logit_diff_across_reps"] = max(compare(c, theirs[0])["max_abs_logit_diff"]
                                                  for c in theirs)
        for name in sides:
            if name == "authors":
                continue
            e = result["sides"][name]
            per_rep = [compare(o, t) for o, t in zip(calls[name], theirs)]
            e["vs_authors"] = {"speedup": e["images_per_s"] / a["images_per_s"],
                               "same_tags": all(r["same_tags"] for r in per_rep),
                               "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in per_rep),
                               "logits_within_tol": all(r["max_abs_logit_diff"] <= LOGIT_TOL for r in per_rep),
                               "tol": LOGIT_TOL, "per_rep": per_rep}
    result["loadavg_end"] = os.getloadavg()
    result["loadavg_1min_during_calls"] = {"min": min(loads), "median": median(loads), "max": max(loads)}
    result["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["logs"] = str(log_dir)
    return result


def print_table(result: dict) -> None:
    sides = list(result["sides"])
    n = result["images"]
    print(f"\nsize {result['size']}, {n} images, {result['threads']} thread(s) per side, median of {result['reps']} "
          f"interleaved reps; machine {result['machine']['cpu']} x{result['machine']['logical_cpus']}, "
          f"load avg (1 min) during calls {result['loadavg_1min_during_calls']['median']:.2f}")
    print(f"authors' RAM in {result['authors_mode']} mode, autograd {'on' if result['authors_grad_enabled'] else 'off'}"
          f" ({result['note']})")
    print(f"\n{'side':42s} {'s for N img':>11s} {'img/s':>7s} {'call lat s':>10s} {'x authors':>9s} "
          f"{'same tags':>9s} {'max |dlogit|':>12s}")
    for name in sides:
        e = result["sides"][name]
        vs = e.get("vs_authors")
        ratio = f"{vs['speedup']:.2f}" if vs else "1.00"
        same = ("yes" if vs["same_tags"] else "no") if vs else "-"
        dl = f"{vs['max_abs_logit_diff']:.2e}" if vs else "-"
        print(f"{LABELS[name]:42s} {e['median_s_for_all_images']:11.2f} {e['images_per_s']:7.3f} "
              f"{e['median_call_latency_s']:10.2f} {ratio:>9s} {same:>9s} {dl:>12s}")
    print(f"\n{'side':42s} {'import s':>8s} {'load s':>7s} {'1st call s':>10s} {'RSS load':>8s} {'peak RSS':>8s} "
          f"{'peak anon':>9s}  (GiB)")
    for name in sides:
        e = result["sides"][name]
        print(f"{LABELS[name]:42s} {e['import_s']:8.1f} {e['load_s']:7.1f} {e.get('first_call_s', float('nan')):10.1f} "
              f"{e['rss_after_load_gib']:8.2f} {e['peak_rss_gib']:8.2f} {e.get('peak_anon_gib', float('nan')):9.2f}")
    ours = [result["sides"][s]["vs_authors"] for s in sides if "vs_authors" in result["sides"][s]]
    if ours:
        same = all(v["same_tags"] for v in ours)
        print(f"\nsame tags: {'yes' if same else 'no'} (every image of every timed call, both lion-mllm sides vs "
              f"the authors); logits within {LOGIT_TOL:g}: {'yes' if all(v['logits_within_tol'] for v in ours) else 'no'}"
              f" (max |diff| {max(v['max_abs_logit_diff'] for v in ours):.2e})")
        if "authors" in result["sides"]:
            a = result["sides"]["authors"]
            print(f"authors' tags identical across reps: {'yes' if a['same_tags_across_reps'] else 'no'}; "
                  f"tags per image (first rep): {a['tags_per_image_first_rep']}; "
                  f"closest sigmoid-to-threshold margin: {a['min_threshold_margin']:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--artifacts", help="the authors'-format RAM file (default /tmp/lion-bench-ram, "
                                        "/tmp/lion-bench-ram-tiny for --size tiny)")
    ap.add_argument("--ref-python", default="/tmp/venv-ref/bin/python", help="the reference environment's python")
    ap.add_argument("--official", default="/tmp/lion-official", help="JiuTian-LION checkout at 7578437")
    ap.add_argument("--harness", default=str(ROOT.parent / "shared" / "tools" / "refharness"))
    ap.add_argument("--vocab-dir", default=str(ROOT.parent / "shared" / "ram"),
                    help="RAM's public ram_tag_list.txt and ram_tag_list_threshold.txt (full size)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    ap.add_argument("--authors-mode", choices=["eval", "train"], default="eval",
                    help="eval() the authors' RAM (default, deterministic) or leave it in train mode as LION does")
    ap.add_argument("--authors-no-grad", action="store_true",
                    help="wrap the authors' calls in torch.no_grad() (LION's generate_tags does not)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the untimed one-image call each side makes before the timed ones")
    ap.add_argument("--output", help="results JSON (default benchmarks/results/tagger_vs_reference.json, "
                                     "tagger_vs_reference_tiny.json for --size tiny)")
    ap.add_argument("--worker", choices=SIDES[:2], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.artifacts = args.artifacts or ("/tmp/lion-bench-ram" if args.size == "full" else f"/tmp/lion-bench-ram-{args.size}")
    if args.worker:
        our_worker(args)
        return
    result = run(args)
    suffix = "" if args.size == "full" else f"_{args.size}"
    output = Path(args.output or HERE / "results" / f"tagger_vs_reference{suffix}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"\nwritten {output}")


if __name__ == "__main__":
    main()
