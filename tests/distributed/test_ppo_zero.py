"""PPO on 2 CPU ranks (gloo) under DeepSpeed ZeRO-2 and ZeRO-3, through `accelerate launch -m align`
and `torchrun -m align`.

Two trained engines (policy, value), the reference and a rule-based reward on the tiny model. ZeRO-2
runs the rollout as one micro-batch (the scoring forward's graph reused by the update); ZeRO-3 takes
two micro-batches per mini-batch (DeepSpeed's gradient accumulation). Each saves a whole final/ that
reloads on one process; a ZeRO-3 run killed after a sharded checkpoint and resumed ends exactly where
an uninterrupted one does. The adaptive KL controller is one controller across ranks.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tests.conftest import read_log
from tests.distributed.test_stages_zero import (
    ACCELERATE,
    N_RANKS,
    REPO,
    check_fp32_masters_saved,
    launch,
    ranks_env,
    torchrun_command,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 4
TINY_PPO = (
    "stage=ppo",
    "ppo.reward_fn=tests.rewards:brevity",
    f"train.max_steps={STEPS}",
    "train.save_steps=2",
    "train.precision=fp32",
    "ppo.prompts_per_step=4",
    "ppo.responses_per_prompt=2",
    "ppo.value_warmup_steps=1",
    "ppo.max_new_tokens=8",
)
ONE_MICRO_BATCH = ("train.batch_size=8", "ppo.mini_batches=1", "ppo.epochs=1")
TWO_MICRO_BATCHES = ("train.batch_size=4", "ppo.mini_batches=1", "ppo.epochs=2")
TINY_PARAMETERS = 3_322_112  # align/assets/tiny


def check_final(out: Path) -> None:
    """final/ holds the whole policy and value model (ZeRO-3 gathered them), reloadable here."""
    policy, info = AutoModelForCausalLM.from_pretrained(out / "final", output_loading_info=True)
    assert not any(info.values()), info
    assert sum(p.numel() for p in policy.parameters()) == TINY_PARAMETERS
    value, info = AutoModelForSequenceClassification.from_pretrained(out / "final" / "value", output_loading_info=True)
    assert not any(info.values()), info
    for model in (policy, value):
        assert all(torch.isfinite(p).all() for p in model.parameters())
    ids = torch.tensor([[5, 6, 7]])
    assert policy.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)


def check_steps(out: Path) -> dict[int, dict]:
    rows = {r["step"]: r for r in read_log(out)}
    assert sorted(rows) == list(range(1, STEPS + 1))
    for row in rows.values():
        assert all(math.isfinite(row[k]) for k in ("ppo/reward_raw", "ppo/kl", "ppo/value_loss")), row
    assert "ppo/policy_loss" not in rows[1] and "ppo/policy_loss" in rows[2]  # critic warm-up, then both
    return rows


def test_ppo_zero2_two_ranks_in_bf16(tmp_path, data_cache) -> None:
    # Started with `accelerate launch`, the other launcher users have (the rest use torchrun).
    args = (*TINY_PPO, *ONE_MICRO_BATCH, "deepspeed=zero2", "train.precision=bf16")
    run = launch(tmp_path / "zero2", data_cache, *args, probe=None, launcher=ACCELERATE)
    assert {p.name for p in (run.out / "checkpoints" / "checkpoint-2").glob("rng_rank*.pt")} == {
        f"rng_rank{r}.pt" for r in range(N_RANKS)
    }
    rows = check_steps(run.out)
    # One micro-batch, one epoch: the update reuses the scoring forward, so the ratio is exactly 1,
    # in bf16 as in fp32.
    assert all(rows[s]["ppo/ratio"] == 1.0 for s in range(2, STEPS + 1))
    shards = run.out / "checkpoints" / "checkpoint-2" / "policy" / "deepspeed"
    assert {p.name for p in shards.iterdir()} == {
        "mp_rank_00_model_states.pt",  # ZeRO-2: weights whole, optimizer state sharded
        *(f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(N_RANKS)),  # the fp32 masters
    }
    check_final(run.out)
    for folder in (run.out / "final", run.out / "final" / "value"):
        check_fp32_masters_saved(folder)


def test_ppo_zero3_two_ranks_resumes_from_sharded_checkpoint(tmp_path, data_cache) -> None:
    args = (*TINY_PPO, *TWO_MICRO_BATCHES, "deepspeed=zero3")
    straight = launch(tmp_path / "straight", data_cache, *args, probe=None)
    rows = check_steps(straight.out)
    for role in ("policy", "value"):
        shards = straight.out / "checkpoints" / "checkpoint-2" / role / "deepspeed"
        assert {p.name for p in shards.iterdir()} == {
            f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in range(N_RANKS) for kind in ("model", "optim")
        }
    check_final(straight.out)

    # Kill every rank (SIGKILL to the launcher's process group) once checkpoint-2 is complete.
    out = tmp_path / "resumed"
    command = [*torchrun_command("-m", "align"), *args, f"output_dir={out}"]
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=ranks_env(data_cache),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker = out / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not marker.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.is_file() and not (out / "final").exists()

    resumed = launch(out, data_cache, *args, "resume=auto", probe=None)
    said = resumed.proc.stdout + resumed.proc.stderr
    assert "resuming from" in said and "checkpoint-" in said
    got = {r["step"]: r for r in read_log(out)}  # the last line of each step: the resumed run's
    for step in (3, 4):
        for key in ("ppo/reward_raw", "ppo/kl", "ppo/policy_loss", "ppo/value_loss"):
            print(f"step {step} {key}: resumed {got[step][key]!r} uninterrupted {rows[step][key]!r}")
            assert got[step][key] == pytest.approx(rows[step][key], rel=1e-6, abs=1e-9), (step, key)
    for name in ("model.safetensors", "value/model.safetensors"):
        a, b = load_file(out / "final" / name), load_file(straight.out / "final" / name)
        diff = max((a[k] - b[k]).abs().max().item() for k in b)
        print(f"final {name}: largest difference resumed vs uninterrupted {diff:.2e}")
        assert diff <= 1e-6


def test_adaptive_kl_sees_the_kl_of_every_ranks_episodes(tmp_path, data_cache) -> None:
    """Each rank samples its own episodes, so their KLs differ once the policy moves. The controller must
    be given the mean over all ranks' episodes: with each rank's own, the ranks' penalties drift apart,
    the logged coefficient (a mean over ranks) hides it, and a checkpoint (rank 0's controller) resumes
    rank 1 with another one."""
    steps = 3
    run = launch(
        tmp_path / "kl",
        data_cache,
        "stage=ppo",
        "ppo.reward_fn=tests.rewards:brevity",
        f"train.max_steps={steps}",
        "train.save_steps=2",
        "train.precision=fp32",
        "ppo.prompts_per_step=4",
        "ppo.responses_per_prompt=2",
        "ppo.value_warmup_steps=0",  # the policy moves at step 1: KL from step 2
        "ppo.max_new_tokens=8",
        "ppo.adaptive_kl=true",
        "ppo.kl_horizon=100",
        *ONE_MICRO_BATCH,
        "deepspeed=zero2",
    )
    calls = [json.loads((run.out / "probe" / f"kl_rank{rank}.json").read_text()) for rank in range(N_RANKS)]
    logged = {row["step"]: row for row in read_log(run.out)}
    assert len(calls[0]) == len(calls[1]) == steps
    for step, (rank0, rank1) in enumerate(zip(*calls, strict=True), start=1):
        assert rank0 == rank1, step  # the same KL, episode count and coefficient on every rank
        assert rank0["n_steps"] == N_RANKS * 4 * 2
        assert rank0["kl"] == pytest.approx(logged[step]["ppo/kl"], rel=1e-9, abs=1e-12)  # the global mean
        assert rank0["coef"] == logged[step]["ppo/kl_coef"]
    assert abs(calls[0][-1]["kl"]) > 1e-3  # the policy moved: the ranks' KLs were not all 0
    saved = json.loads((run.out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["kl_ctl"]["value"] == calls[1][1]["coef"]  # rank 0's checkpoint resumes rank 1 as it was


def test_grpo_zero3_two_ranks_trains_the_policy_alone(tmp_path, data_cache) -> None:
    """Critic-free under ZeRO-3: one trained engine (the policy) and the sharded reference; groups of 2
    responses per prompt on each rank, the KL in the loss; final/ holds the whole policy, no value."""
    args = ("stage=grpo", *TINY_PPO[1:], "ppo.value_warmup_steps=0", *TWO_MICRO_BATCHES, "deepspeed=zero3")
    run = launch(tmp_path / "grpo", data_cache, *args, probe=None)
    rows = {r["step"]: r for r in read_log(run.out)}
    assert sorted(rows) == list(range(1, STEPS + 1))
    for row in rows.values():
        assert all(math.isfinite(row[k]) for k in ("ppo/reward_raw", "ppo/kl", "ppo/policy_loss", "ppo/kl_loss")), row
        assert "ppo/value_loss" not in row and 0 <= row["ppo/uniform_groups"] <= 1
    checkpoint = run.out / "checkpoints" / "checkpoint-2"
    assert {p.name for p in (checkpoint / "policy" / "deepspeed").iterdir()} == {
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in range(N_RANKS) for kind in ("model", "optim")
    }
    assert not (checkpoint / "value").exists() and not (run.out / "final" / "value").exists()
    policy, info = AutoModelForCausalLM.from_pretrained(run.out / "final", output_loading_info=True)
    assert not any(info.values()), info
    assert sum(p.numel() for p in policy.parameters()) == TINY_PARAMETERS
