"""Bridges from Hugging Face Trainer events to align's Tracker (used by the SFT and RM stages)."""

from __future__ import annotations

from transformers import TrainerCallback

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
