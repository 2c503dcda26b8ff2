"""PPO checkpoints that continue a run exactly: weights, optimisers, schedulers, controller,
normaliser, RNG and data position (the prompts', and the PTX data's when ppo.ptx_coef > 0), written
atomically (a temporary folder renamed when whole).

`trainer_state.json` is written last inside the temporary folder, so a folder named
`checkpoint-N` always holds a complete checkpoint (what `rundir.complete_checkpoints` looks for).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from align.run.rundir import publish_checkpoint

STATE_FILE = "trainer_state.json"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": _python_state_to_json(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_python_state_from_json(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_json(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def save(
    checkpoints_dir: Path,
    step: int,
    *,
    write: Callable[[Path], None],
    state: dict[str, Any],
    rank: int,
    is_main: bool,
    save_total_limit: int,
    barrier,
) -> Path:
    """Write checkpoint-{step}: `write(folder)` runs on every rank (each writes what it holds), then
    the RNG state of every rank and, last, the trainer state."""
    final = checkpoints_dir / f"checkpoint-{step}"
    tmp = checkpoints_dir / f".tmp-checkpoint-{step}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    # Every rank keeps its own RNG stream.
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    write(tmp)
    barrier()
    if is_main:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
        publish_checkpoint(tmp, final)
        _rotate(checkpoints_dir, save_total_limit)
    barrier()
    return final


def _rotate(checkpoints_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    found = sorted(
        (int(p.name.split("-")[1]), p) for p in checkpoints_dir.glob("checkpoint-*") if (p / STATE_FILE).is_file()
    )
    for _, path in found[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load(path: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer state, this rank's RNG state); the models load their own parts."""
    state = json.loads((path / STATE_FILE).read_text())
    rng_file = path / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        rng_file = path / "rng_rank0.pt"
    return state, torch.load(rng_file, weights_only=True)
