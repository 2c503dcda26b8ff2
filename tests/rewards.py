"""Rule-based rewards for end-to-end PPO tests (`ppo.reward_fn=tests.rewards:brevity`)."""

from __future__ import annotations


def brevity(prompts: list[str], responses: list[str]) -> list[float]:
    """1 for an empty answer, falling by 0.1 a word: a reward a tiny policy can chase in minutes."""
    return [max(0.0, 1.0 - 0.1 * len(response.split())) for response in responses]
