"""Bad input is caught before the work starts, in one line naming the key; secrets of a source URL are never
recorded. In-process: `--set` overrides and presets, LoRA targets in pre-flight, the tokenize stage's room
check, and what the parent run records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fakes
import pytest
import yaml

from pipeline_lib.config import ConfigError, load_config
from pipeline_lib.overrides import apply_overrides, load_run_config

SMOKE = load_config("smoke")
ROOT = Path(__file__).resolve().parent.parent


def qabot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_bad_inputs_stop_before_any_work_with_one_line(tmp_path):
    """The command line: exit code and the one line on stderr of a wrong preset in a file and of a `--set` typo,
    and `--set profile=` at work (every case is tested in-process below)."""
    f = tmp_path / "c.yaml"
    f.write_text("profile: nope\n")
    proc = qabot("run", "--config", str(f), "--no-services", "--no-track")
    assert (proc.returncode, proc.stderr) == (
        2,
        f"qabot: error: {f}: profile: unknown profile 'nope'; choose one of: smoke, report "
        "(or custom for a config of your own)\n",
    )
    proc = qabot("run", "--set", "training.learnig_rate=1", "--no-services", "--no-track")
    assert (proc.returncode, proc.stderr) == (
        2,
        "qabot: error: --set training.learnig_rate: unknown key 'learnig_rate' in training; "
        "did you mean 'training.learning_rate'?\n",
    )
    proc = qabot("config", "show", "--set", "profile=report", "--set", "models.0.max_steps=20")
    shown = yaml.safe_load(proc.stdout)
    assert proc.returncode == 0 and (shown["profile"], shown["device"]) == ("report", "cuda")
    assert shown["models"][0]["base_model"] == "openlm-research/open_llama_3b"
    assert shown["models"][0]["max_steps"] == 20


# ---- --set ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("training.learnig_rate=1", "--set training.learnig_rate: unknown key 'learnig_rate' in training; "
                                    "did you mean 'training.learning_rate'?"),
        ("zzz=1", "--set zzz: unknown key 'zzz' in the config; known keys: name, profile, device, "),
        ("models.5.max_steps=3", "--set models.5.max_steps: models has 3 entries, so '5' is not one of its "
                                 "indexes (0 to 2)"),
        ("models.x.max_steps=3", "--set models.x.max_steps: models has 3 entries, so 'x' is not one of its "
                                 "indexes (0 to 2)"),
        ("data.seed.x=1", "--set data.seed.x: data.seed is a number (42), not a section with keys"),
        ("models.0.epochs=abc", "--set models.0.epochs: Input should be a valid number, unable to parse string "
                                "as a number (got 'abc')"),
        ("models.0.epochs=[1", "--set models.0.epochs: value '[1' is not valid YAML"),
        ("models.0.epochs=.inf", "--set models.0.epochs: Input should be a finite number (got inf)"),
        ("training.learning_rate=.nan", "--set training.learning_rate: Input should be a finite number (got nan)"),
        ("training.learning_rate=1e9", "--set training.learning_rate: Input should be less than or equal to 1"),
        ("models.0.max_length=32", "--set models.0.max_length: Input should be greater than or equal to 64 "
                                   "(got 32)"),
        ("device=gpu", "--set device: Input should be 'auto', 'cpu' or 'cuda' (got 'gpu')"),
        ("training.optimizer=adam_w", "--set training.optimizer: unknown optimizer 'adam_w' "),
        ("nokey", "--set 'nokey': expected KEY=VALUE, e.g. training.learning_rate=1e-4"),
        ("=3", "--set '=3': expected KEY=VALUE"),
    ],
)  # fmt: skip
def test_set_errors_name_the_key(item, message):
    with pytest.raises(ConfigError) as e:
        apply_overrides(SMOKE, [item])
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_set_changes_what_it_names_only():
    cfg = apply_overrides(
        SMOKE, ["models.1.max_steps=7", "lora.target_modules=[q_proj, v_proj]", "training.learning_rate=1e-3"]
    )
    assert cfg.models[1].max_steps == 7 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.training.learning_rate == 1e-3
    changed = {"models", "lora", "training"}
    assert {k: v for k, v in cfg.model_dump().items() if k not in changed} == {
        k: v for k, v in SMOKE.model_dump().items() if k not in changed
    }


def test_set_profile_loads_that_preset_then_the_other_overrides(tmp_path):
    report = load_config("report")
    assert load_run_config(sets=["profile=report"]) == report  # the preset itself, not smoke relabelled
    cfg = load_run_config("smoke", None, ["models.0.max_steps=20", "profile=report"])
    assert cfg.profile == "report" and cfg.models[0].max_steps == 20
    assert cfg.model_copy(update={"models": report.models}) == report
    assert load_run_config("report", None, ["profile=smoke"]) == SMOKE
    f = tmp_path / "c.yaml"  # a file starting from smoke: its settings over the report preset instead
    f.write_text("profile: smoke\nname: mine\ntraining: {warmup_ratio: 0.2}\n")
    cfg = load_run_config(None, f, ["profile=report"])
    assert (cfg.profile, cfg.name, cfg.training.warmup_ratio) == ("report", "mine", 0.2)
    assert cfg.models == report.models and cfg.device == "cuda"
    for bad in ("nope", "custom"):
        with pytest.raises(ConfigError) as e:
            load_run_config(sets=[f"profile={bad}"])
        assert str(e.value) == f"--set profile: unknown preset '{bad}'; choose one of: smoke, report"


# ---- pre-flight: LoRA targets --------------------------------------------------------------------------------


def test_lora_targets_that_match_no_layer_are_named_in_preflight():
    """On each model's structure built without weights (tiny:bloom and tiny:falcon share layer names)."""
    from pipeline_lib.preflight import check_lora_targets, check_run

    cfg = apply_overrides(SMOKE, ["models=[{name: b, base_model: 'tiny:bloom'}]"])
    ok = apply_overrides(cfg, ["lora.target_modules=[query_key_value, mlp.dense_4h_to_h]"])
    assert check_lora_targets(ok) == []
    assert check_lora_targets(cfg) == []  # all-linear
    bad = apply_overrides(cfg, ["lora.target_modules=[query_key_value, bogus, q_proj]"])
    assert check_run(bad) == [
        "lora.target_modules: 'bogus', 'q_proj' match no linear layer of models.0 (b, tiny:bloom); its linear "
        "layers: dense, dense_4h_to_h, dense_h_to_4h, query_key_value"
    ]


# ---- the tokenize stage: room for an answer ------------------------------------------------------------------


def test_a_max_length_that_leaves_no_room_stops_tokenizing_with_what_would(tiny_models, tmp_path):
    from pipeline_lib.contracts import ResolvedModel
    from pipeline_lib.synthetic import alpaca_rows
    from pipeline_lib.tokenization import TokenizeJob, TooFewRowsError, check_room, tokenize_stage

    rows = alpaca_rows(40, seed=1)
    for r in rows[:30]:
        r["input"] = " ".join(["some context words"] * 10)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = ResolvedModel(
        name="bloom-tiny", base_model="tiny:bloom", path=tiny_models["bloom"], revision=None, fingerprint="f",
        arch="bloom", source="tiny",
    )  # fmt: skip
    job = TokenizeJob(
        train_path=str(train), eval_path=str(train), data_fingerprint="d", model=model, max_length=64,
        out_dir=str(tmp_path / "tok"),
    )  # fmt: skip
    with pytest.raises(TooFewRowsError) as e:
        tokenize_stage(job)
    assert str(e.value) == (
        "bloom-tiny: max_length 64 leaves room for an answer in 9 of 40 training rows (in 31 the prompt alone "
        "is longer); set the model's max_length to at least 112, where half the rows fit whole"
    )
    split = fakes.split("bloom-tiny", "train").model_copy(
        update={"n_input_rows": 40, "n_rows": 9, "n_dropped": 31, "n_dropped_prompt": 31}
    )
    with pytest.raises(TooFewRowsError, match="in 9 of 40 training rows"):
        check_room(job, split)
    check_room(job, split.model_copy(update={"n_rows": 30, "n_dropped": 10, "n_dropped_prompt": 10}))
    with pytest.raises(TooFewRowsError, match="in 0 of 40 training rows"):
        check_room(job, split.model_copy(update={"n_rows": 0, "n_dropped": 40, "n_dropped_prompt": 10}))


# ---- secrets in a source URL ---------------------------------------------------------------------------------

SIGNED = "https://example.com/a.json?X-Amz-Signature=S3CRETSIG&X-Amz-Credential=S3CRETCRED&part=1"
SHOWN = "https://example.com/a.json?X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED&part=1"


class RecordingTracker:
    def __init__(self):
        self.records = []

    def start_run(self, name, *, parent_id=None, tags=None):
        self.records.append(("start_run", name, tags))
        return "run-1"

    def log_params(self, run_id, params):
        self.records.append(("log_params", params))

    def log_dict(self, run_id, data, artifact_file):
        self.records.append(("log_dict", artifact_file, data))


def test_the_parent_run_records_no_secret_of_a_signed_url(monkeypatch):
    from pipeline_lib import runs
    from pipeline_lib.tracking import TrackingTarget

    tracker = RecordingTracker()
    monkeypatch.setattr(runs, "make_tracker", lambda target: tracker)
    cfg = apply_overrides(SMOKE, [f"data.source={SIGNED}", "data.sha256=" + "a" * 64])
    assert cfg.data.source == SIGNED  # the run itself downloads with the real URL
    runs.start_parent_run(cfg, TrackingTarget(uri="sqlite:///unused.db", experiment="x"), "flow-1")
    recorded = json.dumps(tracker.records, default=str)
    assert "S3CRET" not in recorded, recorded
    params = next(r[1] for r in tracker.records if r[0] == "log_params")
    assert params["data.source"] == SHOWN
    config_json = next(r[2] for r in tracker.records if r[0] == "log_dict" and r[1] == "config.json")
    assert config_json["data"]["source"] == SHOWN
    assert config_json == {**cfg.model_dump(mode="json"), "data": {**cfg.data.model_dump(), "source": SHOWN}}


def test_the_secret_reaches_only_the_tasks_that_download_with_it(monkeypatch):
    """The flow with every task replaced by a recorder (tests/test_flow.py): only pre-flight, the parent run
    (which redacts what it records) and the data tasks get the URL; the comparison's data line is redacted."""
    from test_flow import Recorder, _install

    from flows import finetune_compare as flow_module

    rec = Recorder()
    _install(monkeypatch, rec)
    flow_module.finetune_compare.fn(apply_overrides(SMOKE, [f"data.source={SIGNED}"]))
    holders = {name for name, kwargs in rec.calls if "S3CRET" in json.dumps(kwargs, default=repr)}
    # decide_retraining takes the config for its training sections only (retraining.train_config, no data)
    assert holders == {"preflight", "start_parent_run", "acquire_data", "clean_data", "decide_retraining"}
    (compare,) = rec.args("compare_models")
    assert compare["data"].startswith(SHOWN + ", ")
