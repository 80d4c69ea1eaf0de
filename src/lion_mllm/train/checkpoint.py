"""Training checkpoints: written atomically, read without unpickling code.

    <run dir>/checkpoints/step_000400/
        lion_params.safetensors   LION's own parameters (our names, float32): what the stage trains
        optimizer.pt              AdamW state (+ the parameter names of each group, to check on resume)
        training_state.pt         step, epoch, schedule, sample-stream position, RNG of every rank, counters
        meta.json                 the same facts for people; written last
    <run dir>/checkpoints/latest  the name of the newest complete checkpoint

A checkpoint is written into `.tmp-step_000400` and renamed into place, so a kill while saving leaves
the previous checkpoint whole (and at worst a `.tmp-*` folder, removed by the next save). The .pt files
hold only tensors, numbers, strings, lists and dicts and are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..checkpoints.checkpoint_files import fsync_folder, read_safetensors
from ..errors import CheckpointError

_STEP_DIR = re.compile(r"^step_(\d+)$")
LION_PARAMS = "lion_params.safetensors"
SAVE_DELAY_ENV = "LION_TRAIN_TEST_SAVE_DELAY"  # tests only: "STEP:SECONDS" pauses inside that save


def rng_state() -> dict[str, Any]:
    """This process's random generators (torch CPU and CUDA, Python's `random`)."""
    state: dict[str, Any] = {"torch": torch.random.get_rng_state(), "python": _python_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write(path: Path, write: Any) -> None:
    write(path)
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def save_checkpoint(directory: Path, step: int, lion_params: dict[str, torch.Tensor], optimizer_state: dict,
                    training_state: dict[str, Any], meta: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` under `directory` (the run's `checkpoints/`) atomically; keep the newest
    `keep` checkpoints. Returns the checkpoint's path."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = directory / name
    tmp = directory / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lion_params.items()}
    _write(tmp / LION_PARAMS, lambda p: save_file(tensors, str(p), metadata={"format": "pt", "step": str(step)}))
    _write(tmp / "optimizer.pt", lambda p: torch.save(optimizer_state, p))
    hook = os.environ.get(SAVE_DELAY_ENV, "")
    if hook and int(hook.split(":")[0]) == step:  # test hook "STEP:SECONDS": a kill lands mid-save
        time.sleep(float(hook.split(":")[1]))
    _write(tmp / "training_state.pt", lambda p: torch.save(training_state, p))
    _write(tmp / "meta.json", lambda p: p.write_text(json.dumps({**meta, "step": step}, indent=2) + "\n"))
    fsync_folder(tmp)
    if final.exists():  # the same step saved again (e.g. a stop request on a save step): replace it
        old = directory / f".old-{name}"
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync_folder(directory)
    latest_tmp = directory / ".latest.tmp"
    latest_tmp.write_text(name + "\n")
    latest_tmp.replace(directory / "latest")
    for stale in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    for leftover in directory.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in (LION_PARAMS, "optimizer.pt", "training_state.pt", "meta.json"))


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints under `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def find_resume_point(target: Path) -> Path:
    """The checkpoint to resume from: `target` itself, the newest in a run directory, or the newest run
    of an output directory (`outputs/<run name>/`)."""
    target = Path(target)
    if is_complete(target):
        return target
    if (target / "checkpoints").is_dir():
        found = list_checkpoints(target / "checkpoints")
        if found:
            return found[-1]
        raise CheckpointError(f"{target}: this run has no complete checkpoint to resume from")
    if target.is_dir():
        runs = sorted((p for p in target.iterdir() if (p / "checkpoints").is_dir() and
                       list_checkpoints(p / "checkpoints")), key=lambda p: p.name)
        if runs:
            return list_checkpoints(runs[-1] / "checkpoints")[-1]
    raise CheckpointError(f"{target}: no checkpoint to resume from (give a run directory "
                          "outputs/<name>/<timestamp>, one of its checkpoints, or outputs/<name>)")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """{"lion_params", "optimizer", "training_state", "meta"} of a complete checkpoint."""
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint")
    try:
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        training_state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: unreadable checkpoint state: {error}") from None
    return {"lion_params": read_safetensors([path / LION_PARAMS]), "optimizer": optimizer,
            "training_state": training_state, "meta": json.loads((path / "meta.json").read_text())}
