"""Two ranks of SFTTrainer under DeepSpeed ZeRO-2/3 on CPU (gloo), with and without init_distributed.

Each launch is one `torchrun --nproc_per_node 2` of sft_two_ranks.py (about 10-15 s on 2 cores);
the ranks write what they saw to JSON and the assertions run here.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("sft_two_ranks.py")
N_RANKS = 2
N_TRAIN, N_EVAL = 16, 8  # as in sft_two_ranks.py: train rows 0..15, eval rows 16..23
LAUNCH_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(out: Path, *script_args: str) -> list[dict[str, Any]]:
    """Run the script on N_RANKS ranks; return each rank's JSON, rank 0 first."""
    env = {
        key: value
        for key, value in os.environ.items()
        # A pytest run inside a launcher must not leak its own world into the children.
        if key not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED"}
    }
    env.update(
        {
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        }
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={N_RANKS}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(SCRIPT),
        "--out",
        str(out),
        *script_args,
    ]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
            f"--- stderr\n{proc.stderr[-8000:]}"
        )
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(N_RANKS)]


@pytest.mark.parametrize("zero", [2, 3])
def test_sft_under_deepspeed_sees_both_ranks(tmp_path: Path, zero: int) -> None:
    ranks = launch(tmp_path, "--zero", str(zero))

    for rank, seen in enumerate(ranks):
        assert seen["distributed_type"] == "DistributedType.DEEPSPEED"
        assert (seen["process_index"], seen["num_processes"]) == (rank, N_RANKS)
        assert seen["is_main_process"] == seen["accelerator_is_main"] == seen["world_process_zero"] == (rank == 0)
        assert seen["gathered_ranks"] == list(range(N_RANKS))
        assert seen["global_step"] == 3
        assert seen["params_changed"]

    # Sharded: each rank gets its own half of the rows, together all of them.
    for key, rows in (("train_rows", range(N_TRAIN)), ("eval_rows", range(N_TRAIN, N_TRAIN + N_EVAL))):
        shards = [set(seen[key]) for seen in ranks]
        assert shards[0].isdisjoint(shards[1]), key
        assert sorted(shards[0] | shards[1]) == list(rows), key
        assert all(len(seen[key]) == len(rows) // N_RANKS for seen in ranks), key

    # The eval loss is gathered over the whole eval set, so every rank reports the same number.
    losses = [seen["eval_loss"] for seen in ranks]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)

    # Saved once, in full: under ZeRO-3 the 16-bit gather fills in the shards, an ungathered save
    # would hold empty tensors.
    with safe_open(tmp_path / "final" / "model.safetensors", framework="pt") as saved:
        shapes = {name: saved.get_slice(name).get_shape() for name in saved.keys()}  # noqa: SIM118
    assert shapes["model.embed_tokens.weight"][1] == 64
    assert all(math.prod(shape) > 0 for shape in shapes.values()), shapes


def test_accelerate_still_miscounts_cpu_deepspeed_without_the_fix(tmp_path: Path) -> None:
    """Pins the accelerate bug init_distributed works around (accelerate 1.15).

    If this fails, accelerate now counts a CPU DeepSpeed world itself: init_distributed's explicit
    backend, and REUSE_DISTRIBUTED_STATE with it, may be no longer needed.
    """
    ranks = launch(tmp_path, "--zero", "2", "--no-fix")

    for rank, seen in enumerate(ranks):
        assert (seen["torch_rank"], seen["torch_world_size"]) == (rank, N_RANKS)
        assert seen["distributed_type"] == "DistributedType.DEEPSPEED"
        assert (seen["process_index"], seen["num_processes"], seen["is_main_process"]) == (0, 1, True)
