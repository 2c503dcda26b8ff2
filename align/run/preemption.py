"""SLURM preemption: on SIGUSR1 finish the step, checkpoint, exit with REQUEUE_EXIT_CODE.

jobs/common.sh requeues the job on that code and the requeued run continues with resume=auto.
Ranks receive the signal at slightly different moments, so they agree at each step end (any
rank signalled means all stop) before saving together.
"""

from __future__ import annotations

import logging
import signal

from transformers import TrainerCallback

from align.run.distributed import any_rank

log = logging.getLogger("align")

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL; jobs/common.sh reads it as "checkpointed, requeue me"


class Preemption:
    def __init__(self) -> None:
        self.requested = False

    def install(self) -> Preemption:
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        # May arrive twice (from SLURM and from the launcher wrapper): setting a flag is idempotent.
        if not self.requested:
            log.warning("SIGUSR1: checkpointing at the end of this step, then exiting for requeue")
        self.requested = True

    def agreed(self) -> bool:
        """True on every rank if any rank was signalled (a collective: call on all ranks together)."""
        return any_rank([self.requested])[0]


class PreemptionCallback(TrainerCallback):
    """Makes the HF Trainer save and stop at the end of the step in which SIGUSR1 arrived."""

    def __init__(self, preemption: Preemption) -> None:
        self.preemption = preemption
        self.stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.preemption.agreed():
            control.should_save = True
            control.should_training_stop = True
            self.stopped = True
        return control
