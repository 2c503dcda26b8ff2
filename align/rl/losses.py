"""PPO losses and the per-token quantities they need, as pure functions over tensors and masks.

Losses are token means over the response tokens of the (micro-)batch unless another aggregation
is asked for (``aggregate``). Masked log-ratios are
zeroed before ``exp`` so that pad positions, whose log-probs may be ``-inf``, can produce neither
NaN losses nor NaN gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from align.rl.masked import masked_mean, masked_var

LOSS_AGGREGATIONS = ("token_mean", "seq_mean", "token_sum")


def aggregate(per_token: Tensor, mask: Tensor, how: str = "token_mean", max_len: int | None = None) -> Tensor:
    """One loss from ``[B, T]`` per-token losses over the masked response tokens.

    'token_mean': the mean over every token (long responses weigh more, per response);
    'seq_mean': each response's token mean, then the mean over the responses that have tokens
    (GRPO's paper: every response weighs the same, so a long one's tokens weigh less);
    'token_sum': the sum over tokens divided by ``B x max_len`` (Dr. GRPO: a constant, so neither
    length is favoured).
    """
    mask = mask.bool()
    if how == "token_mean":
        return masked_mean(per_token, mask)
    if how == "seq_mean":
        per_response = masked_mean(per_token, mask, dim=-1)
        return masked_mean(per_response, mask.any(-1))
    if how == "token_sum":
        if max_len is None:
            raise ValueError("loss aggregation 'token_sum' needs max_len (the response length limit)")
        return torch.where(mask, per_token, torch.zeros_like(per_token)).sum() / (mask.shape[0] * max_len)
    raise ValueError(f"unknown loss aggregation '{how}'; expected one of {', '.join(LOSS_AGGREGATIONS)}")


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    agg: str = "token_mean",
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped-ratio PPO loss (Schulman et al. 2017) over response tokens, aggregated by `agg`.

    ``logp`` comes from the policy being trained, ``old_logp`` from the rollout; all ``[B, T]``.
    The ratio is clipped to ``[1 - clip_eps, 1 + clip_eps_high]`` (DAPO's clip-higher when the two
    differ; ``clip_eps_high=None`` is symmetric). Stats (detached, token means): ``clipfrac``
    (share of tokens where the clipped term is the one used), ``approx_kl`` (mean
    ``0.5 * (logp - old_logp)**2``, as TRL and the N+ details log it), ``ratio_mean``.
    """
    mask = mask.bool()
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = torch.where(mask, logp - old_logp, torch.zeros_like(logp))
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, agg, max_len)
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
