"""A NaN in training, end to end: the run stops (or skips, train.nan_skip_limit) with one line and
the last good checkpoint kept. The NaN comes from tests/poison.py, which runs `python -m align`
with a NaN put into chosen steps' forward (`loss`) or backward (`grad`) pass."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from align.errors import TrainingError
from align.run.rundir import complete_checkpoints
from tests.conftest import REPO, align_env, read_log

RUN = ["model=tiny", "train.save_steps=2", "train.logging_steps=1", "train.eval_steps=0"]
KEPT = "the last good checkpoint is kept in checkpoints/"


def _poisoned(out, data_cache, mode: str, steps: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.poison", *RUN, *overrides, f"output_dir={out}"],
        cwd=REPO,
        env=align_env(data_cache, OMP_NUM_THREADS="1", POISON=mode, POISON_STEPS=steps),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _weights(checkpoint) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def _assert_stopped(proc, out, message: str, kept: list[str]) -> None:
    assert proc.returncode == TrainingError.exit_code, proc.stderr[-4000:]
    # The one line (tqdm may still close its progress bar after it).
    assert [line for line in proc.stderr.splitlines() if line.startswith("align: ")] == [
        f"align: TrainingError: {message}"
    ]
    assert "Traceback" not in proc.stderr
    checkpoints = complete_checkpoints(out / "checkpoints")
    assert [c.name for c in checkpoints] == kept
    assert all(torch.isfinite(t).all() for t in _weights(checkpoints[-1]).values())
    assert not (out / "final").exists()


# The SFT case in bf16 (autocast; emulated on a CPU without bf16): the guard holds in mixed precision.
@pytest.mark.parametrize(
    ("stage", "mode", "what", "precision"), [("sft", "loss", "train/loss", "bf16"), ("rm", "grad", "gradient", "auto")]
)
def test_stops_at_the_first_non_finite_step(stage, mode, what, precision, tmp_path, data_cache):
    out = tmp_path / "run"
    proc = _poisoned(out, data_cache, mode, "5", f"stage={stage}", "train.max_steps=8", f"train.precision={precision}")
    _assert_stopped(proc, out, f"non-finite {what} at step 5; {KEPT}", ["checkpoint-2", "checkpoint-4"])


def test_skips_a_bad_step_and_finishes(tmp_path, data_cache):
    out = tmp_path / "run"
    proc = _poisoned(
        out,
        data_cache,
        "grad",
        "3",
        "stage=sft",
        "train.max_steps=5",
        "train.save_steps=1",
        "train.save_total_limit=10",
        "train.nan_skip_limit=1",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "non-finite gradient at step 3: update skipped (1 of train.nan_skip_limit=1)" in proc.stdout + proc.stderr
    ckpt = {n: _weights(out / "checkpoints" / f"checkpoint-{n}") for n in (2, 3, 4)}
    # Step 3's update was dropped; step 4 trained again.
    assert all(torch.equal(ckpt[2][k], ckpt[3][k]) for k in ckpt[2])
    assert not all(torch.equal(ckpt[3][k], ckpt[4][k]) for k in ckpt[3])
    optimizer = {n: torch.load(out / "checkpoints" / f"checkpoint-{n}" / "optimizer.pt") for n in (2, 3)}
    for param, state in optimizer[2]["state"].items():
        assert all(torch.equal(v, optimizer[3]["state"][param][k]) for k, v in state.items())
    assert all(torch.isfinite(t).all() for t in load_file(out / "final" / "model.safetensors").values())
    losses = [row["train/loss"] for row in read_log(out) if "train/loss" in row]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)


def test_stops_once_skips_exceed_the_limit(tmp_path, data_cache):
    out = tmp_path / "run"
    proc = _poisoned(out, data_cache, "loss", "3,5", "stage=rm", "train.max_steps=8", "train.nan_skip_limit=1")
    assert "non-finite train/loss at step 3: update skipped (1 of train.nan_skip_limit=1)" in proc.stdout + proc.stderr
    _assert_stopped(
        proc,
        out,
        f"non-finite train/loss at step 5, 2 steps skipped: more than train.nan_skip_limit=1; {KEPT}",
        ["checkpoint-2", "checkpoint-4"],
    )
