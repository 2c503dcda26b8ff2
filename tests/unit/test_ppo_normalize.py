"""Running reward statistics: exact over batches, across ranks, and across a resume."""

import threading

import numpy as np
import pytest
import torch
import torch.distributed as dist

from align.rl.normalize import RunningMoments, normalize_reward


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    # A large offset checks that the merge stays accurate when |mean| >> std.
    return [1e4 + torch.randn(n, generator=gen) for n in (3, 5, 1, 0, 8)]


def test_running_moments_equal_numpy_over_the_concatenation() -> None:
    moments = RunningMoments(all_reduce=None)
    seen = []
    for batch in _batches():
        batch_mean, batch_std = moments.update(batch)
        seen.append(batch.numpy())
        all_seen = np.concatenate(seen).astype(np.float64)
        assert moments.count == all_seen.size
        assert moments.mean == pytest.approx(all_seen.mean(), rel=1e-12)
        assert moments.std == pytest.approx(all_seen.std(), rel=1e-6)
        if batch.numel():
            assert batch_mean == pytest.approx(batch.double().mean().item())
            assert batch_std == pytest.approx(batch.double().std(unbiased=False).item())


def test_running_moments_survive_a_state_dict_round_trip() -> None:
    batches = _batches()
    moments = RunningMoments(all_reduce=None)
    for batch in batches[:2]:
        moments.update(batch)
    resumed = RunningMoments(all_reduce=None)
    resumed.load_state_dict(moments.state_dict())
    for batch in batches[2:]:
        moments.update(batch)
        resumed.update(batch)
    assert resumed.state_dict() == moments.state_dict()


def test_running_moments_merge_across_ranks() -> None:
    """Two 'ranks' (threads) with a summing all_reduce see the statistics of both shards."""
    world = 2
    barrier = threading.Barrier(world)
    slots: list[torch.Tensor | None] = [None] * world

    def make_all_reduce(rank: int):
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            return total

        return all_reduce

    shards = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0])], [torch.tensor([4.0]), torch.tensor([])]
    results: list[RunningMoments] = [RunningMoments(make_all_reduce(r)) for r in range(world)]

    def run(rank: int) -> None:
        for batch in shards[rank]:
            results[rank].update(batch)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = np.array([1.0, 2.0, 3.0, 10.0, 4.0])
    for moments in results:
        assert moments.count == 5
        assert moments.mean == pytest.approx(everything.mean())
        assert moments.std == pytest.approx(everything.std())


def test_running_moments_use_torch_distributed_when_initialised(tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        moments = RunningMoments()
        moments.update(torch.tensor([1.0, 3.0]))
        assert (moments.count, moments.mean, moments.var) == (2, 2.0, 1.0)
    finally:
        dist.destroy_process_group()


def test_normalize_reward_mean_std_and_clip() -> None:
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3, population var (4 + 1 + 0 + 9) / 4 = 3.5
    torch.testing.assert_close(
        normalize_reward(scores, RunningMoments(all_reduce=None)), torch.tensor([-2.0, -1.0, 0.0, 3.0])
    )
    std = 3.5**0.5
    torch.testing.assert_close(
        normalize_reward(scores, RunningMoments(all_reduce=None), use_std=True),
        torch.tensor([-2.0, -1.0, 0.0, 3.0]) / std,
    )
    torch.testing.assert_close(
        normalize_reward(scores, RunningMoments(all_reduce=None), clip=2.0),
        torch.tensor([-2.0, -1.0, 0.0, 2.0]),
    )


def test_normalize_reward_without_update_leaves_the_statistics() -> None:
    moments = RunningMoments(all_reduce=None)
    moments.update(torch.tensor([0.0, 2.0]))
    out = normalize_reward(torch.tensor([5.0]), moments, update=False)
    torch.testing.assert_close(out, torch.tensor([4.0]))
    assert moments.count == 2
