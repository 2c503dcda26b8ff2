"""Generalised advantage estimation (Schulman et al. 2016) over the response tokens only."""

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
