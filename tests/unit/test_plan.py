"""The start-up block says what really runs and where each number came from; a demo tuning preset
refuses a checkpoint of another architecture."""

from __future__ import annotations

import pytest

from align.cli import check_overrides
from align.config import ModelConfig
from align.errors import ConfigError
from align.modeling import models
from align.run import plan
from tests.own_models import TINY, pretrained_tiny


@pytest.mark.parametrize(
    ("overrides", "key", "expected"),
    [
        (["stage=sft", "model=tiny"], "train.lr", "tuning"),
        (["stage=sft", "model=qwen2.5-7b"], "train.lr", "default"),
        (["stage=ppo", "model=qwen2.5-7b"], "train.lr", "stage"),
        (["stage=ppo", "model=qwen2.5-7b"], "ppo.value_lr", "default"),
        (["stage=ppo", "model=tiny"], "ppo.value_lr", "tuning"),
        (["stage=rm", "model.name_or_path=/m", "train.lr=5e-6"], "train.lr", "override"),
        (["stage=sft", "model=tiny", "train.lr=1e-3"], "train.lr", "tuning"),  # the same value as the preset
    ],
)
def test_origin(overrides, key, expected):
    assert plan.origin(check_overrides(overrides), key) == expected


def test_the_block_names_model_init_template_rates_and_batch(tmp_path):
    path = pretrained_tiny(tmp_path / "mine")
    config = check_overrides(["stage=sft", f"model.name_or_path={path}", "train.grad_accum=4"])
    tokenizer = models.load_tokenizer(config.model)
    model = models.load_causal_lm(config.model, tokenizer)
    block = plan.describe(config, config.model, model, tokenizer)
    assert f"model:     {path} (Qwen2ForCausalLM, 3.3M parameters, pretrained weights, float32)" in block
    assert "template:  align's ChatML (assistant turns end with '<|im_end|>'; no new tokens)" in block
    assert "lr:        2e-06 [default], constant_with_warmup [default], warm-up 1430 steps [default]" in block
    assert "batch:     1 per device [default] x 4 accumulation [override] x 1 process(es) = 4 sequences" in block
    assert "steps:     4000 [default], max length 2048 tokens [default]" in block
    assert "no tuning preset" in block


def test_the_block_of_a_ppo_run_names_both_rates():
    config = check_overrides(["stage=ppo", "model=tiny"])
    tokenizer = models.load_tokenizer(config.model)
    model = models.load_causal_lm(config.model, tokenizer, seed=config.seed)
    block = plan.describe(config, config.model, model, tokenizer)
    assert "random init (seed 42)" in block
    assert "lr:        0.0001 [tuning], constant [stage]" in block
    assert "value:     lr 0.0001 [tuning], warm-up 5 steps [tuning]" in block
    assert "16 prompts [tuning] x 2 responses [default] = 32 episodes per device" in block
    assert "[tuning] conf/tuning/ppo_tiny.yaml" in block


def test_a_demo_preset_refuses_a_checkpoint_of_another_architecture(tmp_path):
    config = check_overrides(["stage=ppo", "model=tiny", "ppo.policy=/any"])
    same = pretrained_tiny(tmp_path / "same")
    models.check_tuning_fits(config, ModelConfig(name_or_path=str(same)), "ppo.policy")
    other = pretrained_tiny(tmp_path / "wide", hidden_size=128, intermediate_size=256)
    with pytest.raises(ConfigError) as err:
        models.check_tuning_fits(config, ModelConfig(name_or_path=str(other)), "ppo.policy")
    assert str(err.value).startswith(f"ppo.policy={other} (model_type qwen2, hidden_size 128,")
    assert "conf/tuning/ppo_tiny.yaml" in str(err.value)
    # A run of one's own has no preset to protect.
    own = check_overrides(["stage=ppo", f"ppo.policy={other}"])
    models.check_tuning_fits(own, ModelConfig(name_or_path=str(other)), "ppo.policy")


def test_the_tiny_preset_is_the_tiny_asset():
    assert check_overrides(["model=tiny"]).model.name_or_path == str(TINY)
