"""Every preset and every deployment parses and validates; bad configs fail with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline_lib.config import PROFILES, ConfigError, RunConfig, load_config, parse_config
from pipeline_lib.files import fingerprint

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("profile", PROFILES)
def test_every_preset_validates(profile):
    cfg = load_config(profile)
    assert cfg.profile == profile
    assert len(cfg.models) == 3
    assert parse_config(cfg.model_dump(mode="json")) == cfg  # round trip


def test_report_preset_is_the_reports_setup():
    cfg = load_config("report")
    by = {m.base_model: m for m in cfg.models}
    assert (by["openlm-research/open_llama_3b"].epochs, by["openlm-research/open_llama_3b"].batch_size) == (
        2,
        4,
    )
    assert (by["bigscience/bloom-3b"].epochs, by["bigscience/bloom-3b"].batch_size) == (1, 2)
    assert (by["tiiuae/falcon-rw-1b"].epochs, by["tiiuae/falcon-rw-1b"].batch_size) == (1, 1)
    assert cfg.training.warmup_ratio == 0.1 and cfg.training.lr_scheduler == "linear"
    q = cfg.quantization
    assert (q.load_in_4bit, q.quant_type, q.double_quant, q.compute_dtype) == (True, "nf4", True, "bfloat16")
    assert cfg.training.gpu_memory_gib == 8
    assert cfg.data.source == "tatsu-lab/alpaca"


def test_smoke_uses_only_local_things():
    cfg = load_config("smoke")
    assert {m.base_model for m in cfg.models} == {"tiny:llama", "tiny:bloom", "tiny:falcon"}
    assert cfg.data.source.startswith("builtin:") and cfg.device == "cpu"


def test_every_deployment_parameter_validates():
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = set()
    for dep in doc["deployments"]:
        names.add(dep["name"])
        cfg = parse_config(dep["parameters"]["config"], f"deployment {dep['name']}")
        assert cfg.profile in PROFILES
        assert dep["work_pool"]["name"] == "qabot-process"
        assert dep["entrypoint"] == "flows/finetune_compare.py:finetune_compare"
    assert {"smoke", "report", "report-weekly"} <= names


def test_every_field_is_described():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            for sub in getattr(ann, "__args__", ()) + (ann,):
                if isinstance(sub, type) and hasattr(sub, "model_fields"):
                    walk(sub)

    walk(RunConfig)


def test_overrides_start_from_preset():
    cfg = parse_config({"profile": "smoke", "training": {"learning_rate": 0.01}})
    assert cfg.training.learning_rate == 0.01
    assert cfg.training.warmup_ratio == load_config("smoke").training.warmup_ratio


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"profile": "smoke", "models": []}, "models"),
        ({"profile": "smoke", "models": [{"name": "a", "base_model": "tiny:llama"}] * 2}, "unique"),
        ({"profile": "smoke", "data": {"eval_fraction": 0.9}}, "data.eval_fraction"),
        ({"profile": "smoke", "models": [{"name": "a", "base_model": "x", "epochs": 0}]}, "models.0.epochs"),
        ({"profile": "smoke", "training": {"optimizer": "paged_adamw_8bit"}}, "paged"),
        ({"profile": "smoke", "lora": {"rank": 8}}, "lora.rank"),
        ({"profile": "smoke", "data": {"sha256": "xyz"}}, "data.sha256"),
    ],
)
def test_bad_config_is_one_clear_line(data, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(data, "cfg.yaml")
    msg = str(e.value)
    assert "\n" not in msg and needle in msg and msg.startswith("cfg.yaml")


def test_config_files(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("profile: smoke\nname: mine\n")
    assert load_config(path=f).name == "mine"
    f.write_text("profile: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path=f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(path=tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="unknown profile"):
        load_config("huge")


def test_fingerprint_is_stable_and_sensitive():
    a, b = load_config("smoke"), load_config("smoke")
    assert fingerprint(a) == fingerprint(b)
    b.training.learning_rate = 0.5
    assert fingerprint(a) != fingerprint(b)
