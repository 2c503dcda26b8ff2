"""PPO losses, log-probs and entropy on hand-computed tensors; masked positions get no gradient."""

import math

import pytest
import torch

from align.rl.losses import (
    aggregate,
    entropy_from_logits,
    explained_variance,
    logprobs_from_logits,
    policy_loss,
    token_entropy,
    value_loss,
)

E = math.e
NEG_INF = float("-inf")


def test_policy_loss_ratio_e_is_clipped_to_1_2() -> None:
    # Tokens: (ratio e, A=+1) -> clipped term -1.2 wins; (ratio e, A=-1) -> unclipped e wins
    # (pessimistic bound); (ratio 1, A=2) -> -2; then a pad whose log-probs are -inf.
    logp = torch.tensor([[0.0, 0.0, -0.5, NEG_INF]], requires_grad=True)
    old_logp = torch.tensor([[-1.0, -1.0, -0.5, 0.0]])
    advantages = torch.tensor([[1.0, -1.0, 2.0, 123.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx((-1.2 + E - 2.0) / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["approx_kl"].item() == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert stats["ratio_mean"].item() == pytest.approx((2 * E + 1) / 3)
    loss.backward()
    # d/dlogp of -A * ratio is -A * ratio; the clipped token and the pad get none.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, E / 3, -2.0 / 3, 0.0]]))


def test_value_loss_clips_at_0_15() -> None:
    # Token 1: v moves 0.5 from old 1.0 towards R=2.0; clipped v = 1.15, error 0.85^2 = 0.7225 > 0.25.
    # Token 2: v moves 0.5 away from R=1.0; clipped v = 1.15, error 0.0225 < 0.25 -> unclipped.
    values = torch.tensor([[1.5, 1.5, 7.0]], requires_grad=True)
    old_values = torch.tensor([[1.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = value_loss(values, old_values, returns, mask, clip_value=0.15)
    assert loss.item() == pytest.approx(0.5 * (0.7225 + 0.25) / 2)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    # Token 1's clipped branch is flat in v; token 2: d/dv 0.5 * (v - R)^2 / 2 = (1.5 - 1.0) / 2.
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.25, 0.0]]))


def test_value_loss_unclipped() -> None:
    values = torch.tensor([[1.5, 1.5]])
    loss, stats = value_loss(values, torch.ones(1, 2), torch.tensor([[2.0, 1.0]]), torch.ones(1, 2), None)
    assert loss.item() == pytest.approx(0.5 * 0.25)
    assert stats["vf_clipfrac"].item() == 0.0


def test_logprobs_from_logits_by_hand_and_with_temperature() -> None:
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, 0]])
    expected = [3.0 - math.log(E + E**2 + E**3), -math.log(3.0)]
    torch.testing.assert_close(logprobs_from_logits(logits, labels), torch.tensor([expected]))
    # temperature 2: logits / 2 = 0.5, 1, 1.5
    hot = 1.5 - math.log(math.exp(0.5) + E + math.exp(1.5))
    assert logprobs_from_logits(logits, labels, temperature=2.0)[0, 0].item() == pytest.approx(hot)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_from_logits_matches_log_softmax_across_chunks(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(2, 5, 7, generator=gen)).to(dtype)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    reference = torch.log_softmax(logits.float() / 0.7, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    out = logprobs_from_logits(logits, labels, temperature=0.7, chunk_size=3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference)


def test_entropy_by_hand() -> None:
    # p = (0.25, 0.75) from logits (log 1, log 3); uniform over 4 has entropy log 4.
    h2 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(
        token_entropy(torch.tensor([[0.0, math.log(3.0)]])), torch.tensor([h2]), check_dtype=False
    )
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), NEG_INF, NEG_INF], [9.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert entropy_from_logits(logits, mask).item() == pytest.approx((math.log(4.0) + h2) / 2)


def test_explained_variance() -> None:
    returns = torch.tensor([1.0, 2.0, 3.0, 50.0])
    mask = torch.tensor([1, 1, 1, 0])
    # residuals (0, 0, 1): var 2/9; var(returns) 2/3 -> 1 - 1/3
    ev = explained_variance(torch.tensor([1.0, 2.0, 2.0, 0.0]), returns, mask)
    assert ev.item() == pytest.approx(2 / 3)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert math.isnan(explained_variance(returns, torch.ones(4), mask).item())
    assert math.isnan(explained_variance(returns, returns, torch.zeros(4)).item())  # nothing scored


def test_masked_positions_receive_zero_gradient() -> None:
    """Garbage (-inf, huge) at pad positions must give exactly zero, finite gradients everywhere."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    pad = ~mask.bool()

    logits = torch.randn(2, 5, 6, generator=gen)
    logits[pad] = torch.tensor([1e30, NEG_INF, 0.0, 0.0, 0.0, 0.0])
    logits.requires_grad_(True)
    labels = torch.randint(0, 6, (2, 5), generator=gen)
    logp = logprobs_from_logits(logits, labels)
    old_logp = torch.where(pad, torch.tensor(NEG_INF), logp.detach() + 0.1 * torch.randn(2, 5, generator=gen))
    advantages = torch.randn(2, 5, generator=gen)
    pg_loss, _ = policy_loss(logp, old_logp, advantages, mask)

    values = torch.where(pad, torch.tensor(1e30), torch.randn(2, 5, generator=gen)).requires_grad_(True)
    vf_loss, _ = value_loss(values, torch.zeros(2, 5), torch.randn(2, 5, generator=gen), mask)

    total = pg_loss + vf_loss - 0.01 * entropy_from_logits(logits, mask)
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(values.grad).all()
    assert (logits.grad[pad] == 0).all() and (values.grad[pad] == 0).all()
    assert logits.grad[~pad].abs().sum() > 0 and values.grad[~pad].abs().sum() > 0


def test_loss_aggregations_by_hand() -> None:
    # Response 0 has 3 tokens (losses 1, 2, 3), response 1 has 1 token (loss 10); pads hold garbage.
    per_token = torch.tensor([[1.0, 2.0, 3.0], [10.0, float("inf"), float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx(16 / 4)
    assert aggregate(per_token, mask, "seq_mean").item() == pytest.approx((2.0 + 10.0) / 2)
    assert aggregate(per_token, mask, "token_sum", max_len=8).item() == pytest.approx(16 / (2 * 8))
    with pytest.raises(ValueError, match="max_len"):
        aggregate(per_token, mask, "token_sum")


def test_clip_higher_lets_a_positive_advantage_ratio_rise_further() -> None:
    # Ratio e^0.24 = 1.271 with advantage 1: clipped at 1.2 symmetric, not clipped at 1 + 0.28.
    logp, old = torch.tensor([[0.24]]), torch.tensor([[0.0]])
    adv, mask = torch.tensor([[1.0]]), torch.tensor([[1]])
    symmetric, stats = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    assert symmetric.item() == pytest.approx(-1.2) and stats["clipfrac"].item() == 1.0
    higher, stats = policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    assert higher.item() == pytest.approx(-math.exp(0.24)) and stats["clipfrac"].item() == 0.0
    # The low side is unchanged: ratio e^-0.24 = 0.787 with advantage -1 is clipped at 0.8.
    low, _ = policy_loss(-logp, old, -adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    assert low.item() == pytest.approx(0.8)
