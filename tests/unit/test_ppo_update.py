"""The update reusing the scoring forward (a rollout of one micro-batch) is the plain update."""

import copy

import torch
from accelerate import Accelerator
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from align.config import REPO_ROOT, AlignConfig
from align.ppo.forward import ValueModel, disable_dropout, response_logprobs
from align.ppo.placement import Placement
from align.ppo.rollout import sample
from align.stages.ppo import make_optimizer, score_forward, update

TINY = REPO_ROOT / "align" / "assets" / "tiny"


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    config = AutoConfig.from_pretrained(TINY)
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_labels": 1})
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config)
    value = ValueModel(AutoModelForSequenceClassification.from_config(config))
    for model in (policy, value):
        disable_dropout(model)
    return policy, value


def _finite(what: str) -> None:
    raise AssertionError(f"non-finite {what}")


def test_update_reusing_the_scoring_forward_equals_a_fresh_forward():
    config = AlignConfig(stage_name="ppo", output_dir="unused")
    config.train.batch_size = 4
    config.ppo.mini_batches, config.ppo.epochs = 1, 2
    config.train.lr, config.ppo.value_lr = 1e-3, 1e-3
    config.train.warmup_steps, config.train.warmup_ratio = 0, 0.0  # full learning rate from the first step
    placement = Placement(Accelerator(cpu=True), ds_config=None)
    policy, value = _models()
    trained = {}
    for name in ("reused", "fresh"):
        p, v = copy.deepcopy(policy), copy.deepcopy(value)
        trained[name] = (
            placement.trained(p, *make_optimizer(p, config.train.lr, config, 10)),
            placement.trained(v, *make_optimizer(v, config.ppo.value_lr, config, 10)),
        )
    torch.manual_seed(1)
    rollout = sample(
        policy,
        [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]],
        pad_id=0,
        eos_ids=[2],
        max_new_tokens=6,
        temperature=1.0,
        top_p=1.0,
        device=torch.device("cpu"),
    )
    advantages, returns = torch.randn(2, *rollout.response_mask.shape)

    p, v = trained["reused"]
    first = score_forward(p, v, rollout, 1.0, config, train=True)
    assert first.keeps_graph and first.logp.requires_grad and first.values.requires_grad
    old_logp, old_values = first.logp.detach(), first.values.detach()
    reused = update(config, p, v, rollout, old_logp, old_values, advantages, returns, True, None, first, _finite)

    p, v = trained["fresh"]
    with torch.no_grad():
        fresh_logp, _ = response_logprobs(p, rollout.input_ids, rollout.attention_mask, rollout.prompt_len, 1.0)
        fresh_values = v(rollout.input_ids, rollout.attention_mask, rollout.prompt_len)
    torch.testing.assert_close(fresh_logp, old_logp, rtol=0, atol=0)
    torch.testing.assert_close(fresh_values, old_values, rtol=0, atol=0)
    fresh = update(config, p, v, rollout, fresh_logp, fresh_values, advantages, returns, True, None, None, _finite)

    assert reused.keys() == fresh.keys()
    for key in reused:
        # Shuffling one micro-batch only reorders sums: the same numbers to float rounding.
        assert abs(reused[key] - fresh[key]) <= 1e-5 * max(1.0, abs(fresh[key])), key
    for (name, a), (_, b) in zip(
        [*trained["reused"][0].module.named_parameters(), *trained["reused"][1].module.named_parameters()],
        [*trained["fresh"][0].module.named_parameters(), *trained["fresh"][1].module.named_parameters()],
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    moved = max(
        (a - b).abs().max().item()
        for a, b in zip(trained["reused"][0].module.parameters(), policy.parameters(), strict=True)
    )
    assert moved > 1e-4  # both paths really trained the policy
