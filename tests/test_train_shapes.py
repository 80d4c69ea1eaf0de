"""`lion train` on the shapes world, the recipe of the built-in `lion-shapes` model: streamed data (made
ahead by a worker thread), the grouped training pass (one ViT pass per image), the `shapes_dense`
objective, held-out scores in the loop, shipping a complete run's best model with its record, a time
budget that stops a run incomplete, and the MLflow logger (offline, local store)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lion_mllm.shapes import HELD_OUT_SEED_BASE, ShapesTagger
from lion_mllm.shapes.recipe import ShapesStream, build_shapes_lion
from lion_mllm.train.checkpoint import list_checkpoints, load_checkpoint
from lion_mllm.train.config import ConfigError, load_train_config
from lion_mllm.train.data import StreamedBatches
from lion_mllm.train.loop import ship_run, train
from lion_mllm.train.objectives import grouped_losses

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread

REPO = Path(__file__).resolve().parents[1]


def shapes_run(out: Path, **run) -> dict:
    """configs/shapes_from_scratch.yaml at test size: 2 images per step, 1 caption + 1 question + 1
    referring phrase each, 1-2 shapes for the first 2 steps, float32 (bit-exact comparisons)."""
    block = {"stage": 4, "unfreeze": ["vision_model.", "language_model."], "init_lr": 3e-4, "min_lr": 3e-5,
             "warmup_steps": 1, "max_steps": 4, "batch_size_train": 2, "weight_decay": 0.01, "beta2": 0.98,
             "mixed_precision": "fp32", "num_workers": 0, "num_threads": 1, "seed": 0, "print_freq": 1,
             "tensorboard": False, "progress_bar": False, "output_dir": str(out),
             "objectives": [{"name": "shapes_dense", "weight": 1.0}]}
    block.update(run)
    return {"model": {"preset": "shapes"}, "run": block,
            "train_datasets": [{"stream": "shapes", "vqa_per_image": 1, "rec_per_image": 1, "curriculum_steps": 2}]}


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_shipped_config_loads_as_documented():
    cfg = load_train_config(REPO / "configs" / "shapes_from_scratch.yaml")
    assert cfg.model.preset == "shapes" and cfg.train_datasets == []
    assert cfg.train_stream.stream == "shapes"
    assert [o.name for o in cfg.run.objectives] == ["shapes_dense"]
    # float32 on one thread: bf16 has no native kernels on an AVX2 CPU (MODEL_CARD.md, "what mattered")
    assert cfg.run.mixed_precision == "fp32" and not cfg.run.cpu_autocast and cfg.run.num_threads == 1
    assert cfg.run.max_steps and cfg.run.max_minutes == 120 and cfg.run.stream_prefetch >= 1
    assert cfg.run.best_metric == "val_shapes" and cfg.run.eval_tasks[0].task == "shapes"


@pytest.mark.parametrize("change, message", [
    (lambda c: c["train_datasets"].append({"ann_path": "x.jsonl", "vis_root": "."}), "cannot be mixed"),
    (lambda c: c["train_datasets"][0].update(stream="nope"), "unknown stream 'nope'"),
    (lambda c: c["run"].pop("max_steps") and c["run"].update(max_epoch=1), "set run.max_steps"),
    (lambda c: c["run"].update(objectives=[{"name": "nope"}]), "run.objectives[0]"),
    (lambda c: c["run"].update(loggers=["comet"]), "run.loggers: unknown ['comet']"),
    (lambda c: c["run"].update(parallel="fsdp2"), "grouped training pass"),
    (lambda c: c["run"].update(max_minutes=0), "run.max_minutes must be positive"),
    (lambda c: c["run"].update(stream_prefetch=-1), "run.stream_prefetch must be 0 or more"),
])
def test_config_refuses_what_the_stream_cannot_do(tmp_path, change, message):
    raw = shapes_run(tmp_path)
    change(raw)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_train_config(raw)


def test_stream_groups_samples_by_image_and_resumes_in_place():
    lion = build_shapes_lion(0)
    source = ShapesStream(seed=0, images_per_batch=3, vqa_per_image=2, rec_per_image=1, curriculum_steps=1)
    stream = StreamedBatches(source, lion.processor, seed=0, rank=0, world_size=1, accum_grad_iters=1)
    first = next(stream)["batch"]
    assert first["pixel_values"].shape == (3, 3, 128, 128)  # each image once
    index = first["image_index"].tolist()
    assert sorted(set(index)) == [0, 1, 2] and first["labels"].shape[0] == len(index) <= 3 * 4
    # curriculum: the first step's scenes hold 1-2 shapes (objects centred in a patch, dense targets)
    assert ((first["dense_colour"] > 0).sum(1) <= 2).all() and first["dense_box"].shape == (3, 64, 4)
    state = stream.state_dict()
    expected = next(stream)["batch"]
    again = StreamedBatches(source, lion.processor, seed=0, rank=0, world_size=1, accum_grad_iters=1, state=state)
    got = next(again)["batch"]
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_stream_spreads_a_few_samples_over_more_images():
    """samples_per_image: every image of the group goes through the vision side (and the dense objective),
    each with a random few of its samples, so the T5 work stays that of fewer images."""
    lion = build_shapes_lion(0)
    source = ShapesStream(seed=0, images_per_batch=6, vqa_per_image=3, rec_per_image=2, samples_per_image=2)
    batch = next(StreamedBatches(source, lion.processor, seed=0, rank=0, world_size=1, accum_grad_iters=1))["batch"]
    assert batch["pixel_values"].shape[0] == 6 and batch["dense_colour"].shape[0] == 6
    counts = torch.bincount(batch["image_index"], minlength=6)
    assert counts.tolist() == [2] * 6
    with pytest.raises(ValueError, match="samples_per_image must be at least 1"):
        ShapesStream(seed=0, samples_per_image=0)


def test_ranks_draw_disjoint_scenes():
    source = ShapesStream(seed=0, images_per_batch=2)
    seen = []
    for rank in (0, 1):
        calls = []
        source.group = lambda index, step, rng, calls=calls: calls.append(index) or ([], [], {})
        stream = StreamedBatches(source, None, seed=0, rank=rank, world_size=2, accum_grad_iters=1)
        for _ in range(3):
            with pytest.raises(AttributeError):  # no processor: only the group index matters here
                next(stream)
        seen.append(calls)
    assert seen == [[0, 2, 4], [1, 3, 5]]


def test_grouped_pass_computes_lion_forward():
    """One ViT pass per image shared by its samples = LionModel.forward on every sample's own copy."""
    lion = build_shapes_lion(0)
    model = lion.model.eval()
    source = ShapesStream(seed=0, images_per_batch=2, vqa_per_image=2, rec_per_image=2)
    batch = next(StreamedBatches(source, lion.processor, 0, 0, 1, 1))["batch"]
    with torch.no_grad():
        grouped, aux = grouped_losses(model, batch, {}, {})
        plain = {k: v for k, v in batch.items() if not k.startswith("dense_") and k != "image_index"}
        plain["pixel_values"] = batch["pixel_values"][batch["image_index"]]
        logits = model(**plain).logits
        reference = F.cross_entropy(logits.flatten(0, 1), plain["labels"].flatten(), ignore_index=-100,
                                    reduction="sum")
    assert float(aux) == 0.0
    torch.testing.assert_close(grouped, reference, rtol=1e-5, atol=1e-4)


def test_stream_run_resumes_bit_exactly_and_ships_its_best(tmp_path):
    """4 steps straight = 2 steps, stop, resume 2 (weights, the objective head, AdamW, losses); the held-out
    shapes score runs in the loop and, the run complete, its best model is shipped in float16 with its
    training.json and metrics.jsonl, beside the card kept there."""
    ship = tmp_path / "ship"
    ship.mkdir()
    (ship / "MODEL_CARD.md").write_text("the card\n")
    evaluation = {"eval_tasks": [{"task": "shapes", "limit": 2, "batch_size": 2}], "eval_every_steps": 2}
    straight = train(load_train_config(shapes_run(tmp_path / "a", ship_best_to=str(ship), **evaluation)))
    first = train(load_train_config(shapes_run(tmp_path / "b", **evaluation)), stop_after_steps=2)
    assert not first.finished and first.step == 2
    resumed = train(load_train_config(shapes_run(tmp_path / "b", **evaluation)), resume=first.run_dir)
    assert resumed.finished and resumed.step == 4
    a = load_checkpoint(list_checkpoints(straight.run_dir / "checkpoints")[-1])
    b = load_checkpoint(list_checkpoints(resumed.run_dir / "checkpoints")[-1])
    assert any(name.startswith("objectives.shapes_dense.") for name in a["lion_params"])
    assert a["lion_params"].keys() == b["lion_params"].keys()
    for name, tensor in a["lion_params"].items():
        assert torch.equal(tensor, b["lion_params"][name]), name
    train_rows = [(r["step"], r["loss"], r["aux_loss"], r["lr"]) for r in rows(straight.run_dir) if "loss" in r]
    assert train_rows == [(r["step"], r["loss"], r["aux_loss"], r["lr"]) for r in rows(resumed.run_dir) if "loss" in r]
    assert [row[0] for row in train_rows] == [1, 2, 3, 4]
    # 1 caption + 1 question + at most 1 referring phrase per image: region samples are at most a third
    assert all(0 < r["region_fraction_rank0"] <= 1 / 3 + 1e-9 for r in rows(straight.run_dir) if "loss" in r)
    scores = [r for r in rows(straight.run_dir) if "val_shapes" in r]
    assert [r["step"] for r in scores] == [2, 4] and scores[0]["val_shapes_samples"] == 2
    assert scores[0]["val_shapes"] == pytest.approx(scores[0]["val_shapes_rec"] + scores[0]["val_shapes_vqa"]
                                                    + scores[0]["val_shapes_caption"])
    from lion_mllm import Lion

    assert (ship / "MODEL_CARD.md").read_text() == "the card\n"
    shipped = Lion.from_pretrained(ship)
    assert isinstance(shipped.tagger, ShapesTagger) and shipped.generation_config.num_beams == 1
    assert "F16" in (ship / "model-00001-of-00001.safetensors").read_bytes()[:4096].decode("latin-1")
    assert not any(k.startswith("objectives") for k in shipped.model.state_dict())  # training-only head
    best = json.loads((straight.run_dir / "best" / "best.json").read_text())
    best_weights = Lion.from_pretrained(straight.run_dir / "best").model.state_dict()
    for name, tensor in shipped.model.state_dict().items():  # exactly the run's best, in float16
        assert torch.equal(tensor, best_weights[name].half().float()), name
    assert (ship / "metrics.jsonl").read_text() == (straight.run_dir / "metrics.jsonl").read_text()
    record = json.loads((ship / "training.json").read_text())
    assert record == json.loads((straight.run_dir / "training.json").read_text())
    assert record["steps"] == record["max_steps"] == 4 and record["best"] == best and record["held_out"] is None
    assert record["device"] == "cpu" and record["threads"] == 1 and record["machine"]
    assert record["config"]["run"]["max_steps"] == 4 and record["wall_seconds"] > 0
    assert record["commit"] is None or len(record["commit"]) == 40
    summary = json.loads((straight.run_dir / "summary.json").read_text())
    assert summary["complete"] is True and summary["stopped_by"] is None


def test_time_budget_stops_the_run_incomplete_and_a_resume_finishes_its_schedule(tmp_path, monkeypatch):
    """run.max_minutes stops a run (saved, marked incomplete in summary.json and its last log line) without
    touching the schedule, refuses to ship it, and a resume runs the rest of the same schedule: the same
    learning rates, losses and weights as an uninterrupted run."""
    from lion_mllm.train import loop

    ship = tmp_path / "ship"
    straight = train(load_train_config(shapes_run(tmp_path / "a", export_final=False)))
    monkeypatch.setattr(loop, "_wall_seconds", lambda state: 40.0 * state.step)  # a slow machine: 40 s a step
    raw = shapes_run(tmp_path / "b", max_minutes=1.5, ship_best_to=str(ship))
    stopped = train(load_train_config(raw))
    monkeypatch.undo()
    assert not stopped.finished and stopped.step == 3  # 120 s >= 90 s after step 3
    summary = json.loads((stopped.run_dir / "summary.json").read_text())
    assert summary["complete"] is False and summary["stopped_by"] == "run.max_minutes"
    assert summary["step"] == stopped.step and summary["total_steps"] == 4
    last_line = (stopped.run_dir / "train.log").read_text().splitlines()[-1]
    assert "incomplete: run.max_minutes=1.5 spent at step" in last_line and "not shipped" in last_line
    assert not ship.exists() and not (stopped.run_dir / "training.json").exists()
    with pytest.raises(ValueError, match="refusing to ship .* incomplete"):
        ship_run(stopped.run_dir, ship)
    resumed = train(load_train_config({**raw, "run": {**raw["run"], "max_minutes": None}}), resume=stopped.run_dir)
    assert resumed.finished and resumed.step == 4
    assert json.loads((stopped.run_dir / "summary.json").read_text())["complete"] is True
    assert (ship / "training.json").is_file()  # now complete: shipped
    train_rows = [(r["step"], r["loss"], r["aux_loss"], r["lr"]) for r in rows(straight.run_dir) if "loss" in r]
    assert train_rows == [(r["step"], r["loss"], r["aux_loss"], r["lr"]) for r in rows(resumed.run_dir) if "loss" in r]
    a = load_checkpoint(list_checkpoints(straight.run_dir / "checkpoints")[-1])["lion_params"]
    b = load_checkpoint(list_checkpoints(resumed.run_dir / "checkpoints")[-1])["lion_params"]
    assert all(torch.equal(tensor, b[name]) for name, tensor in a.items())


def test_prefetched_stream_hands_out_the_batches_made_without_it():
    """The worker thread makes the same micro-batches in the same order; the state handed to checkpoints is
    the one after the last batch taken, so a stream resumed from it continues exactly."""
    lion = build_shapes_lion(0)
    source = ShapesStream(seed=0, images_per_batch=2, vqa_per_image=2, rec_per_image=1, curriculum_steps=1)
    plain = StreamedBatches(source, lion.processor, seed=0, rank=0, world_size=1, accum_grad_iters=1)
    ahead = StreamedBatches(source, lion.processor, seed=0, rank=0, world_size=1, accum_grad_iters=1, prefetch=2)
    try:
        for _ in range(3):
            expected, got = next(plain)["batch"], next(ahead)["batch"]
            assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
            assert ahead.state_dict() == plain.state_dict()
        state = ahead.state_dict()
        deadline = time.monotonic() + 30
        while ahead.position <= 3 and time.monotonic() < deadline:  # the worker fills its queue in its own time
            time.sleep(0.01)
        assert state["position"] == 3 and ahead.position > 3  # made ahead, not handed out
        resumed = StreamedBatches(source, lion.processor, seed=0, rank=0, world_size=1, accum_grad_iters=1,
                                  state=state, prefetch=1)
        expected, got = next(plain)["batch"], next(resumed)["batch"]
        assert all(torch.equal(got[k], expected[k]) for k in got)
        resumed.close()
    finally:
        ahead.close()


def test_a_failing_stream_worker_raises_in_the_trainer():
    source = ShapesStream(seed=0, images_per_batch=2, first_scene=HELD_OUT_SEED_BASE - 2)
    stream = StreamedBatches(source, build_shapes_lion(0).processor, seed=0, rank=0, world_size=1,
                             accum_grad_iters=1, prefetch=2)
    next(stream)  # seeds base-2, base-1: fine
    for _ in range(2):  # the next group would reach the held-out seeds: raised, and again if asked again
        with pytest.raises(ValueError, match="held-out"):
            next(stream)
    stream.close()


def test_cpu_autocast_runs_in_bf16(tmp_path):
    """run.cpu_autocast: the forward computes in bfloat16 on CPU (the weights stay float32)."""
    seen = []
    from lion_mllm.train import objectives

    original = objectives.grouped_losses

    def spy(model, batch, *rest):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return original(model, batch, *rest)

    objectives.grouped_losses = spy
    try:
        result = train(load_train_config(shapes_run(tmp_path, max_steps=1, mixed_precision="bf16",
                                                    cpu_autocast=True, export_final=False)))
    finally:
        objectives.grouped_losses = original
    assert seen == [True] and result.finished


def test_mlflow_logs_every_step_once_across_a_resume(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: a local file store works offline
    uri = (tmp_path / "mlruns").as_uri()
    raw = shapes_run(tmp_path / "runs", max_steps=2, loggers=["mlflow"], mlflow_tracking_uri=uri,
                     mlflow_experiment="shapes-test", export_final=False)
    first = train(load_train_config(raw), stop_after_steps=1)
    run_id = json.loads((first.run_dir / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "KILLED"  # stopped, to be resumed
    train(load_train_config(raw), resume=first.run_dir)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["run.init_lr"] == "0.0003"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]
    assert client.get_experiment(run.info.experiment_id).name == "shapes-test"


def test_mlflow_missing_is_a_config_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name.startswith("mlflow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    from lion_mllm.train.trackers import MlflowLogger

    with pytest.raises(ConfigError, match=r"pip install 'lion-mllm\[mlflow\]'"):
        MlflowLogger(tmp_path, "x", None, {})


def test_stream_scenes_stay_below_the_held_out_seeds():
    source = ShapesStream(seed=0, images_per_batch=2, first_scene=HELD_OUT_SEED_BASE - 3)
    source.group(0, 1, random.Random(0))  # seeds base-3, base-2: fine
    with pytest.raises(ValueError, match="held-out"):
        source.group(1, 1, random.Random(0))


def test_two_ranks_train_the_stream_and_objective_in_step(tmp_path):
    """torchrun, 2 ranks (gloo): DDP wraps the model with its objective head; the ranks draw disjoint
    scenes and end with identical weights."""
    import os
    import subprocess
    import sys

    import yaml

    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump(shapes_run(tmp_path / "out", max_steps=2, export_final=False)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "lion_mllm.train", "--config", str(cfg_file)], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = next((tmp_path / "out").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 2 and summary["replicas_identical"] is True
    state = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    assert len(state["training_state"]["schedule"]) == 3 and state["training_state"]["schedule"]["world_size"] == 2
    assert all(r["aux_loss"] > 0 for r in rows(run_dir) if "loss" in r)
