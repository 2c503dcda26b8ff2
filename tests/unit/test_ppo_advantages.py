"""GAE over response tokens only, written out step by step."""

import pytest
import torch

from align.rl.advantages import gae, whiten_advantages

GAMMA, LAM = 0.9, 0.8
# A length-3 response r1 r2 r3: hand-computed backward recursion (V after r3 is 0).
#   t=3: delta = 1.0 + 0.9 * 0   - 0.3 =  0.7;   A3 = 0.7
#   t=2: delta = -0.2 + 0.9 * 0.3 - 0.4 = -0.33;  A2 = -0.33 + 0.72 * 0.7   = 0.174
#   t=1: delta = 0.1 + 0.9 * 0.4 - 0.5 = -0.04;  A1 = -0.04 + 0.72 * 0.174 = 0.08528
R = [0.1, -0.2, 1.0]
V = [0.5, 0.4, 0.3]
A = [0.08528, 0.174, 0.7]


def test_gae_length_3_with_prompt_and_pad_around_it() -> None:
    # [prompt, r1, r2, r3, pad] in row 0; [pad, pad, r1, r2, r3] (left padded) in row 1.
    # Garbage rewards/values at masked positions must not leak in.
    rewards = torch.tensor([[9.0, *R, 7.0], [9.0, 9.0, *R]])
    values = torch.tensor([[5.0, *V, 8.0], [5.0, 5.0, *V]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    adv, ret = gae(rewards, values, mask, GAMMA, LAM)
    expected_adv = torch.tensor([[0.0, *A, 0.0], [0.0, 0.0, *A]])
    expected_ret = torch.tensor([[0.0, 0.58528, 0.574, 1.0, 0.0], [0.0, 0.0, 0.58528, 0.574, 1.0]])
    torch.testing.assert_close(adv, expected_adv)
    torch.testing.assert_close(ret, expected_ret)


def test_gae_with_gamma_lambda_1_is_reward_to_go() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 4.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(ret, torch.tensor([[6.0, 5.0, 3.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[5.5, 4.5, 2.5, 0.0]]))


def test_gae_skips_a_masked_hole_as_if_it_were_absent() -> None:
    rewards = torch.tensor([[0.1, 50.0, -0.2, 1.0]])
    values = torch.tensor([[0.5, 50.0, 0.4, 0.3]])
    adv, _ = gae(rewards, values, torch.tensor([[1, 0, 1, 1]]), GAMMA, LAM)
    torch.testing.assert_close(adv, torch.tensor([[A[0], 0.0, A[1], A[2]]]))


def test_gae_carries_no_gradient() -> None:
    values = torch.tensor([[0.5, 0.4]], requires_grad=True)
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), values, torch.tensor([[1, 1]]), 1.0, 0.95)
    assert not adv.requires_grad and not ret.requires_grad


def test_whiten_advantages_over_response_tokens_only() -> None:
    adv = torch.tensor([[2.0, 4.0, 0.0], [6.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(whiten_advantages(adv, mask), torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    assert whiten_advantages(adv, mask)[mask.bool()].mean().item() == pytest.approx(0.0)


def test_whitening_leaves_a_batch_with_nothing_to_train_on_alone():
    """Every episode unscored (a reward function's None): no tokens to standardise over, no error."""
    advantages = torch.zeros(2, 3)
    assert torch.equal(whiten_advantages(advantages, torch.zeros(2, 3)), advantages)
    one = torch.tensor([[0.0, 0.5, 0.0]])
    assert torch.equal(whiten_advantages(one, torch.tensor([[0, 1, 0]])), one)
