"""Statistics over the unmasked positions of a tensor.

Masked positions may hold anything (pad log-probs can be ``-inf``), so they are replaced with 0
by ``torch.where`` before any arithmetic, rather than multiplied by the mask: ``inf * 0`` is NaN,
in the forward pass and, through the chain rule, in the backward pass too.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (over all of them, or along ``dim``).

    An all-masked reduction gives 0 (not NaN): a micro-batch without response tokens then adds
    nothing to the loss instead of poisoning it.
    """
    mask = mask.bool()
    total = torch.where(mask, x, torch.zeros_like(x))
    if dim is None:
        return total.sum() / mask.sum().clamp(min=1)
    return total.sum(dim=dim) / mask.sum(dim=dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all unmasked positions (Bessel-corrected when ``unbiased``)."""
    mask = mask.bool()
    x = torch.where(mask, x, torch.zeros_like(x))
    count = int(mask.sum())
    if count == 0 or (unbiased and count == 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} unmasked value(s), got {count}")
    centred = x - masked_mean(x, mask)
    var = masked_mean(centred.square(), mask)
    if unbiased:
        var = var * (count / (count - 1))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Standardise ``x`` with the mean and std of its unmasked positions; masked positions become 0.

    ``shift_mean=False`` only rescales (the mean is added back), as the N+ implementation details
    (Huang et al. 2024) do for rewards, whose sign carries meaning; advantages are shifted too.
    Padding must not enter the statistics: whitening over pads biases the mean towards 0.
    """
    mask = mask.bool()
    x = torch.where(mask, x, torch.zeros_like(x))
    mean = masked_mean(x, mask)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))
