from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_nd.nas import ArchCost, CostConstraint, PathSampler, build_space, set_alive


def tiny():
    return build_space("nb201", num_classes=3, C=4, N=1, input_size=8)


def test_deterministic_per_step_and_uniform():
    net = tiny()
    a, b = PathSampler(net, seed=3), PathSampler(tiny(), seed=3)
    assert [a.sample(s) for s in range(20)] == [b.sample(s) for s in range(20)]
    assert a.sample(5) == a.sample(5)  # a pure function of (seed, step): resume-safe
    assert PathSampler(net, seed=4).sample(5) != a.sample(5) or PathSampler(net, seed=4).sample(6) != a.sample(6)
    paths = np.array([a.sample(s) for s in range(2000)])
    counts = np.stack([(paths == o).mean(0) for o in range(5)])
    assert np.abs(counts - 0.2).max() < 0.04


def test_alive_masks_are_respected():
    net = tiny()
    for op in (0, 1, 4):
        set_alive(net, 2, op, False)
    sampler = PathSampler(net)
    assert {sampler.sample(s)[2] for s in range(200)} == {2, 3}


def test_masks_changed_after_construction_are_seen():
    net = tiny()
    sampler = PathSampler(net)
    assert {sampler.sample(s)[2] for s in range(100)} == set(range(5))
    for op in (0, 1, 4):
        set_alive(net, 2, op, False)
    assert {sampler.sample(s)[2] for s in range(100)} == {2, 3}
    restored = PathSampler(tiny())
    assert {restored.sample(s)[2] for s in range(100)} == set(range(5))
    restored.model.load_state_dict(net.state_dict())  # a resumed run: the masks are restored in place
    assert [restored.sample(s) for s in range(20)] == [sampler.sample(s) for s in range(20)]


def test_constraint_and_flops_bins():
    net = tiny()
    cost = ArchCost(net, (3, 8, 8))
    limit = cost.flops([2] * 6)
    ok = CostConstraint(cost, flops_range=(None, limit))
    sampler = PathSampler(net, constraint=ok)
    paths = [sampler.sample(s) for s in range(50)]
    assert all(cost.flops(p) <= limit for p in paths)
    assert paths == [PathSampler(net, constraint=ok).sample(s) for s in range(50)]
    low, mid, high = cost.flops([0] * 6), cost.flops([2] * 6), cost.flops([3] * 6)
    bins = [(low, mid), (mid, high + 1)]
    binned = PathSampler(net, flops_bins=bins, cost=cost)
    flops = [cost.flops(binned.sample(s)) for s in range(100)]
    assert 20 < sum(f < mid for f in flops) < 80
    impossible = PathSampler(net, constraint=CostConstraint(cost, flops_range=(high + 1, None)), max_tries=5,
                             on_failure="raise")
    with pytest.raises(RuntimeError, match="no path"):
        impossible.sample(0)
    with pytest.raises(ValueError, match="needs cost"):
        PathSampler(net, flops_bins=bins)


def test_verify_synced_fails_loudly_on_disagreement():
    net = tiny()
    sampler = PathSampler(net)
    strategy = SimpleNamespace(world_size=2, global_rank=0, root_device=torch.device("cpu"),
                               all_gather=lambda t: torch.stack([t, t + 1]))
    with pytest.raises(RuntimeError, match="desynchronised"):
        sampler.verify_synced([1] * 6, strategy)
    agree = SimpleNamespace(world_size=2, global_rank=0, root_device=torch.device("cpu"),
                            all_gather=lambda t: torch.stack([t, t]))
    sampler.verify_synced([1] * 6, agree)
