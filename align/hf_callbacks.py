"""Bridges from Hugging Face Trainer events to align's Tracker (used by the SFT and RM stages)."""

from __future__ import annotations

import math

from transformers import TrainerCallback

from align.errors import TrainingError
from align.tracking import Tracker

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


class FiniteLossCallback(TrainerCallback):
    """Stop at the first non-finite loss or gradient norm, before a checkpoint can keep it.

    Logging happens before saving within a step, and `logging_nan_inf_filter` is off (it would
    average a NaN away), so the newest checkpoint on disk is the last good one.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm", "eval_loss"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(float(value)):
                raise TrainingError(
                    f"non-finite {metric_name(key)} ({value}) at step {state.global_step}; "
                    "the last good checkpoint is kept in checkpoints/"
                )
