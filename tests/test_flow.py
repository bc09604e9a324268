"""The flow's wiring, without any server: every task replaced by a recorder, the flow body run as a function.

Checks that each stage receives what the stage before it returned, models run one after another, the parent
run is finished (or failed) and nothing runs after a failure; that the GPU slot is held from the retraining
decision to the end, so runs started together train one after the other; that a run whose data and settings
did not change skips training and says why."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import fakes
import pytest
from prefect.states import State

from flows import finetune_compare as flow_module
from pipeline_lib.config import load_config
from pipeline_lib.contracts import Comparison, PromotionResult, RetrainDecision

TRAIN = RetrainDecision(
    train=True, reason="no previous successful run", mode="always", data_fingerprint="data-fp",
    train_config_fingerprint="cfg-fp",
)  # fmt: skip
SKIP = TRAIN.model_copy(
    update={"train": False, "mode": "on_change", "previous_run_id": "parent-0",
            "reason": "data and training settings unchanged since run parent-0"}
)  # fmt: skip


class Recorder:
    def __init__(self, fail_at: str | None = None, decision: RetrainDecision = TRAIN, previous=None):
        self.calls: list[tuple[str, dict]] = []
        self.fail_at = fail_at
        self.decision = decision
        self.previous = previous  # what previous_results returns

    @contextlib.contextmanager
    def gpu_slot(self, flow_run_id=None):
        self.calls.append(("gpu_slot", {}))
        try:
            yield
        finally:
            self.calls.append(("gpu_slot_released", {}))

    def __call__(self, name: str, **kwargs):
        self.calls.append((name, kwargs))
        if name == self.fail_at:
            raise RuntimeError(f"{name} failed")
        if name == "decide_retraining":
            return self.decision
        if name == "previous_results":
            return self.previous
        spec = kwargs.get("spec")
        label = spec.name if spec is not None else kwargs.get("model_name")
        if name == "resolve_model":
            return fakes.resolved(label)
        if name == "tokenize_data":
            return fakes.tokenized(kwargs["model"].name)
        if name == "train_model":
            return fakes.trained(label)
        if name == "merge_model":
            return fakes.merged(kwargs["trained"].model_name)
        if name == "answer_questions":
            return fakes.answered(label, phase=kwargs["phase"])
        if name == "promote_model":
            waiting = kwargs["promotion"].approval and kwargs.get("verdict") is None
            return PromotionResult(
                model_name=kwargs["trained"].model_name,
                registered_name=kwargs["registered_name"],
                version="1",
                decision="pending" if waiting else "promoted",
                reason=f"verdict {kwargs.get('verdict')}",
            )
        return {
            "preflight": None,
            "start_parent_run": "parent-1",
            "acquire_data": {"sha256": "raw", "path": "/raw"},
            "clean_data": {
                "fingerprint": "data-fp",
                "train_path": "t",
                "eval_path": "e",
                "rows_in": 10,
                "n_train": 8,
                "n_eval": 2,
            },
            "log_data": None,
            "compare_models": Comparison(report_dir="/r", files={}),
            "previous_comparison": Comparison(report_dir="/r0", files={}, parent_run_url="http://m/parent-0"),
            "start_progress": "progress-1",
            "finish_parent_run": None,
        }[name]

    def names(self) -> list[str]:
        return [n for n, _ in self.calls]

    def args(self, name: str) -> list[dict]:
        return [kw for n, kw in self.calls if n == name]


def _install(monkeypatch, rec: Recorder) -> None:
    import inspect

    from tasks import stages

    for name, task in vars(stages).items():
        if hasattr(task, "fn") and hasattr(task, "cache_policy"):
            params = list(inspect.signature(task.fn).parameters)

            def fake(*args, _name=name, _params=params, **kwargs):
                return rec(_name, **dict(zip(_params, args, strict=False)), **kwargs)

            monkeypatch.setattr(stages, name, fake)
    monkeypatch.setattr(flow_module, "get_run_logger", lambda: logging.getLogger("test-flow"))
    monkeypatch.setattr(flow_module, "gpu_slot", rec.gpu_slot)


def test_each_stage_gets_what_the_one_before_returned(monkeypatch):
    rec = Recorder()
    _install(monkeypatch, rec)
    config = load_config("smoke")
    summary = flow_module.finetune_compare.fn(config)

    names = rec.names()
    assert names[:2] == ["preflight", "start_parent_run"]
    assert names[-2:] == ["finish_parent_run", "gpu_slot_released"]
    # the GPU slot is taken before the decision and every model stage, and given back after the parent run ends
    assert names.index("gpu_slot") < names.index("decide_retraining") < names.index("tokenize_data")
    (decide,) = rec.args("decide_retraining")
    assert decide["prepared"]["fingerprint"] == "data-fp" and decide["parent_run_id"] == "parent-1"
    assert list(decide["resolved"]) == [m.name for m in config.models]
    assert rec.args("finish_parent_run")[0]["status"] == "FINISHED"
    assert names.count("acquire_data") == names.count("clean_data") == 1
    models = [m.name for m in config.models]
    # One model at a time: tokenize -> train -> merge -> answer, in the configured order.
    stages = {"tokenize_data", "train_model", "merge_model", "answer_questions", "promote_model"}
    per_model = [n for n in names if n in stages]
    one = [
        "tokenize_data",
        "train_model",
        "answer_questions",
        "merge_model",
        "answer_questions",
        "promote_model",
    ]
    assert per_model == one * len(models)
    for name, tok in zip(models, rec.args("tokenize_data"), strict=True):
        assert tok["prepared"]["fingerprint"] == "data-fp" and tok["model"].name == name
    for name, train in zip(models, rec.args("train_model"), strict=True):
        assert train["tokenized"].fingerprint == f"tok-{name}" and train["spec"].name == name
        assert train["model"].fingerprint == f"model-{name}" and train["parent_run_id"] == "parent-1"
        assert train["settings"] == config.train_settings()
    for name, merge in zip(models, rec.args("merge_model"), strict=True):
        assert merge["trained"].run_id == f"run-{name}" and merge["model"].name == name
        assert merge["tokenized"].fingerprint == f"tok-{name}" and merge["merge"] == config.merge
    answers = rec.args("answer_questions")
    for k, name in enumerate(models):
        before, after = answers[2 * k], answers[2 * k + 1]
        assert (before["phase"], before["model_dir"], before["model_fingerprint"]) == (
            "before",
            f"/m/{name}",
            f"model-{name}",
        )
        assert (after["phase"], after["model_dir"], after["model_fingerprint"]) == (
            "after",
            f"/mm/{name}",
            f"merged-{name}",
        )
        assert before["run_id"] == after["run_id"] == f"run-{name}"
    for name, promote in zip(models, rec.args("promote_model"), strict=True):
        assert (
            promote["trained"].run_id == f"run-{name}" and promote["merged"].fingerprint == f"merged-{name}"
        )
        assert (promote["answers"].phase, promote["answers"].model_name) == ("after", name)
        assert (
            promote["registered_name"] == f"{config.name}-{name}" and promote["promotion"] == config.promotion
        )
        assert promote.get("verdict") is None
    assert summary["models"][models[0]]["promotion"]["decision"] == "promoted"
    (compare,) = rec.args("compare_models")
    assert [r.model_name for r in compare["results"]] == models
    assert [r.train.run_id for r in compare["results"]] == [f"run-{m}" for m in models]
    assert [(r.answers_before.phase, r.answers.phase) for r in compare["results"]] == [
        ("before", "after")
    ] * 3
    assert summary["parent_run_id"] == "parent-1" and set(summary["models"]) == set(models)


def test_a_promotion_waiting_for_a_reviewer_asks_then_applies_the_answer(monkeypatch):
    from pipeline_lib.config import parse_config

    rec = Recorder()
    _install(monkeypatch, rec)
    asked = []

    def ask_reviewer(result, timeout_s):
        asked.append((result.model_name, result.decision, timeout_s))
        rec.calls.append(("ask_reviewer", {}))
        return "refused" if result.model_name == "bloom-tiny" else "approved"

    monkeypatch.setattr(flow_module.approval, "ask_reviewer", ask_reviewer)
    config = parse_config({"profile": "smoke", "promotion": {"approval": True, "approval_timeout_s": 60}})
    summary = flow_module.finetune_compare.fn(config)

    models = [m.name for m in config.models]
    assert asked == [(m, "pending", 60) for m in models]
    verdicts = [kw.get("verdict") for kw in rec.args("promote_model")]
    # every model is decided first; the reviewer is asked once the report is built and the GPU slot is given
    # back (a run waiting for a person never keeps another from training), then each answer is applied
    assert verdicts == [None, None, None, "approved", "refused", "approved"]
    names = rec.names()
    assert names.index("compare_models") < names.index("gpu_slot_released") < names.index("ask_reviewer")
    assert names[-2:] == ["promote_model", "finish_parent_run"]
    assert summary["models"]["bloom-tiny"]["promotion"]["reason"] == "verdict refused"


@pytest.mark.parametrize("stage", ["clean_data", "train_model", "answer_questions"])
def test_a_failed_stage_fails_the_parent_run_and_stops(monkeypatch, stage):
    rec = Recorder(fail_at=stage)
    _install(monkeypatch, rec)
    with pytest.raises(RuntimeError, match=f"{stage} failed"):
        flow_module.finetune_compare.fn(load_config("smoke"))
    names = [n for n in rec.names() if n != "gpu_slot_released"]
    assert names[-1] == "finish_parent_run" and rec.args("finish_parent_run")[0]["status"] == "FAILED"
    assert names.index(stage) == len(names) - 2  # nothing ran after the failure
    assert rec.names()[-1] == ("gpu_slot_released" if "gpu_slot" in names else "finish_parent_run")


MODEL_STAGES = {"tokenize_data", "train_model", "merge_model", "answer_questions"}


@pytest.mark.parametrize("refresh", [True, False])
def test_unchanged_data_and_settings_skip_training_and_say_why(monkeypatch, tmp_path, refresh):
    previous = [fakes.model_result(tmp_path, m.name, 1.0) for m in load_config("smoke").models]
    rec = Recorder(decision=SKIP, previous=previous)
    _install(monkeypatch, rec)
    config = load_config("smoke").model_copy(update={"retrain": "on_change", "refresh_comparison": refresh})
    state = flow_module.finetune_compare.fn(config)

    assert isinstance(state, State) and state.is_completed()
    assert state.message == "training skipped: data and training settings unchanged since run parent-0"
    names = rec.names()
    assert not MODEL_STAGES & set(names) and "start_progress" not in names
    assert names[-2:] == ["finish_parent_run", "gpu_slot_released"]
    (finish,) = rec.args("finish_parent_run")
    summary = state.data
    assert finish["status"] == "FINISHED" and finish["summary"] == summary
    assert summary["retrain"]["train"] is False and summary["retrain"]["previous_run_id"] == "parent-0"
    assert set(summary["models"]) == {m.name for m in config.models}
    if refresh:  # the comparison is rebuilt under this run from the previous run's results
        (compare,) = rec.args("compare_models")
        assert compare["results"] == previous and compare["parent_run_id"] == "parent-1"
        assert "previous_comparison" not in names and summary["report_dir"] == "/r"
    else:  # this run points at the previous run's report
        assert "compare_models" not in names
        assert summary["report_dir"] == "/r0" and summary["parent_run_url"] == "http://m/parent-0"


def test_two_runs_started_together_train_one_after_the_other(monkeypatch):
    """Two flow runs in two threads, the GPU limit a semaphore of `slots`: the stretch from one run's
    retraining decision to its end never overlaps the other's when there is one slot (and does with two,
    which shows the check can see an overlap)."""
    config = load_config("smoke")

    def stretches(slots: int) -> list[tuple[float, float]]:
        monkeypatch.undo()  # the real tasks back, to be faked afresh
        limit = threading.BoundedSemaphore(slots)
        spans: dict[int, list[float]] = {}
        rec = Recorder()

        @contextlib.contextmanager
        def gpu_slot(flow_run_id=None):
            with limit:
                yield

        def stamp(name):
            spans.setdefault(threading.get_ident(), []).append(time.monotonic())
            if name == "train_model":
                time.sleep(0.05)

        _install(monkeypatch, rec)
        monkeypatch.setattr(flow_module, "gpu_slot", gpu_slot)
        for name in ("decide_retraining", "train_model", "finish_parent_run"):
            fake = getattr(flow_module.stages, name)
            monkeypatch.setattr(
                flow_module.stages, name, lambda *a, _f=fake, _n=name, **kw: (stamp(_n), _f(*a, **kw))[1]
            )
        start = threading.Barrier(2)

        def run():
            start.wait()
            flow_module.finetune_compare.fn(config)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(spans) == 2 and all(len(v) == 2 + len(config.models) for v in spans.values())
        return sorted((v[0], v[-1]) for v in spans.values())

    (a0, a1), (b0, b1) = stretches(1)
    assert a1 < b0, "the second run decided before the first one ended"
    (a0, a1), (b0, b1) = stretches(2)
    assert b0 < a1  # with two slots they overlap
