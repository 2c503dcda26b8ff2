"""Multi-rank start-up and the DeepSpeed config, shared by every stage.

Call `init_distributed()` once, first thing, before any `TrainingArguments`/`SFTConfig` or
`Accelerator` is built, and pass `REUSE_DISTRIBUTED_STATE` as the Trainer's `accelerator_config`.

Why it exists: under DeepSpeed on a machine without an accelerator (DeepSpeed's CPU accelerator,
gloo), accelerate (checked with 1.15) reports `num_processes=1, process_index=0` on every rank while
the gloo world has all of them. `PartialState._prepare_backend` (accelerate/state.py:769) picks a
backend only for accelerator devices, or for gloo when `cpu=True` (state.py:801); but `cpu=True`
turns DeepSpeed off (state.py:201 and :974). So a CPU DeepSpeed run gets `backend=None`;
`PartialState.__init__` still lets DeepSpeed bring up its gloo group (state.py:215), then, seeing
`backend is None`, hard-codes a one-process world (state.py:288-292) and relabels it DEEPSPEED
(state.py:312). Every rank then sees all the data, thinks it is main and saves, and
`gather_for_metrics` crashes ("ProcessGroupGloo::allgather: ... expected length 2, got 1").
transformers cannot route around it: for DeepSpeed, `_setup_devices` drops `ddp_backend` and resets
any state built before it (training_args.py:1872-1890).

The fix uses only supported knobs: build `PartialState` ourselves with the backend DeepSpeed's
accelerator uses (`PartialState(backend=...)`), so accelerate reads the world size and rank from
the process group it just created, and tell the Trainer to keep that state
(`accelerator_config={"use_configured_state": True}`). A plain `Accelerator` (our PPO loop) reuses
it without being told. tests/distributed/ pins the bug, so we notice when accelerate fixes it.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import torch
from accelerate.state import PartialState

from align.errors import ConfigError

REUSE_DISTRIBUTED_STATE: dict[str, Any] = {"use_configured_state": True}
"""`accelerator_config` for every `TrainingArguments`: keep the state `init_distributed` built
instead of resetting it (which would bring the one-process world back on CPU)."""

ZERO_STAGES = (2, 3)
PRECISIONS = ("bf16", "fp16", "fp32")
_NEVER_PRINT = 2**31 - 1
"""DeepSpeed's own step log; the Trainer and our PPO loop already log every step we want."""


def world_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as the launcher set them; (0, 1, 0) for a plain `python`.

    Reads only the environment (torchrun, the deepspeed launcher and `accelerate launch` all set
    RANK/WORLD_SIZE/LOCAL_RANK), so it works before any process group exists: for per-rank paths,
    seeds, or the world size that `build_deepspeed_config` needs.
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world_size}; check the launcher's environment")
    return rank, world_size, local_rank


def any_rank(flags: list[bool]) -> list[bool]:
    """Each flag, true on every rank if it is true on any (a collective: call on all ranks together)."""
    values = torch.tensor([1.0 if f else 0.0 for f in flags])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            values = values.cuda()
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return [bool(v > 0) for v in values.tolist()]


def _has_accelerator() -> bool:
    return torch.accelerator.is_available()


def _deepspeed_cpu_backend() -> str:
    # The backend DeepSpeed's CPU accelerator initialises with ('ccl' when Intel's oneCCL bindings
    # are installed, else 'gloo'); accelerate must name the same one or the two would disagree.
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().communication_backend_name()


def _set_single_process_env() -> None:
    # What a launcher would set for a world of one: DeepSpeed otherwise looks for MPI (mpi4py) to
    # find its world, and accelerate marks the state DeepSpeed only when LOCAL_RANK is set.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(port))


def init_distributed(*, deepspeed: bool, timeout_s: int = 1800) -> PartialState:
    """Bring up the process group and accelerate's process state so both see the launcher's world.

    Call once per process before any TrainingArguments/Accelerator; with the Trainer also pass
    `accelerator_config=REUSE_DISTRIBUTED_STATE`. `deepspeed` must say whether the run uses DeepSpeed
    (a DeepSpeed config is given): accelerate marks the state DeepSpeed only if told so at creation,
    and the Trainer refuses a reused state that disagrees with its `deepspeed=` argument. Works
    under torchrun/deepspeed/accelerate launchers and, for a single process, under plain `python`.
    """
    kwargs: dict[str, Any] = {"timeout": timedelta(seconds=timeout_s)}
    if not deepspeed:
        _, world_size, _ = world_info()
        # Plain data parallel on CPU is accelerate's MULTI_CPU mode, reached only with cpu=True.
        state = PartialState(cpu=world_size > 1 and not _has_accelerator(), **kwargs)
        check_world(state)
        return state

    if "LOCAL_RANK" not in os.environ:
        if world_info()[1] > 1:
            raise ConfigError("WORLD_SIZE > 1 but LOCAL_RANK is unset: launch with torchrun or deepspeed")
        _set_single_process_env()
    if not _has_accelerator():
        # The root-cause fix: with the backend named, `PartialState` takes the world size and rank
        # from the group DeepSpeed creates instead of assuming one process.
        kwargs["backend"] = _deepspeed_cpu_backend()
    # PartialState marks the state DeepSpeed (and lets DeepSpeed create the group) only when this is
    # set at creation; transformers sets it just as briefly, and an Accelerator given a DeepSpeed
    # plugin sets it again itself.
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        state = PartialState(**kwargs)
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    check_world(state)
    return state


def check_world(state: PartialState | None = None) -> None:
    """Fail plainly if accelerate's idea of the world differs from the process group's.

    Cheap; call it after building a Trainer/Accelerator to catch a TrainingArguments that was built
    without `REUSE_DISTRIBUTED_STATE` (its reset state would be one process again on CPU).
    """
    state = state or PartialState()
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if (state.num_processes, state.process_index) != (world, rank):
        raise RuntimeError(
            f"accelerate sees process {state.process_index} of {state.num_processes} but the process group "
            f"is rank {rank} of {world}: call align.run.distributed.init_distributed() before any "
            "TrainingArguments/Accelerator and pass accelerator_config=REUSE_DISTRIBUTED_STATE"
        )


def build_deepspeed_config(
    stage: int,
    offload_optimizer: bool,
    offload_param: bool,
    *,
    precision: str,
    grad_clip: float,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
) -> dict[str, Any] | None:
    """The DeepSpeed config for a run, or None for stage 0 (no DeepSpeed).

    Every run-dependent value is filled from our config, never "auto": the HF Trainer resolves
    "auto" itself, but our PPO loop hands the dict to plain accelerate, which needs numbers. The
    Trainer checks these numbers against its own arguments and refuses a mismatch, so set
    `world_size` from `world_info()`. `precision` must already be resolved ('bf16', 'fp16', 'fp32').
    """
    if stage == 0:
        if offload_optimizer or offload_param:
            raise ValueError("offload needs DeepSpeed: set deepspeed.stage to 2 or 3")
        return None
    if stage not in ZERO_STAGES:
        raise ValueError(f"deepspeed.stage must be 0, 2 or 3, got {stage}")
    if offload_param and stage != 3:
        raise ValueError("offload_param needs ZeRO-3 (stage 2 keeps every parameter on each rank)")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (resolve 'auto' first), got {precision!r}")
    if min(micro_batch, grad_accum, world_size) < 1:
        raise ValueError(f"micro_batch, grad_accum, world_size must be >= 1, got {micro_batch, grad_accum, world_size}")
    on_cpu = not _has_accelerator()
    if on_cpu and precision == "fp16":
        # DeepSpeed's CPU accelerator has no loss-scaled fp16 training; bf16 and fp32 work.
        raise ValueError("fp16 is not supported by DeepSpeed on CPU; use bf16 or fp32")

    # Pinned host memory needs an accelerator to pin for; on CPU there is nothing to pin.
    offload = {"device": "cpu", "pin_memory": not on_cpu}
    zero: dict[str, Any] = {"stage": stage}
    if offload_optimizer:
        zero["offload_optimizer"] = dict(offload)
    if offload_param:
        zero["offload_param"] = dict(offload)
    if stage == 3:
        # Save one full 16-bit model file on rank 0 instead of only per-rank shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = True

    config: dict[str, Any] = {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero,
        "steps_per_print": _NEVER_PRINT,
        "wall_clock_breakdown": False,
    }
    if on_cpu and offload_optimizer:
        # On CPU the optimizer already runs on the host: keep the client's torch optimizer rather than
        # have accelerate swap in DeepSpeedCPUAdam, whose C++ op would be JIT-compiled on every fresh
        # machine for no gain.
        config["zero_force_ds_cpu_optimizer"] = False
    return config
