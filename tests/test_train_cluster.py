"""What a long job on a shared cluster meets: a run directory another trainer still uses, LAVIS config
keys, evaluation on held-out files with the best model kept, SIGTERM, and one-line errors from every
entry point."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import ASSETS, REPO

from lion_mllm.train import main
from lion_mllm.train.config import ConfigError, load_train_config
from lion_mllm.train.loop import train
from lion_mllm.train.rundir import LOCK_NAME, RunDirectoryLocked
from lion_mllm.train.synthetic import tiny_train_config, write_synthetic_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_images=8)


def raw_config(data, out, **run):
    run = {"num_threads": 1, "max_steps": 4, "batch_size_train": 2, "print_freq": 1, "export_final": False,
           "init_lr": 5e-3, **run}
    return tiny_train_config(data, 1, ASSETS / "flan-t5-tiny", ASSETS / "bert-tiny-uncased", out, **run)


def env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------- run lock


def test_a_live_trainer_s_lock_refuses_a_second_one_and_a_dead_one_s_is_taken_over(data, tmp_path):
    first = train(load_train_config(raw_config(data, tmp_path, save_every_steps=2)), stop_after_steps=2)
    lock = first.run_dir / LOCK_NAME
    assert not lock.exists()  # released when the trainer returned
    # a live process on this host holds the run directory (as orphaned torchrun workers would)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "earlier"}))
        with pytest.raises(RunDirectoryLocked, match=rf"in use by another trainer \(pid {holder.pid} on host "):
            train(load_train_config(raw_config(data, tmp_path)), resume=first.run_dir)
        assert json.loads(lock.read_text())["pid"] == holder.pid  # the owner's lock is left alone
        cfg_file = tmp_path / "train.yaml"
        cfg_file.write_text(yaml.safe_dump(raw_config(data, tmp_path)))
        done = subprocess.run([sys.executable, "-m", "lion_mllm.train", "--config", str(cfg_file), "--resume",
                               str(first.run_dir)], env=env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert f"lion train: refused: {first.run_dir} is in use by another trainer (pid {holder.pid}" in done.stderr
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, reported and taken over
    resumed = train(load_train_config(raw_config(data, tmp_path)), resume=first.run_dir)
    assert resumed.finished and resumed.step == 4 and not lock.exists()
    log = (first.run_dir / "train.log").read_text()
    assert f"taking over a stale lock (process {holder.pid} on {socket.gethostname()} is not running)" in log
    steps = [json.loads(line)["step"] for line in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_lock_from_another_host_is_refused_with_the_file_to_delete(data, tmp_path):
    first = train(load_train_config(raw_config(data, tmp_path, max_steps=1)))
    (first.run_dir / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "node-17"}))
    with pytest.raises(RunDirectoryLocked, match=r"pid 1 on host node-17.*cannot be checked from here.*delete"):
        train(load_train_config(raw_config(data, tmp_path, max_steps=2)), resume=first.run_dir)


# ------------------------------------------------------------------------------------ LAVIS keys


def test_lavis_run_keys_are_honoured_or_refused_never_dropped(data, tmp_path):
    cfg = raw_config(data, tmp_path, task="image_text_pretrain", dist_url="env://", evaluate=False,
                     lr_sched="linear_warmup_cosine_lr", valid_splits=[])
    for key, value, message in (("evaluate", True, "evaluation only"),
                                ("valid_splits", ["val"], "list held-out annotation files under valid_datasets"),
                                ("test_splits", ["test"], "valid_datasets"),
                                ("lr_sched", "linear_warmup_step_lr", "is not implemented"),
                                ("lr_layer_decay", 0.9, "layer-wise"),
                                ("resume_ckpt_path", str(data["image_level"]), "is a file")):
        with pytest.raises(ConfigError, match=message):
            load_train_config({**cfg, "run": {**cfg["run"], key: value}})
    result = train(load_train_config(cfg), stop_after_steps=2)
    log = (result.run_dir / "train.log").read_text()
    # the ignored keys are named in a warning in train.log (logging is set up before they are reported)
    assert "WARNING config: run: ignoring keys that mean nothing to this trainer: dist_url='env://', " \
           "task='image_text_pretrain'" in log
    # resume_ckpt_path resumes (LAVIS users resume that way), instead of silently starting over
    resumed_cfg = load_train_config({**cfg, "run": {**cfg["run"], "resume_ckpt_path": str(result.run_dir)}})
    assert resumed_cfg.resume_from == result.run_dir
    resumed = train(resumed_cfg)
    assert resumed.run_dir == result.run_dir and resumed.finished and resumed.step == 4
    assert "run.resume_ckpt_path: resuming from" in (result.run_dir / "train.log").read_text()


# ------------------------------------------------------------------------------------ evaluation


def test_validation_loss_in_the_loop_keeps_the_best_model(data, tmp_path):
    cfg = raw_config(data, tmp_path, max_steps=6, eval_every_steps=2, batch_size_eval=3, save_every_steps=3,
                     keep_checkpoints=5)
    cfg["valid_datasets"] = [{"ann_path": str(data["image_level"]), "vis_root": str(data["vis_root"])}]
    result = train(load_train_config(cfg), stop_after_steps=3)  # evaluated at 2, saved at 3
    resumed = train(load_train_config(cfg), resume=result.run_dir)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "val_loss" in row]
    assert [row["step"] for row in evals] == [2, 4, 6]
    assert all(row["val_samples"] == 8 and row["val_tokens"] > 0 for row in evals)  # every record, once
    best = min(evals, key=lambda row: row["val_loss"])
    assert evals[-1]["val_best"] == best["val_loss"]  # the best of step 2 survived the resume at 3
    info = json.loads((resumed.run_dir / "best" / "best.json").read_text())
    assert info == {"step": best["step"], "metric": "val_loss", "value": best["val_loss"]}
    summary = json.loads((resumed.run_dir / "summary.json").read_text())
    assert summary["best"] == info
    from lion_mllm import Lion

    Lion.from_pretrained(resumed.run_dir / "best")  # a loadable bundle
    log = (result.run_dir / "train.log").read_text()
    assert "validation: 8 records" in log and "validation loss" in log
    # eval mode leaves training exact: the training losses equal those of a run with no evaluation
    plain = train(load_train_config(raw_config(data, tmp_path / "plain", max_steps=6, save_every_steps=3)))
    train_rows = lambda run: [(r["step"], r["loss"]) for r in  # noqa: E731
                              map(json.loads, (run.run_dir / "metrics.jsonl").read_text().splitlines())
                              if "loss" in r]
    assert train_rows(resumed) == train_rows(plain)


# ------------------------------------------------------------------------------- SIGTERM, messages


def test_sigterm_saves_a_checkpoint_and_resume_finishes(data, tmp_path):
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump(raw_config(data, tmp_path / "out", max_steps=400, print_freq=1)))
    process = subprocess.Popen([sys.executable, "-m", "lion_mllm.train", "--config", str(cfg_file)], env=env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            metrics = list((tmp_path / "out").glob("*/metrics.jsonl"))
            if metrics and metrics[0].read_text().count("\n") >= 2:
                break
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err[-3000:]
    assert "stopped (resume with --resume)" in err
    run_dir = next((tmp_path / "out").iterdir())
    log = (run_dir / "train.log").read_text()
    step = int(log.split("SIGTERM received: saved step ")[1].split(";")[0])
    assert 2 <= step < 400 and (run_dir / "checkpoints" / f"step_{step:06d}").is_dir()
    assert not (run_dir / LOCK_NAME).exists()
    resumed = train(load_train_config(cfg_file), resume=run_dir, stop_after_steps=1)  # continues there
    assert resumed.step == step + 1


def test_a_broken_annotation_file_is_one_line_from_every_entry_point(data, tmp_path, capsys):
    """`python -m lion_mllm.train` and the `lion train` handler print the same line, no traceback."""
    broken = tmp_path / "broken.json"
    broken.write_bytes(b'[\n{"image": "img000.png", "question": "q", "answer": "a", "category": "image_level",'
                       b' "tags": "x"},\n{"image": "img001.png" "question": "q"}\n]\n')
    cfg = raw_config(data, tmp_path / "out")
    cfg["train_datasets"][0]["ann_path"] = str(broken)
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    expected = f"lion train: bad data: {broken}:3:24: not valid JSON (Expecting ',' delimiter)"
    done = subprocess.run([sys.executable, "-m", "lion_mllm.train", "--config", str(cfg_file)], env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("lion train:")][0].startswith(expected)
    assert main(["--config", str(cfg_file)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(expected)


def test_resuming_an_earlier_checkpoint_logs_each_step_once_in_metrics_and_tensorboard(data, tmp_path):
    """A run that went on past its last checkpoint (killed, or resumed from an older one) logged steps
    the resumed run logs again: metrics.jsonl drops them and TensorBoard purges them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = raw_config(data, tmp_path, max_steps=4, save_every_steps=2, keep_checkpoints=5, tensorboard=True)
    first = train(load_train_config(cfg))
    resumed = train(load_train_config(cfg), resume=first.run_dir / "checkpoints" / "step_000002")
    assert resumed.finished and resumed.run_dir == first.run_dir
    steps = [json.loads(line)["step"] for line in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    events = EventAccumulator(str(first.run_dir / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4]
    log = (first.run_dir / "train.log").read_text()
    assert "metrics.jsonl: dropped 2 rows logged after step 2" in log
    assert "elapsed 0:" in log and " eta " in log  # log lines carry elapsed time and ETA


def test_task_scores_through_the_evaluation_harness_choose_the_best_model(data, tmp_path):
    """run.eval_tasks: the `lion eval` harness generates with the model being trained (here a VQA-style
    file scored by exact match) and run.best_metric picks the best model by that score."""
    task = {"task": "iconqa", "ann": str(data["image_level"]), "images": str(data["vis_root"]), "limit": 4,
            "batch_size": 4, "tags": "square", "decoding": {"num_beams": 1, "max_new_tokens": 3}}
    cfg = raw_config(data, tmp_path, max_steps=4, eval_every_steps=2, eval_tasks=[task], best_metric="val_iconqa")
    with pytest.raises(ConfigError, match=r"run.best_metric: 'val_gqa' is not evaluated; choose one of \['val_iconqa'\]"):
        load_train_config({**cfg, "run": {**cfg["run"], "best_metric": "val_gqa"}})
    with pytest.raises(ConfigError, match="unknown task 'vqa3'"):
        load_train_config({**cfg, "run": {**cfg["run"], "eval_tasks": [{**task, "task": "vqa3"}]}})
    result = train(load_train_config(cfg))
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    scores = [(row["step"], row["val_iconqa"]) for row in rows if "val_iconqa" in row]
    assert [step for step, _ in scores] == [2, 4] and all(0.0 <= value <= 1.0 for _, value in scores)
    assert all(row["val_iconqa_samples"] == 4 for row in rows if "val_iconqa" in row)
    reports = sorted((result.run_dir / "eval").glob("step_*/iconqa*.report.json"))
    assert [r.parent.name for r in reports] == ["step_000002", "step_000004"]
    report = json.loads(reports[-1].read_text())
    assert report["metrics"][report["primary_metric"]] == scores[-1][1]
    best = json.loads((result.run_dir / "summary.json").read_text())["best"]
    assert best["metric"] == "val_iconqa" and best["value"] == max(value for _, value in scores)
    assert best["step"] == next(step for step, value in scores if value == best["value"])  # the first maximum


def test_task_scores_in_the_loop_decode_with_the_model_s_own_generation_config(data, tmp_path):
    """A model whose generation config is not the authors' (no repetition penalty, at least 4 tokens) is
    scored in the loop as `Lion.generate` answers with that config, not with the authors' defaults."""
    from lion_mllm import GenerationDefaults, Lion
    from lion_mllm.evaluation.harness import evaluate, read_predictions
    from lion_mllm.train.config import ModelSpec
    from lion_mllm.train.stages import build_lion

    own = GenerationDefaults(repetition_penalty=1.0, min_length=4)
    built = build_lion(ModelSpec(preset="tiny", llm_model=ASSETS / "flan-t5-tiny",
                                 bert_model=ASSETS / "bert-tiny-uncased"), 1, torch.device("cpu"))
    Lion(built.model, built.processor, None, own).save_pretrained(tmp_path / "start")
    task = {"task": "iconqa", "ann": str(data["image_level"]), "images": str(data["vis_root"]), "limit": 4,
            "batch_size": 4, "tags": "square", "decoding": {"num_beams": 1, "max_new_tokens": 3}}
    cfg = raw_config(data, tmp_path, max_steps=1, eval_every_steps=1, eval_tasks=[task], export_final=True)
    cfg["model"] = {"pretrained": str(tmp_path / "start")}
    result = train(load_train_config(cfg))
    in_loop = read_predictions(next((result.run_dir / "eval" / "step_000001").glob("*.predictions.jsonl")))
    final = Lion.from_pretrained(result.run_dir / "final")  # the weights scored at step 1
    assert final.generation_config == own

    def answers(lion: Lion, name: str) -> dict[str, str]:
        def generate_fn(images, questions, tasks, **decoding):
            return lion.generate(images, questions, tasks=tasks, tags=[task["tags"]] * len(questions), **decoding)

        evaluate("iconqa", generate_fn, task["ann"], task["images"], limit=4, batch_size=4,
                 decoding=task["decoding"], out_dir=tmp_path / name)
        return {key: r["prediction"] for key, r in read_predictions(next((tmp_path / name).glob("*.jsonl"))).items()}

    as_generated = answers(final, "own")
    assert {key: r["prediction"] for key, r in in_loop.items()} == as_generated
    assert answers(Lion(final.model, final.processor), "authors") != as_generated  # the config matters here
