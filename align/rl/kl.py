"""Per-token KL estimators against the reference policy, and the KL coefficient controllers.

The estimators follow Schulman, "Approximating KL Divergence" (2020), for tokens sampled from
the policy, with ``log_ratio = logp - ref_logp``:

- k1 = log_ratio: unbiased, high variance, negative on some tokens.
- k2 = log_ratio**2 / 2: biased, low variance, non-negative.
- k3 = (r - 1) - log r with r = 1 / ratio: unbiased, low variance, non-negative.

The reward penalty defaults to k1 (InstructGPT, Ziegler et al. 2019, OpenRLHF and TRL default):
with k1 the summed penalty is exactly the sequence log-ratio, so treating it as a fixed reward
gives the true gradient of the KL term. k3 used as a reward gives a biased gradient even though
its value is unbiased (its own derivative w.r.t. the policy does not vanish in expectation).
Log k3 as a non-negative monitor; a clearly negative mean k1 means the rollout log-probs do not
match the training forward pass (TRL #235, #1005: dropout, temperature, padding).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from align.rl.normalize import AllReduce, dist_all_reduce

KLEstimator = Literal["k1", "k2", "k3"]


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token ``logp - ref_logp``."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token ``0.5 * (logp - ref_logp) ** 2``."""
    return 0.5 * (logp - ref_logp).square()


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token ``exp(ref_logp - logp) - 1 - (ref_logp - logp)`` (>= 0 token by token)."""
    log_r = ref_logp - logp
    # expm1 keeps precision when the two policies are close, which is the usual case.
    return log_r.expm1() - log_r


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token KL estimate chosen by name (from config)."""
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        choices = sorted(KL_ESTIMATORS)
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {choices}") from None
    return fn(logp, ref_logp)


def mean_kl_over_ranks(seq_kl: Tensor, all_reduce: AllReduce = dist_all_reduce) -> tuple[float, int]:
    """``[B]`` summed KL of each of this rank's responses -> (the mean over every rank's responses, how many).

    What the adaptive controller is given: with each rank's own mean, the ranks would scale their
    penalties apart, the logged coefficient (a mean over ranks) would hide it, and a checkpoint (which
    holds rank 0's controller) would resume the other ranks with another coefficient. Every rank must
    call it.
    """
    local = torch.stack(
        [seq_kl.detach().to(torch.float64).sum(), seq_kl.new_tensor(seq_kl.numel(), dtype=torch.float64)]
    )
    total, count = all_reduce(local).tolist()
    return total / count, int(count)


class FixedKLController:
    """A constant KL coefficient (the Qwen recipe: 0.04)."""

    def __init__(self, coef: float) -> None:
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op, so that the training loop treats both controllers alike."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences", section 2.2.

    Steers the observed KL towards ``target``: the coefficient is multiplied by
    ``1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon``. ``current_kl`` is the mean over
    the rollout batch of each response's summed per-token KL, and ``n_steps`` is the number of
    responses in that batch (as in the paper and TRL's former PPOTrainer), over all ranks
    (`mean_kl_over_ranks`).
    """

    def __init__(self, init_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target, horizon > 0; got {target}, {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        # Only the coefficient is run state; target and horizon come from the (maybe changed) config.
        self.value = float(state["value"])


KLController = FixedKLController | AdaptiveKLController
