"""resume=auto picks the newest complete checkpoint and skips a save that was cut short."""

import json
import logging

from align.rundir import complete_checkpoints


def _checkpoint(root, step, *, state="{}", weights=True):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if weights:
        (path / "model.safetensors").write_bytes(b"x")
    if state is not None:
        (path / "trainer_state.json").write_text(state)
    return path


def test_newest_complete_checkpoint_wins_and_broken_ones_are_skipped(tmp_path, caplog):
    good = _checkpoint(tmp_path, 10, state=json.dumps({"global_step": 10}))
    _checkpoint(tmp_path, 20, state='{"global_st')  # killed while writing the trainer state
    _checkpoint(tmp_path, 30, state=None)  # killed before the trainer state
    _checkpoint(tmp_path, 40, state="{}", weights=False)  # weights missing
    (tmp_path / ".tmp-checkpoint-50").mkdir()  # PPO's temporary folder, never renamed
    with caplog.at_level(logging.WARNING, logger="align"):
        found = complete_checkpoints(tmp_path)
    assert found == [good]
    assert sum("skipping incomplete checkpoint" in r.message for r in caplog.records) == 3
