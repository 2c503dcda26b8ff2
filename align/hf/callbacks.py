"""Callbacks for the Hugging Face Trainer (SFT and RM stages): metrics to align's Tracker, no checkpoint
after the last step, and the non-finite guard."""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from align.errors import TrainingError
from align.run.distributed import any_rank
from align.run.nonfinite import KEPT, NonFiniteBudget
from align.run.tracking import Tracker

_RENAME = {"learning_rate": "lr"}
_SKIP = {"epoch", "total_flos"}


def metric_name(key: str) -> str:
    """HF's `eval_loss` / `loss` become `eval/loss` / `train/loss`."""
    if "/" in key:
        return key
    if key.startswith("eval_"):
        return "eval/" + key.removeprefix("eval_")
    return "train/" + _RENAME.get(key, key)


class TrackerCallback(TrainerCallback):
    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        metrics = {metric_name(k): v for k, v in logs.items() if k not in _SKIP}
        metrics["train/epoch"] = state.epoch
        self.tracker.log(metrics, step=state.global_step)


class NoCheckpointAtTheEnd(TrainerCallback):
    """The last step is followed by final/, not by a checkpoint: the Trainer's end-of-training save
    would write the weights again with the optimizer state (the largest write of a run: 12 bytes a
    parameter in fp32 Adam) for nothing a resume needs, since a finished run is not resumed. PPO
    does the same. A preemption at the last step still checkpoints (PreemptionCallback, after this)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = False
        return control


class NonFiniteGuard(TrainerCallback):
    """Stop at a non-finite loss or gradient, or with `skip_limit > 0` drop that step's update.

    Checked at every optimizer step, before the update reaches the weights, so the newest
    checkpoint on disk is always the last good one. A skipped step keeps the weights and the
    optimizer state as they were (every gradient is dropped, so AdamW touches nothing), while the
    step counter and the learning-rate schedule advance. Under DeepSpeed the optimizer steps inside
    the backward pass, before this check: the loss is checked there too, and the run stops before
    that step's checkpoint (skipping is refused at start-up, see cli.validate).
    """

    def __init__(self, skip_limit: int = 0) -> None:
        self.skip_limit = skip_limit
        self.budget = NonFiniteBudget(skip_limit, unit="steps")
        self._losses_finite: torch.Tensor | None = None

    def record_loss(self, loss: torch.Tensor) -> None:
        """Called with every micro-batch's loss; a device tensor, read once per optimizer step (no sync here)."""
        finite = torch.isfinite(loss.detach()).all()
        self._losses_finite = finite if self._losses_finite is None else self._losses_finite & finite

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        bad_loss = self._losses_finite is not None and not bool(self._losses_finite)
        self._losses_finite = None
        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        bad_grad = bool(grads) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        # Under DDP the gradients are already averaged, but each rank saw only its own losses.
        bad_loss, bad_grad = any_rank([bad_loss, bad_grad])
        if not (bad_loss or bad_grad):
            return
        what = "train/loss" if bad_loss else "gradient"
        self.budget.dropped(what, state.global_step + 1)
        model.zero_grad(set_to_none=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Evaluation is not guarded above; train loss and grad norm are, except under DeepSpeed
        # (gradients live in its optimizer), which this backstop covers in stop mode. In skip mode a
        # skipped step's logged grad norm is NaN by design.
        keys = ("eval_loss",) if self.skip_limit else ("loss", "grad_norm", "eval_loss")
        for key in keys:
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(float(value)):
                raise TrainingError(f"non-finite {metric_name(key)} ({value}) at step {state.global_step}; {KEPT}")
