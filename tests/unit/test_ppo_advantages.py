"""Advantage estimators, written out by hand: GAE over response tokens only, and the critic-free
ones (GRPO, Dr. GRPO, RLOO, REINFORCE++) on a group of 4 with known rewards."""

import pytest
import torch

from align.rl.advantages import critic_free_advantages, gae, group_advantages, uniform_groups, whiten_advantages

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


# Two prompts x 4 responses, prompt-major. Group 1 rewards 1, 0, 0, 1: mean 0.5, unbiased std
# sqrt(1/3) = 0.57735. Group 2 all 2.0: no signal.
SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
ALL = torch.ones(8, dtype=torch.bool)


@pytest.mark.parametrize(
    ("estimator", "group_one"),
    [
        ("grpo", [0.5 / 0.57735, -0.5 / 0.57735, -0.5 / 0.57735, 0.5 / 0.57735]),  # (r - mean) / std
        ("dr_grpo", [0.5, -0.5, -0.5, 0.5]),  # r - mean
        ("rloo", [1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3]),  # r - mean of the other three
    ],
)
def test_group_estimators_on_a_group_of_4(estimator: str, group_one: list[float]) -> None:
    got = group_advantages(SCORES, ALL, group_size=4, estimator=estimator)
    torch.testing.assert_close(got, torch.tensor([*group_one, 0.0, 0.0, 0.0, 0.0]), atol=1e-5, rtol=1e-5)


def test_an_unscored_response_is_out_of_its_groups_statistics_and_gets_no_advantage() -> None:
    # Response 2 of group 1 unscored (its 0.0 is a placeholder): the group is 1, 0, 1 (mean 2/3).
    valid = torch.tensor([True, False, True, True, True, True, True, True])
    got = group_advantages(SCORES, valid, 4, "rloo")
    torch.testing.assert_close(got[:4], torch.tensor([1 - 0.5, 0.0, 0 - 1.0, 1 - 0.5]))
    # A group with a single scored response has no baseline: all zero.
    lone = torch.tensor([True, False, False, False, *[True] * 4])
    assert group_advantages(SCORES, lone, 4, "grpo")[:4].tolist() == [0.0] * 4


def test_uniform_groups_are_the_ones_with_one_reward() -> None:
    assert uniform_groups(SCORES, ALL, 4).tolist() == [False, True]
    # Unscored responses do not count: 1, (unscored 0), 1, 1 is uniform.
    valid = torch.tensor([True, False, True, True, *[True] * 4])
    assert uniform_groups(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 2.0, 3.0]), valid, 4).tolist() == [True, False]


def test_group_advantages_reach_every_token_of_their_response() -> None:
    # Per-token rewards: a KL penalty on each token and the score at the last one; a response's
    # group score is their sum. Row 0 sums to 1.0, row 1 to 0.0.
    rewards = torch.tensor([[0.0, -0.1, 1.1], [-0.2, 0.2, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    scored = torch.ones(4, dtype=torch.bool)
    got = critic_free_advantages("dr_grpo", rewards, mask, scored, group_size=4, gamma=1.0)
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.5, 0.5], [-0.5, -0.5, 0.0], [0.5, 0.5, 0.5], [-0.5] * 3]))


def test_reinforce_pp_is_the_return_whitened_over_the_batch() -> None:
    # Returns with gamma 1: row 0 [1.5, 1.0] (0.5 then 1.0), row 1 [-1.0, -1.0] (0 then -1).
    rewards = torch.tensor([[0.5, 1.0, 9.0], [0.0, -1.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    got = critic_free_advantages("reinforce_pp", rewards, mask, torch.ones(2, dtype=torch.bool), 1, gamma=1.0)
    returns = torch.tensor([1.5, 1.0, -1.0, -1.0])
    expected = (returns - returns.mean()) / returns.std()
    torch.testing.assert_close(got[:, :2].reshape(-1), expected, atol=1e-5, rtol=1e-5)
    assert got[:, 2].tolist() == [0.0, 0.0]
