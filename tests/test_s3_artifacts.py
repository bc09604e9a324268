"""MLflow artifacts in an S3-compatible object store (the scale-out setting `MLFLOW_ARTIFACTS=s3://...`).

The store is moto's S3 server (`moto.server.ThreadedMotoServer`, in this process) on a free 127.0.0.1 port with
throwaway credentials. The MLflow server is started by the code `qabot up` runs (`services.up`, MLflow alone)
from the settings a user exports: MLFLOW_ARTIFACTS, MLFLOW_S3_ENDPOINT_URL and the AWS credentials. A client
logs a file and a pyfunc model through the server (proxied artifacts), reads them back, and boto3 finds the
objects in the bucket under the prefix. Bad settings are one line, before anything starts.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from servicekit import env_for, kill_leftovers, leftovers, ports, qabot, wait_for

from flows import services

BUCKET, PREFIX = "qabot-artifacts", "team/mlflow"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "qabot-test", "AWS_SECRET_ACCESS_KEY": "qabot-test-secret"}


def _clean_env(monkeypatch, home: Path) -> None:
    """This process's environment as a fresh shell's: no qabot, MLflow, Prefect or AWS settings."""
    for key in list(os.environ):
        if key.startswith(("MLFLOW_", "PREFECT_", "QABOT_", "AWS_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("QABOT_HOME", str(home))  # leftovers(home) finds what this test started


@contextmanager
def s3_store(port: int):
    """An S3-compatible server on 127.0.0.1:`port` with one empty bucket; yields a boto3 client of it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-east-1",
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )
        client.create_bucket(Bucket=BUCKET)
        yield client
    finally:
        server.stop()


@pytest.mark.slow
def test_qabot_mlflow_server_keeps_artifacts_in_an_s3_compatible_store(tmp_path, monkeypatch):
    t0 = time.monotonic()
    home = tmp_path / "home"
    _clean_env(monkeypatch, home)
    mlflow_port, s3_port = ports(2)
    dest = f"s3://{BUCKET}/{PREFIX}"
    for key, value in {  # what a user exports before `qabot up`
        "MLFLOW_ARTIFACTS": dest,
        "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        **CREDENTIALS,
    }.items():
        monkeypatch.setenv(key, value)
    with ExitStack() as stack:
        stack.callback(kill_leftovers, home)  # last: whatever `down` left
        pool = stack.enter_context(ThreadPoolExecutor(1))
        # the MLflow server starts (what `qabot up` does for it) while the store and the client get ready: it
        # reaches the store only for the first artifact
        starting = pool.submit(services.up, home, mlflow_port=mlflow_port, prefect=False)

        def stop_mlflow():
            starting.exception()  # once `up` has returned or failed
            services.down(home)

        stack.callback(stop_mlflow)
        s3 = stack.enter_context(s3_store(s3_port))
        import pandas as pd

        import mlflow
        from mlflow import MlflowClient

        stack.callback(mlflow.set_tracking_uri, mlflow.get_tracking_uri())
        state = starting.result(timeout=180)
        started = time.monotonic() - t0
        url = state["mlflow_url"]
        assert url == f"http://127.0.0.1:{mlflow_port}" and state["mlflow_artifacts"] == dest
        recorded = json.loads((home / "services.json").read_text())["procs"]["mlflow"]["cmdline"]
        assert recorded[recorded.index("--artifacts-destination") + 1] == dest, recorded
        assert "--serve-artifacts" in recorded, recorded

        client = MlflowClient(tracking_uri=url)
        exp = client.create_experiment("s3-check")
        run = client.create_run(exp, run_name="s3-check")
        run_id = run.info.run_id
        assert run.info.artifact_uri == f"mlflow-artifacts:/{exp}/{run_id}/artifacts"  # proxied by the server
        note = tmp_path / "note.txt"
        note.write_text("kept in the object store\n")
        client.log_artifact(run_id, str(note), artifact_path="notes")
        mlflow.set_tracking_uri(url)

        class Echo(mlflow.pyfunc.PythonModel):
            """A plain pyfunc model: answers each question with its length."""

            def predict(self, context, model_input, params=None):
                return [len(q) for q in model_input["question"]]

        with mlflow.start_run(run_id=run_id):
            model = mlflow.pyfunc.log_model(name="echo", python_model=Echo(), pip_requirements=["mlflow"])

        # read back through the client: by default MLflow hands out presigned URLs of the store for downloads
        # (the client must reach MLFLOW_S3_ENDPOINT_URL); with MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false
        # the bytes come through the tracking server
        for through_server in (False, True):
            if through_server:
                monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
            got = client.download_artifacts(
                run_id, "notes/note.txt", str(tmp_path / f"read-{through_server}")
            )
            assert Path(got).read_text() == "kept in the object store\n"
        assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]
        loaded = mlflow.pyfunc.load_model(model.model_uri)
        assert list(loaded.predict(pd.DataFrame({"question": ["What is 2+2?", "Hi"]}))) == [12, 2]

        # the objects are in the bucket, under the prefix, where MLflow's layout puts them
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])}
        note_key = f"{PREFIX}/{exp}/{run_id}/artifacts/notes/note.txt"
        assert note_key in keys, sorted(keys)
        assert s3.get_object(Bucket=BUCKET, Key=note_key)["Body"].read() == b"kept in the object store\n"
        model_dir = f"{PREFIX}/{exp}/models/{model.model_id}/artifacts/"
        assert {f"{model_dir}MLmodel", f"{model_dir}python_model.pkl"} <= keys, sorted(keys)
        assert all(k.startswith(f"{PREFIX}/") for k in keys), sorted(keys)
        # and nothing went to the local default
        assert not (home / "mlflow" / "artifacts").exists()
        print(
            f"\nMLflow on s3:// answered after {started:.1f} s; all done after {time.monotonic() - t0:.1f} s"
        )

        assert services.down(home) == ["mlflow"]
        wait_for(lambda: not leftovers(home), 20, "the MLflow server's processes to end")


# --- bad settings: one line, nothing started ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "endpoint", "message"),
    [
        ("s3://", "", "MLFLOW_ARTIFACTS='s3://': no bucket; expected s3://BUCKET[/PREFIX]"),
        ("s3:/qabot/mlflow", "", "MLFLOW_ARTIFACTS='s3:/qabot/mlflow': expected s3://BUCKET[/PREFIX]"),
        (
            "s3://minio:9000/qabot",
            "",
            "MLFLOW_ARTIFACTS='s3://minio:9000/qabot': 'minio:9000' is not a bucket name; expected "
            "s3://BUCKET[/PREFIX] (the service's address goes in MLFLOW_S3_ENDPOINT_URL)",
        ),
        (
            "s3://AKIAKEY:topsecret@qabot/mlflow",
            "",
            "MLFLOW_ARTIFACTS='s3://REDACTED@qabot/mlflow': no credentials in the URL; the server reads them "
            "from its environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)",
        ),
        (
            "s3://qabot/mlflow",
            "minio:9000",
            "MLFLOW_S3_ENDPOINT_URL='minio:9000': expected http(s)://HOST[:PORT] of the S3-compatible service",
        ),
        (
            "s4://qabot/mlflow",
            "",
            "MLFLOW_ARTIFACTS='s4://qabot/mlflow': MLflow has no artifact store for s4:// "
            "(e.g. s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, a local directory)",
        ),
    ],
)
def test_a_bad_artifact_destination_is_one_line(tmp_path, monkeypatch, value, endpoint, message):
    _clean_env(monkeypatch, tmp_path / "home")
    monkeypatch.setenv("MLFLOW_ARTIFACTS", value)
    if endpoint:
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
    with pytest.raises(ValueError) as err:
        services.mlflow_artifacts()
    assert str(err.value) == message
    assert "topsecret" not in str(err.value)


def test_good_artifact_destinations(tmp_path, monkeypatch):
    _clean_env(monkeypatch, tmp_path / "home")
    monkeypatch.chdir(tmp_path)
    assert services.mlflow_artifacts() is None
    for value, want in [
        ("", None),
        ("s3://qabot-artifacts/team/mlflow", "s3://qabot-artifacts/team/mlflow"),
        (" s3://qabot ", "s3://qabot"),
        (
            "relative/dir",
            os.path.join(os.getcwd(), "relative", "dir"),
        ),  # the server runs elsewhere: made absolute
        ("file:///srv/mlflow", "file:///srv/mlflow"),
    ]:
        monkeypatch.setenv("MLFLOW_ARTIFACTS", value)
        assert services.mlflow_artifacts() == want, value
    monkeypatch.setenv("MLFLOW_ARTIFACTS", "s3://qabot")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert services.mlflow_artifacts() == "s3://qabot"


def test_s3_without_boto3_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "boto3" else find_spec(n, *a))
    _clean_env(monkeypatch, tmp_path / "home")
    monkeypatch.setenv("MLFLOW_ARTIFACTS", "s3://qabot/mlflow")
    with pytest.raises(ValueError) as err:
        services.mlflow_artifacts()
    assert str(err.value) == (
        "MLFLOW_ARTIFACTS='s3://qabot/mlflow': the MLflow server needs boto3 for s3:// (pip install -e '.[s3]')"
    )


def test_qabot_up_with_a_bad_artifact_destination_is_one_line_and_starts_nothing(tmp_path):
    home = tmp_path / "home"
    env = env_for(home, MLFLOW_ARTIFACTS="s3:/qabot")
    proc = qabot(env, "up", "--no-worker", "--mlflow-port", "1", "--prefect-port", "2", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "qabot: error: MLFLOW_ARTIFACTS='s3:/qabot': expected s3://BUCKET[/PREFIX]"
    ]
    assert not (home / "logs").exists() and not leftovers(home)


def test_a_running_server_with_other_artifacts_is_not_reused(tmp_path, monkeypatch):
    """Setting MLFLOW_ARTIFACTS while the server `up` started keeps them elsewhere: an error, not a silent reuse."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    _clean_env(monkeypatch, home)
    me = services.identify(os.getpid())  # a live process stands in for the recorded server: never signalled
    local = str(home / "mlflow" / "artifacts")
    state = {"procs": {"mlflow": me}, "mlflow_url": "http://127.0.0.1:9", "mlflow_artifacts": local}
    (home / "services.json").write_text(json.dumps(state))
    monkeypatch.setenv("MLFLOW_ARTIFACTS", "s3://qabot/mlflow")
    with pytest.raises(services.ServiceError) as err:
        services.up(home, prefect=False)
    assert str(err.value) == (
        f"the MLflow server runs with its artifacts in {local}, not s3://qabot/mlflow; `qabot down` first"
    )
