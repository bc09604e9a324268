"""The Kubernetes GPU work-pool example (deploy/k8s-gpu/): what a user relies on, checked without a cluster.

The base job template is one Prefect's server accepts for a `kubernetes` work pool (its own validation), every
`{{ placeholder }}` of the job configuration is a declared variable, the Job's container asks for exactly one
`nvidia.com/gpu`, runs the flow run's command and carries MLFLOW_TRACKING_URI; the deployments run this repo's
flow on that pool, and their job variables render into a Job the way the worker renders them (Prefect's own
templating and job-variable validation).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from prefect.server.schemas.actions import WorkPoolCreate
from prefect.utilities.schema_tools import validate
from prefect.utilities.templating import apply_values, find_placeholders

from pipeline_lib.config import PROFILES, parse_config

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "deploy" / "k8s-gpu"
POOL = "qabot-gpu-k8s"
TEMPLATE = json.loads((HERE / "base-job-template.json").read_text())
DEPLOY = yaml.safe_load((HERE / "prefect.yaml").read_text())
IMAGE, MLFLOW = "registry.example.com/qabot:gpu", "http://mlflow.qabot.svc.cluster.local:5000"


def _container(manifest: dict) -> dict:
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    return container


def test_the_template_is_a_valid_kubernetes_work_pool_template():
    pool = WorkPoolCreate(name=POOL, type="kubernetes", base_job_template=TEMPLATE)  # the server's validation
    assert pool.base_job_template == TEMPLATE
    config, variables = TEMPLATE["job_configuration"], TEMPLATE["variables"]
    used = {p.name for p in find_placeholders(json.dumps(config))}
    declared = set(variables["properties"])
    assert used <= declared, f"undeclared: {used - declared}"
    assert declared <= used, f"declared but never used (no effect): {declared - used}"
    assert set(variables["required"]) == {"image", "mlflow_tracking_uri"}
    # what prefect-kubernetes requires of a job manifest, and the fields its job configuration reads
    manifest = config["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    pod = manifest["spec"]["template"]["spec"]
    assert (pod["parallelism"], pod["completions"], pod["restartPolicy"]) == (1, 1, "Never")
    assert _container(manifest)["name"] == "prefect-job"
    assert set(config) == {
        "command",
        "env",
        "labels",
        "name",
        "namespace",
        "job_manifest",
        "job_watch_timeout_seconds",
        "pod_watch_timeout_seconds",
    }


def test_the_job_has_one_gpu_the_flow_runs_command_and_mlflow_tracking_uri():
    config = TEMPLATE["job_configuration"]
    container = _container(config["job_manifest"])
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources.get("requests", {}).get("nvidia.com/gpu", 1) == 1  # a request must equal the limit
    gpu_keys = re.findall(r"nvidia\.com/gpu", json.dumps(config["job_manifest"]["spec"]["template"]["spec"]))
    assert len(gpu_keys) == 2, "one limit and the GPU nodes' toleration, nothing a variable could change"
    # the flow run's command: the worker fills `{{ command }}` (`prefect flow-run execute`)
    assert container["args"] == "{{ command }}" and config["command"] == "{{ command }}"
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == {"name": "MLFLOW_TRACKING_URI", "value": "{{ mlflow_tracking_uri }}"}
    # Prefect's own settings (PREFECT_API_URL, the flow run's id) and the `env` variable come through here
    assert config["env"] == "{{ env }}"
    assert container["image"] == "{{ image }}" and config["namespace"] == "{{ namespace }}"


def _deployments() -> list[dict]:
    return DEPLOY["deployments"]


@pytest.mark.parametrize("deployment", _deployments(), ids=lambda d: d["name"])
def test_each_deployment_runs_this_repos_flow_on_the_pool(deployment, monkeypatch):
    path, name = deployment["entrypoint"].split(":")
    source = (ROOT / path).read_text()
    assert re.search(rf"^@flow\(.*\)\ndef {name}\(", source, re.M), deployment["entrypoint"]
    cfg = parse_config(deployment["parameters"]["config"], f"deployment {deployment['name']}")
    assert cfg.profile in PROFILES
    assert deployment["work_pool"]["name"] == POOL

    # as `prefect deploy` fills in the environment, and the server then checks a flow run's job variables
    monkeypatch.setenv("QABOT_K8S_IMAGE", IMAGE)
    monkeypatch.setenv("QABOT_K8S_MLFLOW_URI", MLFLOW)
    job_variables = apply_values(deployment["work_pool"]["job_variables"], os.environ, remove_notset=False)
    assert job_variables == {"image": IMAGE, "mlflow_tracking_uri": MLFLOW}
    properties = TEMPLATE["variables"]["properties"]
    values = {k: v["default"] for k, v in properties.items() if v.get("default") is not None} | job_variables
    validate(values, TEMPLATE["variables"], raise_on_error=True, ignore_required=False)
    # rendered as the worker renders it (variables missing a value drop their keys)
    job = apply_values(TEMPLATE["job_configuration"], values)
    container = _container(job["job_manifest"])
    assert container["image"] == IMAGE
    assert {"name": "MLFLOW_TRACKING_URI", "value": MLFLOW} in container["env"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "args" not in container  # no command given: the worker puts the flow run's there
    assert job["namespace"] == job["job_manifest"]["metadata"]["namespace"] == "qabot"


@pytest.mark.parametrize(
    ("job_variables", "needle"),
    [
        ({"mlflow_tracking_uri": MLFLOW}, "'image' is a required property"),
        ({"image": IMAGE}, "'mlflow_tracking_uri' is a required property"),
        # what `prefect deploy` leaves where QABOT_K8S_IMAGE / QABOT_K8S_MLFLOW_URI were not exported
        ({"image": "", "mlflow_tracking_uri": MLFLOW}, "'' does not match"),
        ({"image": "{{ $QABOT_K8S_IMAGE }}", "mlflow_tracking_uri": MLFLOW}, "does not match"),
        ({"image": IMAGE, "mlflow_tracking_uri": "mlflow:5000"}, "'mlflow:5000' does not match"),
    ],
)
def test_a_run_without_a_usable_image_or_mlflow_uri_is_refused(job_variables, needle):
    """The server validates a flow run's job variables against the template's schema (required included)."""
    with pytest.raises(Exception, match=re.escape(needle)):
        validate(job_variables, TEMPLATE["variables"], raise_on_error=True, ignore_required=False)


def test_deployments_are_distinct_from_the_process_pools_and_pull_into_the_images_workdir():
    names = [d["name"] for d in _deployments()]
    process = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert len(set(names)) == len(names) and not set(names) & {d["name"] for d in process}
    assert {"smoke-k8s", "report-k8s"} <= set(names)
    (step,) = DEPLOY["pull"]
    workdir = re.search(r"^WORKDIR (\S+)$", (HERE / "Dockerfile").read_text(), re.M).group(1)
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == workdir


def test_the_readme_gives_the_commands_with_these_names():
    readme = (HERE / "README.md").read_text()
    for command in (
        f"prefect work-pool create {POOL} --type kubernetes --base-job-template deploy/k8s-gpu/base-job-template.json",
        f"prefect work-pool set-concurrency-limit {POOL} ",
        "prefect gcl create qabot-gpu --limit ",
        "prefect gcl update qabot-gpu --limit ",
        f"prefect worker start --pool {POOL} --type kubernetes",
        "prefect --no-prompt deploy --all --prefect-file deploy/k8s-gpu/prefect.yaml",
        "docker build -f deploy/k8s-gpu/Dockerfile",
    ):
        assert command in readme, command
