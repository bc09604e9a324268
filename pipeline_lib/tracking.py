"""Tracking behind one small interface: MLflow for real runs, a no-op for tests and dry runs.

Runs are addressed by id (never by the fluent "active run"), so any process — the flow, a training
subprocess, a later rerun — can log to the same run. Loss and learning rate come from the Trainer's own
MLflow callback; CPU/GPU utilisation from MLflow's system metrics (which samples the GPU through pynvml).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

PARENT_TAG = "mlflow.parentRunId"


@dataclass(frozen=True)
class TrackingTarget:
    """Where to log: passed between stages and processes as plain data."""

    uri: str | None  # None = tracking disabled
    experiment: str

    @property
    def enabled(self) -> bool:
        return bool(self.uri)


class Tracker(Protocol):
    def start_run(self, name: str, *, parent_id: str | None = None, tags: dict | None = None) -> str: ...
    def resume_run(self, run_id: str) -> None: ...
    def run_status(self, run_id: str) -> str | None: ...
    def log_params(self, run_id: str, params: dict[str, Any]) -> None: ...
    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None: ...
    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None: ...
    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, run_id: str, data: Any, artifact_file: str) -> None: ...
    def log_table(self, run_id: str, rows: list[dict], artifact_file: str) -> None: ...
    def end_run(self, run_id: str, status: str = "FINISHED") -> None: ...
    def run_url(self, run_id: str) -> str | None: ...


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            s = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
            out[key] = s[:6000]
    return out


class NullTracker:
    """Accepts every call and records nothing (tests, dry runs, tracking switched off)."""

    def __init__(self) -> None:
        self._n = 0

    def start_run(self, name: str, *, parent_id: str | None = None, tags: dict | None = None) -> str:
        self._n += 1
        return f"null-{self._n}"

    def resume_run(self, run_id: str) -> None:
        return None

    def run_status(self, run_id: str) -> str | None:
        return None

    def log_params(self, run_id, params):
        return None

    def log_metrics(self, run_id, metrics, step=None):
        return None

    def set_tags(self, run_id, tags):
        return None

    def log_artifact(self, run_id, path, artifact_path=None):
        return None

    def log_dict(self, run_id, data, artifact_file):
        return None

    def log_table(self, run_id, rows, artifact_file):
        return None

    def end_run(self, run_id, status="FINISHED"):
        return None

    def run_url(self, run_id):
        return None


class MlflowTracker:
    """MLflow client bound to one tracking server and experiment."""

    def __init__(self, target: TrackingTarget) -> None:
        from mlflow import MlflowClient

        self.target = target
        self.client = MlflowClient(tracking_uri=target.uri)
        exp = self.client.get_experiment_by_name(target.experiment)
        self.experiment_id = exp.experiment_id if exp else self._create_experiment(target)

    def _create_experiment(self, target: TrackingTarget) -> str:
        location = None
        if target.uri and target.uri.startswith("sqlite:///"):
            # a local database without a server: artifacts beside it, not in ./mlruns of whatever cwd
            location = (Path(target.uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
        return self.client.create_experiment(target.experiment, artifact_location=location)

    def start_run(self, name: str, *, parent_id: str | None = None, tags: dict | None = None) -> str:
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_id:
            tags[PARENT_TAG] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def resume_run(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def run_status(self, run_id: str) -> str | None:
        try:
            run = self.client.get_run(run_id)
        except Exception:  # deleted or unknown on this server
            return None
        return None if run.info.lifecycle_stage == "deleted" else run.info.status

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        flat = {k: v for k, v in _flatten(params).items() if existing.get(k, v) == v and k not in existing}
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(run_id, str(p), artifact_path)

    def log_dict(self, run_id: str, data: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, data, artifact_file)

    def log_table(self, run_id: str, rows: list[dict], artifact_file: str) -> None:
        import pandas as pd

        self.client.log_table(run_id, pd.DataFrame(rows), artifact_file)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def run_url(self, run_id: str) -> str | None:
        uri = self.target.uri or ""
        if not uri.startswith("http"):
            return None
        return f"{uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"

    def register_model_dir(self, run_id: str, model_dir: str | Path, registered_name: str | None) -> dict:
        """Log a saved transformers model directory as an MLflow pyfunc model (questions in, answers out,
        same prompt template as training) and register it under `registered_name`."""
        from mlflow.models import infer_signature

        import mlflow
        from pipeline_lib.serving import QABotModel

        signature = infer_signature(
            ["What is the capital city of Australia?"],
            ["Canberra."],
            params={"max_new_tokens": 128, "do_sample": False, "temperature": 0.7, "repetition_penalty": 1.1},
        )
        mlflow.set_tracking_uri(self.target.uri)
        with _quiet_active_run(run_id):
            info = mlflow.pyfunc.log_model(
                name="merged_model",
                python_model=QABotModel(),
                artifacts={"model_dir": str(model_dir)},
                registered_model_name=registered_name,
                signature=signature,
                pip_requirements=["torch", "transformers", "accelerate", "qabot"],
            )
        return {
            "model_uri": info.model_uri,
            "registered_model_version": getattr(info, "registered_model_version", None),
        }


class _quiet_active_run:
    """Make `run_id` the fluent active run for a call that needs one, then leave it as it was."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def __enter__(self):
        import mlflow
        from mlflow import MlflowClient

        self._status = MlflowClient().get_run(self.run_id).info.status
        self._run = mlflow.start_run(run_id=self.run_id, log_system_metrics=False)
        return self._run

    def __exit__(self, *exc):
        import mlflow

        mlflow.end_run(status=self._status)
        return False


def make_tracker(target: TrackingTarget | None) -> Tracker:
    if target is None or not target.enabled:
        return NullTracker()
    return MlflowTracker(target)


def target_from_env(experiment: str) -> TrackingTarget:
    """MLFLOW_TRACKING_URI decides; 'off'/'none'/'' disables tracking."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.lower() in ("", "off", "none", "disabled"):
        return TrackingTarget(None, experiment)
    return TrackingTarget(uri, experiment)


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8"
    ) as f:
        json.dump(data, f, indent=2, ensure_ascii=False, default=str)
        tmp = f.name
    os.replace(tmp, path)
    return path
