"""What align adds to every Hugging Face Trainer it runs (SFT, RM): atomic checkpoints and the
guard against non-finite losses and gradients (`hf_callbacks.NonFiniteGuard`, fed every
micro-batch's loss). Mixed in before TRL's class: `class AlignSFTTrainer(AlignTrainerMixin, SFTTrainer)`.

Atomic checkpoints. The Trainer writes `checkpoint-N/` in place, file by file, from every rank
(DeepSpeed writes its shards from all of them); a run killed mid-write leaves a folder that looks
like a checkpoint. Here the whole save goes to `checkpoints/.staging/checkpoint-N/` and the main
process renames it to `checkpoints/checkpoint-N/` once every rank has finished, so a folder of
that name is always whole (`rundir.complete_checkpoints` still validates, for older runs and
disks that lie). Rotation (`train.save_total_limit`) runs after the rename.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from align.hf.callbacks import NonFiniteGuard
from align.run.rundir import publish_checkpoint

STAGING_DIR = ".staging"


class AlignTrainerMixin:
    """Atomic checkpoints and the non-finite guard for a transformers Trainer subclass."""

    def __init__(self, *args: Any, nan_skip_limit: int = 0, **kwargs: Any) -> None:
        self._staging: Path | None = None
        super().__init__(*args, **kwargs)
        self.nonfinite_guard = NonFiniteGuard(nan_skip_limit)
        self.add_callback(self.nonfinite_guard)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite_guard.record_loss(loss)
        return loss

    def _get_output_dir(self, trial) -> str:
        # The Trainer saves into _get_output_dir(trial)/checkpoint-N; during a save that is the staging folder.
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        checkpoints = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = checkpoints / STAGING_DIR
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # what a killed save left behind
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every rank's files (DeepSpeed shards, RNG states) are written
        if self.args.should_save:
            publish_checkpoint(staging / name, checkpoints / name)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(
                output_dir=str(checkpoints),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        # A rank that exits right after (SIGUSR1 preemption) must not take the launcher down mid-rename.
        self.accelerator.wait_for_everyone()
