"""Every preset and every deployment parses and validates; bad configs fail with one clear line."""

from __future__ import annotations

import copy
import math
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipeline_lib.config import OPTIMIZERS, PROFILES, ConfigError, RunConfig, load_config, parse_config
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


# ---- bad inputs caught before any work (issue 11, point 9) -----------------------------------------------------


def test_an_unknown_profile_in_a_file_lists_the_presets(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("profile: nope\nname: mine\n")
    with pytest.raises(ConfigError) as e:
        load_config(path=f)
    assert str(e.value) == (
        f"{f}: profile: unknown profile 'nope'; choose one of: smoke, report (or custom for a config of your own)"
    )
    with pytest.raises(ConfigError, match=r"profile: unknown profile 'reprot' \(did you mean 'report'\?\)"):
        parse_config({"profile": "reprot", "models": [{"name": "a", "base_model": "tiny:llama"}]})
    with pytest.raises(ValidationError, match="unknown profile 'nope'"):  # as a flow parameter, too
        RunConfig.model_validate({**load_config("smoke").model_dump(), "profile": "nope"})
    custom = parse_config({"profile": "custom", "models": [{"name": "a", "base_model": "tiny:llama"}]})
    assert custom.profile == "custom" and custom.data.source == "tatsu-lab/alpaca"


def _float_fields(model, prefix=""):
    """Dotted paths of every float field of the config (a list of models: its first entry)."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        args = typing.get_args(field.annotation) or (field.annotation,)
        if float in args:
            yield path
        below = f"{path}.0." if typing.get_origin(field.annotation) is list else f"{path}."
        for sub in args:
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                yield from _float_fields(sub, below)


def _with(data: dict, path: str, value) -> dict:
    data = copy.deepcopy(data)
    node = data
    *parents, last = path.split(".")
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[last] = value
    return data


def test_nan_and_infinity_are_refused_in_every_numeric_field():
    base = load_config("smoke").model_dump(mode="json")
    paths = list(_float_fields(RunConfig))
    assert {"models.0.epochs", "training.learning_rate", "data.eval_fraction", "merge.max_loss_delta"} <= set(
        paths
    )
    assert len(paths) >= 15, paths
    for path in paths:
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ConfigError) as e:
                parse_config(_with(base, path, bad), "c.yaml")
            assert str(e.value).startswith(f"c.yaml: {path}: "), (path, bad, str(e.value))


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("models.0.epochs", 1e-9, "Input should be greater than or equal to 0.01"),
        ("models.0.epochs", 1e6, "Input should be less than or equal to 100"),
        ("models.0.learning_rate", 1e9, "Input should be less than or equal to 1"),
        ("training.learning_rate", 1e9, "Input should be less than or equal to 1"),
        ("models.0.max_length", 32, "Input should be greater than or equal to 64"),
        ("training.optimizer", "adamw_bogus",
         "unknown optimizer 'adamw_bogus' (did you mean 'adamw_8bit'?); choose one of: adamw_torch, "),
        ("models.0.base_model", "tiny:gpt2",
         "unknown tiny architecture 'tiny:gpt2'; choose one of: tiny:llama, tiny:bloom, tiny:falcon"),
        ("lora.target_modules", [],
         "an empty list adapts no layer; name layers (e.g. [q_proj, v_proj]) or use all-linear"),
        ("lora.target_modules", ["q proj"], "'q proj' is not a module name"),
        ("lora.target_modules", "q_proj",
         "'q_proj' is neither all-linear nor a list of module names; for one module write [q_proj]"),
    ],
)  # fmt: skip
def test_absurd_values_are_refused_naming_the_key(path, value, message):
    with pytest.raises(ConfigError) as e:
        parse_config(_with(load_config("smoke").model_dump(mode="json"), path, value), "c.yaml")
    assert str(e.value).startswith(f"c.yaml: {path}: {message}"), str(e.value)
    assert "\n" not in str(e.value)


def test_sensible_values_at_the_bounds_pass():
    base = load_config("smoke").model_dump(mode="json")
    for path, value in (("models.0.epochs", 0.01), ("models.0.epochs", 100), ("training.learning_rate", 1),
                        ("models.0.max_length", 64), ("training.optimizer", "paged_adamw_8bit"),
                        ("lora.target_modules", ["q_proj", "self_attn.v_proj"])):  # fmt: skip
        data = _with(base, path, value)
        if path == "training.optimizer":
            data["device"] = "cuda"
        parse_config(data)


def test_every_allowed_optimizer_is_one_transformers_knows():
    """Read from transformers' source (`OptimizerNames`), not imported: importing it takes seconds."""
    import ast
    import importlib.util

    source = Path(importlib.util.find_spec("transformers").origin).with_name("training_args.py").read_text()
    enum = next(
        n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == "OptimizerNames"
    )
    known = {
        a.value.value for a in enum.body if isinstance(a, ast.Assign) and isinstance(a.value, ast.Constant)
    }
    assert len(known) > 20 and set(OPTIMIZERS) <= known, set(OPTIMIZERS) - known
    assert {"adamw_torch", "paged_adamw_8bit"} <= set(OPTIMIZERS)


@pytest.mark.parametrize("prefect_file", ["prefect.yaml", "deploy/k8s-gpu/prefect.yaml"])
def test_every_deployment_parameter_passes_the_prefect_servers_schema_check(prefect_file):
    """What the Prefect server does before it creates a flow run of a deployment (`prefect deployment run`, the
    UI's Run button, a schedule): the deployment's parameters, checked against the flow's parameter schema as
    `prefect deploy` records it. A preset (`{profile: smoke}`) passes before the flow fills in its models."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    from flows.finetune_compare import finetune_compare

    schema = parameter_schema(finetune_compare).model_dump_for_openapi()
    for dep in yaml.safe_load((ROOT / prefect_file).read_text())["deployments"]:
        assert dep.get("enforce_parameter_schema", True), dep["name"]
        validate(dep["parameters"], schema, raise_on_error=True)
    with pytest.raises(Exception, match="config"):  # the check is real: a wrong type is refused
        validate({"config": {"profile": "smoke", "models": "llama"}}, schema, raise_on_error=True)
