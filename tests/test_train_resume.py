"""Resuming: a run stopped or killed mid-way and resumed ends bit-identical to an uninterrupted one, and
a kill while a checkpoint is being written leaves the previous checkpoint whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ASSETS, REPO

from lion_mllm.train.checkpoint import SAVE_DELAY_ENV, is_complete, list_checkpoints, load_checkpoint
from lion_mllm.train.config import load_train_config
from lion_mllm.train.loop import train
from lion_mllm.train.synthetic import tiny_train_config, write_synthetic_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def raw_config(data, out):
    """Stage 3 with dropout on, augmentation on, accumulation: everything that could break exactness."""
    cfg = tiny_train_config(data, 3, ASSETS / "flan-t5-tiny", ASSETS / "bert-tiny-uncased", out, num_threads=1,
                            max_steps=8, batch_size_train=2, accum_grad_iters=2, save_every_steps=3, print_freq=1,
                            init_lr=5e-3, warmup_steps=2, keep_checkpoints=5,
                            augment={"hflip": 0.5, "random_resized_crop": [0.5, 1.0]})
    cfg["model"]["config_overrides"] = {"language": {"dropout_rate": 0.1}, "qformer": {"dropout": 0.1},
                                        "aggregator": {"dropout": 0.1}}
    return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_images=10)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run."""
    return train(load_train_config(raw_config(data, tmp_path_factory.mktemp("reference"))))


def final_state(result):
    checkpoint = load_checkpoint(list_checkpoints(result.run_dir / "checkpoints")[-1])
    assert checkpoint["training_state"]["step"] == 8
    return checkpoint


def assert_identical(a, b):
    assert a["lion_params"].keys() == b["lion_params"].keys()
    for name, tensor in a["lion_params"].items():
        assert torch.equal(tensor, b["lion_params"][name]), name
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state_a[key][field], state_b[key][field]), (key, field)


def losses(result):
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: (row["loss"], row["lr"]) for row in rows}


def test_stopped_and_resumed_run_is_bit_identical(reference, data, tmp_path):
    cfg = load_train_config(raw_config(data, tmp_path))
    stopped = train(cfg, stop_after_steps=5)
    assert not stopped.finished and stopped.step == 5 and stopped.last_checkpoint.name == "step_000005"
    resumed = train(cfg, resume=stopped.run_dir)
    assert resumed.finished and resumed.run_dir == stopped.run_dir
    assert_identical(final_state(reference), final_state(resumed))
    # the same batches at the same learning rates: every step's loss and rate agree exactly
    assert losses(resumed) == losses(reference)
    exported = json.loads((resumed.export_dir / "config.json").read_text())
    assert exported["visual_input"] == "all"


def test_kill_while_saving_keeps_the_previous_checkpoint_and_resume_is_exact(reference, data, tmp_path):
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump(raw_config(data, tmp_path / "out")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           SAVE_DELAY_ENV: "6:120", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lion_mllm.train", "--config", str(cfg_file)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        partial = None
        while time.time() < deadline and process.poll() is None:
            found = list((tmp_path / "out").glob("*/checkpoints/.tmp-step_000006/optimizer.pt"))
            if found:
                partial = found[0].parent
                break
            time.sleep(0.1)
        assert partial is not None, process.stderr.read() if process.poll() is not None else "no save started"
        process.send_signal(signal.SIGKILL)  # mid-save: the parameters and optimizer are written, the rest not
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    checkpoints = partial.parent
    # saved at steps 3 (save_every_steps) and 5 (end of an epoch: 20 samples / 4 per step); 6 was torn
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step_000003", "step_000005"]
    assert is_complete(checkpoints / "step_000005") and not (checkpoints / "step_000006").exists()
    assert (checkpoints / "latest").read_text().strip() == "step_000005"
    # resume the newest run under output_dir (no path given), in this process
    resumed = train(load_train_config(cfg_file), resume="auto")
    assert resumed.run_dir == checkpoints.parent and resumed.finished
    assert_identical(final_state(reference), final_state(resumed))
    assert not list(checkpoints.glob(".tmp-*"))  # the torn save was cleaned up by a later one
    ref_losses = losses(reference)
    assert losses(resumed) == ref_losses
    # step 6 was logged before the kill and again after the resume from step 5: the resumed run drops
    # the killed run's rows past its checkpoint, so every step is in metrics.jsonl once
    steps = [json.loads(line)["step"] for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    log = (resumed.run_dir / "train.log").read_text()
    assert "taking over a stale lock" in log and "is not running" in log  # the killed trainer's lock
    assert not (resumed.run_dir / "train.lock").exists()


def test_resume_refuses_a_checkpoint_of_another_stage(reference, data, tmp_path):
    from lion_mllm import CheckpointError

    cfg = raw_config(data, tmp_path)
    cfg["run"]["stage"] = 1
    cfg["train_datasets"] = cfg["train_datasets"][:1]
    with pytest.raises(CheckpointError, match="do not fit this model"):
        train(load_train_config(cfg), resume=reference.run_dir)


def test_checkpoint_files_hold_only_plain_data(reference):
    path = Path(reference.last_checkpoint)
    for name in ("optimizer.pt", "training_state.pt"):
        torch.load(path / name, weights_only=True)  # no pickled code
    meta = json.loads((path / "meta.json").read_text())
    assert (meta["stage"], meta["visual_input"], meta["step"]) == (3, "all", 8)
    assert (reference.run_dir / "config.yaml").is_file() and (reference.run_dir / "final" / "config.json").is_file()
