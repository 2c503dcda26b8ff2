"""Running reward statistics and reward normalisation.

The Qwen report normalises the reward with a running mean (a running std is optional). The
statistics are merged batch by batch with Chan et al.'s parallel variance formula, in float64,
so the result equals the mean and (population) std over all scores seen so far, and a resumed run
continues with exactly the same statistics (``state_dict``/``load_state_dict``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

AllReduce = Callable[[Tensor], Tensor]
"""Sums a tensor over all ranks and returns the sum (same shape); every rank must call it."""


def dist_all_reduce(t: Tensor) -> Tensor:
    """Sum over ranks with torch.distributed when a process group is up; the identity otherwise."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class RunningMoments:
    """Running mean and population variance of every score seen so far (on all ranks).

    With ``all_reduce`` set (the default uses torch.distributed when initialised), each
    ``update`` merges the scores of all ranks, so every rank holds the same statistics; all ranks
    must then call ``update`` together. Pass ``all_reduce=None`` for rank-local statistics. The
    reduced float64 tensors live on the scores' device, which must suit the backend (CUDA for NCCL).
    """

    def __init__(self, all_reduce: AllReduce | None = dist_all_reduce) -> None:
        self.all_reduce = all_reduce
        self.mean = 0.0
        self.var = 0.0  # population variance (ddof=0)
        self.count = 0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def _sum(self, t: Tensor) -> Tensor:
        return self.all_reduce(t) if self.all_reduce is not None else t

    @torch.no_grad()
    def update(self, x: Tensor) -> tuple[float, float]:
        """Merge the scores ``x`` (any shape) into the statistics; return this batch's (mean, std)."""
        x = x.detach().reshape(-1).to(torch.float64)
        # Two passes over the (global) batch: first its count and mean, then the squared deviations
        # from that mean. Summing raw squares instead loses precision when |mean| >> std.
        count_sum = self._sum(torch.stack([x.new_tensor(float(x.numel())), x.sum()]))
        batch_count = int(count_sum[0].item())
        if batch_count == 0:
            return self.mean, self.std
        batch_mean = float(count_sum[1].item()) / batch_count
        batch_m2 = float(self._sum((x - batch_mean).square().sum()).item())

        total = self.count + batch_count
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_m2 + delta * delta * self.count * batch_count / total
        self.mean += delta * batch_count / total
        self.var = m2 / total
        self.count = total
        return batch_mean, math.sqrt(batch_m2 / batch_count)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.count = int(state["count"])


def normalize_reward(
    scores: Tensor,
    moments: RunningMoments,
    use_std: bool = False,
    clip: float | None = None,
    update: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """``scores [B]`` -> ``(scores - running mean) [/ running std]``, clipped to ``[-clip, clip]``.

    With ``update`` (training) the batch is merged into ``moments`` first, as TRL's
    RunningMoments does, so the first batch is centred on its own mean; evaluation passes
    ``update=False`` to leave the statistics alone.
    """
    if update:
        moments.update(scores)
    normalized = scores - moments.mean
    if use_std:
        normalized = normalized / (moments.std + eps)
    if clip is not None:
        normalized = normalized.clamp(-clip, clip)
    return normalized
