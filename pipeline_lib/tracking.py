"""Tracking behind one small interface: MLflow for real runs, a no-op for tests and dry runs.

This module and `pipeline_lib.serving` are the only ones that import MLflow (tests/test_layers.py checks it).
Stages see a `Tracker`: runs addressed by id (never by the fluent "active run"), so any process — the flow,
an isolated stage, a later rerun — can log to the same run. Loss and learning rate come from the Trainer's
own MLflow callback (`Tracker.trainer_callback`, made safe for continued runs); CPU/GPU utilisation from
MLflow's system metrics (`Tracker.active_run`, which samples the GPU through pynvml); a merged model is
logged and registered with `Tracker.log_model` (MLflow's models-from-code, `pipeline_lib/serving.py`); the
registry's aliases and version tags (`pipeline_lib.promotion`) through `set_alias`, `get_alias_version`,
`set_version_tags` and `version_tags`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

PARENT_TAG = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment in its GenAI view unless told it holds model training runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
SERVING_CODE = Path(__file__).with_name("serving.py")  # the pyfunc model's code (models-from-code)
LIBRARY_DIR = Path(__file__).parent  # attached to logged models, so they load outside this environment
# not attached: the shipped tiny models (weights, not code) and compiled-module caches
LIBRARY_EXCLUDE = ("tiny_models", "__pycache__", "*.pyc")


class TrackingTarget(BaseModel):
    """Where to log: passed between stages and processes as plain data."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str | None  # None = tracking disabled
    experiment: str
    system_metrics: bool = True  # sample CPU/GPU/memory into each model's run while it trains
    system_metrics_interval_s: float | None = None  # None = MLflow's default
    log_models: bool = True  # log (and register, when given a name) merged models

    @property
    def enabled(self) -> bool:
        return bool(self.uri)


class Tracker(Protocol):
    target: TrackingTarget

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
    def find_run(self, tags: dict[str, str]) -> tuple[str, str | None] | None: ...
    def last_run(
        self, tags: dict[str, str], status: str = "FINISHED"
    ) -> tuple[str, dict[str, str]] | None: ...
    def load_dict(self, run_id: str, artifact_file: str) -> Any | None: ...
    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]: ...
    def trainer_callback(self, run_id: str) -> Any | None: ...
    def active_run(self, run_id: str, system_metrics: bool = False) -> contextlib.AbstractContextManager: ...
    def log_model(self, run_id: str, model_dir: str | Path, registered_name: str | None) -> dict | None: ...
    def set_alias(self, name: str, alias: str, version: str) -> None: ...
    def get_alias_version(self, name: str, alias: str) -> str | None: ...
    def set_version_tags(self, name: str, version: str, tags: dict[str, Any]) -> None: ...
    def version_tags(self, name: str, version: str) -> dict[str, str] | None: ...


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

    def __init__(self, target: TrackingTarget | None = None) -> None:
        self.target = target or TrackingTarget(uri=None, experiment="none")
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

    def find_run(self, tags):
        return None

    def last_run(self, tags, status="FINISHED"):
        return None

    def load_dict(self, run_id, artifact_file):
        return None

    def metric_history(self, run_id, key):
        return []

    def trainer_callback(self, run_id):
        return None

    def active_run(self, run_id, system_metrics=False):
        return contextlib.nullcontext()

    def log_model(self, run_id, model_dir, registered_name):
        return None

    def set_alias(self, name, alias, version):
        return None

    def get_alias_version(self, name, alias):
        return None

    def set_version_tags(self, name, version, tags):
        return None

    def version_tags(self, name, version):
        return None


class MlflowTracker:
    """MLflow client bound to one tracking server and experiment."""

    def __init__(self, target: TrackingTarget) -> None:
        from mlflow import MlflowClient

        self.target = target
        self.client = MlflowClient(tracking_uri=target.uri)
        exp = self.client.get_experiment_by_name(target.experiment)
        self.experiment_id = exp.experiment_id if exp else self._create_experiment(target)
        if exp is not None and exp.tags.get(EXPERIMENT_KIND_TAG) is None:
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)

    def _create_experiment(self, target: TrackingTarget) -> str:
        location = None
        if target.uri and target.uri.startswith("sqlite:///"):
            # a local database without a server: artifacts beside it, not in ./mlruns of whatever cwd
            location = (Path(target.uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
        return self.client.create_experiment(
            target.experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND}
        )

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
        """Parameters the run does not have yet (a continued run keeps its first values)."""
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        items = [Param(k, v) for k, v in _flatten(params).items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), 100):  # one request (and one database commit) per 100 tags
            self.client.log_batch(run_id, tags=items[i : i + 100])

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

    def run_url(self, run_id: str, experiment_id: str | None = None) -> str | None:
        uri = self.target.uri or ""
        if not uri.startswith("http"):
            return None
        # workflowType: MLflow 3's UI opens its GenAI view unless the link asks for the model-training one (the
        # experiment's mlflow.experimentKind tag alone does not switch a fresh browser)
        return (
            f"{uri.rstrip('/')}/#/experiments/{experiment_id or self.experiment_id}/runs/{run_id}"
            "?workflowType=machine_learning"
        )

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(timestamp in ms, value) of every value of one metric of a run, oldest first."""
        try:
            history = self.client.get_metric_history(run_id, key)
        except Exception:  # an unknown run or key
            return []
        return sorted((m.timestamp, float(m.value)) for m in history)

    def find_run(self, tags: dict[str, str]) -> tuple[str, str | None] | None:
        """(run id, URL) of the newest run, in any experiment, carrying all of `tags`."""
        where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        runs = self.client.search_runs(
            experiments, filter_string=where, order_by=["start_time DESC"], max_results=1
        )
        if not runs:
            return None
        run = runs[0]
        return run.info.run_id, self.run_url(run.info.run_id, run.info.experiment_id)

    def last_run(self, tags: dict[str, str], status: str = "FINISHED") -> tuple[str, dict[str, str]] | None:
        """(run id, tags) of the newest run, in any experiment, with status `status` and all of `tags`."""
        where = " and ".join(
            [f"tags.`{k}` = '{v}'" for k, v in tags.items()] + [f"attributes.status = '{status}'"]
        )
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        runs = self.client.search_runs(
            experiments, filter_string=where, order_by=["start_time DESC"], max_results=1
        )
        return (runs[0].info.run_id, dict(runs[0].data.tags)) if runs else None

    def load_dict(self, run_id: str, artifact_file: str) -> Any | None:
        """A JSON artifact of a run, parsed; None when the run has no such artifact."""
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = self.client.download_artifacts(run_id, artifact_file, tmp)
                return json.loads(Path(path).read_text(encoding="utf-8"))
            except Exception:  # a missing artifact or run, or a file that is not JSON
                return None

    def trainer_callback(self, run_id: str):
        """transformers' own MLflow callback, made safe for a run that continues after a kill or an
        out-of-memory error: logging is synchronous (a kill loses nothing already reported), parameters the
        run already has are not logged again (a changed value would be refused), and steps the run already
        has (logged after the last checkpoint, then trained again) are not logged twice."""
        from mlflow.entities import Param
        from transformers.integrations import MLflowCallback

        client = self.client
        floor = max(
            (m.step for key in ("loss", "eval_loss") for m in client.get_metric_history(run_id, key)),
            default=-1,
        )

        class ResumableMLflowCallback(MLflowCallback):
            def setup(self, args, state, model):
                previous = os.environ.get("MLFLOW_MAX_LOG_PARAMS")
                os.environ["MLFLOW_MAX_LOG_PARAMS"] = "0"  # the parameters are logged below
                try:
                    super().setup(args, state, model)
                finally:
                    if previous is None:
                        os.environ.pop("MLFLOW_MAX_LOG_PARAMS", None)
                    else:
                        os.environ["MLFLOW_MAX_LOG_PARAMS"] = previous
                self._async_log = False
                existing = client.get_run(run_id).data.params
                config = getattr(model, "config", None)
                combined = {**(config.to_dict() if config is not None else {}), **args.to_dict()}
                items = [
                    Param(k, str(v))
                    for k, v in combined.items()
                    if k not in existing and len(str(v)) <= self._MAX_PARAM_VAL_LENGTH
                ]
                for i in range(0, len(items), 100):
                    client.log_batch(run_id, params=items[i : i + 100])

            def on_log(self, args, state, control, logs, model=None, **kwargs):
                if state.global_step <= floor:
                    return
                # The summary's train_loss covers this call's steps only; the stage logs the whole run's.
                logs = {k: v for k, v in logs.items() if k != "train_loss"}
                super().on_log(args, state, control, logs, model=model, **kwargs)

        return ResumableMLflowCallback()

    @contextlib.contextmanager
    def active_run(self, run_id: str, system_metrics: bool = False) -> Iterator[None]:
        """`run_id` as MLflow's active (fluent) run while inside — where the Trainer's callback logs — with
        MLflow's system metrics (CPU, memory, GPU through pynvml) sampled into it when `system_metrics`
        (every `target.system_metrics_interval_s`). The run's status is left to `end_run`."""
        import mlflow

        mlflow.set_tracking_uri(self.target.uri)
        if system_metrics and self.target.system_metrics_interval_s:
            mlflow.set_system_metrics_sampling_interval(self.target.system_metrics_interval_s)
        status = self.client.get_run(run_id).info.status
        mlflow.start_run(
            run_id=run_id, log_system_metrics=system_metrics, nested=mlflow.active_run() is not None
        )
        try:
            yield
        finally:
            mlflow.end_run(status=status)

    def log_model(self, run_id: str, model_dir: str | Path, registered_name: str | None) -> dict:
        """Log a merged transformers model directory as an MLflow pyfunc model (`pipeline_lib/serving.py`,
        models-from-code: questions in, answers out, the training prompt template) with the library
        attached, and register it under `registered_name`."""
        from mlflow.models.signature import ModelSignature
        from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

        import mlflow

        signature = ModelSignature(
            inputs=Schema([ColSpec("string", "question"), ColSpec("string", "input", required=False)]),
            outputs=Schema([ColSpec("string", "answer")]),
            params=ParamSchema(
                [
                    ParamSpec("max_new_tokens", "long", 128),
                    ParamSpec("do_sample", "boolean", False),
                    ParamSpec("temperature", "double", 0.7),
                    ParamSpec("repetition_penalty", "double", 1.1),
                ]
            ),
        )
        mlflow.set_tracking_uri(self.target.uri)
        with tempfile.TemporaryDirectory() as tmp, _quiet_active_run(self.client, run_id):
            library = Path(tmp) / LIBRARY_DIR.name
            shutil.copytree(LIBRARY_DIR, library, ignore=shutil.ignore_patterns(*LIBRARY_EXCLUDE))
            info = mlflow.pyfunc.log_model(
                name="merged_model",
                python_model=str(SERVING_CODE),
                artifacts={"model_dir": str(model_dir)},
                code_paths=[str(library)],
                registered_model_name=registered_name,
                signature=signature,
                pip_requirements=_requirements(),
            )
        return {
            "model_uri": info.model_uri,
            "registered_model_version": getattr(info, "registered_model_version", None),
        }

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point the registered model's `alias` at `version` (moving it from any other version)."""
        self.client.set_registered_model_alias(name, alias, str(version))

    def get_alias_version(self, name: str, alias: str) -> str | None:
        """The version `alias` points at; None when the model or the alias does not exist."""
        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except Exception as err:  # an unknown model, or a model without the alias
            if _not_found(err):
                return None
            raise

    def set_version_tags(self, name: str, version: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(name, str(version), k, str(v))

    def version_tags(self, name: str, version: str) -> dict[str, str] | None:
        """The tags of one model version; None when the model or the version does not exist."""
        try:
            return dict(self.client.get_model_version(name, str(version)).tags)
        except Exception as err:
            if _not_found(err):
                return None
            raise


def _not_found(err: Exception) -> bool:
    """An MLflow error saying that a registered model, version or alias does not exist."""
    code = getattr(err, "error_code", "")
    return code == "RESOURCE_DOES_NOT_EXIST" or (
        code == "INVALID_PARAMETER_VALUE" and "not found" in str(err)
    )


def _requirements() -> list[str]:
    """What the logged model needs, pinned to the versions it was logged with (all on the package index)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    names = "torch transformers accelerate safetensors tokenizers pydantic mlflow pandas"
    for name in names.split():
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


class _quiet_active_run:
    """Make `run_id` the fluent active run for a call that needs one, then leave its status as it was."""

    def __init__(self, client, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def __enter__(self):
        import mlflow

        self._status = self.client.get_run(self.run_id).info.status
        self._run = mlflow.start_run(run_id=self.run_id, log_system_metrics=False)
        return self._run

    def __exit__(self, *exc):
        import mlflow

        mlflow.end_run(status=self._status)
        return False


def artifact_schemes() -> set[str] | None:
    """The URI schemes MLflow has an artifact store for (`mlflow server --artifacts-destination`); None where
    this MLflow keeps that registry elsewhere. Imports MLflow: seconds."""
    try:
        from mlflow.store.artifact.artifact_repository_registry import _artifact_repository_registry

        return {s.lower() for s in _artifact_repository_registry._registry}
    except (ImportError, AttributeError):
        return None


def make_tracker(target: TrackingTarget | None) -> Tracker:
    if target is None or not target.enabled:
        return NullTracker(target)
    return MlflowTracker(target)


def target_from_env(experiment: str, **settings: Any) -> TrackingTarget:
    """MLFLOW_TRACKING_URI decides where; 'off'/'none'/'' disables tracking. `settings`: the other fields."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.lower() in ("", "off", "none", "disabled"):
        return TrackingTarget(uri=None, experiment=experiment, **settings)
    return TrackingTarget(uri=uri, experiment=experiment, **settings)
