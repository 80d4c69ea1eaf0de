"""The input layouts of a Ray run, each read by Ray Data and turned into decoded task rows.

Every layout ends in the same rows (:data:`TASK_SCHEMA`): the task's key, the task itself, where it came
from (for messages), and either its decoded RGB pixels or its error record. Parsing, validation, image
loading and error records are `lion run`'s own (:mod:`lion_mllm.run`), so both engines accept and
refuse the same tasks with the same messages.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import ray.data

from ..run import (
    BatchItem,
    LineError,
    RunSummary,
    error_record,
    load_item_image,
    parse_task,
    pending_tasks,
    task_key,
)

Layout = Literal["jsonl", "folder", "parquet", "webdataset"]
LAYOUTS: tuple[str, ...] = ("jsonl", "folder", "parquet", "webdataset")

# Extensions read as images in a folder and as a WebDataset sample's image member.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")

TASK_SCHEMA = pa.schema([
    ("key", pa.string()),        # batch.task_key: what resuming compares
    ("item", pa.string()),       # the BatchItem as JSON (null for an input error)
    ("where", pa.string()),      # "input:line" (or file, shard#key) that starts error messages
    ("record", pa.string()),     # the error record as JSON when the task failed before the model
    ("pixels", pa.large_binary()),  # decoded RGB, row-major (what load_image gave, losslessly); 64-bit offsets
                                    # since a batch of large photos passes 2 GiB
    ("width", pa.int32()),
    ("height", pa.int32()),
])


@dataclass(frozen=True)
class TaskDefaults:
    """The task of every item of a folder, and of Parquet rows / WebDataset samples that name none."""

    task: str | None = None
    prompt: str | None = None
    phrase: str | None = None

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def detect_layout(path: Path) -> Layout:
    """The layout of an input path: a task file, a folder of images, Parquet files or tar shards."""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            return "parquet"
        if suffix == ".tar":
            return "webdataset"
        return "jsonl"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such input file or folder")
    names = [name.lower() for name in os.listdir(path)]
    if any(name.endswith(".parquet") for name in names):
        return "parquet"
    if any(name.endswith(".tar") for name in names):
        return "webdataset"
    return "folder"


def read_input(path: Path, layout: Layout, defaults: TaskDefaults, done: frozenset[str], summary: RunSummary, *,
               image_root: Path | None, max_pixels: int | None, decode_cpus: float,
               batch_size: int) -> ray.data.Dataset | None:
    """A dataset of :data:`TASK_SCHEMA` rows: the tasks of ``path`` whose keys are not in ``done``,
    read and decoded by CPU tasks of ``decode_cpus`` each; None when a task file has nothing left to do."""
    # A task file is filtered by the driver; the streamed layouts are filtered in their prepare tasks.
    prepare_args: dict[str, Any] = {"layout": layout, "defaults": defaults,
                                    "done": frozenset() if layout == "jsonl" else done,
                                    "max_pixels": max_pixels, "root": str(path), "image_root": image_root}
    if layout == "jsonl":
        # Hand-read in the driver: lion run's parser gives line numbers (the keys of id-less lines and the
        # start of every message) and drops duplicate ids, which need one pass over the whole file; Ray's
        # read_json has neither and fails a whole block on one bad line. Only task lines (paths, prompts)
        # are held here; images are read by the decode tasks.
        rows = [_jsonl_row(entry, path) for entry in pending_tasks(path, set(done), summary, image_root=image_root)]
        if not rows:
            return None
        dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 256)))
    elif layout == "folder":
        dataset = ray.data.read_binary_files(str(path), include_paths=True, file_extensions=list(IMAGE_EXTENSIONS),
                                             num_cpus=decode_cpus)
    elif layout == "parquet":
        dataset = ray.data.read_parquet(str(path), include_paths=True, num_cpus=decode_cpus)
    else:
        # decoder=None keeps members as bytes: images are decoded by load_image, as lion run does.
        dataset = ray.data.read_webdataset(str(path), decoder=None, num_cpus=decode_cpus)
    return dataset.map_batches(prepare, batch_format="pyarrow", batch_size=batch_size, fn_kwargs=prepare_args,
                               num_cpus=decode_cpus)


def _jsonl_row(entry: BatchItem | LineError, path: Path) -> dict[str, Any]:
    key = task_key(entry.id, entry.line)
    if isinstance(entry, LineError):
        return {"key": key, "entry": json.dumps(error_record(entry, entry.message))}
    return {"key": key, "entry": json.dumps({"item": _item_json(entry), "where": f"{path}:{entry.line}"})}


def _item_json(item: BatchItem) -> dict[str, Any]:
    return {**asdict(item), "image": str(item.image)}


def prepare(batch: pa.Table, *, layout: Layout, defaults: TaskDefaults, done: frozenset[str],
            max_pixels: int | None, root: str, image_root: Path | None) -> pa.Table:
    """Raw rows of one layout -> decoded :data:`TASK_SCHEMA` rows (finished tasks dropped)."""
    rows = []
    for key, entry, where, data in _entries(batch.to_pylist(), layout, defaults, root, image_root):
        if key in done:
            continue
        if isinstance(entry, dict):  # an error record already
            rows.append({"key": key, "where": where, "record": json.dumps(entry)})
            continue
        if isinstance(entry, LineError):
            rows.append({"key": key, "where": where, "record": json.dumps(error_record(entry, entry.message))})
            continue
        loaded = load_item_image(entry, where, max_pixels, data)
        row: dict[str, Any] = {"key": key, "item": json.dumps(_item_json(entry)), "where": where}
        if isinstance(loaded, dict):
            row["record"] = json.dumps(loaded)
        else:
            row.update(pixels=loaded.tobytes(), width=loaded.width, height=loaded.height)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=TASK_SCHEMA)


Entry = tuple[str, "BatchItem | LineError | dict[str, Any]", str, "bytes | None"]


def _entries(rows: list[dict[str, Any]], layout: Layout, defaults: TaskDefaults, root: str,
             image_root: Path | None) -> Iterator[Entry]:
    """(key, task or error, where, image bytes or None) of each raw row."""
    if layout == "jsonl":
        for row in rows:
            entry = json.loads(row["entry"])
            if "item" not in entry:
                yield row["key"], entry, "", None
            else:
                yield row["key"], BatchItem(**entry["item"]), entry["where"], None
        return
    for row in rows:
        record, where, data = _task_record(row, layout, defaults, root)
        entry = parse_task(record, where, 0, Path(root), image_root)
        yield task_key(entry.id, entry.line), entry, where, data


def _task_record(row: dict[str, Any], layout: Layout, defaults: TaskDefaults,
                 root: str) -> tuple[dict[str, Any], str, bytes | None]:
    """The task record of one raw row (as a line of a task file would give it), where it came from, and
    the image's bytes when the input carries them."""
    if layout == "folder":
        # The id is the path inside the folder: stable across runs, unique by construction.
        relative = Path(os.path.relpath(row["path"], root)).as_posix()
        return {**defaults.record(), "id": relative, "image": row["path"]}, row["path"], row["bytes"]
    if layout == "webdataset":
        image_member = next((k for k in row if k.lower() in IMAGE_EXTENSIONS and row[k] is not None), None)
        meta = _json_member(row.get("json"))
        where = f"{row.get('__url__', root)}#{row['__key__']}"
        record = {**defaults.record(), **meta, "id": meta.get("id", row["__key__"]),
                  "image": f"{where}.{image_member}" if image_member else None}
        return record, where, row[image_member] if image_member else None
    # Parquet: the hub's layouts: an `image` column of bytes, a path, or {"bytes", "path"} (datasets' Image).
    image, data = row.get("image"), None
    if isinstance(image, dict):
        data, image = image.get("bytes"), image.get("path")
    elif isinstance(image, (bytes, bytearray)):
        data, image = bytes(image), None
    source = row.get("path", root)
    record = {**defaults.record(), **{k: row[k] for k in ("task", "prompt", "phrase", "tags") if row.get(k) is not None}}
    item_id = row.get("id")
    if item_id is None:
        # Without an id column the task is named by its content, which a restart finds again.
        digest = hashlib.sha1(data if data is not None else str(image).encode())
        digest.update(json.dumps(record, sort_keys=True).encode())
        item_id = f"sha1:{digest.hexdigest()[:20]}"
    where = f"{source}#{item_id}"
    record.update(id=item_id, image=image if image else (where if data is not None else None))
    return record, where, data


def _json_member(value: bytes | str | None) -> dict[str, Any]:
    if value is None:
        return {}
    try:
        parsed = json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return parsed if isinstance(parsed, dict) else {}

