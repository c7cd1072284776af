"""The DARTS supernet: only the chosen edges run, exports equal the supernet path, genotypes round-trip, costs
match exported subnets, and ABS shrinking works per edge while every node keeps two inputs."""

import copy

import numpy as np
import pytest
import torch

from lightning_nd.callbacks import ProgressivePruner
from lightning_nd.nas import (
    AngleLayout,
    AngleStats,
    ArchCost,
    PathSampler,
    alive_options,
    build_space,
    check_arch,
    count_flops,
    count_params,
    decisions,
    export_subnet,
    set_alive,
    set_arch,
    space_size,
    used_mask,
)
from lightning_nd.nas.angle import ANGLE_PRESETS
from lightning_nd.nas.spaces.darts import GENOTYPES, arch_to_genotype, genotype_from_ops, genotype_to_arch


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_space("darts", num_classes=10, in_chans=1, C=4, layers=3)


def test_only_the_chosen_edges_run_and_the_export_matches(net):
    arch = PathSampler(net, seed=1).sample(0)
    set_arch(net, arch)
    ran = []
    hooks = [c.register_forward_hook(lambda m, i, o, k=d.key: ran.append(k))
             for d in decisions(net) if d.gate is not None for c in d.layers]
    x = torch.randn(2, 1, 16, 16)
    net.eval()
    try:
        y = net(x)
    finally:
        for h in hooks:
            h.remove()
    found = decisions(net)
    used = {d.key for d, u in zip(found, used_mask(found, [arch])[0]) if u and d.gate is not None}
    assert set(ran) == used and len(used) == 16  # 2 edges x 4 nodes x 2 cell kinds
    sub = export_subnet(net, arch).eval()
    torch.testing.assert_close(sub(x), y)
    assert count_params(sub) < count_params(net) / 5


def test_none_is_masked_unless_allowed(net):
    edges = [d for d in decisions(net) if d.gate is not None]
    assert all(d.names[0] == "none" and 0 not in d.alive for d in edges)
    other = build_space("darts", num_classes=10, in_chans=1, C=4, layers=3, allow_none=True)
    assert all(0 in d.alive for d in decisions(other) if d.gate is not None)
    with pytest.raises(ValueError, match="layers=2"):
        build_space("darts", layers=2)
    with pytest.raises(ValueError, match="unknown DARTS op 'conv9'"):
        build_space("darts", ops=["none", "conv9"])


@pytest.mark.parametrize("name", sorted(GENOTYPES))
def test_genotypes_round_trip(net, name):
    genotype = GENOTYPES[name]
    arch = genotype_to_arch(net, genotype)
    check_arch(net, arch)
    back = arch_to_genotype(net, arch)
    for kind in ("normal", "reduce"):  # the same pairs per node (the genotype may list a node's inputs in any order)
        a, b = getattr(genotype, kind), getattr(back, kind)
        assert [sorted(a[i:i + 2], key=lambda p: p[1]) for i in range(0, 8, 2)] == [b[i:i + 2] for i in range(0, 8, 2)]
    assert back.normal_concat == genotype.normal_concat
    ops = {d.key: d.names[i] for d, i in zip(decisions(net), arch)}
    assert genotype_from_ops(ops) == back


def test_arch_cost_equals_the_exported_subnet(net):
    cost = ArchCost(net, (1, 16, 16))
    sampler = PathSampler(net, seed=2)
    for step in range(3):
        arch = sampler.sample(step)
        sub = export_subnet(net, arch)
        assert cost.flops(arch) == count_flops(sub, (1, 16, 16))
        assert cost.params(arch) == count_params(sub)


def test_abs_shrinking_per_edge_keeps_two_inputs_per_node():
    torch.manual_seed(0)
    net = build_space("darts", num_classes=10, in_chans=1, C=4, layers=3, affine=True)
    initial = copy.deepcopy(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    stats = AngleStats.compute(AngleLayout.build(net, ANGLE_PRESETS["rlnas_darts"]), dict(net.named_parameters()),
                               dict(initial.named_parameters()))
    pruner = ProgressivePruner(drop_per_step=14, paths_per_op=10, depth_sampling=False)
    before = space_size(net)
    for step in range(2):
        scores = pruner.score_ops(stats, net, np.random.default_rng([0, step]))
        assert all(np.isfinite(v) for v in scores.values())
        for d, o in pruner.select_ops_to_drop(scores, alive_options(net)):
            set_alive(net, d, o, False)
    found = decisions(net)
    assert space_size(net) < before
    assert all(len(d.alive) >= 1 for d in found)  # >= 1 combination alive: 2 inputs per node
    shrunk = [d for d in found if d.gate is not None and len(d.alive) < 7]
    assert shrunk  # ops were dropped per edge
    sampler = PathSampler(net, seed=0)
    for step in range(20):
        arch = sampler.sample(step)
        check_arch(net, arch)
        used = used_mask(found, [arch])[0]
        assert sum(used[i] for i, d in enumerate(found) if d.gate is not None) == 16
