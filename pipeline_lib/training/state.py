"""What a training keeps in its output directory so a rerun after a kill (or an out-of-memory error) goes on
where it stopped: checkpoints, the run state (MLflow child run, memory plan, step total), events, the result.

- `checkpoints/checkpoint-N/`: written by the Trainer every `save_steps` (adapter, optimizer, scheduler, RNG);
- `run_state.json`: the child run's id and tracking URI, and after an out-of-memory error the halved plan
  and the step total (so the LR schedule stays the same);
- `events.json`: what happened (resumed, out_of_memory), also logged to the run;
- `train_result.json`: the finished result; a rerun with the same inputs returns it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline_lib.contracts import TrainResult
from pipeline_lib.files import read_json, write_json
from pipeline_lib.training.job import TrainJob

STATE_FILE = "run_state.json"
RESULT_FILE = "train_result.json"
EVENTS_FILE = "events.json"


def checkpoint_step(path: Path) -> int:
    """N of `checkpoint-N`, -1 for anything else."""
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint: the Trainer writes `trainer_state.json` last, so a checkpoint cut off
    by a kill in the middle of saving (no readable state) is passed over."""
    if not ckpt_dir.is_dir():
        return None
    found = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) >= 0]
    for path in sorted(found, key=checkpoint_step, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return path
    return None


def read_state(out_dir: Path) -> dict[str, Any]:
    return read_json(out_dir / STATE_FILE, {}) or {}


def update_state(out_dir: Path, **changes: Any) -> dict[str, Any]:
    state = {**read_state(out_dir), **changes}
    write_json(out_dir / STATE_FILE, state)
    return state


def read_events(out_dir: Path) -> list[dict[str, Any]]:
    return read_json(out_dir / EVENTS_FILE, []) or []


def stored_result(job: TrainJob, tracker, out_dir: Path) -> TrainResult | None:
    """The result of a training that already finished in `out_dir` (same inputs), else None."""
    raw = read_json(out_dir / RESULT_FILE, None)
    if not raw:
        return None
    try:
        result = TrainResult.model_validate(raw)
    except ValueError:
        return None
    if not Path(result.adapter_dir).is_dir():
        return None
    if job.tracking.enabled and tracker.run_status(result.run_id) != "FINISHED":
        return None
    return result


def write_result(out_dir: Path, result: TrainResult) -> None:
    write_json(out_dir / RESULT_FILE, result.to_json())


def child_run(job: TrainJob, tracker, out_dir: Path) -> tuple[str, bool]:
    """(run id, continued): the child run recorded in the output directory if the server still has it
    (a rerun after a kill or a failure), else a new one under the parent run."""
    state = read_state(out_dir)
    rid = state.get("run_id")
    if rid and state.get("tracking_uri") == job.tracking.uri and tracker.run_status(rid) is not None:
        tracker.resume_run(rid)
        return rid, True
    rid = tracker.start_run(
        job.name,
        parent_id=job.parent_run_id,
        tags={
            "qabot.model": job.name,
            "qabot.arch": job.model.arch,
            "qabot.base_model": job.model.base_model,
            "qabot.stage": "train",
        },
    )
    update_state(out_dir, run_id=rid, tracking_uri=job.tracking.uri)
    return rid, False
