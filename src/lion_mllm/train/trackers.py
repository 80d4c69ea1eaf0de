"""Experiment trackers beside metrics.jsonl and TensorBoard (`run.loggers`), imported only when named.

    run:
      loggers: [tensorboard, mlflow]
      mlflow_tracking_uri: http://mlflow.example:5000   # or MLFLOW_TRACKING_URI; a local store works offline

MLflow gets every metrics row (training and evaluation) at its step, the resolved `run` block as
parameters, and the run's end state (FINISHED, or KILLED for a stopped run that will be resumed). A resumed
run logs into the same MLflow run (its id is kept in `<run dir>/mlflow_run.json`). MLflow cannot rewrite a
metric's history, so the steps a killed run logged after its last checkpoint stay there; metrics.jsonl
and TensorBoard drop them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .config import ConfigError

LOGGERS = ("tensorboard", "mlflow")


class MlflowLogger:
    """One training run as one MLflow run, through `MlflowClient` (no global active run to leak into the
    caller's own MLflow use)."""

    def __init__(self, run_dir: Path, experiment: str, tracking_uri: str | None, params: dict[str, Any]):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError("run.loggers: mlflow is not installed; pip install 'lion-mllm[mlflow]' (or remove "
                              "mlflow from run.loggers)") from None
        self.client = MlflowClient(tracking_uri)
        id_file = run_dir / "mlflow_run.json"
        if id_file.is_file():  # a resumed run continues its MLflow run
            self.run_id = json.loads(id_file.read_text())["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        id_file.write_text(json.dumps({"run_id": self.run_id, "experiment": experiment,
                                       "tracking_uri": self.client.tracking_uri}) + "\n")
        from mlflow.entities import Param

        # MLflow caps a parameter value at 6000 characters; long lists (freeze prefixes) are cut, not refused
        self.client.log_batch(self.run_id, params=[Param(key, str(value)[:6000]) for key, value in params.items()])

    def write(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        stamp = int(record.get("time", time.time()) * 1000)
        metrics = [Metric(key, float(value), stamp, int(record["step"])) for key, value in record.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time")]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")


def flat_params(block: dict[str, Any], prefix: str = "run.") -> dict[str, Any]:
    """A config block as flat `run.key` parameters (nested mappings dotted, lists as text)."""
    out: dict[str, Any] = {}
    for key, value in block.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
