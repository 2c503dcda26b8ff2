"""The reward lands at the last real response token, whatever the padding side; a cut-off response
pays the missing-EOS penalty in the units PPO trains on."""

import pytest
import torch

from align.rl.normalize import RunningMoments
from align.rl.rewards import (
    gather_at,
    has_eos,
    last_token_index,
    penalize_missing_eos,
    per_token_rewards,
    response_mask_after_eos,
    shaped_scores,
)


def test_last_token_index_left_right_and_both_sided_padding() -> None:
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # right padding
            [0, 0, 1, 1, 1],  # left padding
            [0, 1, 1, 1, 0],  # left-padded prompt + right-padded response
            [1, 1, 1, 1, 1],  # no padding
            [0, 0, 0, 1, 0],  # a single token
        ]
    )
    assert last_token_index(mask).tolist() == [2, 4, 3, 4, 3]
    assert last_token_index(mask.bool()).tolist() == [2, 4, 3, 4, 3]


def test_last_token_index_rejects_an_empty_row() -> None:
    with pytest.raises(ValueError):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


def test_gather_at_reads_the_reward_head_at_the_eos() -> None:
    head = torch.tensor([[0.1, 0.2, 0.3, 9.0], [9.0, 9.0, 0.5, 0.7]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    torch.testing.assert_close(gather_at(head, last_token_index(mask)), torch.tensor([0.3, 0.7]))


def test_per_token_rewards_for_right_left_and_both_sided_rows() -> None:
    coef = 0.1
    score = torch.tensor([3.0, -1.0, 2.0])
    kl = torch.tensor(
        [
            [0.5, -1.0, 2.0, 9.0, 9.0],
            [9.0, 9.0, 1.0, 0.0, 4.0],
            [9.0, 2.0, 3.0, 9.0, 9.0],
        ]
    )
    response_mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # right-padded response
            [0, 0, 1, 1, 1],  # left-padded: the response ends at the last column
            [0, 1, 1, 0, 0],  # prompt token, response, pads
        ]
    )
    expected = torch.tensor(
        [
            [-0.05, 0.1, -0.2 + 3.0, 0.0, 0.0],
            [0.0, 0.0, -0.1, 0.0, -0.4 - 1.0],
            [0.0, -0.2, -0.3 + 2.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(per_token_rewards(score, kl, response_mask, coef), expected)


def test_per_token_rewards_ignore_inf_kl_at_pads() -> None:
    kl = torch.tensor([[0.0, float("inf")]])
    rewards = per_token_rewards(torch.tensor([1.0]), kl, torch.tensor([[1, 0]]), 0.04)
    torch.testing.assert_close(rewards, torch.tensor([[1.0, 0.0]]))


def test_response_mask_keeps_tokens_up_to_the_first_eos() -> None:
    ids = torch.tensor([[5, 6, 2, 0, 2], [5, 6, 7, 8, 9], [2, 2, 2, 2, 2], [5, 3, 6, 2, 0]])
    assert response_mask_after_eos(ids, 2).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],  # truncated: everything counts
        [1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0],
    ]
    # Several end-of-turn ids: 3 ends the last row first.
    assert response_mask_after_eos(ids, [2, 3])[3].tolist() == [1, 1, 0, 0, 0]


def test_missing_eos_penalty_hits_only_truncated_rows() -> None:
    ids = torch.tensor([[5, 6, 2, 0], [5, 6, 7, 8]])
    mask = response_mask_after_eos(ids, 2)
    ended = has_eos(ids, mask, 2)
    assert ended.tolist() == [True, False]
    torch.testing.assert_close(penalize_missing_eos(torch.tensor([1.0, 1.0]), ended, 0.5), torch.tensor([1.0, 0.5]))


def test_the_missing_eos_penalty_comes_after_the_normalisation_and_before_the_clip() -> None:
    scores = torch.tensor([1.0, 3.0, 5.0, 7.0])  # mean 4, population std sqrt(5)
    ended = torch.tensor([True, False, True, False])
    cut = torch.tensor([0.0, 1.0, 0.0, 1.0])
    moments = RunningMoments(all_reduce=None)
    moments.update(scores)
    # The statistics are the scores' as read; the penalty is then 1.0 in normalised units (here 1 std).
    assert (moments.mean, moments.var) == (4.0, 5.0)
    torch.testing.assert_close(
        shaped_scores(scores, ended, moments, use_std=True, missing_eos_penalty=1.0), (scores - 4.0) / 5**0.5 - cut
    )
    # The clip bounds the result: -1 - 1 = -2 and 3 - 1 = 2 both reach it.
    torch.testing.assert_close(
        shaped_scores(scores, ended, moments, missing_eos_penalty=1.0, clip=1.5), torch.tensor([-1.5, -1.5, 1.0, 1.5])
    )
    # Without normalisation the penalty comes off the scores as read; without a penalty they stay.
    torch.testing.assert_close(shaped_scores(scores, ended, None, missing_eos_penalty=0.5), scores - 0.5 * cut)
    torch.testing.assert_close(shaped_scores(scores, ended, None), scores)


def test_a_running_mean_cannot_absorb_the_missing_eos_penalty() -> None:
    # Every response cut off, all read alike (a policy that never ends yet): each still pays the penalty.
    scores, ended = torch.full((4,), 0.5), torch.zeros(4, dtype=torch.bool)
    moments = RunningMoments(all_reduce=None)
    moments.update(scores)
    torch.testing.assert_close(shaped_scores(scores, ended, moments, missing_eos_penalty=1.0), torch.full((4,), -1.0))
