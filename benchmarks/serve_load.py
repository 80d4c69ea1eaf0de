"""`lion serve` under a bounded Poisson load on loopback: continuous batching against request-level batching.

    python benchmarks/serve_load.py                                   # lion-shapes, rates 2 and 6 req/s
    python benchmarks/serve_load.py --rates 1 4 --requests 60 --output benchmarks/results/serve_load.json

For each rate, the same arrival schedule (Poisson: exponential gaps, fixed seed) and the same mixture of
requests go to two servers of the same model in turn, each its own process (`python -m lion_mllm.server`
on 127.0.0.1, `--batching continuous` and `--batching request`, the same `--max-batch-size`), one mode
after the other, in alternating order from rate to rate. The mixture: `--long-fraction` of the requests
are captions forced to `--long-tokens` tokens (`max_tokens` = `min_tokens`), the rest short questions
answered in a few tokens (at most `--short-tokens`). Every request streams (`stream: true`, usage
included), so each one gives its time to first token (first text chunk) and its latency (the `[DONE]`).

Reported per mode and rate: p50/p99 latency and time to first token (all requests, then short ones
alone), completed requests per second and answer tokens per second over the run (first send to last
answer). The load is bounded: `--requests` per run and `--max-seconds` per run (requests not sent by
then are not sent), and every request has a client timeout. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from cpu_vs_reference import machine  # noqa: E402  (no torch at import time)

SHORT_QUESTIONS = ["How many shapes are there?", "What colour is the square?", "How many circles are there?",
                   "What colour is the triangle?", "Is there a red shape?"]


@dataclass
class Planned:
    at: float  # seconds after the run starts
    long: bool
    scene: int
    question: str


@dataclass
class Outcome:
    long: bool
    status: int
    ttft: float | None
    latency: float | None
    tokens: int
    error: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plan(rate: float, count: int, long_fraction: float, scenes: int, seed: int) -> list[Planned]:
    rng = random.Random(seed)
    at, items = 0.0, []
    for _ in range(count):
        at += rng.expovariate(rate)
        long = rng.random() < long_fraction
        items.append(Planned(at, long, rng.randrange(scenes), "Describe the picture." if long
                             else rng.choice(SHORT_QUESTIONS)))
    return items


def scene_urls(count: int) -> list[str]:
    from lion_mllm.shapes import make_scene, render

    urls = []
    for seed in range(count):
        buf = io.BytesIO()
        render(make_scene(seed)).save(buf, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


class Server:
    """`python -m lion_mllm.server` in its own process on 127.0.0.1."""

    def __init__(self, args: argparse.Namespace, mode: str, log_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_dir / f"server-{mode}.log", "w")
        # "baseline": continuous batching of another checkout (--baseline-src); "compiled": this checkout's
        # continuous batching with its decoder step compiled (--compile); the others: this checkout
        src = args.baseline_src / "src" if mode == "baseline" else ROOT / "src"
        batching = "request" if mode == "request" else "continuous"
        extra = ["--compile"] if mode == "compiled" else []
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
                   TOKENIZERS_PARALLELISM="false")
        if args.threads:
            env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lion_mllm.server", "--model", args.model, "--host", "127.0.0.1", "--port",
             str(self.port), "--batching", batching, *extra, "--max-batch-size", str(args.max_batch_size), "--no-ui",
             "--queue-size", str(max(64, args.requests)), "--timeout", str(args.request_timeout),
             "--max-tokens-limit", str(max(512, args.long_tokens)), "--log-level", "warning"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited (code {self.process.returncode}); see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"the server did not start in {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


async def one(client, url: str, item: Planned, images: list[str], args: argparse.Namespace) -> Outcome:
    body = {"model": "lion", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "text", "text": item.question},
                                                      {"type": "image_url", "image_url": {"url": images[item.scene]}}]}]}
    if item.long:
        body.update(task="caption", max_tokens=args.long_tokens, min_tokens=args.long_tokens)
    else:
        body.update(task="vqa", max_tokens=args.short_tokens)
    started, ttft, tokens = time.monotonic(), None, 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Outcome(item.long, response.status_code, None, None, 0, response.text[:200])
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Outcome(item.long, 500, ttft, None, tokens, chunk["error"]["message"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.monotonic() - started
        return Outcome(item.long, 200, ttft, time.monotonic() - started, tokens)
    except Exception as error:  # noqa: BLE001 - counted as a failed request
        return Outcome(item.long, 0, ttft, None, tokens, f"{type(error).__name__}: {error}"[:200])


async def drive(url: str, items: list[Planned], images: list[str], args: argparse.Namespace
                ) -> tuple[list[Outcome], float]:
    import httpx

    limits = httpx.Limits(max_connections=len(items) + 4, max_keepalive_connections=len(items) + 4)
    async with httpx.AsyncClient(timeout=args.request_timeout + 10, limits=limits) as client:
        started = time.monotonic()
        tasks = []
        for item in items:
            delay = item.at - (time.monotonic() - started)
            if item.at > args.max_seconds:
                break
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, url, item, images, args)))
        outcomes = await asyncio.gather(*tasks)
        return list(outcomes), time.monotonic() - started


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarise(outcomes: list[Outcome], wall: float) -> dict:
    ok = [o for o in outcomes if o.status == 200 and o.latency is not None]
    short = [o for o in ok if not o.long]

    def stats(group: list[Outcome], attr: str) -> dict:
        values = [getattr(o, attr) for o in group if getattr(o, attr) is not None]
        return {"p50": percentile(values, 50), "p99": percentile(values, 99),
                "mean": statistics.fmean(values) if values else None}

    return {"sent": len(outcomes), "completed": len(ok), "failed": len(outcomes) - len(ok),
            "errors": sorted({o.error for o in outcomes if o.error})[:5], "wall_s": wall,
            "latency": stats(ok, "latency"), "ttft": stats(ok, "ttft"),
            "short_latency": stats(short, "latency"), "short_ttft": stats(short, "ttft"),
            "requests_per_s": len(ok) / wall if wall else None,
            "tokens_per_s": sum(o.tokens for o in ok) / wall if wall else None,
            "tokens": sum(o.tokens for o in ok)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="lion-shapes")
    parser.add_argument("--rates", type=float, nargs="+", default=[2.0, 6.0], help="requests per second")
    parser.add_argument("--requests", type=int, default=60, help="requests per run (one mode, one rate)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="no request is sent later than this")
    parser.add_argument("--long-fraction", type=float, default=0.3)
    parser.add_argument("--long-tokens", type=int, default=64)
    parser.add_argument("--short-tokens", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=0, help="server intra-op threads (0: torch's default)")
    parser.add_argument("--modes", nargs="+", default=["continuous", "request"],
                        choices=["continuous", "request", "compiled", "baseline"],
                        help="compiled: continuous with --compile; baseline: continuous of --baseline-src")
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="a checkout (its root folder) to serve as the baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if "baseline" in args.modes and args.baseline_src is None:
        parser.error("--modes baseline needs --baseline-src")
    if args.baseline_src is not None and not (args.baseline_src / "src" / "lion_mllm").is_dir():
        # a wrong folder would silently serve this checkout's code (the installed package) as the baseline
        parser.error(f"--baseline-src {args.baseline_src}: not a checkout (no src/lion_mllm in it)")

    log_dir = Path(tempfile.mkdtemp(prefix="lion-serve-load-"))
    images = scene_urls(8)
    results: dict = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                     "machine": machine(), "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "output"},
                     "load_average_start": os.getloadavg(), "runs": []}
    if args.baseline_src is not None:
        results["baseline_commit"] = subprocess.run(["git", "-C", str(args.baseline_src), "rev-parse", "--short",
                                                     "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"logs in {log_dir}", flush=True)
    for index, rate in enumerate(args.rates):
        items = plan(rate, args.requests, args.long_fraction, len(images), args.seed + index)
        modes = args.modes if index % 2 == 0 else list(reversed(args.modes))
        for mode in modes:
            server = Server(args, mode, log_dir)
            try:
                server.wait_ready()
                warm = [Planned(0.0, False, 0, SHORT_QUESTIONS[0]), Planned(0.0, True, 1, "Describe the picture.")]
                asyncio.run(drive(server.url, warm, images, args))  # first-call costs out of the timed run
                load_before = os.getloadavg()
                outcomes, wall = asyncio.run(drive(server.url, items, images, args))
                summary = summarise(outcomes, wall)
                summary.update(mode=mode, rate=rate, load_average=[load_before, os.getloadavg()],
                               outcomes=[asdict(o) for o in outcomes])
                results["runs"].append(summary)
                print(f"rate {rate:g}/s {mode:>10}: {summary['completed']}/{summary['sent']} ok, "
                      f"latency p50 {fmt(summary['latency']['p50'])} p99 {fmt(summary['latency']['p99'])}, "
                      f"TTFT p50 {fmt(summary['ttft']['p50'])} p99 {fmt(summary['ttft']['p99'])}, "
                      f"{summary['requests_per_s']:.2f} req/s, {summary['tokens_per_s']:.1f} tok/s", flush=True)
            finally:
                server.stop()
    results["load_average_end"] = os.getloadavg()
    print(table(results))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    return results


def fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


def table(results: dict) -> str:
    rows = ["| rate | batching | ok | latency p50 / p99 | TTFT p50 / p99 | short requests: latency p50 / p99 | "
            "req/s | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for run in sorted(results["runs"], key=lambda r: (r["rate"], r["mode"])):
        rows.append(f"| {run['rate']:g}/s | {run['mode']} | {run['completed']}/{run['sent']} | "
                    f"{fmt(run['latency']['p50'])} / {fmt(run['latency']['p99'])} | "
                    f"{fmt(run['ttft']['p50'])} / {fmt(run['ttft']['p99'])} | "
                    f"{fmt(run['short_latency']['p50'])} / {fmt(run['short_latency']['p99'])} | "
                    f"{run['requests_per_s']:.2f} | {run['tokens_per_s']:.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
