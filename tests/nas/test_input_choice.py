"""Input choices (k of n inputs) as decisions: sampling, masks, pruning, evolution, export, arch.json and cost."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_nd.callbacks import ProgressivePruner
from lightning_nd.nas import (
    ArchCost,
    Choice,
    Evolution,
    InputChoice,
    PathSampler,
    alive_options,
    arch_from_json,
    arch_to_json,
    canonical_arch,
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


class Node(nn.Module):
    """A DARTS-like node: 2 of 3 inputs, a conv/pool op on each input edge."""

    def __init__(self, c=4):
        super().__init__()
        self.inputs = InputChoice(3, 2, key="node.inputs")
        self.edges = nn.ModuleList()
        for k in range(3):
            edge = Choice({"conv": nn.Conv2d(c, c, 3, padding=1, bias=False), "pool": nn.AvgPool2d(3, 1, 1),
                           "wide": nn.Conv2d(c, c, 5, padding=2, bias=False)}, key=f"node<-{k}")
            edge.gate = ("node.inputs", k)
            self.edges.append(edge)

    def forward(self, states):
        return sum(self.edges[k](states[k]) for k in self.inputs.chosen)


class Toy(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.node = Node(c)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        s = self.stem(x)
        return self.head(self.node([s, s.relu(), -s]).mean((2, 3)))


def test_input_choice_is_one_decision_over_combinations():
    pick = InputChoice(4, 2, key="x")
    assert pick.names == ["0+1", "0+2", "0+3", "1+2", "1+3", "2+3"]
    pick.active = 4
    assert pick.chosen == (1, 3)
    assert pick(["a", "b", "c", "d"]) == ["b", "d"]
    with pytest.raises(ValueError, match="n_chosen=3 of n_candidates=2"):
        InputChoice(2, 3)


def test_space_size_counts_only_ops_on_chosen_inputs():
    net = Toy()
    assert [d.key for d in decisions(net)] == ["node.inputs", "node<-0", "node<-1", "node<-2"]
    assert space_size(net) == 3 * 3 * 3  # 3 input pairs x 3 ops x 3 ops, not 3 x 3^3
    set_alive(net, 2, 1, False)  # node<-1 loses "pool"
    assert space_size(net) == 3 * 3 + 3 * 2 + 3 * 2  # pairs (0,1), (0,2), (1,2)


def test_sampler_draws_valid_canonical_paths_uniformly():
    net = Toy()
    set_alive(net, 0, 2, False)  # input pair 1+2 pruned: node<-0 is always used
    found = decisions(net)
    sampler = PathSampler(net, seed=5)
    archs = np.array([sampler.sample(step) for step in range(3000)])
    assert np.array_equal(archs, np.array([PathSampler(net, seed=5).sample(s) for s in range(3000)]))  # (seed, step)
    for arch in archs[:50]:
        check_arch(net, arch.tolist())
    assert set(archs[:, 0]) == {0, 1}
    used = used_mask(found, archs)
    assert used[:, 1].all() and (used[:, 2] == (archs[:, 0] == 0)).all()
    assert (archs[~used] == 0).all()  # unused edges spelled with their first alive op
    networks, counts = np.unique(archs, axis=0, return_counts=True)
    assert len(networks) == space_size(net) == 18
    assert counts.min() > 0.7 * 3000 / 18 and counts.max() < 1.3 * 3000 / 18


def test_masks_and_pruning_keep_k_inputs_alive():
    net = Toy()
    for c in (0, 1):
        set_alive(net, 0, c, False)
    with pytest.raises(ValueError, match="last alive op of decision 'node.inputs'"):
        set_alive(net, 0, 2, False)
    pruner = ProgressivePruner(drop_per_step=10)
    scores = {(d, o): -float(o) for d, opts in enumerate(alive_options(Toy())) for o in opts}
    drops = pruner.select_ops_to_drop(scores, alive_options(Toy()))
    remaining = {d: 3 - sum(1 for dd, _ in drops if dd == d) for d in range(4)}
    assert remaining[0] >= 1  # one combination alive = 2 inputs alive
    assert all(v >= 1 for v in remaining.values())


def test_pruner_scores_an_edge_op_only_on_paths_that_choose_the_edge():
    net = Toy()
    found = decisions(net)
    set_alive(net, 0, 1, False)  # pairs 0+1 and 1+2 left
    pruner = ProgressivePruner(depth_sampling=False)
    rng = np.random.default_rng(0)
    archs = pruner.sample_paths(rng, alive_options(net), 3, 2, 200, [None] * 4, found)  # node<-2 forced "wide"
    assert (archs[:, 3] == 2).all() and (archs[:, 0] == 2).all()  # only pair 1+2 holds input 2
    set_alive(net, 0, 2, False)
    assert len(pruner.sample_paths(rng, alive_options(net), 3, 2, 10, [None] * 4, found)) == 0


def test_evolution_children_are_valid_and_canonical():
    net = Toy()
    set_alive(net, 1, 0, False)
    found = decisions(net)
    evo = Evolution(alive_options(net), population=8, top_k=3, mutations=3, crossovers=3, generations=4, seed=1,
                    mutation_prob=0.5, canonical=lambda a: canonical_arch(found, a))
    rng = np.random.default_rng(0)
    while not evo.done:
        archs = evo.ask()
        if not archs:  # 21 networks: the small space runs out
            break
        for a in archs:
            check_arch(net, a)
            assert a == canonical_arch(found, a)
        evo.tell(archs, rng.random(len(archs)).tolist())
    nets = [tuple(a) for a, _ in evo.records]
    assert len(nets) == len(set(nets))


def test_export_and_cost_skip_ops_on_unchosen_inputs():
    net = Toy()
    cost = ArchCost(net, (1, 8, 8))
    for arch in ([0, 0, 2, 1], [1, 2, 0, 2], [2, 1, 0, 0], [2, 1, 2, 0]):
        set_arch(net, arch)
        sub = export_subnet(net, arch)
        assert cost.flops(arch) == count_flops(sub, (1, 8, 8))
        assert cost.params(arch) == count_params(sub)
        assert cost.flops_many(np.array([arch]))[0] == cost.flops(arch)
        x = torch.randn(2, 1, 8, 8)
        torch.testing.assert_close(sub(x), net(x))
    assert cost.flops([2, 1, 2, 0]) == cost.flops([2, 0, 2, 0])  # node<-0 unused: its op costs nothing


def test_arch_json_round_trip_and_conflicts(tmp_path):
    net = Toy()
    arch = [1, 2, 0, 1]
    data = arch_to_json(net, arch, score=1.0)
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({"best": data}))
    assert arch_from_json(net, path) == arch
    bad = dict(data, arch=[1, 2, 1, 1])
    with pytest.raises(ValueError, match=r"decision 'node<-1'.*index 1 \('pool'\).*'conv'"):
        arch_from_json(net, bad)
    with pytest.raises(ValueError, match="list of 4 indices"):
        arch_from_json(net, dict(data, arch=[1, 2]))
    with pytest.raises(ValueError, match="'node.inputs'"):
        check_arch(net, [3, 0, 0, 0])


def test_gate_must_name_an_input_choice():
    net = Toy()
    net.node.edges[0].gate = ("nope", 0)
    with pytest.raises(ValueError, match="gated by 'nope'"):
        decisions(net)


def test_darts_space_size_is_the_published_count():
    from lightning_nd.nas import build_space

    net = build_space("darts", num_classes=10, in_chans=1, C=4, layers=3)
    per_cell = math.prod(math.comb(j, 2) for j in range(2, 6)) * 7 ** 8  # 2 of j inputs, 7 ops per chosen edge
    assert space_size(net) == per_cell ** 2  # ~1e18 (Liu et al.)
