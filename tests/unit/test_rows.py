"""Packed rows compute what padded rows compute: log-probs, values, rewards and their gradients."""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from align.config import REPO_ROOT
from align.modeling.reward_model import row_rewards
from align.modeling.rows import PackedRows, PaddedRows, can_pack, enable_packing
from align.rl.forward import ValueModel, disable_dropout, response_logprobs
from align.rl.rollout import left_pad, sample

TINY = REPO_ROOT / "align" / "assets" / "tiny"
PAD, EOS = 0, 2


def _config(**overrides):
    config = AutoConfig.from_pretrained(TINY)
    # 4 query heads on 2 key/value heads: grouped-query attention, as in Qwen2 and Llama.
    config.update(
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_labels": 1,
            "pad_token_id": PAD,
            **overrides,
        }
    )
    return config


def _rollout_tensors():
    """Three rows: unequal prompts (left padding), responses ending at EOS at different places."""
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], PAD, torch.device("cpu"))
    response = torch.tensor([[20, 21, EOS, PAD], [22, 23, 24, 25], [EOS, PAD, PAD, PAD]])
    response_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    return torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1), ids.shape[1], response_mask


def _grouped_rollout_tensors():
    """Six rows: two groups sharing a prompt (rows 0, 2, 3 and rows 1, 4), and row 5 with its own."""
    prompts = [[5, 6, 7, 8, 9], [10, 11], [5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    ids, mask = left_pad(prompts, PAD, torch.device("cpu"))
    response = torch.tensor(
        [[20, 21, EOS], [22, 23, 24], [EOS, PAD, PAD], [25, EOS, PAD], [26, 27, EOS], [28, 29, EOS]]
    )
    response_mask = (response != PAD).long()
    return torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1), ids.shape[1], response_mask


def test_packed_rows_index_the_real_tokens_by_hand():
    ids, mask, prompt_len, _ = _rollout_tensors()
    rows = PackedRows(ids, mask, prompt_len)
    # Row lengths 5 + 3, 2 + 4, 3 + 1: each prompt a segment, each response one that also sees it.
    assert rows.segments == [
        (0, 5, 0, 0),
        (5, 8, 0, 5),
        (8, 10, 0, 0),
        (10, 14, 8, 10),
        (14, 17, 0, 0),
        (17, 18, 14, 17),
    ]
    assert rows.input_ids.tolist() == [[5, 6, 7, 8, 9, 20, 21, EOS, 10, 11, 22, 23, 24, 25, 12, 13, 14, EOS]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]
    # The logit predicting each response token sits one position before it.
    assert rows.logits_to_keep.tolist() == [4, 5, 6, 9, 10, 11, 12, 16]
    assert rows.response_tokens.tolist() == [20, 21, EOS, 22, 23, 24, 25, EOS]
    spread = rows.to_rows(torch.arange(1.0, 9.0))
    assert spread.tolist() == [[1, 2, 3, 0], [4, 5, 6, 7], [8, 0, 0, 0]]
    hidden = torch.arange(18.0).reshape(1, 18, 1)
    assert rows.at_last_token(hidden).squeeze(-1).tolist() == [7, 13, 17]
    assert PaddedRows(ids, mask, prompt_len).at_last_token(hidden.expand(3, 18, 1)[:, :9]).squeeze(-1).tolist() == [
        7,
        8,
        5,
    ]


def test_rows_with_the_same_prompt_hold_it_once_by_hand():
    ids, mask, prompt_len, _ = _grouped_rollout_tensors()
    rows = PackedRows(ids, mask, prompt_len)
    # Prompt [5..9] once (0-5), then its three responses; prompt [10, 11] once (11-13), then its two;
    # the last row's prompt (19-22), then its response.
    assert rows.segments == [
        (0, 5, 0, 0),
        (5, 8, 0, 5),
        (8, 9, 0, 5),
        (9, 11, 0, 5),
        (11, 13, 0, 0),
        (13, 16, 11, 13),
        (16, 19, 11, 13),
        (19, 22, 0, 0),
        (22, 25, 19, 22),
    ]
    assert rows.input_ids.tolist() == [
        [5, 6, 7, 8, 9, 20, 21, EOS, EOS, 25, EOS, 10, 11, 22, 23, 24, 26, 27, EOS, 12, 13, 14, 28, 29, EOS]
    ]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 5, 5, 6, 0, 1, 2, 3, 4, 2, 3, 4, 0, 1, 2, 3, 4, 5]]
    # Each response's first token is predicted at its shared prompt's last position.
    assert rows.logits_to_keep.tolist() == [4, 5, 6, 12, 13, 14, 4, 4, 9, 12, 16, 17, 21, 22, 23]
    assert rows.response_tokens.tolist() == [20, 21, EOS, 22, 23, 24, EOS, 25, EOS, 26, 27, EOS, 28, 29, EOS]
    hidden = torch.arange(25.0).reshape(1, 25, 1)
    assert rows.at_last_token(hidden).squeeze(-1).tolist() == [7, 15, 8, 10, 18, 24]


def test_a_row_without_prompt_tokens_is_refused():
    ids = torch.tensor([[0, 0, 7, 8], [5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="no prompt token"):
        PackedRows(ids, mask, prompt_len=2)


@pytest.mark.parametrize("tensors", [_rollout_tensors, _grouped_rollout_tensors], ids=["own-prompts", "shared-prompts"])
def test_packed_forwards_match_padded_values_and_gradients(tensors):
    config = _config()
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config)
    value = ValueModel(AutoModelForSequenceClassification.from_config(config))
    reward = AutoModelForSequenceClassification.from_config(config)
    for model in (policy, value, reward):
        disable_dropout(model)
    packed_policy, packed_value, packed_reward = (copy.deepcopy(m) for m in (policy, value, reward))
    for model in (packed_policy, packed_value.hf_model, packed_reward):
        enable_packing(model)

    ids, mask, prompt_len, response_mask = tensors()
    padded, packed = PaddedRows(ids, mask, prompt_len), PackedRows(ids, mask, prompt_len)
    results = {}
    for name, rows, p, v, r in (
        ("padded", padded, policy, value, reward),
        ("packed", packed, packed_policy, packed_value, packed_reward),
    ):
        logp, entropy = response_logprobs(p, rows, 0.7, with_entropy=True)
        if rows is packed:
            assert not logp[response_mask == 0].any()  # after each EOS: nothing computed, 0
        values = v(rows)
        ((logp * response_mask).sum() + (values * response_mask).sum()).backward()
        with torch.no_grad():
            rewards = row_rewards(r, rows)
        grads = [param.grad.clone() for param in [*p.parameters(), *v.parameters()]]
        results[name] = (logp.detach() * response_mask, entropy * response_mask, values.detach() * response_mask)
        results[name] += (rewards, grads)

    (*a, a_grads), (*b, b_grads) = results["padded"], results["packed"]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    for x, y in zip(a_grads, b_grads, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)


def test_generation_is_unchanged_by_the_packed_attention():
    config = _config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    disable_dropout(model)
    switched = copy.deepcopy(model)
    enable_packing(switched)
    outputs = []
    for m in (model, switched):
        torch.manual_seed(3)
        rollout = sample(
            m,
            [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]],
            pad_id=PAD,
            eos_ids=[EOS],
            max_new_tokens=8,
            temperature=1.0,
            top_p=1.0,
            device=torch.device("cpu"),
        )
        outputs.append(rollout.input_ids)
    assert torch.equal(*outputs)


@pytest.mark.parametrize(
    "overrides, attention, expected",
    [
        ({}, "sdpa", True),
        ({}, "eager", False),
        ({"sliding_window": 16, "layer_types": ["full_attention", "sliding_attention"]}, "sdpa", False),
    ],
    ids=["sdpa", "eager", "sliding-window"],
)
def test_only_full_attention_sdpa_models_are_packed(overrides, attention, expected):
    model = AutoModelForCausalLM.from_config(_config(**overrides), attn_implementation=attention)
    assert can_pack(model) is expected
