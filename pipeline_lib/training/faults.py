"""The one hook through which tests inject faults into a training (read from the environment, so it also
reaches a training running in a process of its own):

- `QABOT_SIMULATE_OOM=STEP:MICRO` raises a CUDA out-of-memory error when step STEP (or any later one)
  begins while the micro-batch is larger than MICRO — what a too-large plan does on a GPU;
- `QABOT_KILL_AFTER_STEP=N` ends the process abruptly (no cleanup, exit code 137) once step N is logged —
  what a kill or a lost machine does.

Unset (always, outside tests), `fault_callbacks()` is empty.
"""

from __future__ import annotations

import os

SIMULATE_OOM = "QABOT_SIMULATE_OOM"
KILL_AFTER_STEP = "QABOT_KILL_AFTER_STEP"


def fault_callbacks() -> list:
    from transformers import TrainerCallback

    out: list = []
    if os.environ.get(SIMULATE_OOM):
        import torch

        step, micro = (int(x) for x in os.environ[SIMULATE_OOM].split(":"))

        class SimulatedOom(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step >= step and args.per_device_train_batch_size > micro:
                    raise torch.OutOfMemoryError(f"simulated CUDA out of memory at step {state.global_step}")

        out.append(SimulatedOom())
    if os.environ.get(KILL_AFTER_STEP):
        n = int(os.environ[KILL_AFTER_STEP])

        class KillAfter(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if state.global_step >= n and logs and "loss" in logs:
                    os._exit(137)

        out.append(KillAfter())
    return out
