"""Observers the training tests pass to `run_training(job, callbacks=[...])`."""

from __future__ import annotations

from collections import Counter, defaultdict

from transformers import TrainerCallback


class StepRecorder(TrainerCallback):
    """Records the rows (as tuples of their real token ids) of every training forward, by the optimizer step
    they belong to (`state.global_step` during the forward = the 0-based index of the step being trained).

    A step trained again after an out-of-memory error or a resume is recorded once per attempt: `final()`
    keeps the last attempt of each step, `executions` counts the attempts."""

    def __init__(self) -> None:
        self.attempts: list[dict[int, list[tuple[int, ...]]]] = []
        self._handle = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        steps: dict[int, list[tuple[int, ...]]] = defaultdict(list)
        self.attempts.append(steps)

        def hook(module, hook_args, hook_kwargs):
            if not module.training:
                return
            ids, mask = hook_kwargs["input_ids"], hook_kwargs["attention_mask"]
            for row, m in zip(ids.tolist(), mask.tolist(), strict=True):
                steps[state.global_step].append(tuple(t for t, keep in zip(row, m, strict=True) if keep))

        if self._handle is not None:
            self._handle.remove()
        self._handle = model.register_forward_pre_hook(hook, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def final(self) -> dict[int, list[tuple[int, ...]]]:
        out: dict[int, list[tuple[int, ...]]] = {}
        for attempt in self.attempts:
            out.update(attempt)
        return dict(sorted(out.items()))

    @property
    def executions(self) -> Counter:
        return Counter(step for attempt in self.attempts for step in attempt)
