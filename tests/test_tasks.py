"""The Prefect tasks' cache keys: every input fingerprint is part of the key, tracking arguments are not.

Keys are computed with each task's own cache policy (what Prefect does before running it), no server needed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import fakes
import pytest

from pipeline_lib.config import load_config
from pipeline_lib.tracking import TrackingTarget
from tasks import stages
from tasks.progress import ProgressSpan

CONFIG = load_config("smoke")
SPEC = CONFIG.models[0]
PREPARED = {"fingerprint": "data-a", "train_path": "/d/train.jsonl", "eval_path": "/d/eval.jsonl"}
MODEL = fakes.resolved("llama-tiny")
TOKENIZED = fakes.tokenized("llama-tiny")
SETTINGS = CONFIG.train_settings()
TRAINED = fakes.trained("llama-tiny")
TRACKING = TrackingTarget(uri="http://127.0.0.1:5000", experiment="qabot-smoke")
OTHER_TRACKING = TrackingTarget(uri="http://127.0.0.1:5999", experiment="elsewhere", system_metrics=False)

# task -> (inputs, {input: changed value that must change the key}, {input: changed value that must not})
CASES = {
    "clean_data": (
        {"acquired": {"sha256": "raw-a", "path": "/r"}, "data": CONFIG.data},
        {"acquired": {"sha256": "raw-b", "path": "/r"}, "data": CONFIG.data.model_copy(update={"seed": 1})},
        {},
    ),
    "tokenize_data": (
        {"prepared": PREPARED, "model": MODEL, "max_length": 256, "use_fast": None, "long_rows": "cut"},
        {
            "prepared": {**PREPARED, "fingerprint": "data-b"},
            "model": MODEL.model_copy(update={"fingerprint": "model-b"}),
            "max_length": 128,
            "use_fast": False,
            "long_rows": "drop",
        },
        {},
    ),
    "train_model": (
        {
            "model": MODEL,
            "tokenized": TOKENIZED,
            "spec": SPEC,
            "settings": SETTINGS,
            "parent_run_id": "p1",
            "tracking": TRACKING,
        },
        {
            "model": MODEL.model_copy(update={"fingerprint": "model-b"}),
            "tokenized": TOKENIZED.model_copy(update={"fingerprint": "tok-b"}),
            "spec": SPEC.model_copy(update={"epochs": 2.0}),
            "settings": SETTINGS.model_copy(update={"lora": SETTINGS.lora.model_copy(update={"r": 4})}),
        },
        {
            "parent_run_id": "p2",
            "tracking": OTHER_TRACKING,
            "progress": ProgressSpan(artifact_id="a", start=50.0, share=50.0),
        },
    ),
    "merge_model": (
        {
            "trained": TRAINED,
            "model": MODEL,
            "tokenized": TOKENIZED,
            "settings": SETTINGS,
            "merge": CONFIG.merge,
            "tracking": TRACKING,
            "registered_name": "x",
        },
        {
            "trained": TRAINED.model_copy(update={"adapter_fingerprint": "adapter-b"}),
            "model": MODEL.model_copy(update={"fingerprint": "model-b"}),
            "settings": SETTINGS.model_copy(update={"device": "cuda"}),
            "merge": CONFIG.merge.model_copy(update={"max_loss_delta": 0.5}),
        },
        {"tracking": OTHER_TRACKING},
    ),
    "answer_questions": (
        {
            "model_name": "llama-tiny",
            "phase": "after",
            "model_dir": "/mm",
            "model_fingerprint": "merged-a",
            "inference": CONFIG.inference,
            "settings": SETTINGS,
            "run_id": "r1",
            "tracking": TRACKING,
        },
        {
            "phase": "before",
            "model_fingerprint": "merged-b",
            "inference": CONFIG.inference.model_copy(update={"max_new_tokens": 5}),
        },
        {"run_id": "r2", "tracking": OTHER_TRACKING},
    ),
}


def _key(task, inputs: dict) -> str:
    ctx = SimpleNamespace(task=task)
    return task.cache_policy.compute_key(task_ctx=ctx, inputs=copy.deepcopy(inputs), flow_parameters={})


@pytest.mark.parametrize("name", sorted(CASES))
def test_cache_key_follows_every_input_fingerprint(name):
    task = getattr(stages, name)
    inputs, changes, _ = CASES[name]
    base = _key(task, inputs)
    assert base and base == _key(task, inputs)  # stable
    for field, value in changes.items():
        assert _key(task, {**inputs, field: value}) != base, f"{name}: {field} must change the cache key"


@pytest.mark.parametrize("name", sorted(CASES))
def test_cache_key_ignores_where_results_are_logged(name):
    task = getattr(stages, name)
    inputs, _, tracking_only = CASES[name]
    base = _key(task, inputs)
    for field, value in tracking_only.items():
        assert _key(task, {**inputs, field: value}) == base, f"{name}: {field} must not change the cache key"


def test_every_heavy_task_is_cached_on_its_inputs():
    for name in CASES:
        task = getattr(stages, name)
        assert task.persist_result, name
    assert set(CASES) | {"acquire_data"} >= {
        n for n in dir(stages) if getattr(getattr(stages, n), "persist_result", False)
    }


def test_acquire_key_follows_the_data(tmp_path):
    from pipeline_lib.config import DataConfig

    f = tmp_path / "d.json"
    f.write_text("[]")
    data = DataConfig(source=str(f))
    first = stages._acquire_key(None, {"data": data})
    assert first == stages._acquire_key(None, {"data": data})
    f.write_text('[{"instruction": "a", "input": "", "output": "b"}]')
    assert stages._acquire_key(None, {"data": data}) != first
    builtin = DataConfig(source="builtin:smoke_alpaca.jsonl")
    assert stages._acquire_key(None, {"data": builtin}) == stages._acquire_key(None, {"data": builtin})
    hub = DataConfig(source="tatsu-lab/alpaca")  # cannot know without fetching: never reused
    assert stages._acquire_key(None, {"data": hub}) != stages._acquire_key(None, {"data": hub})


def test_the_acquire_key_of_a_signed_url_holds_no_secret():
    """Prefect stores the key in plain text (the result's file name): a pinned URL's key hashes the URL with
    its secrets redacted, so a re-signed URL of the same file reuses the cache."""
    from pipeline_lib.config import DataConfig

    pinned = "a" * 64
    signed = "https://example.com/a.json?X-Amz-Signature=S3CRETSIG&X-Amz-Credential=S3CRETCRED"
    key = stages._acquire_key(None, {"data": DataConfig(source=signed, sha256=pinned)})
    assert "S3CRET" not in key and "example.com" not in key and key.endswith(":" + pinned)
    resigned = signed.replace("S3CRETSIG", "OTHERSIG")
    assert stages._acquire_key(None, {"data": DataConfig(source=resigned, sha256=pinned)}) == key
    other = DataConfig(source="https://example.com/b.json?X-Amz-Signature=S3CRETSIG", sha256=pinned)
    assert stages._acquire_key(None, {"data": other}) != key


# ---- caches that heal ------------------------------------------------------------------------------------------


def _store(tmp_path):
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore

    return ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path / "results")))


def test_a_cached_result_whose_outputs_are_gone_is_computed_again(tmp_path, caplog):
    """The key a task's policy gives when the result cached under it names files that were deleted: the next
    key of its chain (nothing cached there: the task runs), and that key from then on while its files exist."""
    store = _store(tmp_path)
    ctx = SimpleNamespace(task=stages.clean_data, result_store=store)
    inputs = CASES["clean_data"][0]
    out = tmp_path / "home" / "data" / "clean-x"

    def compute() -> dict:  # what the task would write and return
        out.mkdir(parents=True, exist_ok=True)
        for name in ("clean", "train", "eval"):
            (out / f"{name}.jsonl").write_text("{}\n")
        (out / "audit.json").write_text("{}")
        return {f"{n}_path": str(out / f"{n}.{'json' if n == 'audit' else 'jsonl'}")
                for n in ("clean", "train", "eval", "audit")} | {"fingerprint": "f"}  # fmt: skip

    def key() -> str:
        return stages.clean_data.cache_policy.compute_key(task_ctx=ctx, inputs=inputs, flow_parameters={})

    base = key()
    assert base == _key(stages.clean_data, inputs)  # nothing cached: the plain key
    store.write(compute(), key=base)
    assert key() == base  # cached, outputs present: a cache hit
    (out / "audit.json").unlink()
    with caplog.at_level("WARNING"):
        assert key() == base + ".1"  # outputs gone: a key with nothing cached, so the task runs again
    assert "clean-data: the cached result names outputs that are gone" in caplog.text
    assert str(out / "audit.json") in caplog.text
    store.write(compute(), key=base + ".1")
    assert key() == base + ".1"  # the newest record is used from then on
    import shutil

    shutil.rmtree(tmp_path / "home")
    assert key() == base + ".2"
    (tmp_path / "results" / base).write_bytes(b"not a record")  # unreadable old records do not matter
    store.write(compute(), key=base + ".2")
    assert key() == base + ".2"


def test_every_cached_task_heals_and_every_result_names_its_outputs():
    from tasks.caching import Healing, recorded_outputs

    for name in (*CASES, "acquire_data"):
        assert isinstance(getattr(stages, name).cache_policy, Healing), name
    results = {
        "acquire": {"path": "/r/raw.json", "sha256": "s", "source": "x"},
        "clean": {
            "clean_path": "/c",
            "train_path": "/t",
            "eval_path": "/e",
            "audit_path": "/a",
            "rows_in": 1,
        },
        "tokenized": TOKENIZED,
        "trained": TRAINED,
        "merged": fakes.merged("llama-tiny"),
        "answered": fakes.answered("llama-tiny", path="/ans.jsonl"),
    }
    assert {k: sorted(recorded_outputs(v)) for k, v in results.items()} == {
        "acquire": ["/r/raw.json"],
        "clean": ["/a", "/c", "/e", "/t"],
        "tokenized": ["/t/llama-tiny/eval", "/t/llama-tiny/train"],
        "trained": ["/a", "/m/llama-tiny"],
        "merged": ["/mm/llama-tiny"],
        "answered": ["/ans.jsonl"],
    }


def test_the_train_task_moves_the_progress_artifact_as_the_stage_writes_its_progress_file(
    monkeypatch, tmp_path
):
    """While the stage trains, its progress file (step of max_steps) moves the run's progress artifact within
    this model's share; at the end the model's share is full."""
    import json
    import time

    from tasks import progress as progress_mod

    monkeypatch.setenv("QABOT_HOME", str(tmp_path))
    seen: list[tuple[float, str | None]] = []
    monkeypatch.setattr(
        progress_mod,
        "update",
        lambda span, fraction, note=None: seen.append((round(span.start + span.share * fraction, 1), note)),
    )

    def fake_call(fn, job, **kwargs):  # the stage: writes its progress file as it goes
        job_dir = Path(job.out_dir)
        job_dir.mkdir(parents=True, exist_ok=True)
        for step in (2, 4):
            (job_dir / "progress.json").write_text(json.dumps({"step": step, "max_steps": 4}))
            time.sleep(2.3)
        return TRAINED

    monkeypatch.setattr(stages.isolation, "call", fake_call)
    span = ProgressSpan(artifact_id="a", start=50.0, share=50.0)
    result = stages.train_model.fn(MODEL, TOKENIZED, SPEC, SETTINGS, None, TRACKING, span)
    assert result == TRAINED
    percents = [p for p, _ in seen]
    assert percents[0] == 75.0 and percents[-1] == 100.0 and percents == sorted(percents), seen
    assert seen[-1][1] == f"{SPEC.name}: trained" and f"{SPEC.name}: 50% of its steps" in [n for _, n in seen]


def test_the_tokenize_task_keeps_prints_out_of_the_log():
    """`datasets` fingerprints functions with dill, which reads their globals from a `dis.dis` printout it
    captures on stdout. With the flow's log_prints, Prefect logs each of those prints instead: the run's log in
    the UI filled with bytecode and dill saw no globals. The tokenize task turns log_prints off."""
    import dill.detect

    assert stages.tokenize_data.log_prints is False
    # dill's own capture works when print reaches sys.stdout (as it does in that task)
    assert "json" in dill.detect.nestedglobals(lambda: json.dumps(1))  # noqa: F821 - a name to find, not run
