"""KL estimators and KL-coefficient controllers."""

import math

import pytest
import torch

from align.ppo.kl import AdaptiveKLController, FixedKLController, kl_k1, kl_k2, kl_k3, kl_penalty


def test_estimators_by_hand() -> None:
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(kl_k2(logp, ref), torch.tensor([0.125, 0.5]))
    # log r = ref - logp = -0.5, 1.0: k3 = e^log_r - 1 - log_r
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([math.exp(-0.5) - 0.5, math.e - 2.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), kl_k3(logp, ref))
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")  # type: ignore[arg-type]


def test_k3_is_non_negative_and_zero_when_equal() -> None:
    logp = torch.randn(1000)
    assert (kl_k3(logp, torch.randn(1000)) >= 0).all()
    assert (kl_k3(logp, logp) == 0).all()


def test_k1_and_k3_are_unbiased_monte_carlo_estimates_of_kl() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    true_kl = (p * (p / q).log()).sum()
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    logp, ref = p.log()[tokens], q.log()[tokens]
    torch.testing.assert_close(kl_k1(logp, ref).mean(), true_kl, atol=0.01, rtol=0)
    torch.testing.assert_close(kl_k3(logp, ref).mean(), true_kl, atol=0.01, rtol=0)


def test_fixed_controller_never_moves() -> None:
    ctl = FixedKLController(0.04)
    ctl.update(current_kl=100.0, n_steps=512)
    assert ctl.value == 0.04
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.04


def test_adaptive_controller_update_numbers() -> None:
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10_000)
    # KL 9 vs target 6: error 0.5 clipped to 0.2; factor 1 + 0.2 * 256 / 10000 = 1.00512
    ctl.update(current_kl=9.0, n_steps=256)
    assert ctl.value == pytest.approx(0.100512)
    # KL 5.7: error -0.05 (inside the clip); factor 1 - 0.05 * 0.0256 = 0.99872
    ctl.update(current_kl=5.7, n_steps=256)
    assert ctl.value == pytest.approx(0.100512 * 0.99872)
    # KL 0: error -1 clipped to -0.2; factor 1 - 0.2 * 0.0256 = 0.99488
    before = ctl.value
    ctl.update(current_kl=0.0, n_steps=256)
    assert ctl.value == pytest.approx(before * 0.99488)


def test_adaptive_controller_state_round_trip() -> None:
    ctl = AdaptiveKLController(0.1, 6.0, 10_000)
    ctl.update(9.0, 256)
    resumed = AdaptiveKLController(0.1, 6.0, 10_000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    ctl.update(3.0, 64)
    resumed.update(3.0, 64)
    assert resumed.value == ctl.value
