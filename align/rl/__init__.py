"""Online RL shared by the stages that sample (PPO today): the maths as small pure functions over
tensors and masks, and the machinery around it (``rollout``, ``forward``, ``placement``,
``checkpoint``, ``reward_fns``: users' reward functions).

Maths: ``masked`` (masked statistics), ``rewards`` (reward at the last real token, per-token
KL-penalised rewards), ``kl`` (KL estimators and coefficient controllers), ``normalize`` (running
reward statistics), ``advantages`` (GAE), ``losses`` (clipped policy/value losses, log-probs,
entropy). Shape convention: ``[B, T]`` tensors are aligned so that position ``t`` holds the
quantity for the token at ``t`` (its log-prob, value, reward), and a 0/1 mask marks the response
tokens that count.
"""
