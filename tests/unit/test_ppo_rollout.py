"""The sampler's temperature and top-p are generate's: the same tokens survive the cut, and only those are drawn."""

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from align.rl.rollout import sample_next, top_p_filter


def _logits() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=gen) * 3
    logits[0] = 0.0  # a flat row: the cut falls among ties
    logits[1, 7] = 30.0  # one token holds almost all the mass: only it survives
    return logits


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_top_p_keeps_the_tokens_transformers_keeps(top_p: float, temperature: float) -> None:
    logits = _logits()
    scaled = TemperatureLogitsWarper(temperature)(None, logits.clone())
    expected = TopPLogitsWarper(top_p)(None, scaled.clone())
    ours = top_p_filter(logits / temperature, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    torch.testing.assert_close(ours[~torch.isinf(ours)], expected[~torch.isinf(expected)], rtol=0, atol=0)
    kept = (~torch.isinf(ours)).sum(-1)
    assert (kept >= 1).all() and kept[1] == 1
    assert (kept < logits.shape[-1]).any()  # the cut removed something: the comparison has teeth


def test_sampling_draws_only_kept_tokens_at_their_renormalised_rates() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).repeat(20_000, 1)
    kept = ~torch.isinf(TopPLogitsWarper(0.8)(None, logits[:1].clone()))[0]
    torch.manual_seed(0)
    drawn = sample_next(logits, temperature=1.0, top_p=0.8)
    assert kept[drawn].all()
    rates = torch.bincount(drawn, minlength=5).float() / len(drawn)
    expected = torch.where(kept, logits[0].softmax(-1), 0.0)
    torch.testing.assert_close(rates, expected / expected.sum(), atol=0.01, rtol=0)


def test_top_p_of_one_keeps_every_token() -> None:
    logits = _logits()
    assert torch.equal(top_p_filter(logits, 1.0), logits)
