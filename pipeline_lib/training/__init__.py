"""QLoRA fine-tuning of one model: `train_stage(job) -> TrainResult`.

- `job`: `TrainJob`, the stage's typed input;
- `memory`: the memory plan (micro-batch, accumulation, checkpointing) and its halving after an OOM error;
- `state`: checkpoints and the run state kept in the output directory, for resuming after a kill;
- `trainer`: pre-flight, the plan from it, the model and its `QabotTrainer`;
- `reporting`: parameters, pre-flight, plan changes, events and the final metrics in the model's run;
- `faults`: the one hook tests use to inject out-of-memory errors and kills;
- `stage`: the stage itself, with its out-of-memory loop.

The package imports lightly: `TrainJob` (the stage's input) needs only pydantic, so a process that only
describes or schedules work (a Prefect deployment being registered, a cached rerun) never imports torch,
transformers, peft or bitsandbytes; everything else is loaded on first use (PEP 562).
"""

from importlib import import_module
from typing import TYPE_CHECKING

from pipeline_lib.training.job import TrainJob

if TYPE_CHECKING:  # for type checkers and readers: where each lazily loaded name lives
    from pipeline_lib.training.memory import (
        BUDGET_HEADROOM,
        MemoryPlan,
        estimate_peak_gib,
        halve,
        plan_memory,
    )
    from pipeline_lib.training.stage import train_stage
    from pipeline_lib.training.state import last_checkpoint

_LAZY = {
    "BUDGET_HEADROOM": "memory",
    "MemoryPlan": "memory",
    "estimate_peak_gib": "memory",
    "halve": "memory",
    "plan_memory": "memory",
    "train_stage": "stage",
    "last_checkpoint": "state",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f"pipeline_lib.training.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline_lib.training' has no attribute {name!r}")


__all__ = [
    "BUDGET_HEADROOM",
    "MemoryPlan",
    "TrainJob",
    "estimate_peak_gib",
    "halve",
    "last_checkpoint",
    "plan_memory",
    "train_stage",
]
