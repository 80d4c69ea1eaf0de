"""`lion run --engine ray`: read -> decode on CPU tasks -> a pool of model replicas -> result shards.

Ray Data streams the blocks through the three stages and holds back reading when the replicas fall
behind (its backpressure on object-store memory), so a run's memory does not grow with the dataset.
Replicas are actors (one GPU each, or CPU actors); Ray Data restarts a killed one and resubmits the batch
it held (``max_restarts=-1``, ``max_task_retries=-1``), and retries a killed decode or write task.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import ray.data
from PIL import Image

from ..model.images import DEFAULT_MAX_PIXELS
from ..run import BatchItem, RunSummary, answer_items
from .inputs import LAYOUTS, Layout, TaskDefaults, detect_layout, read_input
from .resources import (
    WaitReporter,
    cluster_autoscales,
    cluster_nodes,
    plan_replicas,
    replicas_that_fit,
    stage_needs,
)
from .shards import OutputFormat, ShardSink, finished_keys

__all__ = ["LionReplica", "run_ray"]

OUTPUT_SCHEMA = pa.schema([("key", pa.string()), ("record", pa.string())])


class LionReplica:
    """One model replica: answers decoded task rows with `lion run`'s batching and error isolation."""

    def __init__(self, load: Callable[[], Any], threads: int, default_tags: str | None,
                 decode: dict[str, Any]) -> None:
        import torch

        torch.set_num_threads(threads)
        self.lion, self.default_tags, self.decode = load(), default_tags, decode

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        records: dict[int, dict[str, Any]] = {}
        ready = []
        for index, row in enumerate(rows):
            if row["record"] is not None:
                records[index] = json.loads(row["record"])
                continue
            image = Image.frombytes("RGB", (row["width"], row["height"]), row["pixels"])
            ready.append((index, BatchItem(**json.loads(row["item"])), image, row["where"]))
        records.update(answer_items(self.lion, ready, self.default_tags, self.decode, with_tags=True))
        return pa.Table.from_pylist([{"key": row["key"], "record": json.dumps(records[i], ensure_ascii=False)}
                                     for i, row in enumerate(rows)], schema=OUTPUT_SCHEMA)


def run_ray(model: str | Callable[[], Any], input_path: str | os.PathLike[str], output_dir: str | os.PathLike[str],
            *, layout: Layout | None = None, task: str | None = None, prompt: str | None = None,
            phrase: str | None = None, tags: str | None = None,
            batch_size: int = 8, replicas: int | None = None, device: str | None = None, dtype: str | None = None,
            threads: int = 1, replica_cpus: float | None = None, decode_cpus: float = 1.0,
            output_format: OutputFormat = "parquet", rows_per_shard: int = 1000,
            image_root: str | os.PathLike[str] | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
            generate_kwargs: dict[str, Any] | None = None, address: str | None = None,
            progress: bool = True) -> RunSummary:
    """Answer every task of ``input_path`` not yet in the shards of ``output_dir``, on Ray Data.

    ``model``: a name or path for :func:`lion_mllm.load_model`, or a picklable function returning a
    `Lion` (called once in each replica). ``layout``: "jsonl" (`lion run`'s task file), "folder"
    (images; every one gets ``task``/``prompt``/``phrase``), "parquet" (an ``image``
    column of bytes, paths or ``{bytes, path}``; optional ``id``, ``task``, ``prompt``, ``phrase``,
    ``tags`` columns, else those defaults) or "webdataset" (tar shards; an image member, optional
    ``.json`` member with the task's fields); None: from the path. ``tags``: default tags, as in
    `lion run`. ``replicas``: model actors (default: one per GPU of the cluster when ``device`` is
    not "cpu", else 1), each with ``threads`` intra-op threads and ``replica_cpus`` CPUs (default
    ``threads``); read, decode and write tasks take ``decode_cpus`` each. A fixed cluster that cannot hold
    that many replicas beside the other stages runs as many as fit (logging what it changed), or raises
    `ClusterTooSmallError` at once when not one fits; an autoscaling one waits, logging what for
    (:mod:`lion_mllm.scale.resources`). Results go to ``output_dir``
    as shards of about ``rows_per_shard`` records ("parquet" or "jsonl"). ``address``: the Ray cluster
    (default: the one ``ray.init()`` finds, else a new local one, shut down again at the end).
    """
    started = time.monotonic()
    input_path, output = Path(input_path), Path(output_dir)
    if batch_size < 1 or threads < 1 or rows_per_shard < 1:
        raise ValueError("batch size, threads and rows per shard must be at least 1")
    if decode_cpus < 0 or (replica_cpus is not None and replica_cpus < 0):
        raise ValueError(f"replica_cpus ({replica_cpus}) and decode_cpus ({decode_cpus}) must be 0 or more")
    layout = layout or detect_layout(input_path)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown input layout {layout!r} (known: {', '.join(LAYOUTS)})")
    if output.exists() and not output.is_dir():
        raise ValueError(f"{output}: the Ray engine writes a folder of shards; this is a file")
    defaults = TaskDefaults(task, prompt, phrase)
    if layout == "folder" and task is None:
        raise ValueError("a folder of images needs the task for all of them (task=..., and prompt or phrase)")

    waiting: WaitReporter | None = None
    own_cluster = not ray.is_initialized()
    if own_cluster:
        ray.init(address=address, log_to_driver=progress)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = progress
        gpus = int(ray.cluster_resources().get("GPU", 0))
        on_gpu = device != "cpu" and (gpus > 0 or (device or "").startswith("cuda"))
        if replicas is None:
            replicas = max(gpus, 1) if on_gpu else 1
        # A job whose stages the cluster cannot hold would wait forever: fit it first (scale/resources.py).
        needs = stage_needs(layout, threads if replica_cpus is None else replica_cpus, on_gpu, decode_cpus)
        nodes = cluster_nodes()
        replicas = plan_replicas(replicas, nodes, needs, cluster_autoscales())
        if replicas > replicas_that_fit(nodes, needs):  # an autoscaling cluster, which must grow first
            waiting = WaitReporter(replicas, needs).start()
        loader = (functools.partial(_load_named, model, device or ("cuda" if on_gpu else "cpu"), dtype)
                  if isinstance(model, str) else model)

        summary = RunSummary()
        done = finished_keys(output)
        root = Path(image_root).expanduser() if image_root is not None else None
        tasks = read_input(input_path, layout, defaults, done, summary, image_root=root, max_pixels=max_pixels,
                           decode_cpus=decode_cpus, batch_size=batch_size)
        if tasks is not None:
            answered = tasks.map_batches(
                LionReplica, batch_format="pyarrow", batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=replicas),
                fn_constructor_kwargs={"load": loader, "threads": threads, "default_tags": tags,
                                       "decode": dict(generate_kwargs or {})},
                num_cpus=needs.replica_cpus, num_gpus=needs.replica_gpus)
            sink = ShardSink(output, output_format, rows_per_shard)
            # Write tasks take a CPU share too: at Ray's default of one CPU they could wait behind the replicas,
            # and results would pile up in the object store instead of streaming to disk.
            answered.write_datasink(sink, ray_remote_args={"num_cpus": decode_cpus})
            summary.done, summary.errors = sink.answered, sink.errors
        if layout != "jsonl":  # streamed inputs are not counted in the driver: what the shards held is skipped
            summary.skipped = len(done)
            summary.total = summary.skipped + summary.done + summary.errors
    finally:
        if waiting is not None:
            waiting.stop()
        if own_cluster:
            ray.shutdown()
    summary.seconds = time.monotonic() - started
    return summary


def _load_named(name: str, device: str, dtype: str | None) -> Any:
    from .. import load_model

    return load_model(name, device=device, dtype=dtype)
