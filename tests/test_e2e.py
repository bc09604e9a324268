"""End to end: the smoke pipeline through a real MLflow server and a real Prefect server.

1. `qabot up` starts MLflow + Prefect on free localhost ports under a fresh QABOT_HOME;
2. `qabot demo --config` (the smoke preset, fewer steps) runs the deployment through the process worker: it
   trains the three tiny architectures with real 4-bit QLoRA, merges, answers;
3. MLflow holds one parent run with 3 child runs, step-wise loss, artifacts, an answer per question and model;
4. the same config run by `qabot run` in a process of its own finds every heavy task Cached;
5. changed data re-runs tokenize and train (and what follows them);
6. bad data stops the flow in the data stage with one line: no run at all when pre-flight sees it, else one
   FAILED parent run without children;
7. in headless Chromium, the Prefect flow-run page and the MLflow runs show what a user must see there;
8. `qabot down` stops exactly what was started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
HEAVY = {"acquire-data", "clean-data", "tokenize", "train", "merge", "answer-questions"}
EIGHT = (
    "eval_loss_before", "eval_loss", "perplexity_before", "perplexity", "bits_per_byte_before", "bits_per_byte",
    "question_score_before", "question_score",
)  # fmt: skip


def _qabot(env, *args, timeout=900):
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, time.time() - t0


def _printed_summary(stdout: str) -> dict:
    """The JSON summary `qabot run` prints (indented, starting with its "seconds")."""
    return json.loads(stdout[stdout.index('{\n  "seconds"') : stdout.rindex("}") + 1])


def _demo_urls(out: str) -> dict[str, str]:
    """The flow run's id and URL and the MLflow parent run's URL, as `qabot demo` prints them."""
    return {
        "flow_run_id": out.split("/runs/flow-run/")[1].split()[0],
        "flow_run_url": out.split("Prefect flow run: ")[1].split()[0],
        "parent_run_url": out.split("MLflow parent run: ")[1].split()[0],
    }


def _task_states(home, flow_run_id):
    from flows.services import prefect_api  # CSRF token (and auth) included

    runs = prefect_api(
        "POST",
        "/task_runs/filter",
        {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200},
        home=home,
        timeout=30,
    )
    out: dict[str, list[str]] = {}
    for r in runs:
        name = r["name"].rsplit("-", 1)[0]
        out.setdefault(name, []).append(r["state"]["name"])
    return out


WORKER_RUN: dict[str, str] = {}  # the deployment run through the worker, for the browser test
SCREENSHOTS = ROOT / "test-output" / "screenshots"

# The smoke preset with a few steps per model: the pipeline's every stage, in a fraction of its time.
E2E_CONFIG = """profile: smoke
name: e2e
models:
  - {name: llama-tiny, base_model: "tiny:llama", batch_size: 4, max_length: 256, max_steps: 6}
  - {name: bloom-tiny, base_model: "tiny:bloom", batch_size: 2, max_length: 256, max_steps: 6}
  - {name: falcon-tiny, base_model: "tiny:falcon", batch_size: 1, max_length: 256, max_steps: 6}
training: {save_steps: 3, logging_steps: 1}
inference: {max_new_tokens: 8}
tracking: {experiment: qabot-e2e}
"""


def test_smoke_pipeline_end_to_end(stack, tmp_path):
    from mlflow import MlflowClient

    env, st = stack["env"], stack["state"]
    config = tmp_path / "e2e.yaml"
    config.write_text(E2E_CONFIG)
    # First run: the config as a deployment run through the process worker, followed from the terminal.
    proc, first = _qabot(env, "demo", "--config", str(config))
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    out = proc.stdout
    assert "Prefect flow run: http://127.0.0.1" in out and "MLflow parent run: http://127.0.0.1" in out
    # the run's URL comes first, then each stage as it ends with the training progress, then the summary
    assert out.index("(submitted; the worker starts it)") < out.index("✓ train") < out.index("Summary:")
    assert "100%" in out[: out.index("Summary:")], "the training progress reaches 100%"
    assert all(f"  {m}" in out[out.index("Summary:") :] for m in ("llama-tiny", "bloom-tiny", "falcon-tiny"))
    WORKER_RUN.update(_demo_urls(out))
    summary = {
        "flow_run_id": WORKER_RUN["flow_run_id"],
        "parent_run_id": WORKER_RUN["parent_run_url"].split("/runs/")[1].split("?")[0],
        "report_dir": str(Path(out.split("Report: ")[1].split("\n")[0].strip()).parent),
    }

    client = MlflowClient(tracking_uri=st["mlflow_url"])
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    # named after the Prefect flow run (reruns can be told apart), in an experiment the UI opens as training
    assert parent.info.run_name.startswith("e2e · ") and len(parent.info.run_name) > len("e2e · "), (
        parent.info
    )
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 3
    assert {c.data.tags["qabot.arch"] for c in children} == {"llama", "bloom", "falcon"}
    for c in children:
        rid = c.info.run_id
        loss = client.get_metric_history(rid, "loss")
        assert len({m.step for m in loss}) > 1, "step-wise loss"
        assert client.get_metric_history(rid, "learning_rate")
        assert c.data.metrics["preflight.share_4bit"] == 1.0
        assert c.data.metrics["preflight.footprint_gib"] < c.data.metrics["preflight.bf16_footprint_gib"]
        for key in EIGHT:  # the held-out metrics and the question score, before and after fine-tuning
            assert key in c.data.metrics, (key, sorted(c.data.metrics))
        assert any(k.startswith("system/") for k in c.data.metrics), "MLflow system metrics"
        for p in ("base_model", "dataset_fingerprint", "lora.r", "quant.quant_type", "epochs", "batch_size"):
            assert p in c.data.params, p
        arts = {a.path for a in client.list_artifacts(rid)}
        assert {"adapter", "preflight.json", "answers.jsonl", "answers_before.jsonl", "merge.json"} <= arts, (
            arts
        )
        versions = client.search_model_versions(f"run_id = '{rid}'")
        assert versions, "merged model registered"
    parent_arts = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    expected = {"scoreboard.csv", "scoreboard.json", "answers.csv", "answers.json", "report.md"}
    expected |= {"curves.png", "heldout.png", "system.png", "speed.png"}
    assert {f"comparison/{name}" for name in expected} <= parent_arts, parent_arts
    import pandas as pd

    table = pd.read_csv(Path(summary["report_dir"]) / "answers.csv")
    assert len(table) == 12 * 3 and table["answer_after"].notna().all()  # the smoke questions x 3 models
    # The report's figures are the child runs' own.
    board = pd.read_csv(Path(summary["report_dir"]) / "scoreboard.csv").set_index("model")
    for c in children:
        row = board.loc[c.info.run_name]
        for key in ("bits_per_byte", "bits_per_byte_before", "question_score", "question_score_before"):
            assert row[key] == pytest.approx(c.data.metrics[key]), (c.info.run_name, key)
        # and the parent run carries each model's headline metrics, so the runs table compares them
        assert parent.data.metrics[f"{c.info.run_name}.question_score"] == pytest.approx(
            row["question_score"]
        )

    states = _task_states(stack["home"], summary["flow_run_id"])
    assert HEAVY <= set(states), states
    if stack["postgres"]:  # the servers run on PostgreSQL (tests/test_postgres.py): the run is a row there
        sql = stack["postgres"]["sql"]
        assert sql("mlflow", f"select status from runs where run_uuid = '{parent.info.run_id}'") == "FINISHED"
        assert (
            sql("prefect", f"select state_name from flow_run where id = '{summary['flow_run_id']}'")
            == "Completed"
        )

    # Second and third run at once, each in a process of its own (`qabot run`; they take the GPU slot in turn):
    # - the same config: every heavy task is Cached;
    # - the same settings on changed data (one row edited), one model to keep it short: the data, tokenize
    #   and train tasks run again (not tracked in MLflow: only the Prefect task states are read, and where to
    #   log is not part of a cache key).
    rows = [
        json.loads(x)
        for x in (ROOT / "pipeline_lib" / "assets" / "smoke_alpaca.jsonl").read_text().splitlines()
    ]
    rows[0] = {**rows[0], "output": rows[0]["output"] + " (edited)"}
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one = tmp_path / "changed.yaml"
    llama_only = "\n".join(
        line for line in E2E_CONFIG.splitlines() if "bloom-tiny" not in line and "falcon-tiny" not in line
    )
    one.write_text(llama_only.replace("profile: smoke", f"profile: smoke\ndata: {{source: {changed}}}"))
    t0 = time.time()
    third_proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(one), "--no-services", "--no-track"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        proc, second = _qabot(env, "run", "--config", str(config), "--no-services")
        out3, err3 = third_proc.communicate(timeout=900)
    finally:
        if third_proc.poll() is None:
            third_proc.kill()
            third_proc.communicate()
    both = time.time() - t0
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    states = _task_states(stack["home"], _printed_summary(proc.stdout)["flow_run_id"])
    for name in HEAVY:
        assert states.get(name) and all(s == "Cached" for s in states[name]), (name, states.get(name))
    print(f"\nfirst run through the worker {first:.1f} s, cached rerun {second:.1f} s ({second / first:.0%})")

    assert third_proc.returncode == 0, (out3[-2000:], err3[-4000:])
    states = _task_states(stack["home"], _printed_summary(out3)["flow_run_id"])
    for name in ("acquire-data", "clean-data", "tokenize", "train", "merge"):
        assert states.get(name) == ["Completed"], (name, states.get(name))
    # the fine-tuned model answers again; the base model's answers do not depend on the data and stay cached
    assert sorted(states.get("answer-questions", [])) == ["Cached", "Completed"], states.get(
        "answer-questions"
    )
    print(f"the cached rerun and the changed-data run side by side: {both:.1f} s")


def test_both_uis_show_the_run_in_a_browser(stack, tmp_path):
    """What a user sees in headless Chromium after a deployment run through the worker (the one of the test
    above, else one of its own): the Prefect flow-run page with the flow, its task runs and artifacts; the
    MLflow parent run in the model-training view, with its child runs, metrics and the comparison's plots; a
    child run with its registered model. Screenshots go to test-output/screenshots/."""
    from browserkit import Browser, find_chromium

    if find_chromium() is None:  # .ci/run installs it
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    if not WORKER_RUN:  # the end-to-end test did not run first: a run of this test's own
        config = tmp_path / "e2e.yaml"
        config.write_text(E2E_CONFIG)
        proc, _ = _qabot(stack["env"], "demo", "--config", str(config))
        assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
        WORKER_RUN.update(_demo_urls(proc.stdout))
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack["state"]["mlflow_url"])
    parent_id = WORKER_RUN["parent_run_url"].split("/runs/")[1].split("?")[0]
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    models = sorted(c.info.run_name for c in children)
    assert models == ["bloom-tiny", "falcon-tiny", "llama-tiny"]
    shots = SCREENSHOTS

    with Browser() as b:
        # Prefect: the flow run, its tasks, its artifacts
        b.open(WORKER_RUN["flow_run_url"], ["finetune-compare", "Completed", "qabot-process", "Task Runs"])
        b.screenshot(shots / "prefect-flow-run.png")
        b.click("Task Runs")
        b.wait_for(["tokenize-", "train-", "merge-", "answer-questions-", "promote-", "compare-"])
        b.screenshot(shots / "prefect-task-runs.png")
        b.click("Artifacts")
        b.wait_for(["comparison", "scoreboard", "training-progress", "best llama-tiny"])
        b.screenshot(shots / "prefect-artifacts.png")

        # MLflow: the parent run in the model-training view (not the GenAI one), its children and metrics
        text = b.open(
            WORKER_RUN["parent_run_url"], [parent.info.run_name, "Child runs", *models, "Metrics ("]
        )
        assert "Model registry" in text and "Evaluation runs" not in text, text[:1500]
        assert "llama-tiny.question_score" in text and "llama-tiny.bits_per_byte" in text
        b.screenshot(shots / "mlflow-parent-run.png")
        b.click("Artifacts")
        b.wait_for(["comparison"])
        b.click("comparison")
        b.wait_for(["report.md", "scoreboard.csv", "curves.png", "heldout.png"])
        b.click("curves.png")
        time.sleep(1.5)  # the image loads
        b.screenshot(shots / "mlflow-parent-plots.png")

        # a child run: its own metrics and the model version registered from it
        llama = next(c for c in children if c.info.run_name == "llama-tiny")
        url = WORKER_RUN["parent_run_url"].replace(parent_id, llama.info.run_id)
        b.open(url, ["llama-tiny", "Registered models", "e2e-llama-tiny", "bits_per_byte", "Parent run"])
        b.screenshot(shots / "mlflow-child-run.png")
    assert all((shots / f).stat().st_size > 10_000 for f in os.listdir(shots))


@pytest.mark.parametrize(
    ("content", "needle"),
    [(None, "not found"), ("{not json", "JSON")],  # stopped by pre-flight / by the data stage inside the flow
)
def test_bad_data_stops_in_the_data_stage(stack, tmp_path, content, needle):
    from mlflow import MlflowClient

    data = tmp_path / "data.json"
    if content is not None:
        data.write_text(content)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"profile: smoke\nname: bad-data\ndata:\n  source: {data}\ntracking:\n  experiment: bad-data\n"
    )
    client = MlflowClient(tracking_uri=stack["state"]["mlflow_url"])
    exp = client.get_experiment_by_name("bad-data")
    before = {r.info.run_id for r in client.search_runs([exp.experiment_id])} if exp else set()
    proc, _ = _qabot(stack["env"], "run", "--config", str(cfg), "--no-services", timeout=300)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert err and err[-1].startswith("qabot: error:") and needle in err[-1], proc.stderr[-2000:]
    assert "Traceback" not in err[-1]
    exp = client.get_experiment_by_name("bad-data")
    runs = [
        r for r in (client.search_runs([exp.experiment_id]) if exp else []) if r.info.run_id not in before
    ]
    if content is None:  # a missing file: pre-flight stops the run before anything is recorded
        assert runs == []
    else:  # the data stage failed inside the flow: its parent run is FAILED and no model was trained
        assert [(r.info.status, r.data.tags.get("mlflow.parentRunId")) for r in runs] == [("FAILED", None)]
