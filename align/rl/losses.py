"""PPO losses and the per-token quantities they need, as pure functions over tensors and masks.

Losses are token means over the response tokens of the (micro-)batch. Masked log-ratios are
zeroed before ``exp`` so that pad positions, whose log-probs may be ``-inf``, can produce neither
NaN losses nor NaN gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from align.rl.masked import masked_mean, masked_var


def policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped-ratio PPO loss (Schulman et al. 2017), averaged over response tokens.

    ``logp`` comes from the policy being trained, ``old_logp`` from the rollout; all ``[B, T]``.
    Stats (detached): ``clipfrac`` (share of tokens where the clipped term is the one used),
    ``approx_kl`` (mean ``0.5 * (logp - old_logp)**2``, as TRL and the N+ details log it),
    ``ratio_mean``.
    """
    mask = mask.bool()
    log_ratio = torch.where(mask, logp - old_logp, torch.zeros_like(logp))
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio.square(), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_value: float | None = 0.15
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ``0.5 * max((v - R)**2, (clip(v, old - c, old + c) - R)**2)``, token mean.

    The Qwen report clips the value at 0.15 (an absolute change, in reward units, so it presumes
    normalised rewards); ``clip_value=None`` gives the plain squared error. Stats: ``vf_clipfrac``
    (share of tokens where the clipped error is the larger one), ``value_mean``.
    """
    mask = mask.bool()
    error = (values - returns).square()
    if clip_value is None:
        loss_per_token = error
        clipfrac = torch.zeros((), device=values.device)
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip_value, clip_value)
        clipped_error = (clipped_values - returns).square()
        loss_per_token = torch.maximum(error, clipped_error)
        clipfrac = masked_mean((clipped_error > error).float(), mask).detach()
    loss = 0.5 * masked_mean(loss_per_token, mask)
    return loss, {"vf_clipfrac": clipfrac, "value_mean": masked_mean(values, mask).detach()}


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """``logits [B, T, V]``, ``labels [B, T]`` -> float32 ``log softmax(logits / temperature)`` at ``labels``.

    Align first: ``logits[:, t]`` must be the prediction for ``labels[:, t]`` (i.e. pass
    ``logits[:, :-1]`` and ``input_ids[:, 1:]``). ``temperature`` must be the sampling one, or the
    ratio against the rollout log-probs is off from the first step (N+ details). Computed as
    ``logit[label] - logsumexp`` in float32 over chunks of ``chunk_size`` positions, so no full
    ``[B, T, V]`` log-softmax (nor a full float32 copy of bf16 logits) exists at once when no
    gradient is needed (rollout and reference passes). Negative labels (ignore index) give a
    meaningless value: mask them.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1, 1).clamp(min=0)
    out = []
    for start in range(0, flat_logits.shape[0], chunk_size):
        chunk = flat_logits[start : start + chunk_size].float()
        if temperature != 1.0:
            chunk = chunk / temperature
        label_logits = chunk.gather(-1, flat_labels[start : start + chunk_size]).squeeze(-1)
        out.append(label_logits - torch.logsumexp(chunk, dim=-1))
    if not out:
        return logits.new_zeros(labels.shape, dtype=torch.float32)
    return torch.cat(out).reshape(labels.shape)


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``logits [..., V]`` -> entropy of ``softmax(logits / temperature)``, shape ``[...]``, in float32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    # -inf logits (masked vocabulary) would make p * logit = 0 * -inf = NaN; torch.distributions
    # clamps the same way.
    logits = logits.clamp(min=torch.finfo(logits.dtype).min)
    log_z = torch.logsumexp(logits, dim=-1)
    # H = log Z - sum(p * logit), which needs no log_softmax copy.
    return log_z - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def entropy_from_logits(logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean per-token entropy over the response tokens: ``logits [B, T, V]``, ``mask [B, T]`` -> scalar.

    A falling entropy is the first sign of mode collapse; log it every step.
    """
    return masked_mean(token_entropy(logits, temperature), mask)


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over response tokens (1 is perfect, <= 0 is useless).

    NaN when the returns do not vary, or there are none (every episode unscored).
    """
    if not bool(mask.bool().any()):
        return torch.tensor(float("nan"), device=values.device)
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns == 0:
        return torch.tensor(float("nan"), device=values.device)
    return 1.0 - masked_var(returns - values, mask, unbiased=False) / var_returns
