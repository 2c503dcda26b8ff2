"""The update reusing the scoring forward (a rollout of one micro-batch) is the plain update; the PTX
loss trains the policy."""

import copy
import itertools

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from align.config import REPO_ROOT, AlignConfig
from align.modeling.rows import enable_packing, make_rows
from align.rl.forward import ValueModel, disable_dropout, response_logprobs
from align.rl.placement import Placement
from align.rl.rollout import sample
from align.stages.ppo import collate_lm, make_optimizer, score_forward, update

TINY = REPO_ROOT / "align" / "assets" / "tiny"


def _models(packed: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    config = AutoConfig.from_pretrained(TINY)
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_labels": 1})
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config)
    value = ValueModel(AutoModelForSequenceClassification.from_config(config))
    for model in (policy, value):
        disable_dropout(model)
    if packed:
        enable_packing(policy)
        enable_packing(value.hf_model)
    return policy, value


def _rollout(policy: torch.nn.Module):
    """Four episodes of up to six sampled tokens, the same ones on every call."""
    torch.manual_seed(1)
    return sample(
        policy,
        [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]],
        pad_id=0,
        eos_ids=[2],
        max_new_tokens=6,
        temperature=1.0,
        top_p=1.0,
        device=torch.device("cpu"),
    )


def _finite(what: str) -> None:
    raise AssertionError(f"non-finite {what}")


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_update_reusing_the_scoring_forward_equals_a_fresh_forward(packed):
    config = AlignConfig(stage_name="ppo", output_dir="unused")
    config.train.batch_size = 4
    config.ppo.prompts_per_step, config.ppo.responses_per_prompt = 4, 1
    config.ppo.mini_batches, config.ppo.epochs = 1, 2
    config.train.lr, config.ppo.value_lr = 1e-3, 1e-3
    config.train.warmup_steps, config.train.warmup_ratio = 0, 0.0  # full learning rate from the first step
    placement = Placement(Accelerator(cpu=True), ds_config=None)
    policy, value = _models(packed)
    trained = {}
    for name in ("reused", "fresh"):
        p, v = copy.deepcopy(policy), copy.deepcopy(value)
        trained[name] = (
            placement.trained(p, *make_optimizer(p, config.train.lr, config, 10)),
            placement.trained(v, *make_optimizer(v, config.ppo.value_lr, config, 10)),
        )
    rollout = _rollout(policy)
    advantages, returns = torch.randn(2, *rollout.response_mask.shape)

    rows = make_rows(rollout.input_ids, rollout.attention_mask, rollout.prompt_len, packed=packed)
    args = (None, 0.0, advantages, returns, True, None)  # KL in the reward: no reference in the update

    p, v = trained["reused"]
    first = score_forward(p, v, rows, 1.0, config, train=True)
    assert first.keeps_graph and first.logp.requires_grad and first.values.requires_grad
    old_logp, old_values = first.logp.detach(), first.values.detach()
    reused = update(config, p, v, rollout, old_logp, old_values, *args, first, _finite, packed)

    p, v = trained["fresh"]
    with torch.no_grad():
        fresh_logp, _ = response_logprobs(p, rows, 1.0)
        fresh_values = v(rows)
    torch.testing.assert_close(fresh_logp, old_logp, rtol=0, atol=0)
    torch.testing.assert_close(fresh_values, old_values, rtol=0, atol=0)
    fresh = update(config, p, v, rollout, fresh_logp, fresh_values, *args, None, _finite, packed)

    assert reused.keys() == fresh.keys()
    for key in reused:
        # Shuffling one micro-batch only reorders sums: the same numbers to float rounding.
        assert abs(reused[key] - fresh[key]) <= 1e-5 * max(1.0, abs(fresh[key])), key
    for (name, a), (_, b) in zip(
        [*trained["reused"][0].module.named_parameters(), *trained["reused"][1].module.named_parameters()],
        [*trained["fresh"][0].module.named_parameters(), *trained["fresh"][1].module.named_parameters()],
        strict=True,
    ):
        if name.endswith("k_proj.bias"):
            # Its true gradient is 0 (a key bias shifts all of a query's scores alike, and softmax
            # ignores shifts), so Adam steps on rounding noise, which summation order changes.
            continue
        # Adam divides a gradient by its own scale, so an element whose gradient is near 0 can step
        # on rounding alone (one weight of 8,192 moved 2e-6 apart on an AMD EPYC); never more than
        # Adam's step, lr per optimizer step, and everywhere else to float rounding.
        far = ~torch.isclose(a, b, rtol=1e-5, atol=1e-6)
        assert far.sum() <= max(1, a.numel() // 1000), (name, int(far.sum()))
        assert (a - b).abs().max() <= 2 * config.train.lr * config.ppo.epochs, name
    moved = max(
        (a - b).abs().max().item()
        for a, b in zip(trained["reused"][0].module.parameters(), policy.parameters(), strict=True)
    )
    assert moved > 1e-4  # both paths really trained the policy


def test_the_ptx_loss_alone_trains_the_policy():
    """With every advantage 0 the clipped policy loss has no gradient, so whatever moves the policy is
    the PTX loss: its gradient, ppo.ptx_coef times the language-modelling loss's, reaches the weights;
    without PTX nothing moves."""
    config = AlignConfig(stage_name="ppo", output_dir="unused")
    config.train.batch_size = 4
    config.ppo.prompts_per_step, config.ppo.responses_per_prompt = 4, 1
    config.ppo.mini_batches, config.ppo.epochs = 1, 1
    config.ppo.ptx_coef = 0.5
    config.train.lr, config.train.weight_decay = 1e-3, 0.0  # no decay: a zero gradient leaves AdamW still
    config.train.warmup_steps, config.train.warmup_ratio = 0, 0.0
    placement = Placement(Accelerator(cpu=True), ds_config=None)
    policy, value = _models(packed=False)
    rollout = _rollout(policy)
    rows = make_rows(rollout.input_ids, rollout.attention_mask, rollout.prompt_len, packed=False)
    zeros = torch.zeros_like(rollout.response_mask)
    sft = [
        {"input_ids": [5, 6, 7, 8, 9, 10], "assistant_masks": [0, 0, 1, 1, 1, 1]},
        {"input_ids": [11, 12, 13], "assistant_masks": [0, 1, 1]},
    ]
    ptx_batch = collate_lm(sft, pad_id=0, device=torch.device("cpu"))

    lm = copy.deepcopy(policy)
    lm(**ptx_batch).loss.backward()
    lm_grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in lm.parameters() if p.grad is not None]))

    moved, stats = {}, {}
    for name, ptx in (("ptx", itertools.repeat(ptx_batch)), ("none", None)):
        p, v = copy.deepcopy(policy), copy.deepcopy(value)
        trained_p = placement.trained(p, *make_optimizer(p, config.train.lr, config, 10))
        trained_v = placement.trained(v, *make_optimizer(v, config.ppo.value_lr, config, 10))
        with torch.no_grad():
            old_logp, _ = response_logprobs(trained_p, rows, 1.0)
            old_values = trained_v(rows)
        stats[name] = update(
            config,
            trained_p,
            trained_v,
            rollout,
            old_logp,
            old_values,
            None,
            0.0,
            zeros,
            zeros,
            True,
            ptx,
            None,
            _finite,
            False,
        )
        moved[name] = max((a - b).abs().max().item() for a, b in zip(p.parameters(), policy.parameters(), strict=True))
    assert moved["none"] == 0.0 and stats["none"]["ppo/policy_grad_norm"] == 0.0
    assert moved["ptx"] > 1e-4
    assert stats["ptx"]["ppo/policy_grad_norm"] == pytest.approx(0.5 * lm_grad_norm.item(), rel=1e-4)
