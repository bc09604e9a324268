"""What runs in a section's own process: one family's 4-bit load and report-preset training, or the throughput
settings of llama-3b on the whole card. Each writes its results to a JSON file after every stage, so a crash
or a time-out still leaves what was measured.

Training always goes through `pipeline_lib.training.train_stage` with a `TrainJob` built from the `report`
preset: the plan, the cap, the out-of-memory halving and the figures are the stage's own. The only addition
is `StepTimer`, a `TrainerCallback` passed through `callbacks` that times the steps after the warm-up.

Importing this module is light (no torch); the heavy imports happen inside the section.
"""

from __future__ import annotations

import gc
import importlib
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.gpu_check import models
from pipeline_lib import architectures, devices
from pipeline_lib.architectures import Family
from pipeline_lib.config import ModelSpec, RunConfig, parse_config
from pipeline_lib.devices import GIB
from pipeline_lib.files import write_json

# What a section imports; a tiny run's fork server imports them once (`runner`), tests check none of them
# pulls in prefect or mlflow.
PRELOAD = (
    "torch",
    "transformers",
    "transformers.trainer",
    "peft",
    "datasets",
    "pipeline_lib.modeling",
    "pipeline_lib.training",
    "pipeline_lib.tiny",
    "benchmarks.gpu_check.models",
)
THROUGHPUT_FAMILY = "llama"
SETTING_MIN_S = {"tiny": 5.0, "gpu": 45.0}  # time left that one throughput setting needs to start
TINY_LENGTH_SCALE = 0.25  # a tiny run's rows and max_length: a quarter of the report's (128 tokens)


def length_scale(tiny: bool) -> float:
    return TINY_LENGTH_SCALE if tiny else 1.0


# ---------------------------------------------------------------------------------------------- the preset


def report_config(device: str, **training: Any) -> RunConfig:
    """The `report` preset on `device`, with `training` overrides, validated as any run's config is."""
    if device == "cpu":  # paged optimizers need CUDA
        training = {"optimizer": "adamw_torch", **training}
    over: dict[str, Any] = {"profile": "report", "device": device}
    if training:
        over["training"] = training
    return parse_config(over, "gpu_check: the report preset")


def preset_spec(cfg: RunConfig, family: Family) -> ModelSpec:
    """The preset's model of `family` (the one whose base model is the family's reference model)."""
    for spec in cfg.models:
        if spec.base_model == family.reference_model:
            return spec
    raise LookupError(f"the {cfg.profile} preset has no {family.reference_model} model")


def preset_names() -> dict[str, str]:
    """{family: the report preset's model name}, e.g. llama -> llama-3b."""
    cfg = report_config("cuda")
    return {name: preset_spec(cfg, fam).name for name, fam in architectures.FAMILIES.items()}


# ---------------------------------------------------------------------------------------------- one section


class Section:
    """The results of one section, saved to `part` after every stage."""

    def __init__(self, name: str, opts: dict[str, Any], part: Path) -> None:
        self.name = name
        self.opts = opts
        self.part = part
        self.tiny = bool(opts["tiny"])
        self.work = Path(opts["work_dir"])
        self.steps, self.warmup = int(opts["steps"]), int(opts["warmup"])
        self.res: dict[str, Any] = {"section": name, "errors": []}
        self.device = devices.resolve_device("cpu" if self.tiny else "cuda")
        self.res["device"] = self.device
        if self.device == "cuda":
            import torch

            self.res["gpu"] = torch.cuda.get_device_name(0)
            self.res["gpu_total_gib"] = round(devices.total_memory_gib("cuda"), 2)
        self.save()

    def save(self) -> None:
        write_json(self.part, self.res)

    def error(self, where: str, err: BaseException) -> None:
        trace = traceback.format_exc()
        self.res["errors"].append(
            {"where": where, "error": f"{type(err).__name__}: {str(err)[:400]}", "trace": trace[-3000:]}
        )
        self.save()
        print(trace, flush=True)

    def time_left(self) -> float:
        return float(self.opts["deadline"]) - time.time()

    def model_dir(self, family: Family) -> tuple[Path, dict[str, Any]]:
        path = self.work / f"{family.name}-model"
        built = models.build_model(family, path, self.device, self.tiny)
        return path, built


def child_main(name: str, opts: dict[str, Any], part: str, logfile: str) -> None:
    """A section's process: output to `logfile`, results to `part`; exit status 1 after an error."""
    fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sec = None
    failed = False
    try:
        for module in PRELOAD:  # already there in a forked section
            importlib.import_module(module)
        # The libraries' own objects are never garbage: leave them out of every collection, so the stage's
        # gc.collect() calls (devices.free_memory) take milliseconds instead of a third of a second each.
        gc.freeze()
        sec = Section(name, opts, Path(part))
        if name == "throughput":
            throughput_section(sec)
        else:
            family_section(sec, architectures.FAMILIES[name])
    except Exception as err:
        failed = True
        if sec is None:
            traceback.print_exc()
            write_json(part, {"section": name, "errors": [{"where": name, "error": repr(err)[:400]}]})
        else:
            sec.error(name, err)
    finally:
        if sec is not None:
            sec.res["imported"] = {m: m in sys.modules for m in ("prefect", "mlflow")}
            sec.save()
        sys.stdout.flush()
        sys.stderr.flush()
    if failed:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------- training


def step_timer(warmup: int):
    """A `TrainerCallback` timing the optimizer steps after the first `warmup` of each `train()` call (after
    an out-of-memory halving the stage calls it again: only the attempt that finished counts), with the
    Trainer's count of non-padding input tokens."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.n, self.t0, self.t1, self.tok0, self.tok1 = 0, None, None, 0, 0

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_initialized():
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.n += 1
            if self.n == warmup:
                self.t0, self.tok0 = now, int(state.num_input_tokens_seen)
            elif self.n > warmup:
                self.t1, self.tok1 = now, int(state.num_input_tokens_seen)

        def summary(self) -> dict[str, Any]:
            timed = getattr(self, "n", 0) - warmup
            if timed < 1 or self.t0 is None or self.t1 is None:
                return {"steps_timed": max(0, timed), "real_tok_s": None}
            dt = self.t1 - self.t0
            return {
                "steps_timed": timed,
                "warmup_steps": warmup,
                "timed_s": round(dt, 3),
                "real_tokens": self.tok1 - self.tok0,
                "real_tok_s": round((self.tok1 - self.tok0) / dt, 1) if dt > 0 else None,
                "step_ms": round(1000 * dt / timed, 1),
            }

    return StepTimer()


def train(sec: Section, job) -> dict[str, Any]:
    """`train_stage(job)` with the step timer; what the table and the JSON need from its `TrainResult`."""
    from pipeline_lib.training import train_stage
    from pipeline_lib.training.state import read_events

    shutil.rmtree(job.out_dir, ignore_errors=True)  # a finished result there would be returned as it is
    timer = step_timer(sec.warmup)
    t = time.time()
    try:
        result = train_stage(job, callbacks=[timer])
    except Exception:
        sec.res.setdefault("failed_training_events", []).extend(read_events(Path(job.out_dir)))
        raise
    m = result.metrics
    ooms = [e for e in result.events if e.get("event") == "out_of_memory"]
    cuda = devices.peak_memory_kind(result.device) == "cuda_allocated"
    return {
        "plan": result.memory_plan,
        "initial_plan": ooms[0]["old_plan"] if ooms else result.memory_plan,
        "train": {
            **timer.summary(),
            "steps": m.steps,
            "steps_run": m.steps_run,
            "stage_real_tok_s": round(m.real_tokens_per_s, 1),
            "train_tokens": m.train_tokens,
            "train_runtime_s": round(m.train_runtime_s, 2),
            "padding_share": round(m.padding_share, 4),
            "final_loss": round(m.final_loss, 4),
            "stage_wall_s": round(time.time() - t, 1),
        },
        "peak_gib": round(m.peak_memory_gib, 3) if cuda else None,
        "process_rss_gib": None if cuda else round(m.peak_memory_gib, 3),
        "oom_events": ooms,
        "stage_share_4bit": result.quantization.get("share_4bit"),
        "lora_targets": result.lora_targets,
    }


def job_for(sec: Section, cfg: RunConfig, spec: ModelSpec, family: Family, label: str):
    """The `TrainJob` of `spec` (`--steps` steps) on `family`'s random-weight model and synthetic rows."""
    from pipeline_lib.training import TrainJob

    model_dir, built = sec.model_dir(family)
    scale = length_scale(sec.tiny)
    # The saved tokenizer is a fast one (tokenizer.json only): the model card's advice against the fast
    # tokenizer (OpenLLaMA) is about the real model's own tokenizer, which is not here.
    spec = ModelSpec.model_validate(
        {
            **spec.model_dump(),
            "max_steps": sec.steps,
            "max_length": round(spec.max_length * scale),
            "use_fast_tokenizer": True,
        }
    )
    data = models.synthetic_data(
        sec.work / f"data-{label}",
        sec.steps * spec.batch_size,
        built["vocab_size"],
        spec.max_length,
        seed=1,
        base_model=spec.base_model,
        length_scale=scale,
    )
    return TrainJob(
        model=models.resolved(spec, family, model_dir, built),
        data=data,
        spec=spec,
        settings=cfg.train_settings(),
        out_dir=str(sec.work / f"train-{label}"),
    )


# ---------------------------------------------------------------------------------------------- sections


def load_4bit(sec: Section, model_dir: Path, cfg: RunConfig, name: str) -> dict[str, Any]:
    """The model loaded as the pipeline loads it, and `quantization_report`'s verdict on it."""
    from pipeline_lib import modeling

    t = time.time()
    devices.reset_peak(sec.device)
    model = modeling.load_model(model_dir, cfg.quantization, sec.device, for_training=False)
    rep = modeling.quantization_report(model)
    load_peak = devices.peak_memory_bytes(sec.device) / GIB
    del model
    devices.free_memory(sec.device)
    out = {
        "share_4bit": rep["share_4bit"],
        "linear_layers": rep["linear_layers"],
        "linear_4bit": rep["linear_4bit"],
        "not_4bit": rep["not_4bit"],
        "linear_kinds": rep["linear_kinds"],
        "quant_types": rep["quant_types"],
        "footprint_gib": round(rep["footprint_bytes"] / GIB, 6),
        "bf16_gib": round(rep["bf16_footprint_bytes"] / GIB, 6),
        "ratio": round(rep["ratio"], 4),
        "load_s": round(time.time() - t, 1),
        "load_peak_gib": round(load_peak, 3) if sec.device == "cuda" else None,
    }
    try:
        modeling.check_quantized(rep, name, expected=cfg.quantization.load_in_4bit)
        out["check"] = "ok"
    except modeling.PreflightError as err:
        out["check"] = str(err)
    return out


def family_section(sec: Section, family: Family) -> None:
    """Build, load in 4-bit and train `family`'s report model with the preset's settings."""
    cfg = report_config(sec.device)
    spec = preset_spec(cfg, family)
    sec.res.update(
        family=family.name,
        model=spec.name,
        reference_model=family.reference_model,
        batch_size=spec.batch_size,
        max_length=spec.max_length,
        cap_gib=cfg.training.gpu_memory_gib if sec.device == "cuda" else None,
        optimizer=cfg.training.optimizer,
    )
    model_dir, sec.res["build"] = sec.model_dir(family)
    sec.save()
    sec.res["quant"] = load_4bit(sec, model_dir, cfg, spec.name)
    sec.save()
    job = job_for(sec, cfg, spec, family, family.name)
    sec.res["max_length"] = job.spec.max_length
    sec.res["data"] = {"rows": job.data.train.n_rows, "tokens": job.data.train.padding_free_tokens}
    sec.save()
    sec.res.update(train(sec, job))
    if sec.res["peak_gib"] is not None:
        sec.res["peak_ok"] = sec.res["peak_gib"] <= float(sec.opts["peak_limit_gib"])
    sec.save()


def throughput_variants(tiny: bool, max_length: int) -> list[dict[str, Any]]:
    """Settings of llama-3b on the whole card, in the pipeline's own terms (model batch size and
    `training.*`), from the likely fastest to the anchor's own setup."""
    big = 8 if tiny else 64
    max_length = round(max_length * length_scale(tiny))
    return [
        {"name": f"bs{big}_grouped", "batch_size": big, "training": {"gradient_checkpointing": "auto"}},
        {
            "name": f"bs{big}_grouped_gc",
            "batch_size": big,
            "training": {"gradient_checkpointing": "on", "tokens_per_micro_batch": big // 2 * max_length},
        },
        {
            "name": "bs4_padded_gc",  # the anchor's report row, through the pipeline
            "batch_size": 4,
            "training": {"gradient_checkpointing": "on", "group_by_length": False},
        },
    ]


def throughput_section(sec: Section) -> None:
    family = architectures.FAMILIES[THROUGHPUT_FAMILY]
    spec = preset_spec(report_config(sec.device), family)
    sec.res.update(
        family=family.name,
        model=spec.name,
        budget_gib=devices.total_memory_gib(sec.device),
        variants=[],
    )
    sec.model_dir(family)
    need = SETTING_MIN_S["tiny" if sec.tiny else "gpu"]
    for v in throughput_variants(sec.tiny, spec.max_length):
        row: dict[str, Any] = {k: v[k] for k in ("name", "batch_size", "training")}
        sec.res["variants"].append(row)
        if sec.time_left() < need:
            row["skipped"] = "out of time"
            sec.save()
            continue
        try:
            cfg = report_config(sec.device, gpu_memory_gib=None, **v["training"])
            vspec = ModelSpec.model_validate({**spec.model_dump(), "batch_size": v["batch_size"]})
            row.update(train(sec, job_for(sec, cfg, vspec, family, f"throughput-{v['name']}")))
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            sec.error(v["name"], err)
        devices.free_memory(sec.device)
        sec.save()
    done = [r for r in sec.res["variants"] if (r.get("train") or {}).get("real_tok_s")]
    if done:
        sec.res["best"] = max(done, key=lambda r: r["train"]["real_tok_s"])["name"]
    sec.save()
