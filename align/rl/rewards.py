"""Where the reward goes: the last real token of each sequence, and the per-token PPO reward.

Reading the score at a pad position instead of the EOS is one of the most common RLHF bugs
(TRL #2778 and #3750, DeepSpeedExamples #316, reward-bench #137), usually because the code
assumes one padding side. Everything here finds the last position whose mask is 1, which is
right for left padding, right padding, and a left-padded prompt followed by a right-padded
response.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from align.rl.normalize import RunningMoments, normalize_reward


def last_token_index(attention_mask: Tensor) -> Tensor:
    """``[B, T]`` 0/1 mask -> ``[B]`` index of the last position whose mask is 1.

    Raises on a row with no 1 at all: it has no token to read a reward from.
    """
    mask = attention_mask.bool()
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    index = torch.where(mask, positions, -1).amax(dim=-1)
    if bool((index < 0).any()):
        raise ValueError("last_token_index: a row of the mask has no non-zero position")
    return index


def gather_at(values: Tensor, index: Tensor) -> Tensor:
    """``values [B, T]`` at ``index [B]`` -> ``[B]`` (e.g. the reward head's output at the EOS)."""
    return values.gather(-1, index.unsqueeze(-1)).squeeze(-1)


def response_mask_after_eos(response_ids: Tensor, eos_token_ids: int | Sequence[int]) -> Tensor:
    """``[B, R]`` generated ids -> ``[B, R]`` 0/1 mask that keeps tokens up to and including the first EOS.

    Generation keeps emitting (pad or EOS) tokens after a row has finished while other rows run
    on; they are not part of the response and must get no reward, KL or loss. A row without EOS
    (truncated at the length limit) keeps all its tokens. Several ids can end a turn (ChatML
    ``<|im_end|>`` and ``<|endoftext|>``).
    """
    eos = torch.as_tensor(eos_token_ids, device=response_ids.device).reshape(-1)
    is_eos = torch.isin(response_ids, eos).long()
    # Number of EOS tokens strictly before each position: 0 means "still in the response".
    eos_before = is_eos.cumsum(dim=-1) - is_eos
    return (eos_before == 0).long()


def has_eos(response_ids: Tensor, response_mask: Tensor, eos_token_ids: int | Sequence[int]) -> Tensor:
    """``[B]`` bool: whether the last real response token is an EOS (False when truncated)."""
    eos = torch.as_tensor(eos_token_ids, device=response_ids.device).reshape(-1)
    return torch.isin(gather_at(response_ids, last_token_index(response_mask)), eos)


def penalize_missing_eos(scores: Tensor, ended_with_eos: Tensor, penalty: float) -> Tensor:
    """Subtract ``penalty`` from the score of each response that was truncated before its EOS.

    A reward model learned to read a reward at the end of a turn, so its reading of truncated text
    is one it was never trained for; without a penalty the policy can learn that rambling to the
    length limit pays (the N+ details, Huang et al. 2024, use a fixed penalty).
    """
    return torch.where(ended_with_eos, scores, scores - penalty)


def shaped_scores(
    scores: Tensor,
    ended_with_eos: Tensor,
    moments: RunningMoments | None,
    *,
    use_std: bool = False,
    missing_eos_penalty: float | None = None,
    clip: float | None = None,
) -> Tensor:
    """``scores [B]`` as read (reward model and function) -> the scores PPO trains on: normalised by
    the running statistics ``moments`` (already updated with this batch; None: not normalised), less
    ``missing_eos_penalty`` for each response cut off before its EOS, clipped to ``[-clip, clip]``.

    The penalty comes after the normalisation, in the units PPO trains on: the statistics describe
    what the reward read (a penalty inside them would shift the running mean and widen the running
    std with the share of cut-off responses), and with ``use_std`` the penalty is a number of
    standard deviations whatever the reward model's scale. The clip, last, bounds the result.
    """
    shaped = normalize_reward(scores, moments, use_std=use_std, update=False) if moments is not None else scores
    if missing_eos_penalty is not None:
        shaped = penalize_missing_eos(shaped, ended_with_eos, missing_eos_penalty)
    return shaped if clip is None else shaped.clamp(-clip, clip)


def per_token_rewards(score: Tensor, kl: Tensor, response_mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token PPO reward ``[B, T]``: ``-kl_coef * kl`` on every response token, plus ``score [B]``
    at the last real response token (the EOS, or the last token when the response was truncated).

    This is the InstructGPT / Ziegler et al. (2019) reward; the Qwen recipe uses ``kl_coef`` 0.04.
    Positions outside ``response_mask`` are exactly 0, whatever ``kl`` holds there.
    """
    mask = response_mask.bool()
    rewards = torch.where(mask, -kl_coef * kl, torch.zeros_like(kl))
    last = last_token_index(mask)
    return rewards.scatter_add(-1, last.unsqueeze(-1), score.to(rewards.dtype).unsqueeze(-1))
