"""Masked statistics, against values worked out by hand."""

import pytest
import torch

from align.rl.masked import masked_mean, masked_var, masked_whiten

PAD = 100.0  # a value that would visibly shift any statistic it leaked into


def test_masked_mean_ignores_pads() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, PAD])
    mask = torch.tensor([1, 1, 1, 0])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)


def test_masked_mean_along_dim_and_empty_rows() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, PAD], [PAD, PAD]])
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]])
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.0, 0.0]))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_masked_var_biased_and_unbiased() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, PAD])
    mask = torch.tensor([1, 1, 1, 0])
    # deviations from 2: -1, 0, 1 -> sum of squares 2
    assert masked_var(x, mask).item() == pytest.approx(2.0 / 2)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2.0 / 3)
    with pytest.raises(ValueError):
        masked_var(x, torch.tensor([1, 0, 0, 0]))


def test_masked_whiten_of_1_2_3_pad() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, PAD])
    mask = torch.tensor([1, 1, 1, 0])
    # mean 2, unbiased std 1 -> (x - 2) / 1; the pad position is 0
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor([-1.0, 0.0, 1.0, 0.0]))


def test_masked_whiten_without_mean_shift() -> None:
    x = torch.tensor([[2.0, 4.0], [6.0, PAD]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # mean 4, unbiased var (4 + 0 + 4) / 2 = 4, std 2: (x - 4) / 2 + 4
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), torch.tensor([[3.0, 4.0], [5.0, 0.0]]))


def test_inf_in_masked_positions_gives_no_nan_and_no_gradient() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, float("-inf")], requires_grad=True)
    mask = torch.tensor([1, 1, 1, 0])
    out = masked_whiten(x, mask)
    assert torch.isfinite(out).all()
    (out * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[3] == 0
