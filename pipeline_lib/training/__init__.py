"""QLoRA fine-tuning of one model: `train_stage(job) -> TrainResult`.

- `job`: `TrainJob`, the stage's typed input;
- `memory`: the memory plan (micro-batch, accumulation, checkpointing) and its halving after an OOM error;
- `state`: checkpoints and the run state kept in the output directory, for resuming after a kill;
- `trainer`: pre-flight, the plan from it, the model and its `QabotTrainer`;
- `reporting`: parameters, pre-flight, plan changes, events and the final metrics in the model's run;
- `faults`: the one hook tests use to inject out-of-memory errors and kills;
- `stage`: the stage itself, with its out-of-memory loop.
"""

from pipeline_lib.training.job import TrainJob
from pipeline_lib.training.memory import (
    BUDGET_HEADROOM,
    MemoryPlan,
    estimate_peak_gib,
    halve,
    plan_memory,
)
from pipeline_lib.training.stage import train_stage
from pipeline_lib.training.state import last_checkpoint

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
