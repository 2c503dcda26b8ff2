"""resume=auto picks the newest complete checkpoint and skips a save that was cut short."""

import json
import logging

import torch
from safetensors.torch import save_file

from align.run.rundir import complete_checkpoints, publish_checkpoint


def _checkpoint(root, step, *, state="{}", weights=True):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if weights:
        save_file({"w": torch.zeros(4, 4)}, path / "model.safetensors")
        torch.save({"step": step}, path / "optimizer.pt")
    if state is not None:
        (path / "trainer_state.json").write_text(state)
    return path


def _cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_newest_complete_checkpoint_wins_and_broken_ones_are_skipped(tmp_path, caplog):
    older = _checkpoint(tmp_path, 5, state=json.dumps({"global_step": 5}))
    good = _checkpoint(tmp_path, 10, state=json.dumps({"global_step": 10}))
    _checkpoint(tmp_path, 20, state='{"global_st')  # killed while writing the trainer state
    _checkpoint(tmp_path, 30, state=None)  # killed before the trainer state
    _checkpoint(tmp_path, 40, state="{}", weights=False)  # weights missing
    _cut(_checkpoint(tmp_path, 50) / "model.safetensors")  # weights cut short
    _cut(_checkpoint(tmp_path, 60) / "optimizer.pt", keep=0.9)  # optimizer state cut short
    (tmp_path / ".tmp-checkpoint-70").mkdir()  # PPO's temporary folder, never renamed
    (tmp_path / ".staging" / "checkpoint-70").mkdir(parents=True)  # SFT/RM's (align.hf.trainer)
    with caplog.at_level(logging.WARNING, logger="align"):
        found = complete_checkpoints(tmp_path)
    assert found == [older, good]
    assert sum("skipping incomplete checkpoint" in r.message for r in caplog.records) == 5


def test_publish_checkpoint_replaces_a_broken_one_of_the_same_step(tmp_path):
    broken, staged = tmp_path / "checkpoint-4", tmp_path / ".staging" / "checkpoint-4"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"cut")
    staged.mkdir(parents=True)
    (staged / "trainer_state.json").write_text("{}")
    publish_checkpoint(staged, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".staging", "checkpoint-4"]
    assert sorted(p.name for p in broken.iterdir()) == ["trainer_state.json"]
    assert not staged.exists()
