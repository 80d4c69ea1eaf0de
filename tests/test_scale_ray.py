"""`lion run --engine ray` on a local Ray cluster started here (2 CPUs, 200 MB object store).

The Ray job's records must equal single-process `lion run`'s item for item (lion-shapes on synthetic
scenes), in every input layout; a replica killed mid-job and a job killed and restarted must lose and
duplicate nothing; bad items must become error records.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from lion_mllm import shapes
from lion_mllm.run import run_batch
from lion_mllm.scale import ClusterTooSmallError, read_results, run_ray
from lion_mllm.scale.resources import plan_replicas, replicas_that_fit, stage_needs

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread

SCENES = 20  # x 3 tasks (when the scene has a phrase to find): about 60 tasks, plus bad items
BAD_LINES = ['{"id": "no-image", "image": "nowhere/missing.png", "task": "caption"}',
             '{"id": "not-an-image", "image": "broken.png", "task": "vqa", "prompt": "how many shapes are there?"}',
             '{"id": "no-task", "image": "s0.png"}',
             'this is not JSON']
# Logical CPUs: two replicas leave one CPU of the two for Ray Data's own tasks (listing files takes a whole
# one) and the read/decode/write tasks.
RAY_OPTIONS = {"replicas": 2, "threads": 1, "replica_cpus": 0.5, "decode_cpus": 0.25, "batch_size": 4,
               "progress": False}
ONE_REPLICA = {**RAY_OPTIONS, "replicas": 1}  # layouts: one model load per job keeps the suite short
LAYOUT_TASKS = 30  # the first tasks of the world, for the Parquet and WebDataset layouts


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A Ray head on this machine (ray start --block: stopping it stops every process it started), and
    this process connected to it as the driver."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="lionray-", dir="/tmp")  # Ray's socket paths must stay short
    # A test cluster on the loopback address; token authentication off, since its token file
    # (~/.ray/auth_token) is shared with any other Ray user of this account.
    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2", "--num-gpus=0", "--object-store-memory=200000000",
                             "--include-dashboard=false", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
                break
            except Exception:
                if time.monotonic() > deadline or head.poll() is not None:
                    raise
                time.sleep(1)
        yield address
    finally:
        ray.shutdown()
        head.send_signal(signal.SIGINT)  # what `ray start --block` stops its cluster on
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Scenes with a caption, a question and a grounding task each, the task file of `lion run` (with
    bad lines), and `lion run`'s own records for it (the reference)."""
    root = tmp_path_factory.mktemp("scale")
    images = root / "images"
    tasks = shapes.write_run_tasks(images, range(shapes.HELD_OUT_SEED_BASE, shapes.HELD_OUT_SEED_BASE + SCENES))
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    task_file = images / "tasks.jsonl"
    task_file.write_text("".join(json.dumps(t) + "\n" for t in tasks) + "\n".join(BAD_LINES) + "\n"
                         + json.dumps(tasks[0]) + "\n")  # a duplicate id: lion run skips it, so must Ray
    from lion_mllm import load_model

    lion = load_model("lion-shapes")
    reference = root / "reference.jsonl"
    run_batch(lion, task_file, reference, progress=False)
    records = {_key(r): r for r in map(json.loads, reference.read_text().splitlines())}
    tags = {str(images / f"s{seed}.png"): lion.tag([images / f"s{seed}.png"])[0] for seed in range(SCENES)}
    return {"root": root, "images": images, "tasks": tasks, "task_file": task_file, "reference": records,
            "tags": tags, "lion": lion}


def _key(record: dict[str, Any]) -> str:
    from lion_mllm.run import task_key

    return task_key(record.get("id"), record.get("line", 0))


def _answers(record: dict[str, Any]) -> dict[str, Any]:
    """What must agree between engines whatever the layout (the image is named by each layout its way)."""
    return {k: record.get(k) for k in ("task", "answer", "box", "box_pixels", "error") if k in record}


def _check_complete(output: Path, world: dict[str, Any]) -> list[dict[str, Any]]:
    """Every record of the reference once, equal to `lion run`'s, and nothing else."""
    records = read_results(output)
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)), "duplicate records"
    assert set(keys) == set(world["reference"])
    for record in records:
        expected = world["reference"][record["key"]]
        tags = record.pop("tags", None)
        assert {k: v for k, v in record.items() if k != "key"} == expected
        if "error" not in record:
            assert ", ".join(tags) == world["tags"][record["image"]]  # the tags the model used
    assert not [p for p in output.iterdir() if not p.name.startswith("part-")]  # no leftover temporary file
    return records


def test_task_file_equals_lion_run_item_for_item(cluster: str, world: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = run_ray("lion-shapes", world["task_file"], out, output_format="jsonl", rows_per_shard=16, **RAY_OPTIONS)
    records = _check_complete(out, world)
    errors = {r["id"] for r in records if "error" in r}
    assert errors == {"no-image", "not-an-image", "no-task", None}  # None: the line that is not JSON
    assert (summary.done, summary.errors, summary.duplicates) == (len(world["tasks"]), 4, ["c0"])

    again = run_ray("lion-shapes", world["task_file"], out, output_format="jsonl", **RAY_OPTIONS)
    assert (again.done, again.errors, again.skipped) == (0, 0, len(records))  # finished: nothing redone
    assert len(read_results(out)) == len(records)


def _parquet_input(folder: Path, tasks: list[dict[str, Any]]) -> Path:
    """The hub's layout: an `image` column of {bytes, path} (datasets' Image feature); here half the
    rows carry the bytes, the other half only the path, over two files; plus a corrupt image."""
    rows = []
    for index, task in enumerate(tasks):
        path = Path(task["image"])
        image = {"bytes": path.read_bytes(), "path": path.name} if index % 2 else {"bytes": None, "path": str(path)}
        rows.append({"id": task["id"], "task": task["task"], "prompt": task.get("prompt"),
                     "phrase": task.get("phrase"), "image": image})
    rows.append({"id": "corrupt", "task": "caption", "prompt": None, "phrase": None,
                 "image": {"bytes": b"GIF89a truncated", "path": "corrupt.gif"}})
    folder.mkdir()
    half = len(rows) // 2
    for number, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part), folder / f"train-{number:05d}.parquet")
    return folder


@pytest.mark.slow  # minutes: run by `python -m pytest -m slow` (.ci/run)
def test_parquet_with_bytes_and_paths_equals_lion_run(cluster: str, world: dict[str, Any], tmp_path: Path) -> None:
    tasks = world["tasks"][:LAYOUT_TASKS]
    out = tmp_path / "out"
    run_ray("lion-shapes", _parquet_input(tmp_path / "data", tasks), out, **ONE_REPLICA)
    _assert_like_lion_run(out, tasks, world, bad_id="corrupt", bad_name="corrupt.gif")


def _assert_like_lion_run(out: Path, tasks: list[dict[str, Any]], world: dict[str, Any], *, bad_id: str,
                          bad_name: str) -> None:
    """The Ray results hold every task once, each answered as `lion run` answered it, and the bad item's
    error record names the bad file."""
    records = {r["id"]: r for r in read_results(out)}
    assert set(records) == {t["id"] for t in tasks} | {bad_id}
    for task in tasks:
        assert _answers(records[task["id"]]) == _answers(world["reference"][_key(task)])
    assert bad_name in records[bad_id]["error"]


def _webdataset_input(folder: Path, tasks: list[dict[str, Any]]) -> Path:
    """Tar shards of `<key>.png` + `<key>.json` (the task's fields), as the authors' training data; plus
    a torn image."""
    folder.mkdir()
    samples = [(t["id"], Path(t["image"]).read_bytes(), {k: v for k, v in t.items() if k not in ("id", "image")})
               for t in tasks]
    samples.append(("broken", b"\x89PNG\r\n\x1a\n torn", {"task": "caption"}))
    for number in range(2):
        with tarfile.open(folder / f"shard-{number:06d}.tar", "w") as tar:
            for key, image, meta in samples[number::2]:
                for name, payload in ((f"{key}.png", image), (f"{key}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return folder


@pytest.mark.slow  # minutes: run by `python -m pytest -m slow` (.ci/run)
def test_webdataset_shards_equal_lion_run(cluster: str, world: dict[str, Any], tmp_path: Path) -> None:
    tasks = world["tasks"][:LAYOUT_TASKS]
    out = tmp_path / "out"
    run_ray("lion-shapes", _webdataset_input(tmp_path / "shards", tasks), out, **ONE_REPLICA)
    _assert_like_lion_run(out, tasks, world, bad_id="broken", bad_name="broken.png")


def _workers(head_address: str, title: str = "ray::MapWorker(MapBatches(LionReplica))") -> list[int]:
    """Processes of this test's cluster whose title starts with ``title`` (found through /proc: other
    clusters on this machine have other ports)."""
    port = head_address.rsplit(":", 1)[1]
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith(title) and _in_cluster(int(entry.name), port):
            pids.append(int(entry.name))
    return pids


def _title(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _in_cluster(pid: int, port: str) -> bool:
    # A Ray worker is a child of its node's raylet, whose command line names the GCS port.
    try:
        parent = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        raylet = (Path("/proc") / str(parent) / "cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return False
    return "raylet" in raylet and f":{port}" in raylet


@pytest.mark.slow  # minutes: run by `python -m pytest -m slow` (.ci/run)
def test_a_replica_killed_mid_job_loses_and_duplicates_nothing(cluster: str, world: dict[str, Any],
                                                              tmp_path: Path) -> None:
    out = tmp_path / "out"
    result: dict[str, Any] = {}
    job = threading.Thread(target=lambda: result.update(summary=run_ray(
        "lion-shapes", world["task_file"], out, rows_per_shard=4, **RAY_OPTIONS)))
    job.start()
    deadline = time.monotonic() + 120
    killed = None
    while killed is None and time.monotonic() < deadline and job.is_alive():
        pids = _workers(cluster)
        if pids and out.is_dir() and list(out.glob("part-*")):  # answering has begun
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    job.join(timeout=240)
    assert killed is not None, "the job ended before a replica could be killed"
    assert not job.is_alive() and "summary" in result
    _check_complete(out, world)


@pytest.mark.slow  # minutes: run by `python -m pytest -m slow` (.ci/run)
def test_a_killed_job_restarted_loses_and_duplicates_nothing(cluster: str, world: dict[str, Any],
                                                             tmp_path: Path) -> None:
    out = tmp_path / "out"
    options = {**RAY_OPTIONS, "rows_per_shard": 4}
    script = (f"import ray; from lion_mllm.scale import run_ray; ray.init(address={cluster!r}, log_to_driver=False); "
              f"run_ray('lion-shapes', {str(world['task_file'])!r}, {str(out)!r}, **{options!r})")
    driver = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None and len(list(out.glob("part-*"))) < 3:
        time.sleep(0.1)
    assert driver.poll() is None, "the job ended before it could be killed"
    driver.kill()  # SIGKILL: no cleanup, whatever was being written stays as it is
    driver.wait()
    # Ray ends a dead driver's tasks and actors; restart once they are gone, as one would after `ray job stop`.
    deadline = time.monotonic() + 60
    while [pid for pid in _workers(cluster, "ray::") if "MapBatches" in _title(pid) or "Write" in _title(pid)]:
        assert time.monotonic() < deadline, "the killed job's workers are still running"
        time.sleep(0.2)
    written = read_results(out)
    assert 0 < len(written) < len(world["reference"])

    summary = run_ray("lion-shapes", world["task_file"], out, **options)
    assert summary.skipped == len({r["key"] for r in written})
    assert summary.done + summary.errors == len(world["reference"]) - summary.skipped
    _check_complete(out, world)


@pytest.mark.slow
def test_a_few_hundred_scenes_equal_lion_run(cluster: str, tmp_path: Path) -> None:
    """300 scenes x 3 tasks through the JSONL and Parquet layouts against lion run."""
    from lion_mllm import load_model

    first = shapes.HELD_OUT_SEED_BASE + 1000
    tasks = shapes.write_run_tasks(tmp_path, range(first, first + 300))
    task_file = tmp_path / "tasks.jsonl"
    task_file.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    reference = tmp_path / "reference.jsonl"
    run_batch(load_model("lion-shapes"), task_file, reference, progress=False)
    expected = {r["id"]: r for r in map(json.loads, reference.read_text().splitlines())}

    run_ray("lion-shapes", task_file, tmp_path / "out-jsonl", **RAY_OPTIONS)
    got = {r["id"]: {k: v for k, v in r.items() if k not in ("key", "tags")} for r in read_results(tmp_path / "out-jsonl")}
    assert got == expected

    # Every row names every column (from_pylist takes the columns from the first row): a plain binary image column.
    pq.write_table(pa.Table.from_pylist([{"id": t["id"], "task": t["task"], "prompt": t.get("prompt"),
                                          "phrase": t.get("phrase"), "image": Path(t["image"]).read_bytes()}
                                         for t in tasks]), tmp_path / "tasks.parquet")
    run_ray("lion-shapes", tmp_path / "tasks.parquet", tmp_path / "out-parquet", **RAY_OPTIONS)
    got = {r["id"]: _answers(r) for r in read_results(tmp_path / "out-parquet")}
    assert got == {i: _answers(r) for i, r in expected.items()}


def test_cli_engine_ray_on_a_folder_equals_lion_run(cluster: str, world: dict[str, Any], tmp_path: Path) -> None:
    """`lion run --engine ray` joins the running cluster and captions every image of a folder; the
    non-image file among them is an error record."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": cluster}
    done = subprocess.run([sys.executable, "-m", "lion_mllm.cli", "run", "--engine", "ray", "--input",
                           str(world["images"]), "--output", str(out), "--task", "caption", "--replicas", "1",
                           "--batch-size", "4", "--output-format", "jsonl", "--json", "-q"],
                          env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["answered"], summary["errors"]) == (SCENES, 1)
    records = {r["id"]: r for r in read_results(out)}
    assert set(records) == {f"s{seed}.png" for seed in range(SCENES)} | {"broken.png"}
    for seed in range(SCENES):
        assert _answers(records[f"s{seed}.png"]) == _answers(world["reference"][_key({"id": f"c{seed}"})])
    assert "broken.png" in records["broken.png"]["error"]


# -- A cluster that cannot hold the job's stages: fitted, or refused at once, never a silent wait (#24) -----


def test_replicas_that_fit_keep_a_cpu_free_for_the_other_stages() -> None:
    parquet = stage_needs("parquet", 1.0, False, 1.0)
    assert replicas_that_fit([{"CPU": 2.0}], parquet) == 1  # the file listing's CPU beside one replica
    assert replicas_that_fit([{"CPU": 2.0}], stage_needs("jsonl", 1.0, False, 1.0)) == 1  # a write task's
    assert replicas_that_fit([{"CPU": 2.0}], stage_needs("parquet", 0.5, False, 0.25)) == 2  # RAY_OPTIONS
    assert replicas_that_fit([{"CPU": 2.0}], stage_needs("jsonl", 0.5, False, 0.25)) == 3
    assert replicas_that_fit([{"CPU": 1.0}], parquet) == 0
    gpu_nodes = [{"CPU": 8.0, "GPU": 8.0}] * 2
    on_gpus = stage_needs("webdataset", 1.0, True, 1.0)
    assert replicas_that_fit(gpu_nodes, on_gpus) == 15  # one GPU left idle, so that its node can list
    assert replicas_that_fit([*gpu_nodes, {"CPU": 4.0}], on_gpus) == 16  # or a CPU node lists


def test_a_fixed_cluster_is_fitted_or_refused_and_an_autoscaling_one_awaited(caplog: pytest.LogCaptureFixture) -> None:
    parquet = stage_needs("parquet", 1.0, False, 1.0)
    with caplog.at_level(logging.WARNING, logger="lion_mllm.scale.resources"):
        assert plan_replicas(2, [{"CPU": 2.0}], parquet, autoscales=False) == 1
        assert "running 1 replica(s) instead" in caplog.text and "file listing (1 CPU)" in caplog.text
        caplog.clear()
        assert plan_replicas(2, [{"CPU": 2.0}], parquet, autoscales=True) == 2
        assert "waits for the autoscaler to add nodes" in caplog.text
    with pytest.raises(ClusterTooSmallError, match=r"1 node\(s\) with 1 CPUs .* missing: 1 CPU\."):
        plan_replicas(1, [{"CPU": 1.0}], parquet, autoscales=False)
    with pytest.raises(ClusterTooSmallError, match=r"missing: 1 GPU\."):
        plan_replicas(1, [{"CPU": 4.0}], stage_needs("parquet", 1.0, True, 1.0), autoscales=False)


def test_a_job_waiting_for_an_autoscaling_cluster_says_what_for_until_it_has_grown(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from lion_mllm.scale import resources

    sizes = iter([[{"CPU": 2.0}], [{"CPU": 2.0}, {"CPU": 2.0}]])
    monkeypatch.setattr(resources, "cluster_nodes", lambda: next(sizes))
    with caplog.at_level(logging.WARNING, logger="lion_mllm.scale.resources"):
        reporter = resources.WaitReporter(2, stage_needs("parquet", 1.0, False, 1.0), every_s=0.05).start()
        deadline = time.monotonic() + 10
        while "has grown" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        reporter.stop()
    assert "still waiting for the cluster to grow: 2 replica(s) need room beside 1 free CPU; it has 1 node(s) " \
           "with 2 CPUs" in caplog.text
    assert "the cluster has grown to 2 node(s) with 2+2 CPUs" in caplog.text


def _within(seconds: float, job: Any) -> Any:
    """`job()`'s result, or a failure if it has not ended after `seconds` (a wait that never ends)."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = job()
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_parquet_with_as_many_replicas_as_cpus_is_fitted_and_finishes(cluster: str, world: dict[str, Any],
                                                                      tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Two one-CPU replicas on the 2-CPU cluster left no CPU for Ray Data's file listing: the job waited
    forever. It now runs one replica, says so, and answers as lion run does."""
    tasks = world["tasks"][:LAYOUT_TASKS]
    data, out = _parquet_input(tmp_path / "data", tasks), tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="lion_mllm.scale.resources"):
        _within(240, lambda: run_ray("lion-shapes", data, out, replicas=2, threads=1, batch_size=4, progress=False))
    assert "2 replica(s) of 1 CPU each do not fit" in caplog.text and "running 1 replica(s) instead" in caplog.text
    _assert_like_lion_run(out, tasks, world, bad_id="corrupt", bad_name="corrupt.gif")


@pytest.mark.slow  # minutes: run by `python -m pytest -m slow` (.ci/run)
def test_cli_webdataset_with_as_many_replicas_as_cpus_is_fitted_and_finishes(cluster: str, world: dict[str, Any],
                                                                             tmp_path: Path) -> None:
    """The issue's command: `lion run --engine ray --replicas 2` on the 2-CPU cluster with WebDataset shards."""
    tasks = world["tasks"][:LAYOUT_TASKS]
    shards, out = _webdataset_input(tmp_path / "shards", tasks), tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "lion_mllm.cli", "run", "--engine", "ray", "--input", str(shards),
                           "--output", str(out), "--replicas", "2", "--batch-size", "4", "--json", "-q"],
                          env={**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": cluster}, capture_output=True,
                          text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    assert "running 1 replica(s) instead" in done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["answered"] == len(tasks)
    _assert_like_lion_run(out, tasks, world, bad_id="broken", bad_name="broken.png")


def test_a_job_that_cannot_fit_a_fixed_cluster_fails_at_once_naming_what_is_missing(cluster: str,
                                                                                     world: dict[str, Any],
                                                                                     tmp_path: Path) -> None:
    shards, out = _webdataset_input(tmp_path / "shards", world["tasks"][:4]), tmp_path / "out"
    started = time.monotonic()
    with pytest.raises(ClusterTooSmallError, match=r"2 CPUs and 0 GPUs, fixed.*missing: 1 CPU\."):
        _within(60, lambda: run_ray("lion-shapes", shards, out, replicas=1, decode_cpus=2.0, progress=False))
    assert time.monotonic() - started < 60 and not out.exists()


def test_the_local_engine_never_imports_ray(world: dict[str, Any], tmp_path: Path) -> None:
    """Ray is an optional extra: `lion run` without `--engine ray` answers without it."""
    tasks = tmp_path / "one.jsonl"
    tasks.write_text(json.dumps(world["tasks"][0]) + "\n")
    script = ("import sys; from lion_mllm.cli import main; "
              f"code = main(['run', '--input', {str(tasks)!r}, '--output', {str(tmp_path / 'out.jsonl')!r}, '-q']); "
              "assert code == 0 and 'ray' not in sys.modules, sorted(m for m in sys.modules if 'ray' in m)")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out.jsonl").read_text())["answer"] == world["reference"][_key(world["tasks"][0])]["answer"]
