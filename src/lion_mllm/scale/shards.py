"""Result shards: written atomically under names fixed by their content, read back on restart.

Ray's file writers (write_parquet, write_json) write straight to the final name, so a killed write task
leaves a torn file that a restart would read as finished; this sink writes a temporary file and renames
it (one ``os.replace``). A shard is named by a hash of the task keys it holds, so a write task that Ray
retries after it had already renamed its file writes the same name again: a duplicate cannot appear.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import WriteResult

from ..run import completed_keys, task_key

OutputFormat = Literal["parquet", "jsonl"]
SHARD_PREFIX = "part-"
TMP_PREFIX = ".tmp-"
EXTENSIONS = {"parquet": ".parquet", "jsonl": ".jsonl"}

# Parquet needs one type per column: ids (a string or a number in a task file) are stored as text (a
# string id as it is, any other as JSON); `key` tells 1 from "1".
RESULT_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("id", pa.string()),
    ("line", pa.int64()),          # set for error records of lines without an id
    ("task", pa.string()),
    ("image", pa.string()),
    ("answer", pa.string()),
    ("box", pa.list_(pa.float64())),
    ("box_pixels", pa.list_(pa.float64())),
    ("tags", pa.list_(pa.string())),
    ("error", pa.string()),
])


def finished_keys(directory: Path) -> frozenset[str]:
    """Keys of every task in the finished shards of ``directory`` (both formats); leftovers of writes
    that were killed before their rename are removed."""
    keys: set[str] = set()
    if not directory.is_dir():
        return frozenset()
    for path in sorted(directory.iterdir()):
        if path.name.startswith(TMP_PREFIX):
            path.unlink(missing_ok=True)
        elif path.name.startswith(SHARD_PREFIX) and path.suffix == ".parquet":
            keys.update(pq.read_table(path, columns=["key"]).column("key").to_pylist())
        elif path.name.startswith(SHARD_PREFIX) and path.suffix == ".jsonl":
            keys.update(completed_keys(path))
    return frozenset(keys)


def read_results(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of the shards of ``directory`` as `lion run` writes it (ids back in their own type),
    plus ``key`` and, for results, the ``tags`` used."""
    records: list[dict[str, Any]] = []
    for path in sorted(Path(directory).iterdir()):
        if not path.name.startswith(SHARD_PREFIX):
            continue
        if path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                records.append({"key": task_key(record.get("id"), record.get("line", 0)), **record})
        elif path.suffix == ".parquet":
            records.extend(_from_row(row) for row in pq.read_table(path).to_pylist())
    return records


def _from_row(row: dict[str, Any]) -> dict[str, Any]:
    key = row["key"]
    record: dict[str, Any] = {"key": key, "id": json.loads(key[3:]) if key.startswith("id:") else None}
    if row["error"] is not None:
        record["error"] = row["error"]
        if record["id"] is None:
            record["line"] = row["line"]
        return record
    record.update(task=row["task"], image=row["image"], answer=row["answer"])
    if row["task"] == "grounding":
        record.update(box=row["box"], box_pixels=row["box_pixels"])
    record["tags"] = row["tags"]
    return record


def _to_row(key: str, record: dict[str, Any]) -> dict[str, Any]:
    item_id = record.get("id")
    return {"key": key, "id": item_id if isinstance(item_id, str) or item_id is None else json.dumps(item_id),
            **{name: record.get(name) for name in RESULT_SCHEMA.names if name not in ("key", "id")}}


class ShardSink(Datasink[tuple[int, int]]):
    """Writes blocks of ``key``/``record`` rows as result shards of ``directory``."""

    def __init__(self, directory: Path, output_format: OutputFormat, rows_per_shard: int) -> None:
        self.directory, self.output_format, self.rows_per_shard = directory, output_format, rows_per_shard
        self.answered = self.errors = 0

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_shard

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def write(self, blocks: Iterable[Block], ctx: Any) -> tuple[int, int]:
        rows = [row for block in blocks for row in BlockAccessor.for_block(block).to_arrow().to_pylist()]
        if not rows:
            return 0, 0
        keys = sorted(row["key"] for row in rows)
        name = SHARD_PREFIX + hashlib.sha1("\n".join(keys).encode()).hexdigest()[:24] + EXTENSIONS[self.output_format]
        tmp = self.directory / f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}"
        records = [(row["key"], json.loads(row["record"])) for row in rows]
        if self.output_format == "parquet":
            pq.write_table(pa.Table.from_pylist([_to_row(k, r) for k, r in records], schema=RESULT_SCHEMA), tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for _, record in records)
        os.replace(tmp, self.directory / name)
        errors = sum("error" in record for _, record in records)
        return len(records) - errors, errors

    def on_write_complete(self, write_result: WriteResult[tuple[int, int]]) -> None:
        self.answered = sum(answered for answered, _ in write_result.write_returns)
        self.errors = sum(errors for _, errors in write_result.write_returns)
