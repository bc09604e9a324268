"""QLoRA training of the tiny Llama/Bloom/Falcon models on the CPU (4-bit NF4 through bitsandbytes), with a local
MLflow store: learning, logging, out-of-memory halving, resume after a kill, process isolation, memory plan."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import jobs
import pytest
from recorders import StepRecorder

from pipeline_lib import data as data_lib
from pipeline_lib import isolation, modeling, tokenization
from pipeline_lib.architectures import ARCHS  # noqa: E402  (every family in the registry)
from pipeline_lib.config import DataConfig, QuantizationConfig, load_config
from pipeline_lib.devices import GIB
from pipeline_lib.training import (
    BUDGET_HEADROOM,
    MemoryPlan,
    TrainJob,
    estimate_peak_gib,
    halve,
    plan_memory,
    train_stage,
)

MAX_LENGTH = 128
TRAIN_ROWS, EVAL_ROWS = 32, 8
BATCH = 4
STEPS = TRAIN_ROWS // BATCH  # one epoch
SAVE_STEPS = 3


# ---- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def prepared(work) -> dict:
    cfg = DataConfig(
        source="builtin:smoke_alpaca.jsonl",
        max_rows=TRAIN_ROWS + EVAL_ROWS,
        eval_fraction=EVAL_ROWS / (TRAIN_ROWS + EVAL_ROWS),
    )
    prep = data_lib.prepare(cfg.source, work / "data", cfg).to_dict()
    assert (prep["n_train"], prep["n_eval"]) == (TRAIN_ROWS, EVAL_ROWS)
    return prep


@pytest.fixture(scope="module")
def tokenized(tiny_models, prepared, work) -> dict:
    return {
        arch: jobs.tokenized(prepared, tiny_models[arch], MAX_LENGTH, work / f"tok-{arch}") for arch in ARCHS
    }


def _job(
    arch: str, models, tokenized, out_dir: Path, uri: str | None, experiment: str, **overrides
) -> TrainJob:
    """The job the flow's train task builds, with `overrides` (see tests/jobs.py)."""
    training = {"save_steps": SAVE_STEPS, **overrides.pop("training", {})}
    return jobs.train_job(
        arch,
        models[arch],
        tokenized[arch],
        out_dir,
        uri=uri,
        experiment=experiment,
        batch_size=BATCH,
        max_length=MAX_LENGTH,
        training=training,
        **overrides,
    )


def run_training(job: TrainJob, callbacks: list | None = None) -> dict:
    """The stage, its result as the JSON the flow passes on."""
    return train_stage(job, callbacks).to_json()


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str, experiment: str) -> list:
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _steps(uri: str, run_id: str, key: str) -> list[int]:
    return [m.step for m in _client(uri).get_metric_history(run_id, key)]


@pytest.fixture(scope="module")
def uri(work) -> str:
    return f"sqlite:///{work}/mlflow.db"


@pytest.fixture(scope="module")
def trained(tiny_models, tokenized, work, uri) -> dict[str, dict]:
    """One uninterrupted training per architecture, under one parent run (the reference for the other tests)."""
    from pipeline_lib.tracking import MlflowTracker, TrackingTarget

    parent = MlflowTracker(TrackingTarget(uri=uri, experiment="plain")).start_run("parent")
    out = {}
    extra = {
        "llama": {"system_metrics": True, "system_metrics_interval_s": 0.5},
        "bloom": {},
        "falcon": {},
    }
    for arch in ARCHS:
        job = _job(
            arch,
            tiny_models,
            tokenized,
            work / f"run-{arch}",
            uri,
            "plain",
            parent_run_id=parent,
            **extra[arch],
        )
        out[arch] = {"result": run_training(job), "parent": parent, "job": job}
    return out


# ---- 1. training on each architecture ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_qlora_training_learns_and_logs_everything(arch, trained, tokenized, uri):
    res, parent = trained[arch]["result"], trained[arch]["parent"]
    m = res["metrics"]
    assert m["steps"] == m["steps_run"] == STEPS and not res["resumed"] and m["oom_events"] == 0
    # It learned: the held-out loss fell, and the adapter moved away from its initialisation.
    assert m["eval_loss"] < m["eval_loss_before"] and m["bits_per_byte"] < m["bits_per_byte_before"], m
    check = modeling.check_adapter(res["adapter_dir"], model_name=arch)
    assert check["lora_B_max_abs"] > 0 and res["adapter_check"]["changed_tensors"] > 0
    assert res["quantization"]["share_4bit"] == 1.0

    client = _client(uri)
    run = client.get_run(res["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["qabot.arch"] == arch
    children = [r for r in _runs(uri, "plain") if r.data.tags.get("qabot.arch") == arch]
    assert len(children) == 1
    # Step-wise loss and learning rate, every step once.
    assert _steps(uri, res["run_id"], "loss") == list(range(1, STEPS + 1))
    lrs = client.get_metric_history(res["run_id"], "learning_rate")
    assert [x.step for x in lrs] == list(range(1, STEPS + 1)) and lrs[-1].value < max(x.value for x in lrs)
    evals = client.get_metric_history(res["run_id"], "eval_loss")
    assert [x.step for x in evals] == [0, STEPS] and evals[-1].value < evals[0].value
    metrics, params = run.data.metrics, run.data.params
    assert metrics["preflight.share_4bit"] == 1.0
    assert metrics["preflight.footprint_gib"] < metrics["preflight.bf16_footprint_gib"]
    assert metrics["preflight.trainable_params"] > 0 and metrics["peak_memory_gib"] > 0
    for p in ("base_model", "dataset_fingerprint", "tokenized_fingerprint", "lora.r", "quant.quant_type"):
        assert p in params, p
    assert params["lora.r"] == "8" and params["base_model"] == f"tiny:{arch}"
    assert params["per_device_train_batch_size"] == str(BATCH)  # the Trainer's own parameters too
    # Tokenized length statistics of the training split.
    stats = tokenized[arch].train.model_dump()
    assert metrics["tokens.mean"] == pytest.approx(stats["length_stats"]["mean"])
    assert metrics["tokens.p99"] == pytest.approx(stats["length_stats"]["p99"])
    assert metrics["tokens.truncated"] == stats["n_truncated"]
    assert metrics["tokens.dropped"] == stats["n_dropped"]
    assert metrics["tokens.rows"] == TRAIN_ROWS - stats["n_dropped"]
    arts = {a.path for a in client.list_artifacts(res["run_id"])}
    assert {"adapter", "preflight.json", "log_history.json"} <= arts
    if trained[arch]["job"].tracking.system_metrics:
        assert any(k.startswith("system/") for k in metrics), sorted(metrics)


# ---- 2. out-of-memory halving --------------------------------------------------------------------------------


def _train_rows(tokenized_split) -> Counter:
    from datasets import load_from_disk

    return Counter(tuple(r) for r in load_from_disk(tokenized_split.path)["input_ids"])


def test_out_of_memory_halves_micro_batch_and_goes_on(monkeypatch, tiny_models, tokenized, work, uri):
    """Two epochs, an out-of-memory error at step 4: the micro-batch halves, training goes on from checkpoint
    3, and — because a step's rows do not depend on the micro-batch — the resume skips exactly the steps
    already trained, so every epoch still trains every row once."""
    epochs, oom_step = 2, SAVE_STEPS + 1  # raised when step 5 begins, after checkpoint 3 and logged step 4
    total = epochs * STEPS
    monkeypatch.setenv("QABOT_SIMULATE_OOM", f"{oom_step}:2")
    rec = StepRecorder()
    res = run_training(
        _job("llama", tiny_models, tokenized, work / "run-oom", uri, "oom", epochs=epochs), [rec]
    )

    plan = res["memory_plan"]
    assert (plan["micro_batch"], plan["grad_accum"]) == (2, 2)  # same effective batch of 4 rows
    assert res["metrics"]["steps"] == total and res["metrics"]["oom_events"] == 1
    assert (
        res["metrics"]["steps_run"] == total + 1
    )  # step 4 ran twice: before the error and after checkpoint 3
    (event,) = [e for e in res["events"] if e["event"] == "out_of_memory"]
    assert event["step"] == oom_step and event["resume_from"].endswith(f"checkpoint-{SAVE_STEPS}")
    assert event["old_plan"]["micro_batch"] == 4 and event["new_plan"]["micro_batch"] == 2
    assert json.loads((work / "run-oom" / "events.json").read_text()) == res["events"]

    # The rows: every step has batch_size rows, every epoch trains each row once, and only the step between
    # the checkpoint and the error ran twice (the resume started at the checkpoint, not at step 0).
    steps = rec.final()
    assert sorted(steps) == list(range(total))
    assert all(len(rows) == BATCH for rows in steps.values())
    all_rows = _train_rows(tokenized["llama"].train)
    for e in range(epochs):
        assert Counter(r for k in range(e * STEPS, (e + 1) * STEPS) for r in steps[k]) == all_rows, (
            f"epoch {e}"
        )
    assert rec.executions == Counter({k: 2 if SAVE_STEPS <= k < oom_step else 1 for k in range(total)})

    client = _client(uri)
    run = client.get_run(res["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["qabot.oom_events"] == "1"
    assert len(_runs(uri, "oom")) == 1
    assert "events.json" in {a.path for a in client.list_artifacts(res["run_id"])}
    assert _steps(uri, res["run_id"], "loss") == list(range(1, total + 1))  # redone steps not logged twice
    micro = [(x.step, x.value) for x in client.get_metric_history(res["run_id"], "memory.micro_batch")]
    assert sorted(micro) == [(0, 4.0), (SAVE_STEPS, 2.0)]
    state = json.loads((work / "run-oom" / "run_state.json").read_text())
    assert state["plan"]["micro_batch"] == 2 and state["max_steps"] == total


def test_token_cap_keeps_rows_per_step(tiny_models, tokenized, work):
    """`tokens_per_micro_batch` only cuts steps into smaller micro-batches: a step still has `batch_size` rows."""
    rec = StepRecorder()
    cap = 2 * MAX_LENGTH  # micro-batch 2, accumulation 2
    job = _job(
        "falcon", tiny_models, tokenized, work / "capped", None, "x", training={"tokens_per_micro_batch": cap}
    )
    res = run_training(job, [rec])
    assert (res["memory_plan"]["micro_batch"], res["memory_plan"]["grad_accum"]) == (2, 2)
    assert res["metrics"]["steps"] == STEPS
    assert [len(rows) for rows in rec.final().values()] == [BATCH] * STEPS


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_loss_is_the_token_mean_over_the_split_at_any_batch_size(arch, tiny_models, tokenized):
    """eval_loss = summed NLL of every label token / their number, computed here row by row, independently of
    the project's batching; evaluation batches of any size give the same figure."""
    from datasets import load_from_disk

    from pipeline_lib.evaluation import score_dataset

    model = modeling.load_model(tiny_models[arch], QuantizationConfig(), "cpu")
    split = load_from_disk(tokenized[arch].eval.path)
    nll, count = 0.0, 0
    import torch

    with torch.no_grad():
        for ids, labels in zip(split["input_ids"], split["labels"], strict=True):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            target = torch.tensor(labels[1:])
            keep = target != -100
            nll += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    pad = tokenization.load_tokenizer(tiny_models[arch]).pad_token_id
    results = [score_dataset(model, split, pad_token_id=pad, tokens_per_batch=t) for t in (1, 256, 100_000)]
    assert len({r.tokens for r in results}) == 1 and results[0].tokens == count
    for r in results:
        # Rows batched with padding differ from rows alone only by float rounding (~1e-6 relative, measured);
        # the bug this guards against (a mean of batch means) moved the figure by 10-35%.
        assert r.loss == pytest.approx(nll / count, rel=1e-4)
        assert r.bits_per_byte == pytest.approx(nll / (r.bytes * math.log(2)), rel=1e-4)
    assert results[0].bytes == sum(len(o.encode()) for o in _eval_outputs(tokenized, arch))


def _eval_outputs(tokenized, arch) -> list[str]:
    from datasets import load_from_disk

    kept = load_from_disk(tokenized[arch].eval.path)
    assert tokenized[arch].eval.n_dropped == 0 and len(kept) == EVAL_ROWS
    source = tokenized[arch].eval.source
    return [json.loads(line)["output"] for line in Path(source).read_text(encoding="utf-8").splitlines()]


# ---- 3 and 6. resume after a kill, process isolation ---------------------------------------------------------


def test_killed_training_resumes_same_run_from_checkpoint(
    monkeypatch, trained, tiny_models, tokenized, work, uri
):
    kill_after = SAVE_STEPS + 2
    out_dir = work / "run-resume"
    job = _job("llama", tiny_models, tokenized, out_dir, uri, "resume", name="llama-resume")
    monkeypatch.setenv("QABOT_KILL_AFTER_STEP", str(kill_after))
    with pytest.raises(isolation.StageError) as info:
        isolation.call(train_stage, job, label="train llama-resume")
    message = str(info.value)
    assert "\n" not in message and message.startswith("train llama-resume:") and "137" in message

    # The child died abruptly (this process did not): its run is left RUNNING with the steps it logged.
    (run,) = _runs(uri, "resume")
    run_id = run.info.run_id
    assert run.info.status == "RUNNING"
    assert _steps(uri, run_id, "loss") == list(range(1, kill_after + 1))
    assert (out_dir / "checkpoints" / f"checkpoint-{SAVE_STEPS}").is_dir()

    monkeypatch.delenv("QABOT_KILL_AFTER_STEP")
    res = run_training(job)  # the rerun, in this process: what it does does not depend on where it runs
    assert res["run_id"] == run_id and res["resumed"] and res["resumed_from_step"] == SAVE_STEPS
    assert res["metrics"]["steps_run"] == STEPS - SAVE_STEPS  # went on from the checkpoint, not from step 0
    assert res["metrics"]["steps"] == trained["llama"]["result"]["metrics"]["steps"] == STEPS
    assert [e["event"] for e in res["events"]] == ["resumed"]
    assert res["events"][0]["checkpoint"].endswith(f"checkpoint-{SAVE_STEPS}")
    assert (
        math.isfinite(res["metrics"]["train_loss"])
        and res["metrics"]["eval_loss"] < res["metrics"]["eval_loss_before"]
    )

    (run,) = _runs(uri, "resume")  # still one child run: the same one, continued
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert _steps(uri, run_id, "loss") == list(range(1, STEPS + 1))  # no step twice, none missing
    assert _steps(uri, run_id, "learning_rate") == list(range(1, STEPS + 1))
    history = json.loads((out_dir / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == list(range(1, STEPS + 1))

    # A rerun of a finished training returns the stored result without training again.
    again = isolation.call(train_stage, job, isolate=False)
    assert again.to_json() == json.loads((out_dir / "train_result.json").read_text())
    assert _steps(uri, run_id, "loss") == list(range(1, STEPS + 1))


def test_failed_training_marks_its_run_failed(tiny_models, tokenized, work, uri):
    job = _job("falcon", tiny_models, tokenized, work / "run-broken", uri, "broken", name="broken")
    job = job.model_copy(update={"model": job.model.model_copy(update={"path": str(work / "no-such-model")})})
    with pytest.raises(OSError, match="no-such-model"):
        train_stage(job)
    (run,) = _runs(uri, "broken")
    assert run.info.status == "FAILED"


def test_error_in_an_isolated_stage_is_one_line_stage_error(tiny_models, tokenized, work):
    """The child's error comes back as one line prefixed with the stage's label (a cheap stage: the
    mechanism is the same for every stage)."""
    from pipeline_lib.tokenization import TokenizeJob, tokenize_stage

    job = TokenizeJob(
        train_path=str(work / "missing-train.jsonl"),
        eval_path=str(work / "missing-eval.jsonl"),
        data_fingerprint="x",
        model=jobs.resolved("falcon", tiny_models["falcon"]),
        max_length=64,
        out_dir=str(work / "tok-broken"),
    )
    with pytest.raises(isolation.StageError) as info:
        isolation.call(tokenize_stage, job, label="tokenize broken", log_path=work / "tok-broken.log")
    message = str(info.value)
    assert message.startswith("tokenize broken: ") and "\n" not in message and "missing-train" in message
    assert info.value.kind == "FileNotFoundError" and "Traceback" in info.value.log_tail


# ---- 4. memory plan --------------------------------------------------------------------------------------------

# The report's models (configs of open_llama_3b, bloom-3b, falcon-rw-1b), QLoRA r=16 on every linear layer.
REAL = {
    "llama-3b": dict(
        weights_gib=1.88,
        hidden_size=3200,
        num_layers=26,
        vocab_size=32000,
        num_heads=32,
        eager_attention=False,
        upcast_gib=2 * 32000 * 3200 * 2 / GIB,
        trainable_params=25_425_920,
    ),
    "bloom-3b": dict(
        weights_gib=2.30,
        hidden_size=2560,
        num_layers=30,
        vocab_size=250880,
        num_heads=32,
        eager_attention=True,
        upcast_gib=250880 * 2560 * 2 / GIB,
        trainable_params=19_660_800,
    ),
    "falcon-1b": dict(
        weights_gib=0.80,
        hidden_size=2048,
        num_layers=24,
        vocab_size=50304,
        num_heads=32,
        eager_attention=False,
        upcast_gib=50304 * 2048 * 2 / GIB,
        trainable_params=12_582_912,
    ),
}
# bloom-3b gets the chunked loss (`training.loss: auto`, 250k vocabulary), which fits its 2 rows in one
# micro-batch (estimated, not yet measured on a GPU); with the plain loss it needs 2 micro-batches of 1 row.
EXPECTED_8GIB = {"llama-3b": (4, 1, True), "bloom-3b": (2, 1, True), "falcon-1b": (1, 1, False)}
EXPECTED_8GIB_PLAIN_LOSS = {**EXPECTED_8GIB, "bloom-3b": (1, 2, True)}


@pytest.fixture(scope="module")
def report():
    return load_config(profile="report")


@pytest.mark.parametrize("loss", ["auto", "plain"])
def test_plan_for_the_report_presets_under_8_gib(loss, report):
    assert report.training.gpu_memory_gib == 8 and report.training.loss == "auto"
    settings = report.training.model_copy(update={"loss": loss})
    expected = EXPECTED_8GIB if loss == "auto" else EXPECTED_8GIB_PLAIN_LOSS
    for spec in report.models:
        plan = plan_memory(
            spec.batch_size, spec.max_length, settings, device="cuda", budget_gib=8, **REAL[spec.name]
        )
        assert plan.effective_batch == spec.batch_size, spec.name
        assert (plan.micro_batch, plan.grad_accum, plan.gradient_checkpointing) == expected[spec.name]
        assert plan.estimate_gib <= 8 * BUDGET_HEADROOM
        assert plan.tokens_per_micro_batch == plan.micro_batch * spec.max_length
        assert plan.loss_chunk_tokens == (512 if loss == "auto" and spec.name == "bloom-3b" else None)


def test_estimate_agrees_with_the_measurements():
    # llama-3b, 4 rows of 512 padded, checkpointing: 4.25 GiB peak measured under an 8 GiB cap.
    llama = estimate_peak_gib(4, 512, True, **REAL["llama-3b"])
    assert llama == pytest.approx(4.25, rel=0.15)
    # llama-3b, 16 rows of 512 padded, checkpointing: 8.4 GiB peak uncapped, out of memory under 8 GiB.
    llama16 = estimate_peak_gib(16, 512, True, **REAL["llama-3b"])
    assert llama16 == pytest.approx(8.4, rel=0.1) and llama16 > 8 * BUDGET_HEADROOM
    # bloom-3b, 2 rows of 512, eager attention, checkpointing: out of memory at 7.43 GiB under 8 GiB.
    bloom = estimate_peak_gib(2, 512, True, **REAL["bloom-3b"])
    assert bloom > 8 * BUDGET_HEADROOM and bloom == pytest.approx(7.43, rel=0.1)
    # Its logits (250k vocabulary, every position) are the largest part: more than the 4-bit weights.
    no_vocab = estimate_peak_gib(2, 512, True, **{**REAL["bloom-3b"], "vocab_size": 1})
    assert bloom - no_vocab > REAL["bloom-3b"]["weights_gib"]
    # Checkpointing saves memory; more rows cost more.
    for name, dims in REAL.items():
        assert estimate_peak_gib(2, 512, True, **dims) < estimate_peak_gib(2, 512, False, **dims), name
        assert estimate_peak_gib(1, 512, True, **dims) < estimate_peak_gib(2, 512, True, **dims), name


def test_plan_with_a_large_budget_is_one_micro_batch_without_checkpointing(report):
    for spec in report.models:
        plan = plan_memory(
            spec.batch_size, spec.max_length, report.training, device="cuda", budget_gib=80, **REAL[spec.name]
        )
        assert (plan.micro_batch, plan.grad_accum, plan.gradient_checkpointing) == (spec.batch_size, 1, False)
    # Without the model's LoRA and upcast figures the defaults give the same choices.
    defaults = {k: v for k, v in REAL["llama-3b"].items() if k not in ("upcast_gib", "trainable_params")}
    plan = plan_memory(4, 512, report.training, device="cuda", budget_gib=8, **defaults)
    assert (plan.micro_batch, plan.gradient_checkpointing) == (4, True)


def test_plan_keeps_the_effective_batch_everywhere(report):
    for gc in ("auto", "on", "off"):
        settings = report.training.model_copy(update={"gradient_checkpointing": gc})
        for name, dims in REAL.items():
            for batch in (1, 2, 3, 4, 6, 8, 16):
                for budget in (3, 6, 8, 12, 24, 80):
                    plan = plan_memory(batch, 512, settings, device="cuda", budget_gib=budget, **dims)
                    where = (gc, name, batch, budget)
                    assert plan.effective_batch == batch and batch % plan.micro_batch == 0, where
                    if gc != "auto":
                        assert plan.gradient_checkpointing == (gc == "on"), where
                    if not plan.reason.startswith("even micro-batch 1"):
                        assert plan.estimate_gib <= budget * BUDGET_HEADROOM, where
    cpu = plan_memory(8, 512, report.training, device="cpu", budget_gib=None, **REAL["llama-3b"])
    assert (cpu.micro_batch, cpu.grad_accum, cpu.gradient_checkpointing, cpu.estimate_gib) == (
        8,
        1,
        False,
        None,
    )


def test_halve_keeps_the_effective_batch_and_ends():
    plan = MemoryPlan(4, 1, False, 2048, 8.0, "start")
    seen = []
    while plan is not None:
        seen.append(
            (plan.micro_batch, plan.grad_accum, plan.gradient_checkpointing, plan.tokens_per_micro_batch)
        )
        assert plan.effective_batch == 4
        plan = halve(plan)
    assert seen == [(4, 1, False, 2048), (2, 2, False, 1024), (1, 4, False, 512), (1, 4, True, 512)]
    odd = halve(MemoryPlan(6, 2, True, None, 8.0, ""))
    assert (odd.micro_batch, odd.grad_accum, odd.tokens_per_micro_batch) == (3, 4, None)
    assert halve(MemoryPlan(1, 4, True, 512, 8.0, "")) is None


def test_a_second_run_into_the_same_directory_waits_then_returns_the_stored_result(trained, capsys):
    """Two identical runs (same config, same output directory): the second waits while the first holds the
    directory — a process holding its lock stands in for the first — then finds its stored result."""
    import subprocess
    import sys
    import time

    job = trained["bloom"]["job"]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, job.out_dir], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        again = train_stage(job)
        waited = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert waited >= 1.5, waited  # the holder keeps the lock 2 s
    assert f"another run is training into {job.out_dir}; waiting for it" in capsys.readouterr().out
    assert again.to_json() == json.loads((Path(job.out_dir) / "train_result.json").read_text())


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(2)
"""
