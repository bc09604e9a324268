"""Data-aware retraining: the pure decision, the training-settings slice it compares, and the round trip of
what a parent run records through MLflow (a file store: no server, no database migrations)."""

from __future__ import annotations

import fakes
import pytest

from pipeline_lib import retraining, runs
from pipeline_lib.compare import CompareJob, compare_stage
from pipeline_lib.config import load_config
from pipeline_lib.retraining import PreviousRun, changed_settings, decide_retraining, train_config

CONFIG = load_config("smoke")
FILES = {m.name: f"files-{m.name}" for m in CONFIG.models}
SETTINGS = train_config(CONFIG, FILES)


def _previous(
    data_fp: str = "data-a", settings: dict | None = SETTINGS, run_id: str = "run-1"
) -> PreviousRun:
    return PreviousRun(
        run_id=run_id,
        data_fingerprint=data_fp,
        train_config_fingerprint=retraining.fingerprint(SETTINGS if settings is None else settings),
        train_config=settings,
    )


def test_unchanged_data_and_settings_skip_with_the_reason():
    d = decide_retraining("on_change", _previous(), "data-a", SETTINGS)
    assert not d.train and d.previous_run_id == "run-1" and d.changed == []
    assert d.reason == "data and training settings unchanged since run run-1"
    assert retraining.decision_tags(d) == {
        "qabot.data_fingerprint": "data-a",
        "qabot.train_config_fingerprint": retraining.fingerprint(SETTINGS),
        "qabot.retrain": "skipped",
        "qabot.retrain_reason": d.reason,
        "qabot.previous_run_id": "run-1",
    }


def test_always_trains_even_when_nothing_changed_and_says_so():
    d = decide_retraining("always", _previous(), "data-a", SETTINGS)
    assert d.train and d.reason == "retrain: always (data and training settings unchanged since run run-1)"
    assert retraining.decision_tags(d)["qabot.retrain"] == "trained"


def test_changed_data_retrains_naming_the_data():
    d = decide_retraining("on_change", _previous(), "data-b", SETTINGS)
    assert d.train and d.changed == ["data"]
    assert d.reason == "data changed (data-a → data-b)"


def test_changed_training_setting_retrains_naming_the_key():
    cfg = CONFIG.model_copy(deep=True)
    cfg.training.learning_rate = 0.5
    cfg.models[0].epochs = 9
    d = decide_retraining("on_change", _previous(), "data-a", train_config(cfg, FILES))
    first = cfg.models[0].name
    assert d.train and d.changed == [f"models.{first}.epochs", "training.learning_rate"]
    assert d.reason == f"training settings changed: models.{first}.epochs, training.learning_rate"


def test_both_changed_name_both():
    cfg = CONFIG.model_copy(deep=True)
    cfg.lora.r = 4
    d = decide_retraining("on_change", _previous(), "data-b", train_config(cfg, FILES))
    assert d.train and d.changed == ["data", "lora.r"]
    assert d.reason == "data changed (data-a → data-b); training settings changed: lora.r"


def test_no_previous_run_trains():
    d = decide_retraining("on_change", None, "data-a", SETTINGS)
    assert d.train and d.reason == "no previous successful run" and d.previous_run_id is None
    assert "qabot.previous_run_id" not in retraining.decision_tags(d)


def test_new_base_model_files_or_an_added_model_count_as_changes():
    name = CONFIG.models[0].name
    d = decide_retraining("on_change", _previous(), "data-a", train_config(CONFIG, {**FILES, name: "newer"}))
    assert d.train and d.changed == [f"models.{name}.base_files"]
    cfg = CONFIG.model_copy(deep=True)
    cfg.models = cfg.models[:2]
    assert changed_settings(SETTINGS, train_config(cfg, FILES)) == [
        f"models.{CONFIG.models[2].name} (removed)"
    ]
    assert changed_settings(train_config(cfg, FILES), SETTINGS) == [f"models.{CONFIG.models[2].name} (added)"]


def test_name_tracking_inference_and_isolation_are_not_training_settings():
    cfg = CONFIG.model_copy(deep=True)
    cfg.name, cfg.process_isolation, cfg.retrain = "other", False, "on_change"
    cfg.tracking.experiment, cfg.inference.max_new_tokens = "elsewhere", 7
    assert train_config(cfg, FILES) == SETTINGS


def test_settings_not_recorded_still_retrain_without_naming_keys():
    other = {**SETTINGS, "device": '"cuda"'}
    d = decide_retraining("on_change", _previous(settings=None), "data-a", other)
    assert d.train and d.reason == "training settings changed" and d.changed == ["training settings"]


def test_what_a_run_records_is_what_the_next_run_compares(tmp_path, monkeypatch):
    """record_retraining -> last_trained_run through MLflow: only finished runs of the same config name that
    trained count, and the comparison's results come back as typed records."""
    from pipeline_lib.tracking import TrackingTarget, make_tracker

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tracking = TrackingTarget(uri=(tmp_path / "mlruns").as_uri(), experiment="retrain")
    tracker = make_tracker(tracking)
    assert runs.last_trained_run(tracking, "smoke") is None

    def parent(name: str, decision, status: str) -> str:
        run_id = tracker.start_run(name, tags={retraining.NAME_TAG: name})
        runs.record_retraining(tracking, run_id, decision, SETTINGS)
        tracker.end_run(run_id, status)
        return run_id

    trained = decide_retraining("on_change", None, "data-a", SETTINGS)
    first = tracker.start_run("smoke", tags={retraining.NAME_TAG: "smoke"})
    runs.record_retraining(tracking, first, trained, SETTINGS)
    result = fakes.model_result(tmp_path, "llama-tiny", 2.0)
    job = CompareJob(results=[result], out_dir=str(tmp_path / "report"), title="t", tracking=tracking)
    compare_stage(job.model_copy(update={"parent_run_id": first}))  # records the results with the report
    tracker.end_run(first, "FINISHED")
    parent("smoke", trained.model_copy(update={"data_fingerprint": "data-x"}), "FAILED")  # not finished
    parent("other", trained.model_copy(update={"data_fingerprint": "data-y"}), "FINISHED")  # another name
    skipped = decide_retraining("on_change", _previous(run_id=first), "data-a", SETTINGS)
    parent("smoke", skipped.model_copy(update={"data_fingerprint": "data-z"}), "FINISHED")  # did not train

    previous = runs.last_trained_run(tracking, "smoke")
    assert previous == PreviousRun(
        run_id=first,
        data_fingerprint="data-a",
        train_config_fingerprint=retraining.fingerprint(SETTINGS),
        train_config=SETTINGS,
    )
    back = runs.previous_results(tracking, first)  # (NaN metrics: compared as JSON)
    assert [r.model_dump_json() for r in back] == [result.model_dump_json()]
    assert runs.previous_results(tracking, "no-such-run") is None
    assert not decide_retraining("on_change", previous, "data-a", SETTINGS).train


@pytest.mark.parametrize(
    ("env", "gpus", "slots"),
    [
        ({}, 0, 1),
        ({}, 2, 2),
        ({"CUDA_VISIBLE_DEVICES": "1"}, 4, 1),
        ({"CUDA_VISIBLE_DEVICES": "0,1,-1,2"}, 4, 2),
        ({"CUDA_VISIBLE_DEVICES": ""}, 4, 1),
        ({"QABOT_GPU_SLOTS": "3", "CUDA_VISIBLE_DEVICES": "0"}, 1, 3),
    ],
)
def test_gpu_slots_one_per_visible_gpu_at_least_one(tmp_path, env, gpus, slots):
    from pipeline_lib.devices import gpu_slots

    for k in range(gpus):
        (tmp_path / f"0000:0{k}:00.0").mkdir()
    assert gpu_slots(env, tmp_path) == slots


def test_bad_gpu_slots_is_one_line():
    from pipeline_lib.devices import gpu_slots

    with pytest.raises(ValueError, match=r"^QABOT_GPU_SLOTS='0': expected a whole number of at least 1$"):
        gpu_slots({"QABOT_GPU_SLOTS": "0"})


def test_the_compared_training_settings_never_hold_the_data_source():
    from pipeline_lib.config import load_config
    from pipeline_lib.overrides import apply_overrides
    from pipeline_lib.retraining import train_config

    signed = "https://example.com/a.json?X-Amz-Signature=S3CRET"
    config = apply_overrides(load_config("smoke"), [f"data.source={signed}"])
    settings = train_config(config, {m.name: "fp" for m in config.models})
    assert "S3CRET" not in repr(settings) and not any(k.startswith("data") for k in settings)
