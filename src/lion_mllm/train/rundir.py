"""Owning a run directory: a new one per run (or the one a resume names), one trainer at a time, and a
resumed run's logs without repeated steps.

`RunLock` writes `<run dir>/train.lock` (JSON: pid, host, process start time, command line) with
O_EXCL. A second trainer on the same directory -- a `--resume` while the workers of an orphaned
torchrun job still train, say -- is refused with the owner's pid and host. A lock whose process is
gone (same host, pid not running, or running but started at another time: a reused pid) is stale:
it is reported and taken over. A lock from another host cannot be checked from here and is refused;
the message says which file to delete once that job is known to be dead.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .checkpoint import find_resume_point
from .config import TrainConfig
from .distributed import DistContext

LOCK_NAME = "train.lock"


class RunDirectoryLocked(RuntimeError):
    """Another live trainer owns the run directory."""


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot, /proc/PID/stat field 22); None where
    /proc is not available. Together with the pid it names one process, even after pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its closing ')'
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """The lock file of one run directory, held by the main process of a training job."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(),
                      "start_time": _process_start_time(os.getpid()), "argv": sys.argv,
                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock, or raise RunDirectoryLocked naming the live owner. A stale lock is replaced;
        the return value then says whose it was (for the run's log, which is not open yet)."""
        taken_over = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read()
                reason = self._stale_reason(holder)
                if reason is None:
                    raise RunDirectoryLocked(self._describe(holder)) from None
                taken_over = f"{self.path}: taking over a stale lock ({reason})"
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(self.owner) + "\n")
            self.held = True
            return taken_over
        raise RunDirectoryLocked(f"{self.path}: another trainer keeps creating this lock")

    def release(self) -> None:
        """Remove the lock if it is still ours (never another trainer's)."""
        if not self.held:
            return
        self.held = False
        holder = self._read()
        if holder.get("pid") == self.owner["pid"] and holder.get("host") == self.owner["host"]:
            self.path.unlink(missing_ok=True)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why the lock's owner is certainly gone, or None when it may still be training."""
        if not holder:
            # written by a trainer killed between create and write, or not ours: unreadable either way
            age = time.time() - self.path.stat().st_mtime if self.path.exists() else 0.0
            return "empty or unreadable lock file" if age > 10 else None
        if holder.get("host") != self.owner["host"]:
            return None
        pid = int(holder.get("pid", -1))
        if pid == os.getpid():
            return None  # this very process already holds it: a nested train() call
        if pid <= 0 or not _pid_running(pid):
            return f"process {pid} on {holder.get('host')} is not running"
        start = holder.get("start_time")
        if start is not None and _process_start_time(pid) not in (None, start):
            return f"pid {pid} now belongs to another process"
        return None

    def _describe(self, holder: dict[str, Any]) -> str:
        where = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
        since = f", since {holder['since']}" if holder.get("since") else ""
        command = " ".join(str(a) for a in holder.get("argv", [])) if holder.get("argv") else ""
        local = holder.get("host") == self.owner["host"]
        hint = ("stop it first (kill that pid: with torchrun, orphaned workers keep training after their "
                "launcher is killed)") if local else \
            "that host cannot be checked from here; once that job is known to be dead, delete the lock file"
        return (f"{self.path.parent} is in use by another trainer ({where}{since}"
                f"{'; ' + command if command else ''}): {hint}; lock file {self.path}")


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the rows of metrics.jsonl logged after `step` (a run killed after its last checkpoint logged
    steps that the resumed run logs again). Rewritten atomically; returns how many rows were dropped."""
    if not path.is_file():
        return 0
    kept: list[str] = []
    dropped = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row_step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            row_step = None  # a line cut short by the kill
        if isinstance(row_step, int) and row_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
    return dropped


def choose_run_dir(cfg: TrainConfig, ctx: DistContext, resume: str | Path | None) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from: those `resume` names (a run directory, one of
    its checkpoints, an output directory (its newest run), or "auto": the newest run under
    `run.output_dir`), else a new directory and None."""
    if resume is None:
        return _new_run_dir(cfg, ctx), None
    run = cfg.run
    target = Path(run.output_dir) if str(resume) == "auto" else Path(resume)
    if str(resume) == "auto" and run.run_name and target.name != run.run_name:
        target = target / run.run_name
    resume_point = find_resume_point(target)
    return resume_point.parent.parent, resume_point


def _new_run_dir(cfg: TrainConfig, ctx: DistContext) -> Path:
    """<output_dir>[/<run_name>]/<start time>, made by the main process and named to every process."""
    base = Path(cfg.run.output_dir).expanduser()
    if not base.is_absolute():
        base = Path.cwd() / base
    if cfg.run.run_name and base.name != cfg.run.run_name:
        base = base / cfg.run.run_name
    name = None
    if ctx.is_main:
        name = time.strftime("%Y%m%d%H%M%S")
        while (base / name).exists():  # two runs started in the same second
            time.sleep(1.0)
            name = time.strftime("%Y%m%d%H%M%S")
        (base / name).mkdir(parents=True)
    return base / ctx.broadcast_object(name)


def lock_run_dir(run_dir: Path, ctx: DistContext) -> tuple[RunLock | None, str | None]:
    """The main process takes the run directory's lock; every process raises alike if it is taken.
    Returns the lock and, when a stale one was taken over, a note for the log."""
    lock, refusal, note = None, None, None
    if ctx.is_main:
        lock = RunLock(run_dir)
        try:
            note = lock.acquire()
        except RunDirectoryLocked as error:
            lock, refusal = None, str(error)
    refusal = ctx.broadcast_object(refusal)
    if refusal is not None:
        raise RunDirectoryLocked(refusal)
    return lock, note
