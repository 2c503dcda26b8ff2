"""Advantages over the response tokens only: generalised advantage estimation with a value model
(Schulman et al. 2016), and the critic-free estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++) that
baseline a response's reward with the other responses to its prompt or with the batch."""

from __future__ import annotations

import torch
from torch import Tensor

from align.rl.masked import masked_whiten


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """``rewards, values, mask [B, T]`` -> ``(advantages, returns)``, both ``[B, T]`` and 0 where masked.

    The backward recursion ``delta_t = r_t + gamma * V_next - V_t``,
    ``A_t = delta_t + gamma * lam * A_next`` runs over the unmasked positions only: a masked
    position is skipped (it neither consumes nor changes ``V_next``/``A_next``), so prompt tokens,
    pads after the EOS and left padding never leak values or rewards into the response. After the
    last real token ``V_next = 0``: the episode ends there, even when the response was truncated
    (as in OpenRLHF and the N+ details). ``returns = advantages + values`` are the value targets.
    Runs without autograd: advantages are constants for the policy and value losses.
    """
    mask = mask.bool()
    zeros = torch.zeros_like(rewards[:, 0])
    next_value, next_advantage = zeros, zeros
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(m, advantage, zeros)
        next_advantage = torch.where(m, advantage, next_advantage)
        next_value = torch.where(m, values[:, t], next_value)
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


def whiten_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """Advantages standardised over the batch's response tokens (pads excluded, mean shifted to 0).

    A batch with fewer than two tokens to train on (every episode left unscored) has no spread to
    standardise by; its advantages, 0 wherever masked, are returned as they are.
    """
    if int(mask.bool().sum()) < 2:
        return advantages
    return masked_whiten(advantages, mask, shift_mean=True)


GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
CRITIC_FREE = (*GROUP_ESTIMATORS, "reinforce_pp")


def group_advantages(scores: Tensor, valid: Tensor, group_size: int, estimator: str, eps: float = 1e-6) -> Tensor:
    """``[B]`` sequence scores, ``B = prompts x group_size`` in prompt-major order -> ``[B]`` advantages.

    'grpo': (score - group mean) / (group std + eps) (Shao et al. 2024; unbiased std, as TRL);
    'dr_grpo': score - group mean (Liu et al. 2025: the std division weights easy prompts up);
    'rloo': score - mean of the group's other scores (Ahmadian et al. 2024), which is
    ``n / (n - 1) * (score - group mean)``. Only `valid` (scored) responses enter a group's
    statistics and get an advantage; a group with fewer than two has no baseline and gets 0.
    """
    g, ok = scores.view(-1, group_size), valid.view(-1, group_size).to(scores.dtype)
    n = ok.sum(-1, keepdim=True)
    mean = (g * ok).sum(-1, keepdim=True) / n.clamp(min=1)
    centred = (g - mean) * ok
    if estimator == "grpo":
        std = (centred.square().sum(-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        advantages = centred / (std + eps)
    elif estimator == "dr_grpo":
        advantages = centred
    elif estimator == "rloo":
        advantages = centred * n / (n - 1).clamp(min=1)
    else:
        raise ValueError(f"unknown group estimator '{estimator}'; expected one of {', '.join(GROUP_ESTIMATORS)}")
    return torch.where(n >= 2, advantages, torch.zeros_like(advantages)).reshape(-1)


def uniform_groups(scores: Tensor, valid: Tensor, group_size: int) -> Tensor:
    """``[P]`` True where every scored response of a prompt's group has the same score: a group-relative
    estimator learns nothing from it (DAPO's dynamic sampling leaves such groups out)."""
    g, ok = scores.view(-1, group_size), valid.view(-1, group_size)
    high = torch.where(ok, g, torch.full_like(g, -torch.inf)).amax(-1)
    low = torch.where(ok, g, torch.full_like(g, torch.inf)).amin(-1)
    return (high == low) | (ok.sum(-1) < 2)


@torch.no_grad()
def critic_free_advantages(
    estimator: str, rewards: Tensor, mask: Tensor, scored: Tensor, group_size: int, gamma: float
) -> Tensor:
    """``[B, T]`` advantages without a value model, from the per-token rewards (the score at the last
    real token, plus any per-token KL penalty) over the `mask`ed response tokens.

    'reinforce_pp' (REINFORCE++, Hu 2025): the discounted return of each token, standardised over
    the batch's tokens. The group estimators score each response by its summed reward and give
    every one of its tokens that response's group advantage.
    """
    if estimator == "reinforce_pp":
        returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, lam=1.0)  # V = 0: plain returns
        return whiten_advantages(returns, mask)
    sequence = rewards.sum(-1)  # rewards are 0 outside the response, whatever the mask leaves out
    return group_advantages(sequence, scored, group_size, estimator)[:, None] * mask
