"""PPO and GRPO on the real SmolLM2-135M-Instruct with `rollout.engine=vllm`: a real tokenizer, chat
template (its end of turn is a stop) and weights, tied embeddings, through the entry point."""

from __future__ import annotations

import pytest

from tests.conftest import read_log
from tests.vllm.test_vllm_stages import VLLM, gaps

pytestmark = [pytest.mark.vllm, pytest.mark.real_model]

STAGES = {
    "grpo": ("stage=grpo", "ppo.reward_fn=align.rl.verifiable:number_match", "ppo.responses_per_prompt=4"),
    # PPO with a value model started from the policy (no reward model: a rule-based reward).
    "ppo": ("stage=ppo", "ppo.reward_fn=tests.rewards:brevity", "ppo.value_init=policy", "ppo.value_warmup_steps=0",
            "ppo.responses_per_prompt=2"),
}  # fmt: skip


@pytest.mark.parametrize("stage", STAGES)
def test_smollm2_samples_through_the_engine(run_align, tmp_path, smollm2, stage):
    out = tmp_path / stage
    run_align(*STAGES[stage], f"model.name_or_path={smollm2}", *VLLM, "train.max_steps=2", "ppo.prompts_per_step=2",
              "train.batch_size=2", "ppo.max_new_tokens=24", "train.lr=1e-5", f"output_dir={out}")  # fmt: skip
    log = read_log(out)
    print(gaps(log), [row["ppo/response_length"] for row in log])
    assert len(log) == 2 and max(gaps(log)) < 1e-3
    assert all(row["ppo/response_length"] > 1 and row["ppo/policy_trained"] == 1.0 for row in log)
