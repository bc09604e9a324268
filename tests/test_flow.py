"""The flow's wiring, without any server: every task replaced by a recorder, the flow body run as a function.

Checks that each stage receives what the stage before it returned, models run one after another, the parent
run is finished (or failed) and nothing runs after a failure."""

from __future__ import annotations

import logging

import fakes
import pytest

from flows import finetune_compare as flow_module
from pipeline_lib.config import load_config
from pipeline_lib.contracts import Comparison, PromotionResult


class Recorder:
    def __init__(self, fail_at: str | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.fail_at = fail_at

    def __call__(self, name: str, **kwargs):
        self.calls.append((name, kwargs))
        if name == self.fail_at:
            raise RuntimeError(f"{name} failed")
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


def test_each_stage_gets_what_the_one_before_returned(monkeypatch):
    rec = Recorder()
    _install(monkeypatch, rec)
    config = load_config("smoke")
    summary = flow_module.finetune_compare.fn(config)

    names = rec.names()
    assert names[:2] == ["preflight", "start_parent_run"] and names[-1] == "finish_parent_run"
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
        return "refused" if result.model_name == "bloom-tiny" else "approved"

    monkeypatch.setattr(flow_module.approval, "ask_reviewer", ask_reviewer)
    config = parse_config({"profile": "smoke", "promotion": {"approval": True, "approval_timeout_s": 60}})
    summary = flow_module.finetune_compare.fn(config)

    models = [m.name for m in config.models]
    assert asked == [(m, "pending", 60) for m in models]
    verdicts = [kw.get("verdict") for kw in rec.args("promote_model")]
    assert verdicts == [None, "approved", None, "refused", None, "approved"]
    assert rec.names()[-1] == "finish_parent_run"
    assert summary["models"]["bloom-tiny"]["promotion"]["reason"] == "verdict refused"


@pytest.mark.parametrize("stage", ["clean_data", "train_model", "answer_questions"])
def test_a_failed_stage_fails_the_parent_run_and_stops(monkeypatch, stage):
    rec = Recorder(fail_at=stage)
    _install(monkeypatch, rec)
    with pytest.raises(RuntimeError, match=f"{stage} failed"):
        flow_module.finetune_compare.fn(load_config("smoke"))
    names = rec.names()
    assert names[-1] == "finish_parent_run" and rec.args("finish_parent_run")[0]["status"] == "FAILED"
    assert names.index(stage) == len(names) - 2  # nothing ran after the failure
