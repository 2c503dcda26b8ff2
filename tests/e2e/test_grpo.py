"""Critic-free online RL through `python -m align stage=grpo` (and `stage=ppo ppo.advantage=...`) on
the tiny model: no value model is built, checkpointed or saved; every estimator and DAPO option
runs (with LoRA too); GRPO raises a rule-based reward. Estimator maths: tests/unit/test_ppo_advantages.py; exact
resume: tests/e2e/test_kill_resume.py."""

from __future__ import annotations

import json
import math

import pytest

from align.cli import check_overrides
from align.errors import ConfigError
from align.rl.verifiable import number_match
from align.stages.ppo import check_config
from tests.conftest import read_log
from tests.e2e.test_errors import assert_one_line_error

BREVITY = "ppo.reward_fn=tests.rewards:brevity"
VALUE_KEYS = ("ppo/value_loss", "ppo/vf_clipfrac", "ppo/value_grad_norm", "ppo/explained_variance")


def test_grpo_raises_the_reward_with_no_value_model(run_align, tmp_path):
    out = tmp_path / "grpo"
    # The brevity reward from a random policy at lr 3e-4: 20 steps took the mean reward of 5 steps
    # from 0.03 to 0.76 (measured 2026-12-04 on ce13cb6; grpo_tiny's lr 1e-4 moved it less).
    run_align("stage=grpo", BREVITY, "train.max_steps=20", "train.lr=3e-4", f"output_dir={out}")
    said = (out / "cli.log").read_text()
    assert "advantage: grpo [stage], no value model" in said and "rollout:   hf [default]" in said
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 21))
    rewards = [r["ppo/reward_raw"] for r in log]
    print(rewards)
    start, end = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert end > start + 0.1, (start, end)
    for row in log:
        assert not any(key in row for key in VALUE_KEYS), row
        assert 0 <= row["ppo/uniform_groups"] <= 1 and math.isfinite(row["ppo/kl_loss"])
    assert log[0]["ppo/policy_trained"] == 1.0  # no critic warm-up: the policy trains from step 1
    checkpoint = out / "checkpoints" / "checkpoint-10"
    assert (checkpoint / "policy").is_dir() and not (checkpoint / "value").exists()
    assert (out / "final" / "model.safetensors").is_file() and not (out / "final" / "value").exists()


SMALL = ("train.max_steps=2", "ppo.prompts_per_step=2", "ppo.responses_per_prompt=4", "train.batch_size=4",
         "ppo.mini_batches=2", "ppo.max_new_tokens=8", "ppo.sample_every=0")  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [
        ("ppo.advantage=rloo", "ppo.skip_uniform_groups=true", "ppo.clip_eps_high=0.28", "peft=lora", "peft.r=8"),
        ("ppo.advantage=dr_grpo", "ppo.loss_agg=token_sum", "ppo.overlong_filter=true"),
        ("ppo.advantage=reinforce_pp", "ppo.kl_in=reward", "ppo.loss_agg=token_mean"),
    ],
    ids=["rloo", "dr_grpo", "reinforce_pp"],
)
def test_each_critic_free_estimator_trains_the_policy_alone(run_align, tmp_path, options):
    out = tmp_path / "run"
    run_align("stage=grpo", BREVITY, *SMALL, *options, f"output_dir={out}")
    log = read_log(out)
    assert len(log) == 2
    for row in log:
        assert not any(key in row for key in VALUE_KEYS), row
        assert math.isfinite(row["ppo/policy_loss"]) and math.isfinite(row["ppo/policy_grad_norm"])
    assert ("ppo/kl_loss" in log[0]) == ("ppo.kl_in=reward" not in options)
    assert not (out / "final" / "value").exists()
    # LoRA: the adapter alone is saved, and the reference is its base with the adapter off.
    lora = "peft=lora" in options
    assert (out / "final" / "adapter_model.safetensors").is_file() == lora
    assert (out / "final" / "model.safetensors").is_file() != lora


def test_the_overlong_filter_leaves_cut_off_responses_out(run_align, tmp_path):
    """The random tiny model never ends a response within 4 tokens: with the filter nothing is left
    to train on, so the policy's loss and gradient are exactly zero."""
    out = tmp_path / "run"
    run_align("stage=grpo", BREVITY, *SMALL, "ppo.max_new_tokens=4", "ppo.overlong_filter=true", f"output_dir={out}")
    for row in read_log(out):
        assert row["ppo/eos_rate"] == 0.0
        assert row["ppo/policy_loss"] == 0.0 and row["ppo/policy_grad_norm"] == 0.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ppo.advantage=grpo", "ppo.responses_per_prompt=1"], "ppo.responses_per_prompt must be at least 2"),
        (["ppo.advantage=ppo"], "ppo.advantage must be one of gae, grpo, dr_grpo, rloo, reinforce_pp"),
        (["ppo.loss_agg=sum"], "ppo.loss_agg must be one of token_mean, seq_mean, token_sum"),
        (["ppo.kl_in=both"], "ppo.kl_in must be one of reward, loss"),
        (["ppo.clip_eps_high=0"], "ppo.clip_eps_high must be above 0"),
    ],
)
def test_bad_critic_free_settings_fail_at_start_up(overrides, message):
    config = check_overrides(["stage=grpo", "model=tiny", BREVITY, *overrides])
    with pytest.raises(ConfigError, match=message):
        check_config(config)


def test_the_built_in_number_match_scores_each_response_against_its_rows_answer(run_align, tmp_path):
    """GSM8K-shaped rows (the gold answer after `####`); the two whose answer holds no number are left
    out (TRL's None), so a sample's reward is None exactly when its own row's answer is one of them."""
    rows = [{"question": f"Q{i}: what is {i % 5} + {i % 4}?", "answer": f"{i % 5} + {i % 4}\n#### {i % 5 + i % 4}"}
            for i in range(10)]  # fmt: skip
    rows += [{"question": f"Q{i}: name a colour", "answer": "#### blue"} for i in (10, 11)]
    (tmp_path / "math.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = tmp_path / "math.yaml"
    recipe.write_text("kind: prompt\nsources:\n  - {path: math.jsonl, format: prompt, columns: {prompt: question}}\n")
    out = tmp_path / "grpo"
    run_align("stage=grpo", f"data.recipe={recipe}", "ppo.reward_fn=align.rl.verifiable:number_match",
              "train.max_steps=3", "ppo.prompts_per_step=4", "ppo.responses_per_prompt=4", "train.batch_size=16",
              "ppo.mini_batches=1", "ppo.max_new_tokens=8", "ppo.sample_every=1", f"output_dir={out}")  # fmt: skip
    answers = {row["question"]: row["answer"] for row in rows}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 16
    for sample in samples:
        (expected,) = number_match([sample["prompt"]], [sample["response"]], [answers[sample["prompt"]]])
        assert sample["reward"] == expected, sample
    rewards = [s["reward"] for s in samples]
    assert None in rewards and 0.0 in rewards and set(rewards) <= {None, 0.0, 1.0}
    log = read_log(out)
    assert sum(r["ppo/unscored"] for r in log) > 0


def test_a_verifiable_reward_on_data_without_answers_stops_at_start_up(run_align, tmp_path):
    (tmp_path / "bare.jsonl").write_text("".join(json.dumps({"prompt": f"Q{i}"}) + "\n" for i in range(4)))
    recipe = tmp_path / "bare.yaml"
    recipe.write_text("kind: prompt\nsources:\n  - {path: bare.jsonl, format: prompt}\n")
    proc = run_align("stage=grpo", f"data.recipe={recipe}", "ppo.reward_fn=align.rl.verifiable:exact_match",
                     f"output_dir={tmp_path / 'out'}", check=False)  # fmt: skip
    assert_one_line_error(proc, "ConfigError", "align.rl.verifiable:exact_match takes 'answer', which no prompt row")
