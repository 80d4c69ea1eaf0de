"""Batch inference beyond one machine: `lion run --engine ray` on Ray Data (the ``scale`` extra).

    from lion_mllm.scale import run_ray, read_results
    run_ray("lion-shapes", "tasks.jsonl", "results/", replicas=2)   # or a folder, Parquet, WebDataset shards
    records = read_results("results/")

See docs/scale.md. Ray is imported here only, so `lion run` without ``--engine ray`` never needs it.
"""

from __future__ import annotations

try:
    import ray
    import ray.data  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError("the Ray engine needs Ray Data: pip install 'lion-mllm[scale]'") from error

from .inputs import LAYOUTS, TaskDefaults, detect_layout
from .job import LionReplica, run_ray
from .resources import ClusterTooSmallError
from .shards import RESULT_SCHEMA, finished_keys, read_results

__all__ = ["LAYOUTS", "RESULT_SCHEMA", "ClusterTooSmallError", "LionReplica", "TaskDefaults", "detect_layout", "finished_keys",
           "read_results", "run_ray"]
