"""SIGKILL a run anywhere, rerun it with resume=auto, get the uninterrupted run's weights.

For each stage, through `python -m align` only: one uninterrupted run, then the same run killed
(1) in the middle of a training step between two checkpoints and (2) in the middle of writing a
checkpoint, each time continued with resume=auto, and (3) once more after its newest checkpoint's
weights were cut short on purpose, which resume=auto must skip with a warning. The final weights
must equal the uninterrupted run's bit for bit (torch.equal).

A kill during a checkpoint write is made certain, not hoped for: the test polls checkpoints/ for
files of a checkpoint that is not complete yet, freezes the run there (SIGSTOP), checks again
that the write is still half done, and only then kills it; a poll that came too late lets the
run go on (SIGCONT) to its next checkpoint. It relies on no file name but `checkpoint-N/` and
its `trainer_state.json` (the run-directory contract), so it holds for any atomic scheme.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.run.rundir import complete_checkpoints
from tests.conftest import align_env, preloaded_python
from tests.preloaded import ForkedRun

STEPS = 9  # checkpoints 2, 4, 6 and 8 (none after the last step): two chances to catch a write after 4
COMMON = ["model=tiny", f"train.max_steps={STEPS}", "train.save_steps=2", "train.logging_steps=1"]
STAGES = {
    # SFT in bf16 (autocast over fp32 weights; emulated where the CPU has no bf16): resume is exact in
    # mixed precision too. RM and PPO in the machine's own precision (fp32 on a CPU without bf16).
    "sft": ["stage=sft", "train.eval_steps=0", "train.precision=bf16", "train.batch_size=4"],
    "rm": ["stage=rm", "train.eval_steps=0", "train.batch_size=4"],
    "ppo": [
        "stage=ppo",
        "ppo.reward_fn=align.tasks.sorting:gold_reward",
        "ppo.value_warmup_steps=1",  # checkpoint-2 already holds a policy step (its PTX batches drawn)
        "ppo.prompts_per_step=2",
        "ppo.max_new_tokens=12",
        # Two shuffled passes in two mini-batches: the resumed run must draw the same shuffles.
        "ppo.epochs=2",
        "ppo.mini_batches=2",
        "train.batch_size=2",
        # The PTX stream too: a resumed run must go on where its SFT batches stopped.
        "ppo.ptx_coef=0.5",
        "ppo.ptx_data=demo_sft",
    ],
    # Critic-free: no value model in the checkpoints; group advantages from 2 responses per prompt,
    # the KL in the loss (the reference log-probs reach the update).
    "grpo": [
        "stage=grpo",
        "ppo.reward_fn=tests.rewards:brevity",
        "ppo.prompts_per_step=2",
        "ppo.responses_per_prompt=2",
        "ppo.max_new_tokens=12",
        "ppo.epochs=2",
        "ppo.mini_batches=2",
        "train.batch_size=2",
    ],
}
TIMEOUT = 600
_TIMINGS = ("runtime", "per_second")  # the Trainer's eval/runtime, eval/samples_per_second, ...
_CHECKPOINT = re.compile(r"^checkpoint-\d+$")


def _start(overrides: list[str], out: Path, data_cache: Path) -> ForkedRun | subprocess.Popen:
    """`python -m align` started (forked from the preloaded Python), its output appended to a file."""
    return preloaded_python(data_cache).start(
        [*overrides, f"output_dir={out}"], align_env(data_cache, OMP_NUM_THREADS="1"), out.parent / f"{out.name}.output"
    )


def _output(out: Path) -> str:
    return (out.parent / f"{out.name}.output").read_text()


def _finish(overrides: list[str], out: Path, data_cache: Path) -> str:
    """Run (or resume) to the end; return everything it printed."""
    before = len(_output(out)) if (out.parent / f"{out.name}.output").is_file() else 0
    proc = _start(overrides, out, data_cache)
    code = proc.wait(timeout=TIMEOUT)
    printed = _output(out)[before:]
    assert code == 0, printed[-6000:]
    return printed


def _logged_steps(out: Path) -> list[int]:
    steps = []
    log = out / "log.jsonl"
    for line in log.read_text().splitlines() if log.is_file() else []:
        with contextlib.suppress(ValueError, KeyError):  # a line still being written
            steps.append(json.loads(line)["step"])
    return steps


def _is_whole(checkpoint: Path) -> bool:
    return checkpoint.is_dir() and (checkpoint / "trainer_state.json").is_file()


def _half_written(checkpoints: Path) -> list[Path]:
    """Files of a checkpoint being written: anything under checkpoints/ outside a whole checkpoint-N/."""
    found = []
    try:
        for entry in checkpoints.iterdir():
            if entry.is_dir() and not (_CHECKPOINT.match(entry.name) and _is_whole(entry)):
                found += [p for p in entry.rglob("*") if p.is_file()]
    except FileNotFoundError:  # renamed or removed while we looked
        return []
    return found


def _wait(proc: subprocess.Popen, condition, what: str, out: Path, poll: float = 0.05) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}\n{_output(out)[-6000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def _kill_mid_step(proc: subprocess.Popen, out: Path, after_checkpoint: int) -> None:
    """Kill once the step after `after_checkpoint` is logged: the run is inside the next step."""
    _wait(
        proc,
        lambda: (
            _is_whole(out / "checkpoints" / f"checkpoint-{after_checkpoint}")
            and max(_logged_steps(out), default=0) > after_checkpoint
        ),
        f"step {after_checkpoint + 1}",
        out,
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _kill_mid_checkpoint(proc: subprocess.Popen, out: Path, after_checkpoint: int) -> list[Path]:
    """Kill while a checkpoint after `after_checkpoint` is half written; return its files at that moment."""
    checkpoints = out / "checkpoints"
    first = checkpoints / f"checkpoint-{after_checkpoint}"
    _wait(proc, lambda: _is_whole(first), first.name, out)
    while proc.poll() is None:
        if _half_written(checkpoints):
            proc.send_signal(signal.SIGSTOP)
            frozen = _half_written(checkpoints)  # the run cannot move now: this is what the kill leaves
            if frozen:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return frozen
            proc.send_signal(signal.SIGCONT)  # the write finished between our two looks
        time.sleep(0.002)
    raise AssertionError(f"the run ended (exit {proc.returncode}) before a checkpoint write was caught")


def _step_metrics(out: Path) -> dict[int, dict[str, float]]:
    """Per step, the training numbers of its last log line (wall-clock timings left out)."""
    rows: dict[int, dict[str, float]] = {}
    for line in (out / "log.jsonl").read_text().splitlines():
        row = json.loads(line)
        numbers = {
            k: v
            for k, v in row.items()
            if isinstance(v, float) and not k.startswith(("time/", "perf/", "train/epoch")) and not k.endswith(_TIMINGS)
        }
        if numbers and "step" in row:
            rows[row["step"]] = numbers
    return rows


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for path in sorted((out / "final").rglob("*.safetensors")):
        for name, tensor in load_file(path).items():
            weights[f"{path.relative_to(out / 'final')}:{name}"] = tensor
    assert weights, f"no weights in {out / 'final'}"
    return weights


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_killed_anywhere_resumes_to_the_same_weights(stage, tmp_path, data_cache):
    overrides = [*STAGES[stage], *COMMON]
    whole = tmp_path / "whole"
    _finish(overrides, whole, data_cache)

    out = tmp_path / "killed"
    # (1) Killed inside step 3, between checkpoint-2 and checkpoint-4.
    proc = _start(overrides, out, data_cache)
    _kill_mid_step(proc, out, after_checkpoint=2)
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["checkpoint-2"]

    # (2) Resumed, then killed while writing checkpoint-6 or -8 (checkpoint-4 is whole by then).
    proc = _start([*overrides, "resume=auto"], out, data_cache)
    frozen = _kill_mid_checkpoint(proc, out, after_checkpoint=4)
    # Atomic: the half-written checkpoint is nowhere a resume would look, every checkpoint-N is whole.
    folders = sorted(p for p in (out / "checkpoints").iterdir() if _CHECKPOINT.match(p.name))
    assert folders == complete_checkpoints(out / "checkpoints"), (frozen, folders)
    assert len(folders) >= 2, folders

    # (3) The newest checkpoint's weights cut short on purpose: skipped with a warning, the one before used.
    newest, previous = folders[-1], folders[-2]
    weights = sorted(newest.rglob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    printed = _finish([*overrides, "resume=auto"], out, data_cache)
    assert f"skipping incomplete checkpoint {newest}" in printed, printed[-4000:]
    assert f"resuming from {previous}" in printed, printed[-4000:]

    # Every step's logged numbers too (the last line of a step is the run that finished it).
    whole_log, resumed_log = _step_metrics(whole), _step_metrics(out)
    assert resumed_log.keys() == whole_log.keys() == set(range(1, STEPS + 1))
    for step, metrics in whole_log.items():
        assert resumed_log[step] == pytest.approx(metrics, rel=1e-6, abs=1e-9), step

    expected, got = _final_weights(whole), _final_weights(out)
    assert expected.keys() == got.keys()
    differ = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not differ, f"{len(differ)} of {len(expected)} tensors differ after kill and resume, e.g. {differ[:3]}"
    assert not (out / "checkpoints" / ".staging").exists()
