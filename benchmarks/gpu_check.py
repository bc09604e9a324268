"""Every GPU check of the QLoRA path in one run, with a short table printed last.

    python benchmarks/gpu_check.py [--tiny] [--anchor PATH] [--steps N] [--budget-s S] [--only SECTIONS]

Sections (each in its own process, so GPU memory peaks never mix and one failure leaves the rest standing):

1. `llama-3b`, `bloom-3b`, `falcon-1b`: the real architecture (open_llama_3b, bloom-3b, falcon-rw-1b configs,
   random bf16 weights built on the device, saved to a temporary directory), loaded in 4-bit with
   `pipeline_lib.modeling.load_model`; `quantization_report` must find every linear layer 4-bit (share 1.0).
2. The same models trained with the `report` preset's settings (batch 4 / 2 / 1 rows, max_length 512, LoRA r16
   all-linear, paged AdamW 8-bit, bf16) under the preset's 8 GiB cap
   (`torch.cuda.set_per_process_memory_fraction`), with `training.plan_memory`'s plan, `batching.BudgetTrainer`
   (length-grouped batches) and `training.halve` after an out-of-memory error, as `run_training` does; rows of
   random tokens with Alpaca's lengths (log-normal, median ~150, clipped to 40-512). Peak allocated memory must
   stay <= 7.5 GiB.
3. `throughput`: the llama-3b architecture on the whole card, sdpa attention, bf16, larger token budgets:
   length-grouped padded batches with checkpointing, the same without the float32 upcast of norms and
   embeddings, packed through position_ids (where `supports_exact_packing` says so), and without checkpointing
   where the memory plan allows it; beside `anchor_bench.py`'s "report's setup" row measured in the same run
   (goal >= 4x, beyond that 8x).
4. `--tiny` (the default without CUDA): small configs of the same three architectures on the CPU, no memory
   cap, a few steps; the anchor runs with `SCALE=tiny`. Proves the script end to end before a GPU run.

Full results go to `$OUT/gpu_check.json` (else `./gpu_check_out/gpu_check.json`), with the sections' logs in
`gpu_check.log` and the anchor's rows in `anchor_results.jsonl`. Exit status 0 when every section ran and
the correctness checks (4-bit share, peak under the cap) passed; the throughput goal is reported, not enforced.
Needs torch, transformers, peft, bitsandbytes, pydantic and pyyaml; never imports mlflow or prefect, and uses
`datasets` only where present (a stand-in module takes its place otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata as metadata
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 1024**3
ARCHS = ("llama", "bloom", "falcon")
MODEL_NAMES = {"llama": "llama-3b", "bloom": "bloom-3b", "falcon": "falcon-1b"}  # the report preset's names
SECTIONS = ("llama", "bloom", "falcon", "anchor", "throughput")
PEAK_LIMIT_GIB = 7.5
RATIO_GOAL, RATIO_STRETCH = 4.0, 8.0
ANCHOR_REPORT_VARIANT = "report_bs4_pad_gc"
ANCHOR_CANDIDATES = (
    ROOT.parent / "shared" / "device" / "anchor_bench.py",
    ROOT / "shared" / "device" / "anchor_bench.py",
    ROOT / ".devsite" / "anchor_bench.py",
)
# Seconds each section may take on a GPU, and in a tiny run (always bounded by what is left of --budget-s).
SECTION_CAP_S = {"llama": 150, "bloom": 150, "falcon": 100, "anchor": 150, "throughput": 180}
TINY_CAP_S = 180


# ---------------------------------------------------------------------------------------------- shared helpers


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "pydantic"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def real_config(arch: str):
    """The real models' architecture hyper-parameters (from their config.json files)."""
    from transformers import BloomConfig, FalconConfig, LlamaConfig

    if arch == "llama":  # openlm-research/open_llama_3b
        return LlamaConfig(
            vocab_size=32000,
            hidden_size=3200,
            intermediate_size=8640,
            num_hidden_layers=26,
            num_attention_heads=32,
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    if arch == "bloom":  # bigscience/bloom-3b
        return BloomConfig(vocab_size=250880, hidden_size=2560, n_layer=30, n_head=32)
    if arch == "falcon":  # tiiuae/falcon-rw-1b
        return FalconConfig(
            vocab_size=50304,
            hidden_size=2048,
            num_hidden_layers=24,
            num_attention_heads=32,
            alibi=True,
            new_decoder_architecture=False,
            multi_query=False,
            parallel_attn=False,
            bias=True,
            bos_token_id=1,
            eos_token_id=2,
        )
    raise ValueError(arch)


class _VocabStub:
    """What `pipeline_lib.tiny.tiny_config` reads from a tokenizer (size and special-token ids)."""

    def __init__(self, arch: str, size: int = 1024) -> None:
        self.size = size
        self.bos_token_id, self.eos_token_id = (1, 2) if arch != "falcon" else (0, 0)
        self.pad_token_id = 3 if arch == "bloom" else None

    def __len__(self) -> int:
        return self.size


def model_config(arch: str, tiny: bool):
    if tiny:
        from pipeline_lib.tiny import tiny_config

        return tiny_config(arch, _VocabStub(arch))
    return real_config(arch)


def config_summary(cfg) -> dict[str, Any]:
    return {
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_layers": getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", None)),
        "heads": getattr(cfg, "num_attention_heads", getattr(cfg, "n_head", None)),
    }


# ---------------------------------------------------------------------------------------------- worker side


def call_accepting(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` with only the keyword arguments its signature names (pipeline_lib's helpers gain
    optional arguments over time; the check passes what it knows and keeps working)."""
    import inspect

    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(*args, **kwargs)


def ensure_datasets() -> str:
    """`pipeline_lib.batching` imports `datasets` only to tell a `datasets.Dataset` apart; where the package is
    missing or broken, an empty stand-in module takes its place (the check's rows are a plain list).
    Must run before transformers is imported, so that transformers sees the same module."""
    try:
        import datasets

        return f"datasets {datasets.__version__}"
    except Exception as err:
        import importlib.machinery
        import types

        for name in [m for m in sys.modules if m == "datasets" or m.startswith("datasets.")]:
            del sys.modules[name]
        stand_in = types.ModuleType("datasets")
        stand_in.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
        stand_in.__version__ = "0"

        class Dataset:  # nothing is ever an instance of it
            pass

        stand_in.Dataset = Dataset
        sys.modules["datasets"] = stand_in
        return f"stand-in (datasets not importable: {type(err).__name__}: {str(err)[:120]})"


class Worker:
    """One section in its own process; results go to `part` (a JSON file) after every stage."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.part = Path(opts.part)
        self.work = Path(opts.work_dir)
        self.tiny = opts.tiny
        self.res: dict[str, Any] = {"section": opts.worker_section, "errors": []}
        self.res["datasets"] = ensure_datasets()
        import torch

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() and not self.tiny else "cpu"
        self.res["device"] = self.device
        if self.device == "cuda":
            props = torch.cuda.get_device_properties(0)
            self.res["gpu"] = props.name
            self.res["gpu_total_gib"] = round(props.total_memory / GIB, 2)
        self.save()

    # -- plumbing
    def save(self) -> None:
        write_json(self.part, self.res)

    def error(self, where: str, err: BaseException) -> None:
        self.res["errors"].append(
            {
                "where": where,
                "error": f"{type(err).__name__}: {str(err)[:400]}",
                "trace": traceback.format_exc()[-3000:],
            }
        )
        self.save()
        print(traceback.format_exc(), flush=True)

    def free(self) -> None:
        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def time_left(self) -> float:
        return self.opts.deadline - time.time()

    # -- the report preset
    def preset(self, arch: str):
        from pipeline_lib.config import load_config

        cfg = load_config("report")
        spec = cfg.model(MODEL_NAMES[arch])
        ts = cfg.training
        if self.device != "cuda":  # paged optimizers need CUDA
            ts = ts.model_copy(update={"optimizer": "adamw_torch"})
        return cfg, spec, ts

    # -- weights
    def weights(self, arch: str) -> Path:
        """bf16 random weights of `arch` in the work directory (built once, on the device)."""
        torch = self.torch
        path = self.work / f"{arch}-bf16"
        if (path / "config.json").is_file():
            return path
        from transformers import AutoModelForCausalLM

        cfg = model_config(arch, self.tiny)
        t = time.time()
        torch.manual_seed(0)
        if self.device == "cuda":
            with torch.device("cuda"):
                model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        else:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        params = sum(p.numel() for p in model.parameters())
        tmp = path.with_name(path.name + ".partial")
        model.save_pretrained(tmp)
        del model
        self.free()
        tmp.rename(path)
        self.res["build"] = {
            "config": config_summary(cfg),
            "params": params,
            "build_save_s": round(time.time() - t, 1),
        }
        self.save()
        return path

    # -- data
    def rows(self, n: int, vocab: int, max_length: int, seed: int) -> list[dict[str, Any]]:
        """`n` rows of random token ids whose lengths follow Alpaca with the prompt template: log-normal,
        median ~150 tokens, clipped to 40..max_length (as anchor_bench.py's `lengths`)."""
        torch = self.torch
        g = torch.Generator().manual_seed(seed)
        lengths = (
            torch.exp(torch.normal(mean=math.log(150.0), std=0.55, size=(n,), generator=g))
            .clamp(40, max_length)
            .long()
            .tolist()
        )
        ids = torch.randint(3, vocab, (sum(lengths),), generator=g).tolist()
        out, at = [], 0
        for length in lengths:
            x = ids[at : at + length]
            at += length
            out.append({"input_ids": x, "labels": list(x), "length": length})
        return out

    # -- one training run through the project's Trainer path
    def trainer_args(self, spec, ts, plan, out_dir: Path):
        """The TrainingArguments `run_training` would use (its own builder when it can be called)."""
        from pipeline_lib import training

        try:
            job = training.TrainJob(
                model_name=spec.name, base_model=spec.base_model, base_path="", base_revision=None,
                base_fingerprint="", arch="", train_dataset="", eval_dataset=None, data_fingerprint="",
                tokenized_fingerprint="", out_dir=str(out_dir), spec=spec.model_dump(), training=ts.model_dump(),
                lora={}, quantization={}, device=self.device,
            )  # fmt: skip
            args = call_accepting(
                training._training_arguments, job, plan, self.device, out_dir,
                max_steps=spec.max_steps, eval_on_start=False,
            )  # fmt: skip
            return args, "training._training_arguments"
        except Exception as err:  # its signature changed: the same settings, spelled out here
            import torch
            from transformers import TrainingArguments

            bf16 = ts.bf16 and (self.device == "cpu" or torch.cuda.is_bf16_supported())
            args = TrainingArguments(
                output_dir=str(out_dir), max_steps=spec.max_steps, per_device_train_batch_size=plan.micro_batch,
                gradient_accumulation_steps=plan.grad_accum, gradient_checkpointing=plan.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False} if plan.gradient_checkpointing else None,
                learning_rate=spec.learning_rate or ts.learning_rate, warmup_steps=ts.warmup_ratio,
                lr_scheduler_type=ts.lr_scheduler, weight_decay=ts.weight_decay, max_grad_norm=ts.max_grad_norm,
                optim=ts.optimizer, logging_steps=ts.logging_steps, save_strategy="no", seed=ts.seed,
                data_seed=ts.seed, bf16=bf16, use_cpu=self.device == "cpu", report_to=[],
                remove_unused_columns=False, dataloader_num_workers=0,
                include_num_input_tokens_seen="non_padding", disable_tqdm=True,
            )  # fmt: skip
            return args, f"local copy ({type(err).__name__}: {str(err)[:100]})"

    def train(self, model, spec, ts, plan, rows, warmup: int, packing: bool = False) -> dict[str, Any]:
        """Train `spec.max_steps` optimizer steps with BudgetTrainer; time the steps after `warmup`."""
        torch = self.torch
        from transformers import TrainerCallback

        from pipeline_lib import batching

        device = self.device
        sync = self.sync

        class StepTimer(TrainerCallback):
            def __init__(self) -> None:
                self.t0 = self.t1 = None
                self.tok0 = self.tok1 = 0
                self.step = 0
                self.peak_warm = 0

            def on_step_end(self, args, state, control, **kwargs):
                sync()
                now = time.perf_counter()
                if state.global_step == warmup:
                    self.t0, self.tok0 = now, state.num_input_tokens_seen
                    if device == "cuda":
                        self.peak_warm = torch.cuda.max_memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                self.t1, self.tok1, self.step = now, state.num_input_tokens_seen, state.global_step

        cfg = model.config
        pad_id = cfg.pad_token_id if isinstance(cfg.pad_token_id, int) else cfg.eos_token_id
        args, args_source = self.trainer_args(spec, ts, plan, self.work / f"trainer-{spec.name}")
        timer = StepTimer()
        trainer = batching.QabotTrainer(
            model=model,
            args=args,
            train_dataset=rows,
            data_collator=None if packing else batching.PadCollator(int(pad_id or 0)),
            callbacks=[timer],
            batch_size=plan.effective_batch,
            packing=packing,
        )
        t = time.time()
        try:
            out = trainer.train()
        finally:
            with contextlib.suppress(Exception):
                trainer.accelerator.free_memory()
            del trainer
            self.free()
        wall = time.time() - t
        if timer.t0 is None or timer.step <= warmup:
            raise RuntimeError(f"only {timer.step} steps ran (warm-up {warmup})")
        dt = timer.t1 - timer.t0
        real = timer.tok1 - timer.tok0
        lengths = [r["length"] for r in rows]
        pad = 0.0 if packing else batching.expected_padding_share(
            lengths, plan.effective_batch, plan.micro_batch, True, ts.seed
        )  # fmt: skip
        res = {
            "steps_timed": timer.step - warmup,
            "warmup_steps": warmup,
            "timed_s": round(dt, 3),
            "real_tokens": int(real),
            "real_tok_s": round(real / dt, 1) if dt > 0 else None,
            "step_ms": round(1000 * dt / (timer.step - warmup), 1),
            "padding_share": round(pad, 4),
            "loss": round(float(out.training_loss), 4),
            "wall_s": round(wall, 1),
            "args_source": args_source,
            "optimizer": str(getattr(args.optim, "value", args.optim)),
            "bf16": bool(args.bf16),
        }
        if device == "cuda":
            timed_peak = torch.cuda.max_memory_allocated()
            res["train_peak_gib"] = round(timed_peak / GIB, 3)
            res["run_peak_gib"] = round(max(timed_peak, timer.peak_warm) / GIB, 3)
            res["reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
        return res

    def attempt(self, fn):
        """(fn(), None), or (None, message) after a CUDA out-of-memory error, with the memory the failed step
        held released (the exception and its frames are gone before the cache is emptied)."""
        oom = None
        try:
            return fn(), None
        except self.torch.OutOfMemoryError as err:
            oom = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
        self.free()
        return None, oom

    def peft(self, model):
        """LoRA on every linear layer but the head, seeded as run_training seeds it."""
        from peft import get_peft_model
        from transformers import set_seed

        from pipeline_lib import modeling

        cfg, _, ts = self.preset("llama")
        targets = modeling.lora_target_modules(model)
        set_seed(ts.seed)
        return get_peft_model(model, modeling.lora_config(cfg.lora, targets, model)), targets

    def preflight(self, path: Path, cfg, arch: str) -> dict[str, Any]:
        """As run_training's pre-flight: load for inference, quantization report, the sizes the memory plan
        needs (`training._model_dims` where it exists) and the LoRA report."""
        from peft import get_peft_model

        from pipeline_lib import modeling, training

        t = time.time()
        model = modeling.load_model(path, cfg.quantization, self.device, for_training=False)
        rep = modeling.quantization_report(model)
        mcfg = model.config
        dims = {
            "hidden_size": mcfg.hidden_size,
            "num_layers": getattr(mcfg, "num_hidden_layers", None) or getattr(mcfg, "n_layer", 1),
            "vocab_size": mcfg.vocab_size,
        }
        dims_source = "local"
        with contextlib.suppress(Exception):
            dims = training._model_dims(model, cfg.quantization.load_in_4bit)
            dims_source = "training._model_dims"
        targets = modeling.lora_target_modules(model)
        model = get_peft_model(model, modeling.lora_config(cfg.lora, targets, model))
        lrep = modeling.lora_report(model)
        del model
        self.free()
        return {
            "quant": rep,
            "dims": dims,
            "dims_source": dims_source,
            "trainable_params": lrep["trainable_params"],
            "targets": targets,
            "load_s": round(time.time() - t, 1),
            "arch": arch,
        }

    def plan(self, batch_size: int, max_length: int, ts, budget: float | None, pre: dict, **dims_update):
        from pipeline_lib import training

        return call_accepting(
            training.plan_memory, batch_size, max_length, ts, device=self.device, budget_gib=budget,
            weights_gib=pre["quant"]["footprint_bytes"] / GIB, trainable_params=pre["trainable_params"],
            **{**pre["dims"], **dims_update},
        )  # fmt: skip

    # -- section: one architecture (4-bit load + capped training)
    def run_arch(self, arch: str) -> None:
        torch = self.torch
        from pipeline_lib import modeling, training

        cfg, spec, ts = self.preset(arch)
        self.res.update(arch=arch, model=spec.name, batch_size=spec.batch_size, max_length=spec.max_length)
        path = self.weights(arch)
        mcfg = model_config(arch, self.tiny)
        cap = ts.gpu_memory_gib if self.device == "cuda" else None
        if cap is not None:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GIB / total))
            torch.cuda.reset_peak_memory_stats()
        self.res["cap_gib"] = cap
        quant = cfg.quantization

        pre = self.preflight(path, cfg, arch)
        rep = pre["quant"]
        self.res["quant"] = {
            "share_4bit": rep["share_4bit"],
            "linear_layers": rep["linear_layers"],
            "linear_4bit": rep["linear_4bit"],
            "not_4bit": rep["not_4bit"],
            "linear_kinds": rep["linear_kinds"],
            "quant_types": rep["quant_types"],
            "footprint_gib": round(rep["footprint_bytes"] / GIB, 6),
            "bf16_gib": round(rep["bf16_footprint_bytes"] / GIB, 6),
            "ratio": round(rep["ratio"], 4),
            "load_s": pre["load_s"],
        }
        try:
            modeling.check_quantized(rep, spec.name, expected=True)
            self.res["quant"]["check"] = "ok"
        except Exception as err:
            self.res["quant"]["check"] = str(err)
        self.res.update(
            dims=pre["dims"], dims_source=pre["dims_source"], trainable_params=pre["trainable_params"]
        )
        write_json(self.work / f"preflight-{arch}.json", pre)  # the throughput section reuses llama's
        self.save()
        plan = self.plan(spec.batch_size, spec.max_length, ts, cap, pre)
        self.res["initial_plan"] = asdict(plan)
        steps, warmup = self.opts.steps, self.opts.warmup
        spec = spec.model_copy(update={"max_steps": steps})
        rows = self.rows(steps * spec.batch_size, mcfg.vocab_size, spec.max_length, seed=1)
        events = []
        for _attempt in range(4):  # as run_training: after an out-of-memory error, halve and load again
            self.res["plan"] = asdict(plan) | {"effective_batch": plan.effective_batch}
            self.save()
            model = modeling.load_model(
                path,
                quant,
                self.device,
                for_training=True,
                gradient_checkpointing=plan.gradient_checkpointing,
            )
            model, targets = self.peft(model)
            self.res["lora_targets"] = targets
            result, oom = self.attempt(lambda m=model, p=plan: self.train(m, spec, ts, p, rows, warmup))
            del model
            self.free()
            if oom is None:
                self.res["train"] = result
                break
            new = training.halve(plan)
            events.append({"plan": asdict(plan), "error": oom, "new_plan": asdict(new) if new else None})
            self.res["oom_events"] = events
            self.save()
            if new is None:
                raise RuntimeError(f"out of memory even at micro-batch 1 with checkpointing: {oom}")
            plan = new
            torch.cuda.reset_peak_memory_stats()  # report the peak of the plan that ran
        self.res["oom_events"] = events
        if self.device == "cuda":
            self.res["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
            peak = max(self.res["peak_gib"], self.res.get("train", {}).get("run_peak_gib", 0.0))
            self.res["peak_gib"] = peak
            self.res["peak_ok"] = peak <= self.opts.peak_limit_gib
        self.save()

    # -- section: throughput of the llama-3b architecture on the whole card
    def run_throughput(self) -> None:
        torch = self.torch
        from pipeline_lib import batching, modeling, training

        cfg, spec, ts = self.preset("llama")
        path = self.weights("llama")
        mcfg = model_config("llama", self.tiny)
        quant = cfg.quantization
        budget = torch.cuda.get_device_properties(0).total_memory / GIB if self.device == "cuda" else None
        pre_file = self.work / "preflight-llama.json"
        pre = json.loads(pre_file.read_text()) if pre_file.is_file() else self.preflight(path, cfg, "llama")
        weights_gib = pre["quant"]["footprint_bytes"] / GIB
        # From the safe side to the fast side: checkpointing on with a large token budget; the same without the
        # float32 upcast of norms and embeddings; packed rows; no checkpointing where the memory plan allows it.
        rows, tokens = (8, 2048) if self.tiny else (64, 16384)
        variants = [
            dict(name="grouped_gc", rows=rows, tokens=tokens, upcast=True, gc="on", packing=False),
            dict(name="grouped_gc_bf16", rows=rows, tokens=tokens, upcast=False, gc="on", packing=False),
            dict(name="packed_gc_bf16", rows=rows, tokens=tokens // 4, upcast=False, gc="on", packing=True),
            dict(
                name="grouped_bf16",
                rows=rows // 2,
                tokens=tokens // 2,
                upcast=False,
                gc="auto",
                packing=False,
            ),
        ]
        self.res.update(variants=[], budget_gib=budget, weights_gib=round(weights_gib, 3))
        steps, warmup = self.opts.steps, self.opts.warmup
        need_s = 15 if self.tiny else 40
        loaded: tuple | None = None
        model = None
        for v in variants:
            row: dict[str, Any] = {
                "name": v["name"], "rows_per_step": v["rows"], "tokens_per_micro_batch": v["tokens"],
                "upcast_fp32": v["upcast"], "gradient_checkpointing": v["gc"], "packing": v["packing"],
                "attn_implementation": "sdpa",
            }  # fmt: skip
            self.res["variants"].append(row)
            if self.time_left() < need_s:
                row["skipped"] = "out of time"
                self.save()
                continue
            try:
                vts = ts.model_copy(
                    update={
                        "gpu_memory_gib": None,
                        "tokens_per_micro_batch": v["tokens"],
                        "gradient_checkpointing": v["gc"],
                    }
                )
                vspec = spec.model_copy(update={"batch_size": v["rows"], "max_steps": steps})
                # sdpa attention keeps no scores; without the upcast there is no float32 copy of the embeddings
                dims = {"eager_attention": False} | ({} if v["upcast"] else {"upcast_gib": 0.0})
                plan = self.plan(v["rows"], spec.max_length, vts, budget, pre, **dims)
                data = self.rows(steps * v["rows"], mcfg.vocab_size, spec.max_length, seed=2)
                for _attempt in range(4):
                    row["plan"] = asdict(plan) | {"effective_batch": plan.effective_batch}
                    key = (v["upcast"], plan.gradient_checkpointing)
                    if loaded != key:
                        model = None
                        self.free()
                        t = time.time()
                        base = modeling.load_model(
                            path, quant, self.device, for_training=True,
                            gradient_checkpointing=plan.gradient_checkpointing, attn_implementation="sdpa",
                            upcast_fp32=v["upcast"],
                        )  # fmt: skip
                        model, _ = self.peft(base)
                        del base
                        loaded = key
                        row["load_s"] = round(time.time() - t, 1)
                    if v["packing"] and not batching.supports_exact_packing(model):
                        row["skipped"] = "packing is not exact for this model/attention"
                        break
                    if self.device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    result, oom = self.attempt(
                        lambda m=model, s=vspec, t=vts, p=plan, r=data, k=v["packing"]: self.train(
                            m, s, t, p, r, warmup, packing=k
                        )
                    )
                    if oom is None:
                        row.update(result)
                        break
                    new = training.halve(plan)
                    row.setdefault("oom_events", []).append({"plan": asdict(plan), "error": oom})
                    self.save()
                    if new is None:
                        raise RuntimeError(f"out of memory even at micro-batch 1 with checkpointing: {oom}")
                    plan = new
                    if self.time_left() < need_s:
                        row["skipped"] = "out of time after out-of-memory retries"
                        break
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                self.error(v["name"], err)
            self.save()
        done = [r for r in self.res["variants"] if r.get("real_tok_s")]
        if done:
            self.res["best"] = max(done, key=lambda r: r["real_tok_s"])["name"]
        self.save()


def worker_main(opts: argparse.Namespace) -> int:
    w = Worker(opts)
    try:
        if opts.worker_section == "throughput":
            w.run_throughput()
        else:
            w.run_arch(opts.worker_section)
    except Exception as err:
        w.error(opts.worker_section, err)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------- parent side


def run_worker(section: str, opts, work: Path, logs: dict[str, str], timeout: float) -> dict:
    part = work / f"part-{section}.json"
    logfile = work / f"log-{section}.txt"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker-section", section, "--work-dir", str(work),
        "--part", str(part), "--steps", str(opts.steps), "--warmup", str(opts.warmup),
        "--deadline", str(time.time() + timeout), "--peak-limit-gib", str(opts.peak_limit_gib),
    ]  # fmt: skip
    if opts.tiny:
        cmd.append("--tiny")
    env = worker_env(opts)
    t = time.time()
    status = "ok"
    with logfile.open("wb") as fh:
        try:
            proc = subprocess.run(
                cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=str(work)
            )
            if proc.returncode != 0:
                status = f"exit code {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s"
    text = logfile.read_text(errors="replace")
    logs[section] = text
    res = json.loads(part.read_text()) if part.is_file() else {"errors": []}
    res["status"] = status
    res["section_s"] = round(time.time() - t, 1)
    if status != "ok" or res.get("errors"):
        res["log_tail"] = tail(text, 25)
    return res


def worker_env(opts) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if opts.tiny:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def find_anchor(given: str | None) -> Path | None:
    if given:
        p = Path(given)
        if not p.is_absolute() and not p.exists():
            p = ROOT / given
        return p if p.is_file() else None
    return next((p for p in ANCHOR_CANDIDATES if p.is_file()), None)


def run_anchor(path: Path | None, opts, work: Path, logs: dict[str, str], timeout: float, given: str) -> dict:
    """anchor_bench.py in a subprocess, stopped as soon as it has printed its "report's setup" row."""
    res: dict[str, Any] = {"path": str(path) if path else given, "found": path is not None, "rows": []}
    if path is None:
        res["status"] = "not found"
        return res
    out = work / "anchor"
    out.mkdir(exist_ok=True)
    steps = max(3, opts.steps - opts.warmup)  # anchor_bench adds 3 warm-up steps of its own
    env = {**worker_env(opts), "OUT": str(out), "STEPS": str(steps)}
    if opts.tiny:
        env["SCALE"] = "tiny"
    res["steps"] = steps
    t = time.time()
    proc = subprocess.Popen(
        [sys.executable, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=str(out),
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    text: list[str] = []
    res["status"] = "ended without the report's-setup row"
    deadline = t + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.time()))
        except queue.Empty:
            res["status"] = f"timed out after {timeout:.0f} s"
            break
        if line is None:
            break
        text.append(line)
        if not line.startswith("{"):
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        res["rows"].append(row)
        if row.get("what") == "versions":
            res["gpu"] = row.get("gpu")
        if row.get("what") == "train" and row.get("variant") == ANCHOR_REPORT_VARIANT:
            res["report_row"] = row
            res["status"] = "ok"
            break
        if row.get("what") == "error" and row.get("where") in (ANCHOR_REPORT_VARIANT, "llama-3b"):
            res["status"] = f"anchor error: {str(row.get('err'))[:300]}"
            break
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    logs["anchor"] = "".join(text)
    res["section_s"] = round(time.time() - t, 1)
    if res["status"] != "ok":
        res["log_tail"] = tail("".join(text), 25)
    return res


# ---------------------------------------------------------------------------------------------- table


def fmt(x: Any, spec: str = ".2f", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    if isinstance(x, (int, float)):
        return format(x, spec)
    return str(x)


def gib(x: Any) -> str:
    """GiB with two decimals; below 0.1 GiB in MiB (tiny models)."""
    if not isinstance(x, (int, float)):
        return "-"
    return f"{x * 1024:.1f}M" if 0 < x < 0.1 else f"{x:.2f}"


def size_text(x: Any) -> str:
    return (
        "n/a"
        if not isinstance(x, (int, float))
        else (f"{x * 1024:.1f} MiB" if 0 < x < 0.1 else f"{x:.2f} GiB")
    )


def table(results: dict) -> str:
    tiny = results["mode"] == "tiny"
    lines = []
    dev = results.get("device") or {}
    lines.append(
        f"== gpu_check ({results['mode']}) on {dev.get('gpu', 'cpu')}"
        f"{' ' + fmt(dev.get('total_gib'), '.0f') + ' GiB' if dev.get('total_gib') else ''}"
        f" | torch {results['versions'].get('torch')} transformers {results['versions'].get('transformers')}"
        f" peft {results['versions'].get('peft')} bnb {results['versions'].get('bitsandbytes')}"
        f" | {results['wall_s']:.0f} s =="
    )
    cap = results["settings"]["cap_gib"]
    lines.append(
        f"{'model':<10} {'4bit share':>10} {'4bit GiB':>8} {'bf16 GiB':>8} | {'rows':>4} {'plan':>9} "
        f"{'est GiB':>7} {'peak GiB':>8} {'real tok/s':>10} {'pad':>5} {'status':<}"
    )
    for arch in ARCHS:
        m = results["models"].get(arch)
        name = MODEL_NAMES[arch]
        if m is None:
            lines.append(f"{name:<10} skipped")
            continue
        q, tr, plan = m.get("quant") or {}, m.get("train") or {}, m.get("plan") or {}
        plan_s = (
            f"{plan['micro_batch']}x{plan['grad_accum']}{' gc' if plan['gradient_checkpointing'] else ''}"
            if plan
            else "-"
        )
        notes = []
        if q and q.get("share_4bit") != 1.0:
            notes.append("NOT ALL 4-BIT")
        if m.get("peak_ok") is False:
            notes.append(f"PEAK > {results['settings']['peak_limit_gib']} GiB")
        if m.get("oom_events"):
            notes.append(f"{len(m['oom_events'])} OOM->halved")
        if m.get("status") != "ok" or m.get("errors"):
            err = (m.get("errors") or [{}])[-1].get("error", "")
            notes.append(f"{m.get('status')} {err}"[:90])
        lines.append(
            f"{name:<10} {fmt(q.get('share_4bit'), '.3f'):>10} {gib(q.get('footprint_gib')):>8} "
            f"{gib(q.get('bf16_gib')):>8} | {m.get('batch_size', '-'):>4} {plan_s:>9} "
            f"{gib((m.get('initial_plan') or {}).get('estimate_gib')):>7} {gib(m.get('peak_gib')):>8} {fmt(tr.get('real_tok_s'), ',.0f'):>10} "
            f"{fmt(tr.get('padding_share'), '.0%'):>5} {'; '.join(notes) or 'ok'}"
        )
    lines.append(
        f"  (training: report preset, {'no cap on CPU' if tiny else f'cap {cap} GiB'}, "
        f"{results['settings']['steps']} steps, first {results['settings']['warmup']} untimed; "
        f"peak = max allocated over load + training{'' if not tiny else ', CUDA only'})"
    )
    a = results.get("anchor") or {}
    tp = results.get("throughput") or {}
    base = (a.get("report_row") or {}).get("real_tok_s")
    lines.append(f"throughput, llama-3b architecture{'' if tiny else ', whole card'}:")
    lines.append(f"  {'setting':<52} {'real tok/s':>10} {'peak GiB':>8} {'pad':>5} {'x anchor':>8}")
    if a.get("report_row"):
        r = a["report_row"]
        lines.append(
            f"  {'anchor: report setup (bs4, padded, checkpointing)':<52} {fmt(r.get('real_tok_s'), ',.0f'):>10} "
            f"{gib(r.get('peak_gib')) if not tiny else '-':>8} {fmt(r.get('pad_frac'), '.0%'):>5} {'1.00':>8}"
        )
    elif not a.get("found", True):
        lines.append(f"  anchor not found ({a.get('path')}): ratio skipped")
    else:
        lines.append(f"  anchor: {a.get('status', 'not run')}: ratio skipped")
    for v in tp.get("variants", []):
        plan = v.get("plan") or {}
        desc = (
            f"{v['name']}: {v['rows_per_step']} rows, "
            f"{plan.get('tokens_per_micro_batch', v['tokens_per_micro_batch'])} tok"
            f"{' x' + str(plan['grad_accum']) if plan.get('grad_accum', 1) > 1 else ''}"
            f"{', packed' if v['packing'] else ''}{', gc' if plan.get('gradient_checkpointing') else ''}"
        )
        if v.get("skipped") or v.get("error"):
            lines.append(f"  {desc:<52} {(v.get('skipped') or v.get('error'))[:70]}")
            continue
        ratio = v.get("real_tok_s") / base if base and v.get("real_tok_s") else None
        best = " <- best" if tp.get("best") == v["name"] else ""
        lines.append(
            f"  {desc:<52} {fmt(v.get('real_tok_s'), ',.0f'):>10} {gib(v.get('train_peak_gib')):>8} "
            f"{fmt(v.get('padding_share'), '.0%'):>5} {fmt(ratio, '.2f'):>8}{best}"
        )
    if tp.get("status") not in (None, "ok") or (tp.get("errors") and not tp.get("variants")):
        err = (tp.get("errors") or [{}])[-1].get("error", "")
        lines.append(f"  throughput section: {tp.get('status')} {err}"[:120])
    c = results["checks"]
    verdict = [
        f"4-bit everywhere: {'yes' if c['all_4bit'] else 'NO'}",
        "peaks: n/a on CPU"
        if c["peaks_ok"] is None
        else f"peaks <= {c['peak_limit_gib']} GiB: " + ("yes" if c["peaks_ok"] else "NO"),
    ]
    if c.get("best_ratio") is not None:
        goal = "" if tiny else (
            " (beyond 8x)" if c["best_ratio"] >= RATIO_STRETCH else
            " (goal 4x met)" if c["best_ratio"] >= RATIO_GOAL else " (below the 4x goal)"
        )  # fmt: skip
        verdict.append(
            f"best/anchor: {c['best_ratio']:.2f}x{goal}{' - CPU tiny, not meaningful' if tiny else ''}"
        )
    else:
        verdict.append("best/anchor: n/a")
    lines.append("verdict: " + "; ".join(verdict) + f"; sections failed: {', '.join(c['failed']) or 'none'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (the default without CUDA)")
    p.add_argument(
        "--anchor", default=None, help="anchor_bench.py (default: ../shared/device/anchor_bench.py)"
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (env STEPS; 12, tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="first steps left out of the timing (3, tiny 1)")
    p.add_argument(
        "--budget-s", type=float, default=None, help="time for all sections (GPU 420 s, tiny 600 s)"
    )
    p.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    p.add_argument("--peak-limit-gib", type=float, default=PEAK_LIMIT_GIB)
    p.add_argument("--out", default=None, help="output folder (default $OUT, else ./gpu_check_out)")
    p.add_argument("--work-dir", default=None, help="where the bf16 weights go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    # worker-only options
    p.add_argument("--worker-section", default=None, help=argparse.SUPPRESS)
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.worker_section:
        return worker_main(opts)
    t_start = time.time()
    import torch  # no CUDA context in this process: every section runs in its own

    has_cuda = torch.cuda.is_available()
    opts.tiny = opts.tiny or not has_cuda
    opts.steps = opts.steps or int(os.environ.get("STEPS", "3" if opts.tiny else "12"))
    opts.warmup = opts.warmup if opts.warmup is not None else (1 if opts.tiny else 3)
    opts.warmup = max(1, min(opts.warmup, opts.steps - 1))
    budget = opts.budget_s or (600.0 if opts.tiny else 420.0)
    deadline = t_start + budget
    only = [s.strip() for s in opts.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        print(f"unknown section(s): {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    out_dir = Path(opts.out or os.environ.get("OUT") or "gpu_check_out").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(opts.work_dir or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    mode = "tiny" if opts.tiny else "gpu"
    log(
        f"mode {mode}, steps {opts.steps} (warm-up {opts.warmup}), budget {budget:.0f} s, work {work}, out {out_dir}"
    )

    results: dict[str, Any] = {
        "mode": mode,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        "settings": {
            "steps": opts.steps,
            "warmup": opts.warmup,
            "cap_gib": None,
            "peak_limit_gib": opts.peak_limit_gib,
            "budget_s": budget,
            "sections": only,
            "ratio_goal": RATIO_GOAL,
            "ratio_stretch": RATIO_STRETCH,
        },  # fmt: skip
        "device": {},
        "models": {},
        "throughput": None,
        "anchor": None,
    }
    logs: dict[str, str] = {}

    def cap_for(section: str) -> float:
        cap = TINY_CAP_S if opts.tiny else SECTION_CAP_S[section]
        return max(5.0, min(cap, deadline - time.time()))

    def save() -> None:
        results["wall_s"] = round(time.time() - t_start, 1)
        write_json(out_dir / "gpu_check.json", results)

    for arch in ARCHS:
        if arch not in only:
            continue
        if deadline - time.time() < 10:
            results["models"][arch] = {"status": "skipped: out of time", "errors": []}
            continue
        try:
            res = run_worker(arch, opts, work, logs, cap_for(arch))
            results["models"][arch] = res
            if res.get("gpu"):
                results["device"] = {"gpu": res["gpu"], "total_gib": res.get("gpu_total_gib")}
            if res.get("cap_gib"):
                results["settings"]["cap_gib"] = res["cap_gib"]
            q, tr = res.get("quant") or {}, res.get("train") or {}
            log(
                f"{MODEL_NAMES[arch]}: {res['status']} in {res['section_s']} s; share_4bit {q.get('share_4bit')}, "
                f"4-bit {size_text(q.get('footprint_gib'))}; peak {size_text(res.get('peak_gib'))}, "
                f"{tr.get('real_tok_s')} real tok/s, {len(res.get('oom_events') or [])} out-of-memory retries"
            )
            for e in res.get("errors", []):
                log(f"  error in {e['where']}: {e['error']}")
            if res["status"] != "ok" and res.get("log_tail"):
                print(res["log_tail"], flush=True)
        except Exception as err:
            results["models"][arch] = {"status": f"{type(err).__name__}: {err}", "errors": []}
        save()
        # the bf16 copies of bloom and falcon are no longer needed; llama's serves the throughput section
        if arch != "llama":
            shutil.rmtree(work / f"{arch}-bf16", ignore_errors=True)

    if "anchor" in only:
        anchor = find_anchor(opts.anchor)
        try:
            if deadline - time.time() < 10:
                results["anchor"] = {
                    "path": str(anchor),
                    "found": anchor is not None,
                    "status": "skipped: out of time",
                }
            else:
                results["anchor"] = run_anchor(
                    anchor, opts, work, logs, cap_for("anchor"), opts.anchor or "default"
                )
            a = results["anchor"]
            row = a.get("report_row") or {}
            log(
                f"anchor: {a.get('status')} in {a.get('section_s')} s; report setup {row.get('real_tok_s')} real tok/s, "
                f"peak {size_text(row.get('peak_gib') or None)}"
            )
            if a.get("status") != "ok" and a.get("log_tail"):
                print(a["log_tail"], flush=True)
        except Exception as err:
            results["anchor"] = {"status": f"{type(err).__name__}: {err}", "found": anchor is not None}
        save()

    if "throughput" in only:
        try:
            if deadline - time.time() < 10:
                results["throughput"] = {"status": "skipped: out of time", "variants": [], "errors": []}
            else:
                res = run_worker("throughput", opts, work, logs, cap_for("throughput"))
                results["throughput"] = res
                if res.get("gpu") and not results["device"]:
                    results["device"] = {"gpu": res["gpu"], "total_gib": res.get("gpu_total_gib")}
                for v in res.get("variants", []):
                    log(
                        f"throughput {v['name']}: {v.get('real_tok_s') or v.get('skipped') or v.get('error')}"
                        f" real tok/s, peak {size_text(v.get('train_peak_gib'))}, "
                        f"{len(v.get('oom_events') or [])} out-of-memory retries"
                    )
                if res["status"] != "ok" and res.get("log_tail"):
                    print(res["log_tail"], flush=True)
        except Exception as err:
            results["throughput"] = {"status": f"{type(err).__name__}: {err}", "variants": [], "errors": []}
        save()

    # checks
    models = results["models"]
    shares = [(m.get("quant") or {}).get("share_4bit") for m in models.values()]
    peaks = [m.get("peak_ok") for m in models.values()]
    failed = [
        a for a, m in models.items() if m.get("status") != "ok" or m.get("errors") or not m.get("train")
    ]
    tp, anchor_res = results.get("throughput"), results.get("anchor")
    if tp is not None and (
        tp.get("status") != "ok" or not any(v.get("real_tok_s") for v in tp.get("variants", []))
    ):
        failed.append("throughput")
    if anchor_res is not None and anchor_res.get("status") != "ok":
        failed.append("anchor")
    base = ((anchor_res or {}).get("report_row") or {}).get("real_tok_s")
    rates = {v["name"]: v["real_tok_s"] for v in (tp or {}).get("variants", []) if v.get("real_tok_s")}
    best_ratio = max(rates.values()) / base if base and rates else None
    results["checks"] = {
        "all_4bit": bool(shares) and all(s == 1.0 for s in shares),
        "share_4bit": {MODEL_NAMES[a]: (m.get("quant") or {}).get("share_4bit") for a, m in models.items()},
        "peak_limit_gib": opts.peak_limit_gib,
        "peaks_ok": None if opts.tiny else (bool(peaks) and all(p is True for p in peaks)),
        "anchor_real_tok_s": base,
        "best_ratio": round(best_ratio, 3) if best_ratio else None,
        "ratios": {k: round(r / base, 3) for k, r in rates.items()} if base else {},
        "meets_goal": None if (opts.tiny or best_ratio is None) else best_ratio >= RATIO_GOAL,
        "beyond_stretch": None if (opts.tiny or best_ratio is None) else best_ratio >= RATIO_STRETCH,
        "failed": failed,
    }
    ok = not failed and results["checks"]["all_4bit"] and results["checks"]["peaks_ok"] is not False
    results["ok"] = ok
    save()

    with (out_dir / "gpu_check.log").open("w") as fh:
        for section, text in logs.items():
            fh.write(f"===== {section} =====\n{tail(text, 300)}\n")
    anchor_rows = work / "anchor" / "results.jsonl"
    if anchor_rows.is_file():
        shutil.copy(anchor_rows, out_dir / "anchor_results.jsonl")
    if not opts.keep and not opts.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
