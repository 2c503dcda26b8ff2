"""KL estimators and KL-coefficient controllers."""

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from align.rl.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
    mean_kl_over_ranks,
)


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


def _on_ranks(fn, per_rank: list):
    """``fn(x, all_reduce)`` for each rank's ``x`` at once (threads), with an all-reduce that sums what
    every rank sends, as torch.distributed's does."""
    sent: list = [None] * len(per_rank)
    barrier = threading.Barrier(len(per_rank))

    def all_reduce_of(rank: int):
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            sent[rank] = t
            barrier.wait()
            total = torch.stack(sent).sum(0)
            barrier.wait()  # nobody sends again before every rank has summed
            return total

        return all_reduce

    with ThreadPoolExecutor(len(per_rank)) as pool:
        return list(pool.map(lambda rank: fn(per_rank[rank], all_reduce_of(rank)), range(len(per_rank))))


def test_every_rank_updates_its_controller_with_the_kl_of_all_ranks_episodes() -> None:
    # Rank 0 sampled 3 responses, rank 1 two, with other KLs: each must see the mean of all 5.
    per_rank = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0])]
    seen = _on_ranks(mean_kl_over_ranks, per_rank)
    assert seen == [(36.0 / 5, 5), (36.0 / 5, 5)]

    def controller(kl: float, n: int) -> float:
        ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
        ctl.update(kl, n)
        return ctl.value

    # KL 7.2 against target 6: error 0.2 (at the clip), factor 1 + 0.2 * 5 / 100 = 1.01, on both ranks.
    assert [controller(*s) for s in seen] == [pytest.approx(0.101)] * 2
    # Each rank's own mean (2 and 15) would have moved the two controllers apart.
    assert controller(2.0, 3) != controller(15.0, 2)


def test_mean_kl_on_one_process_is_the_plain_mean() -> None:
    assert mean_kl_over_ranks(torch.tensor([0.5, -0.25, 1.0, 0.75])) == (0.5, 4)
