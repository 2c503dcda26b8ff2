"""Stop at a non-finite loss or gradient, or drop a bounded number of such updates.

One budget shared by the Hugging Face stages (hf_callbacks.NonFiniteGuard) and PPO: with
`train.nan_skip_limit=0` the first bad update stops the run; with N > 0 up to N are dropped (a
warning each) and the next one stops it. The caller makes sure the update was not applied and that
no checkpoint follows it, so the newest checkpoint on disk is the last good one.
"""

from __future__ import annotations

import logging

from align.errors import TrainingError

log = logging.getLogger("align")
KEPT = "the last good checkpoint is kept in checkpoints/"


class NonFiniteBudget:
    def __init__(self, limit: int, unit: str = "steps") -> None:
        self.limit, self.unit, self.skipped = limit, unit, 0

    def dropped(self, what: str, step: int) -> None:
        """A non-finite `what` at `step` was not applied: raise TrainingError, or count and warn."""
        if self.limit == 0:
            raise TrainingError(f"non-finite {what} at step {step}; {KEPT}")
        self.skipped += 1
        if self.skipped > self.limit:
            raise TrainingError(
                f"non-finite {what} at step {step}, {self.skipped} {self.unit} skipped: more than "
                f"train.nan_skip_limit={self.limit}; {KEPT}"
            )
        log.warning(
            "non-finite %s at step %d: update skipped (%d of train.nan_skip_limit=%d)",
            what,
            step,
            self.skipped,
            self.limit,
        )
