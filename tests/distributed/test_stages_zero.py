"""The real entry point on 2 CPU ranks (gloo) under DeepSpeed ZeRO-2/3: SFT and RM train, save and
reload; ZeRO-3 matches one process; the shards are real; a sharded checkpoint resumes exactly.

Every 2-rank run is `torchrun --nproc_per_node 2` of align's own CLI: `-m align` itself, or
align_probe.py, which is `align.cli.main()` plus a read-only callback that records per rank what it
holds and which rows it trained on (see its docstring). The runs are shared between the tests
(module fixtures): 8 launches of 12-25 s each, about 2.5 minutes for the file on 2 busy cores.

Numbers measured when this was written (torch 2.13 CPU, deepspeed 0.19.8, accelerate 1.15,
transformers 5.24, trl 1.16; the tiny model, 3,322,112 parameters; fp32, no dropout):
- ZeRO-3, 2 ranks: each rank holds 1,661,056 parameter elements (50.0%) and that many Adam
  exp_avg elements; ZeRO-2: every rank holds all parameters and 50.0% of the optimizer state.
- 2 ranks x batch 4 vs 1 rank x batch 8 (ZeRO-3 both): the same 8 rows in every global batch
  (rank 0 gets the first 4 of the global batch, rank 1 the next 4); train/loss differs by at most
  4.8e-7 (relative 9e-8, one float32 ulp) over 4 steps, grad_norm by 1e-8 relative, final weights
  by 3.6e-6 at most.
- Preempted at step 2 and resumed on 2 ranks: steps 3-4 loss and final weights bit-identical to an
  uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tests.conftest import align_env, read_log

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("align_probe.py")
TORCHRUN_REQUEUE = REPO / "jobs" / "torchrun_requeue.py"  # what jobs/common.sh launches with
REQUEUE_EXIT_CODE = 75  # align.run.preemption.REQUEUE_EXIT_CODE
N_RANKS = 2
STEPS = 4
MICRO_BATCH = 4
LR = 1e-3
LAUNCH_TIMEOUT_S = 300
TINY = (
    f"train.max_steps={STEPS}",
    f"train.batch_size={MICRO_BATCH}",
    "train.grad_accum=1",
    "train.save_steps=2",
    "train.logging_steps=1",
    "train.eval_steps=0",  # evaluate once, at the end
    "train.precision=fp32",
    "train.dropout=0",
    # A constant learning rate from step 1, so that every step moves the weights and the loss
    # trajectories compare real updates (the tiny preset warms up from 0 over 20 steps).
    "train.lr_scheduler=constant",
    "train.warmup_steps=0",
    f"train.lr={LR}",
)
LOSS_RTOL = 1e-5
"""Allowed relative loss difference, 2 ranks vs 1: about 100x what was measured (one float32 ulp;
the two runs pad their batches to different widths and sum partial gradients in another order)."""
WEIGHT_ATOL = 1e-4
"""Allowed final-weight difference, 2 ranks vs 1 (3.6e-6 measured, Adam steps of 1e-3)."""


@dataclass
class Run:
    out: Path
    proc: subprocess.CompletedProcess
    seconds: float

    def probe(self, rank: int, name: str = "probe") -> dict[str, Any]:
        return json.loads((self.out / name / f"rank{rank}.json").read_text())

    def step_rows(self) -> dict[int, dict]:
        """Per-step training records of log.jsonl (the last one per step: a resumed run's win)."""
        return {row["step"]: row for row in read_log(self.out) if "train/grad_norm" in row}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


ACCELERATE = "accelerate"
"""`launcher=ACCELERATE`: `accelerate launch --multi_gpu` (its multi-process mode, CPU ranks included)."""


def torchrun_command(*entry: str, nproc: int = N_RANKS, launcher: Path | str | None = None) -> list[str]:
    """`torchrun --nproc_per_node N ENTRY...` on this machine (or `launcher`, a torchrun wrapper, or
    accelerate's launcher)."""
    if launcher == ACCELERATE:
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            f"--num_processes={nproc}",
            "--num_machines=1",
            "--mixed_precision=no",
            "--dynamo_backend=no",
            f"--main_process_port={free_port()}",
            *entry,
        ]
    start = [str(launcher)] if launcher else ["-m", "torch.distributed.run"]
    return [
        sys.executable,
        *start,
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *entry,
    ]


def ranks_env(cache: Path) -> dict[str, str]:
    """The environment of a multi-rank launch: DeepSpeed's CPU accelerator, one thread per rank."""
    env = {
        key: value
        for key, value in align_env(cache).items()
        # A pytest run inside a launcher must not leak its own world into the children.
        if key not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED"}
    }
    env.update(
        {
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        }
    )
    return env


def launch(
    out: Path,
    cache: Path,
    *overrides: str,
    nproc: int = N_RANKS,
    probe: str | None = "probe",
    preempt_at: int = 0,
    launcher: Path | str | None = None,
    expect_rc: int = 0,
) -> Run:
    """`python -m align` (or align_probe.py when `probe` names its output folder) on `nproc` ranks."""
    env = ranks_env(cache)
    if probe:
        env["ALIGN_PROBE_DIR"] = str(out / probe)
    if preempt_at:
        env["ALIGN_PROBE_PREEMPT_AT"] = str(preempt_at)
    entry = [str(PROBE)] if probe else ["-m", "align"]
    # One process is started the way a user would: plain python.
    command = [sys.executable, *entry] if nproc == 1 else torchrun_command(*entry, nproc=nproc, launcher=launcher)
    command += [*overrides, f"output_dir={out}"]
    began = time.monotonic()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    seconds = time.monotonic() - began
    print(f"[{seconds:5.1f} s] {' '.join(command[1:])}")
    if proc.returncode != expect_rc:
        raise AssertionError(
            f"{' '.join(command)} exited {proc.returncode}, expected {expect_rc}\n--- stdout\n{proc.stdout[-4000:]}\n"
            f"--- stderr\n{proc.stderr[-8000:]}"
        )
    return Run(out, proc, seconds)


def check_trained_final(run: Run, model_class: type, max_change: float = 20 * STEPS * LR) -> dict[str, torch.Tensor]:
    """final/ reloads in this one process, is finite, and is the run's own init moved by training."""
    model, info = model_class.from_pretrained(run.out / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    weights = {name: p.detach() for name, p in model.named_parameters()}
    init = load_file(run.out / "probe" / "init.safetensors")  # gathered from the shards at train begin
    assert set(init) == set(weights), set(init) ^ set(weights)
    for name, tensor in weights.items():
        assert tensor.shape == init[name].shape, name  # an ungathered ZeRO-3 save holds empty tensors
        assert torch.isfinite(tensor).all(), name
        change = (tensor - init[name]).abs().max().item()
        # Every tensor moved, and by no more than a few Adam steps can: the same model, trained.
        assert 0 < change < max_change, (name, change)
    return weights


def check_sharded_checkpoints(run: Run, steps: list[int], zero: int = 3, optimizer_prefix: str = "") -> None:
    """DeepSpeed's checkpoints: one optimizer shard per rank; ZeRO-3 shards the weights too (ZeRO-2
    keeps them whole, in one file). DeepSpeed's bf16 optimizer names its shards with `bf16_`."""
    found = sorted(int(p.name.split("-")[1]) for p in (run.out / "checkpoints").glob("checkpoint-*"))
    assert found == steps
    for step in steps:
        shards = run.out / "checkpoints" / f"checkpoint-{step}" / f"global_step{step}"
        expected = {f"{optimizer_prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in range(N_RANKS)}
        if zero == 3:
            expected |= {f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" for rank in range(N_RANKS)}
        else:
            expected.add("mp_rank_00_model_states.pt")
        assert {p.name for p in shards.iterdir()} == expected, shards


# --- shared runs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_zero3(tmp_path_factory, data_cache) -> Run:
    return launch(tmp_path_factory.mktemp("sft-zero3"), data_cache, "stage=sft", "deepspeed=zero3", *TINY)


@pytest.fixture(scope="module")
def sft_zero2(tmp_path_factory, data_cache) -> Run:
    return launch(tmp_path_factory.mktemp("sft-zero2"), data_cache, "stage=sft", "deepspeed=zero2", *TINY)


# --- the stages train, save and reload ------------------------------------------------------------


@pytest.mark.parametrize("zero", [2, 3])
def test_sft_two_ranks_saves_a_reloadable_final(request, zero: int) -> None:
    run = request.getfixturevalue(f"sft_zero{zero}")
    rows = run.step_rows()
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert all(math.isfinite(row["train/loss"]) for row in rows.values())
    # Both ranks trained, each on its own rows.
    ranks = [run.probe(rank) for rank in range(N_RANKS)]
    for step in range(STEPS):
        batches = [ranks[rank]["batches"][step] for rank in range(N_RANKS)]
        assert [len(b) for b in batches] == [MICRO_BATCH] * N_RANKS
        assert not {tuple(r) for r in batches[0]} & {tuple(r) for r in batches[1]}
    check_sharded_checkpoints(run, [2], zero)  # none after the last step: final/ follows
    check_trained_final(run, AutoModelForCausalLM)


def check_fp32_masters_saved(folder: Path) -> None:
    """Under DeepSpeed bf16 the module holds 16-bit weights: final/ must hold the fp32 masters, not
    those weights widened (every value would then sit on the bf16 grid)."""
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    weights = {}
    for file in folder.glob("*.safetensors"):
        weights |= load_file(file)
    assert weights and all(t.dtype == torch.float32 for t in weights.values()), {t.dtype for t in weights.values()}
    off_grid = sum(int((t != t.bfloat16().float()).sum()) for t in weights.values())
    assert off_grid > 0.9 * sum(t.numel() for t in weights.values()), off_grid


def test_rm_zero3_two_ranks_in_bf16_saves_a_reloadable_fp32_final(tmp_path, data_cache) -> None:
    """The scalar head gathered from the shards with the backbone, and the fp32 masters saved (ZeRO-2
    in bf16: the PPO test's, the same saving code)."""
    run = launch(tmp_path / "rm", data_cache, "stage=rm", "deepspeed=zero3", *TINY, "train.precision=bf16")
    rows = run.step_rows()
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert all(math.isfinite(row["train/loss"]) for row in rows.values())
    metrics = json.loads((run.out / "metrics.json").read_text())
    assert 0 <= metrics["eval/accuracy"] <= 1 and math.isfinite(metrics["eval/loss"]), metrics
    # None after the last step: final/ follows.
    check_sharded_checkpoints(run, [2], 3, optimizer_prefix="bf16_")
    weights = check_trained_final(run, AutoModelForSequenceClassification)
    assert weights["score.weight"].shape[0] == 1  # the scalar head was gathered and saved too
    check_fp32_masters_saved(run.out / "final")


def test_dpo_zero3_two_ranks_saves_a_reloadable_final(tmp_path, data_cache) -> None:
    """DPO's policy sharded and its reference loaded again into shards (ZeRO-3 shards cannot be copied)."""
    run = launch(tmp_path / "dpo", data_cache, "stage=dpo", "deepspeed=zero3", *TINY, "train.precision=bf16")
    rows = run.step_rows()
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert all(math.isfinite(row["train/loss"]) for row in rows.values())
    assert rows[1]["train/loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy = reference at step 1
    metrics = json.loads((run.out / "metrics.json").read_text())
    assert 0 <= metrics["eval/rewards/accuracies"] <= 1 and math.isfinite(metrics["eval/loss"]), metrics
    check_sharded_checkpoints(run, [2], 3, optimizer_prefix="bf16_")
    check_trained_final(run, AutoModelForCausalLM)
    check_fp32_masters_saved(run.out / "final")


# --- ZeRO-3 on 2 ranks is the same training as 1 process -------------------------------------------


def test_zero3_two_ranks_match_one_rank_with_the_same_global_batch(sft_zero3, tmp_path, data_cache) -> None:
    one = launch(
        tmp_path / "one",
        data_cache,
        "stage=sft",
        "deepspeed=zero3",
        *TINY,
        f"train.batch_size={N_RANKS * MICRO_BATCH}",
        nproc=1,
    )
    # The same starting weights...
    init_two, init_one = (load_file(r.out / "probe" / "init.safetensors") for r in (sft_zero3, one))
    assert all(torch.equal(init_two[k], init_one[k]) for k in init_one)
    # ...and the same rows in every global batch: the seeded sampler draws one order for every world
    # size and accelerate hands rank r the r-th block of MICRO_BATCH rows of each global batch.
    two_ranks = [sft_zero3.probe(rank) for rank in range(N_RANKS)]
    one_rank = one.probe(0)
    for step in range(STEPS):
        joined = [row for rank in range(N_RANKS) for row in two_ranks[rank]["batches"][step]]
        assert joined == one_rank["batches"][step], f"step {step + 1}: different rows"

    rows_two, rows_one = sft_zero3.step_rows(), one.step_rows()
    print("step  loss 2 ranks        loss 1 rank         |diff|     grad_norm rel diff")
    worst = 0.0
    for step in range(1, STEPS + 1):
        a, b = rows_two[step], rows_one[step]
        diff = abs(a["train/loss"] - b["train/loss"])
        grad = abs(a["train/grad_norm"] - b["train/grad_norm"]) / b["train/grad_norm"]
        worst = max(worst, diff / abs(b["train/loss"]))
        print(f"{step:4d}  {a['train/loss']:.15f}  {b['train/loss']:.15f}  {diff:.2e}  {grad:.2e}")
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=LOSS_RTOL), step
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=LOSS_RTOL), step
    final_two, final_one = (load_file(r.out / "final" / "model.safetensors") for r in (sft_zero3, one))
    weight_diff = max((final_two[k] - final_one[k]).abs().max().item() for k in final_one)
    print(f"worst relative loss difference {worst:.2e}; largest final-weight difference {weight_diff:.2e}")
    assert weight_diff < WEIGHT_ATOL


# --- the shards are real ---------------------------------------------------------------------------


def test_zero3_holds_half_the_parameters_on_each_rank(sft_zero3, sft_zero2) -> None:
    for label, run in (("zero3", sft_zero3), ("zero2", sft_zero2)):
        held = []
        for rank in range(N_RANKS):
            seen = run.probe(rank)
            params, optim = seen["params"], seen["optimizer_state"]
            param_share, optim_share = params["held"] / params["total"], optim["exp_avg_numel"] / params["total"]
            print(
                f"{label} rank {rank}: holds {params['held']:,} of {params['total']:,} parameter elements "
                f"({param_share:.1%}, {params['n_partitioned']}/{params['n_tensors']} tensors partitioned); "
                f"Adam exp_avg {optim['exp_avg_numel']:,} ({optim_share:.1%})"
            )
            # Both stages partition the optimizer state...
            assert 0.45 <= optim_share <= 0.55
            held.append(params["held"])
            if label == "zero3":  # ...ZeRO-3 the parameters too, every tensor of them
                assert params["n_partitioned"] == params["n_tensors"]
                assert 0.45 <= param_share <= 0.55
            else:
                assert params["n_partitioned"] == 0 and params["held"] == params["total"]
        if label == "zero3":
            # Together the shards are the model (DeepSpeed pads each tensor to a multiple of the ranks).
            total, n = params["total"], params["n_tensors"]
            assert total <= sum(held) <= total + n * (N_RANKS - 1)


# --- resume from the sharded checkpoint ------------------------------------------------------------


def test_resume_from_a_sharded_checkpoint_matches_an_uninterrupted_run(sft_zero3, tmp_path, data_cache) -> None:
    out = tmp_path / "resumed"
    # SIGUSR1 at step 2, as SLURM sends before preemption: align checkpoints, every rank exits 75, and
    # jobs/torchrun_requeue.py (the launcher jobs/ use) passes 75 on.
    first = launch(
        out,
        data_cache,
        "stage=sft",
        "deepspeed=zero3",
        *TINY,
        probe="probe-first",
        preempt_at=2,
        launcher=TORCHRUN_REQUEUE,
        expect_rc=REQUEUE_EXIT_CODE,
    )
    assert sorted(first.step_rows()) == [1, 2]
    assert not (out / "final").exists()
    check_sharded_checkpoints(first, [2])

    second = launch(out, data_cache, "stage=sft", "deepspeed=zero3", *TINY, "resume=auto")
    said = second.proc.stdout + second.proc.stderr
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-2'}" in said
    # The resumed run trained steps 3 and 4 only, on the rows the uninterrupted run used there.
    for rank in range(N_RANKS):
        assert second.probe(rank)["batches"] == sft_zero3.probe(rank)["batches"][2:]
    resumed, straight = second.step_rows(), sft_zero3.step_rows()
    for step in range(1, STEPS + 1):
        a, b = resumed[step]["train/loss"], straight[step]["train/loss"]
        print(f"step {step}: loss {a:.15f} resumed, {b:.15f} uninterrupted")
        assert resumed[step]["train/loss"] == pytest.approx(straight[step]["train/loss"], rel=1e-6, abs=0)
    final_resumed, final_straight = (load_file(r.out / "final" / "model.safetensors") for r in (second, sft_zero3))
    weight_diff = max((final_resumed[k] - final_straight[k]).abs().max().item() for k in final_straight)
    print(f"largest final-weight difference, resumed vs uninterrupted: {weight_diff:.2e}")
    assert weight_diff <= 1e-6


# --- ZeRO-3 with offload ---------------------------------------------------------------------------


def test_zero3_offload_trains_like_zero3(sft_zero3, tmp_path, data_cache) -> None:
    # The plain entry point, no probe; 2 steps (the constant learning rate makes them the same
    # steps as the first 2 of the 4-step run).
    run = launch(
        tmp_path / "offload",
        data_cache,
        "stage=sft",
        "deepspeed=zero3_offload",
        *TINY,
        "train.max_steps=2",
        probe=None,
    )
    saved = (run.out / "config.yaml").read_text()
    assert "offload_optimizer: true" in saved and "offload_param: true" in saved
    offload, plain = run.step_rows(), sft_zero3.step_rows()
    assert sorted(offload) == [1, 2]
    for step in (1, 2):
        print(f"step {step}: loss {offload[step]['train/loss']:.15f} offload, {plain[step]['train/loss']:.15f} zero3")
        assert offload[step]["train/loss"] == pytest.approx(plain[step]["train/loss"], rel=LOSS_RTOL)
    model = AutoModelForCausalLM.from_pretrained(run.out / "final")
    assert all(torch.isfinite(p).all() for p in model.parameters())
