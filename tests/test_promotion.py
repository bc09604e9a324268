"""Promotion through the registry's aliases, on a real MLflow registry (sqlite in a temporary directory):
the first version becomes champion, a better one replaces it, a worse question score or held-out bits per
byte beyond the margin do not, a rerun changes nothing, a reviewer's answer decides when one is asked for.
Versions are registered directly (a trivial source), not logged merged models, except in the serving test.
"""

from __future__ import annotations

import itertools
import math

import pytest

from pipeline_lib.config import PromotionSettings
from pipeline_lib.promotion import PromoteJob, Scores, decide, promote_stage
from pipeline_lib.tracking import MlflowTracker, TrackingTarget

_names = itertools.count()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """(tracking target, tracker) of one sqlite-backed MLflow shared by the module (creating a database costs
    seconds); every test registers models of its own name."""
    root = tmp_path_factory.mktemp("registry")
    target = TrackingTarget(uri=f"sqlite:///{root}/mlflow.db", experiment="promotion-tests")
    return target, MlflowTracker(target)


class Model:
    """One registered model and its versions, each with a run of its own (as the pipeline's child runs)."""

    def __init__(self, registry, tmp_path):
        self.target, self.tracker = registry
        self.client = self.tracker.client
        self.name = f"qabot-model-{next(_names)}"
        self.client.create_registered_model(self.name)
        self.source = tmp_path

    def new_version(self) -> tuple[str, str]:
        run_id = self.tracker.start_run(f"{self.name}-run")
        mv = self.client.create_model_version(self.name, source=str(self.source), run_id=run_id)
        return str(mv.version), run_id

    def promote(self, version, run_id, score, bpb, verdict=None, **settings):
        job = PromoteJob(
            model_name="llama-tiny",
            registered_name=self.name,
            version=version,
            question_score=score,
            bits_per_byte=bpb,
            run_id=run_id,
            settings=PromotionSettings(**settings),
            tracking=self.target,
            verdict=verdict,
        )
        return promote_stage(job)

    def alias(self, alias: str) -> str | None:
        return self.tracker.get_alias_version(self.name, alias)

    def tags(self, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(self.name, version).tags)

    def run_tags(self, run_id: str) -> dict[str, str]:
        return dict(self.client.get_run(run_id).data.tags)


@pytest.fixture
def model(registry, tmp_path):
    return Model(registry, tmp_path)


@pytest.fixture
def champion(model):
    """`model` with version 1 (question score 0.5, 2.0 bits per byte) as champion."""
    v1, run1 = model.new_version()
    assert model.promote(v1, run1, 0.5, 2.0).decision == "promoted"
    return model


def test_the_first_version_becomes_champion(model):
    v1, run1 = model.new_version()
    res = model.promote(v1, run1, 0.25, 2.5)
    assert (res.decision, res.champion, res.previous_champion) == ("promoted", v1, None)
    assert model.alias("champion") == model.alias("challenger") == v1
    tags = model.tags(v1)
    assert tags["qabot.promotion"] == "promoted" and "first version" in tags["qabot.promotion_reason"]
    assert float(tags["question_score"]) == 0.25 and float(tags["bits_per_byte"]) == 2.5
    run = model.run_tags(run1)
    assert run["qabot.promotion"] == "promoted" and run["qabot.promotion_version"] == f"{model.name}/{v1}"
    assert run["qabot.promotion_reason"] == tags["qabot.promotion_reason"]


def test_a_better_version_replaces_the_champion(champion):
    v2, run2 = champion.new_version()
    res = champion.promote(v2, run2, 0.75, 1.5)
    assert (res.decision, res.champion, res.previous_champion) == ("promoted", v2, "1")
    assert champion.alias("champion") == champion.alias("challenger") == v2
    reason = champion.tags(v2)["qabot.promotion_reason"]
    assert "0.7500 >= champion (version 1) 0.5000" in reason and "1.5000 vs 2.0000, within" in reason
    assert champion.run_tags(run2)["qabot.promotion"] == "promoted"


def test_a_worse_question_score_is_refused(champion):
    v2, run2 = champion.new_version()
    res = champion.promote(v2, run2, 0.4, 1.0)  # better bits per byte do not make up for it
    assert (res.decision, res.champion) == ("refused", "1")
    assert champion.alias("champion") == "1" and champion.alias("challenger") == v2
    tags = champion.tags(v2)
    assert (
        tags["qabot.promotion"] == "refused"
        and "0.4000 < champion (version 1) 0.5000" in tags["qabot.promotion_reason"]
    )
    assert float(tags["question_score"]) == 0.4 and champion.run_tags(run2)["qabot.promotion"] == "refused"
    assert champion.tags("1")["qabot.promotion"] == "promoted"  # the champion's own record is untouched


def test_bits_per_byte_worse_beyond_the_margin_are_refused(champion):
    v2, run2 = champion.new_version()
    res = champion.promote(v2, run2, 0.9, 2.03, bpb_margin=0.02)
    assert res.decision == "refused" and champion.alias("champion") == "1"
    assert "2.0300 vs 2.0000, beyond the margin of 0.02" in champion.tags(v2)["qabot.promotion_reason"]


def test_bits_per_byte_worse_within_the_margin_and_an_equal_score_promote(champion):
    v2, run2 = champion.new_version()
    res = champion.promote(v2, run2, 0.5, 2.01, bpb_margin=0.02)
    assert res.decision == "promoted" and champion.alias("champion") == v2
    assert "2.0100 vs 2.0000, within the margin of 0.02" in res.reason


def test_a_rerun_without_a_new_version_changes_nothing(champion):
    v2, run2 = champion.new_version()
    assert champion.promote(v2, run2, 0.4, 2.0).decision == "refused"
    before = (champion.tags("1"), champion.tags(v2), champion.run_tags(run2))
    again = champion.promote(v2, run2, 0.4, 2.0)
    assert again.decision == "refused" and champion.alias("champion") == "1"
    assert (champion.tags("1"), champion.tags(v2), champion.run_tags(run2)) == before

    tags, run = (
        champion.tags("1"),
        champion.run_tags(champion.client.get_model_version(champion.name, "1").run_id),
    )
    res = champion.promote("1", None, 0.5, 2.0)  # the champion's own merge, from the cache
    assert (res.decision, res.champion, res.previous_champion) == ("unchanged", "1", "1")
    assert "already champion" in res.reason and champion.alias("champion") == "1"
    assert champion.alias("challenger") == v2  # a rerun of an older version does not take the alias back
    assert champion.tags("1") == tags
    assert champion.run_tags(champion.client.get_model_version(champion.name, "1").run_id) == run


def test_a_champion_without_scores_is_not_replaced_blindly(model):
    v1, _ = model.new_version()
    model.tracker.set_alias(model.name, "champion", v1)  # set by hand, no scores recorded
    v2, run2 = model.new_version()
    res = model.promote(v2, run2, 0.9, 1.0)
    assert res.decision == "refused" and "unknown: champion (version 1)'s question score" in res.reason
    assert model.alias("champion") == v1


def test_a_reviewer_decides_when_approval_is_on(champion):
    v2, run2 = champion.new_version()
    pending = champion.promote(v2, run2, 0.75, 1.5, approval=True)
    assert pending.decision == "pending" and champion.alias("champion") == "1"  # nothing promoted yet
    assert champion.alias("challenger") == v2 and champion.tags(v2)["qabot.promotion"] == "pending"
    done = champion.promote(v2, run2, 0.75, 1.5, verdict="approved", approval=True)
    assert done.decision == "promoted" and champion.alias("champion") == v2
    assert champion.tags(v2)["qabot.promotion_reason"].startswith("approved by reviewer; question score 0.75")

    v3, run3 = champion.new_version()
    assert champion.promote(v3, run3, 0.9, 1.0, approval=True).decision == "pending"
    refused = champion.promote(v3, run3, 0.9, 1.0, verdict="refused", approval=True)
    assert refused.decision == "refused" and champion.alias("champion") == v2
    assert champion.run_tags(run3)["qabot.promotion_reason"].startswith("refused by reviewer; ")


def test_nothing_to_judge_is_skipped(registry, model):
    v1, run1 = model.new_version()
    off = TrackingTarget(uri=None, experiment="x")
    base = {"model_name": "m", "registered_name": model.name, "version": v1, "question_score": 0.5}
    cases = {
        "switched off": PromoteJob(
            **base, bits_per_byte=2.0, tracking=registry[0], settings={"enabled": False}
        ),
        "tracking is off": PromoteJob(**base, bits_per_byte=2.0, tracking=off),
        "not registered": PromoteJob(**{**base, "version": None}, bits_per_byte=2.0, tracking=registry[0]),
        "not in the registry": PromoteJob(
            **{**base, "version": "99"}, bits_per_byte=2.0, tracking=registry[0]
        ),
    }
    for needle, job in cases.items():
        res = promote_stage(job)
        assert res.decision == "skipped" and needle in res.reason, (needle, res.reason)
    assert model.alias("champion") is None and model.alias("challenger") is None


# ------------------------------------------------------------------------- the decision alone, and the reviewer

SETTINGS = PromotionSettings(bpb_margin=0.02)
CHAMP = Scores(version="1", question_score=0.5, bits_per_byte=2.0)


@pytest.mark.parametrize(
    ("score", "bpb", "decision"),
    [
        (0.5, 2.0, "promoted"),  # equal is enough
        (0.6, 2.019, "promoted"),
        (0.6, 2.021, "refused"),
        (0.499, 1.0, "refused"),
        (None, 1.0, "refused"),
        (0.9, math.nan, "refused"),
    ],
)
def test_decide(score, bpb, decision):
    assert (
        decide(Scores(version="2", question_score=score, bits_per_byte=bpb), CHAMP, SETTINGS).decision
        == decision
    )


@pytest.mark.parametrize(
    ("verdict", "decision", "start"),
    [
        (None, "pending", "waiting for a reviewer; "),
        ("approved", "promoted", "approved by reviewer; "),
        ("refused", "refused", "refused by reviewer; "),
        ("timed out", "refused", "approval timed out; "),
    ],
)
def test_decide_with_a_reviewer(verdict, decision, start):
    settings = SETTINGS.model_copy(update={"approval": True})
    better = Scores(version="2", question_score=0.9, bits_per_byte=1.0)
    got = decide(better, CHAMP, settings, verdict)
    assert got.decision == decision and got.reason.startswith(start) and "0.9000 >= champion" in got.reason
    assert decide(better, None, settings, verdict).decision == decision  # the first version too
    worse = Scores(version="2", question_score=0.1, bits_per_byte=1.0)
    assert decide(worse, CHAMP, settings, verdict).decision == "refused"  # nobody is asked about a refusal
    assert decide(CHAMP, CHAMP, settings, verdict).decision == "unchanged"


def test_the_reviewers_answer_becomes_the_verdict(monkeypatch):
    """The flow's pause (Prefect's pause_flow_run, replaced here: no server) and its three outcomes."""
    import prefect.flow_runs
    from prefect.exceptions import FlowPauseTimeout

    from pipeline_lib.contracts import PromotionResult
    from tasks import approval

    pending = PromotionResult(
        model_name="m", registered_name="qabot-m", version="3", decision="pending", reason="waiting; why"
    )
    asked, resumed, answers = [], [], [True, False, None]

    def pause(wait_for_input, timeout, key):
        asked.append((wait_for_input, timeout, key))
        answer = answers.pop(0)
        if answer is None:
            raise FlowPauseTimeout("never resumed")
        return wait_for_input(approve=answer)

    monkeypatch.setattr(prefect.flow_runs, "pause_flow_run", pause)
    monkeypatch.setattr(approval, "_resume_after_timeout", lambda: resumed.append(True))
    assert [approval.ask_reviewer(pending, 60) for _ in range(3)] == ["approved", "refused", "timed out"]
    form, timeout, key = asked[0]
    assert issubclass(form, approval.PromotionApproval) and form._description == approval.question(pending)
    assert "qabot-m version 3" in form._description and (timeout, key) == (60, "promote-qabot-m-3")
    assert resumed == [True]  # only after the timeout


# ---------------------------------------------------------------------------------------- the champion serves

LOAD = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
print(json.dumps(list(model.predict(pd.DataFrame({"question": ["What is 2+2?"]}), params={"max_new_tokens": 4}))))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_champion_serves(registry, tiny_models, tmp_path):
    """A merged model (a tiny base stands in for one) logged by `MlflowTracker.log_model` and made champion
    answers through `models:/NAME@champion`: loaded with pyfunc in a fresh process, and behind
    `qabot serve` (`mlflow models serve --env-manager local`) — the same answer as generating with its files directly."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from pipeline_lib.config import InferenceSettings
    from pipeline_lib.inference import generate_answers, load_for_inference
    from pipeline_lib.prompts import build_prompt

    target, tracker = registry
    name = f"smoke-bloom-tiny-{next(_names)}"
    info = tracker.log_model(tracker.start_run("merged"), tiny_models["bloom"], name)
    tracker.set_alias(name, "champion", str(info["registered_model_version"]))
    uri = f"models:/{name}@champion"
    # the library travels with the model, without the shipped tiny models' weights or compiled caches
    from mlflow.artifacts import download_artifacts

    code = Path(
        download_artifacts(
            artifact_uri=f"models:/{name}/{info['registered_model_version']}/code",
            dst_path=str(tmp_path / "code"),
            tracking_uri=target.uri,
        )
    )
    attached = {p.relative_to(code).as_posix() for p in code.rglob("*")}
    assert {"pipeline_lib/serving.py", "pipeline_lib/tracking.py"} <= attached, sorted(attached)[:20]
    assert not [p for p in attached if "tiny_models" in p or "__pycache__" in p or p.endswith(".pyc")]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": target.uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a readable server log when it fails
        "CUDA_VISIBLE_DEVICES": "",  # on the CPU, like the direct answer it is compared with
    }
    # `mlflow models serve` starts `uvicorn` by name; `qabot serve` puts the environment's scripts on PATH
    serve_env = {**env, "PATH": "/usr/bin:/bin"}
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(  # `qabot serve` = `mlflow models serve --env-manager local` on the alias
            [sys.executable, "-m", "flows.cli", "serve", name, "--alias", "champion", "--port", str(port)],
            env={**serve_env, "QABOT_HOME": str(tmp_path / "home")},
            cwd=Path(__file__).resolve().parent.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        model, tokenizer = load_for_inference(tiny_models["bloom"], "cpu")
        prompt = build_prompt("What is 2+2?", "")
        (direct,) = generate_answers(model, tokenizer, [prompt], InferenceSettings(max_new_tokens=4), "cpu")
        # while the server starts: a fresh process loads the champion
        load = subprocess.run(
            [sys.executable, "-c", LOAD, uri],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert load.returncode == 0, load.stderr[-3000:]
        assert json.loads(load.stdout.strip().splitlines()[-1]) == [direct["answer"]]

        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        body = {
            "dataframe_split": {"columns": ["question"], "data": [["What is 2+2?"]]},
            "params": {"max_new_tokens": 4},
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            assert json.loads(r.read()) == {"predictions": [direct["answer"]]}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)
