"""The decomposed angle equals the naive concatenated angle (float64, <= 1e-6 rad)."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from lightning_nd.callbacks import AngleTracker
from lightning_nd.nas import AngleLayout, AngleStats, Choice, build_space
from lightning_nd.nas.angle import tracked_parameters
from lightning_nd.nas.spaces.nb201 import NB201_CELL_PATHS, NB201_EDGES, NB201_OPS


def conv_bn(c):
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())


class Toy(nn.Module):
    """Stem, two choice layers (conv+BN, 1x1 conv, identity, avg pool) and a classifier."""

    def __init__(self, c=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c))
        ops = lambda: {"conv3": conv_bn(c), "conv1": nn.Conv2d(c, c, 1), "skip": nn.Identity(),  # noqa: E731
                       "pool": nn.AvgPool2d(3, 1, 1)}
        self.l1 = Choice(ops())
        self.l2 = Choice(ops())
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        return self.head(self.l2(self.l1(self.stem(x))).mean((2, 3)))


def perturb(net, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.1))


def naive_toy(net, ref, arch, bn, bias, identity):
    """Concatenate the path's tensors explicitly (pseudo-weights materialised) and take the cosine."""
    cur = dict(net.named_parameters())
    keep = tracked_parameters(net, bn, bias)
    v0, v = [], []
    for name in keep:
        layer = name.split(".")[0]
        if layer in ("l1", "l2"):
            op = int(name.split(".")[2])
            if op != arch[int(layer[1]) - 1]:
                continue
        v0.append(ref[name].reshape(-1)), v.append(cur[name].detach().reshape(-1))
    c = net.stem[0].out_channels
    for a in arch:
        name = ["conv3", "conv1", "skip", "pool"][a]
        if name == "pool":
            pseudo = torch.ones(c, 3, 3) / 9
        elif name == "skip" and identity == "eye":
            pseudo = torch.eye(c)
        else:
            continue
        v0.append(pseudo.reshape(-1)), v.append(pseudo.reshape(-1))
    a, b = torch.cat(v0).double(), torch.cat(v).double()
    return torch.acos(torch.clamp(torch.dot(a, b) / (a.norm() * b.norm()), -1, 1)).item()


@pytest.mark.parametrize("bn,identity", [(False, "none"), (True, "eye"), (True, "none"), (False, "eye")])
def test_toy_paths_and_ops_match_naive(bn, identity):
    torch.manual_seed(0)
    net = Toy()
    ref = {n: p.detach().clone() for n, p in net.named_parameters()}
    perturb(net)
    layout = AngleLayout.build(net, bn, bn, identity, channels={"l1": 3, "l2": 3})
    stats = AngleStats.compute(layout, dict(net.named_parameters()), ref)
    archs = np.array(list(itertools.product(range(4), range(4))))
    fast = stats.path_angles(archs)
    naive = [naive_toy(net, ref, a, bn, bn, identity) for a in archs.tolist()]
    assert np.abs(fast - np.array(naive)).max() <= 1e-6
    assert fast.std() > 1e-3  # paths really differ
    # op granularity: the op's own weights only
    ops = stats.op_angles()
    w, w0 = net.l1.candidates[0][0].weight.detach().double(), ref["l1.candidates.0.0.weight"].double()
    keep = [w.reshape(-1), net.l1.candidates[0][0].bias.detach().double()] if bn else [w.reshape(-1)]
    keep0 = [w0.reshape(-1), ref["l1.candidates.0.0.bias"].double()] if bn else [w0.reshape(-1)]
    if bn:
        bnm = net.l1.candidates[0][1]
        keep += [bnm.weight.detach().double(), bnm.bias.detach().double()]
        keep0 += [ref["l1.candidates.0.1.weight"].double(), ref["l1.candidates.0.1.bias"].double()]
    a, b = torch.cat(keep0), torch.cat(keep)
    assert abs(ops[0][0] - torch.acos(torch.dot(a, b) / (a.norm() * b.norm())).item()) <= 1e-6
    assert np.isnan(ops[0][2]) or identity == "eye"  # skip: no weights, constant only with eye
    assert ops[0][3] == 0.0  # pooling: a constant kernel never moves


def naive_nb201(net, ref, arch):
    """RLNAS weight_angle.py: stem/tail + fixed cells + per cell, per input->output path (none drops it)."""
    cur = dict(net.named_parameters())
    keep = tracked_parameters(net, True, True)
    fixed = [n for n in keep if ".edges." not in n]
    v0 = [ref[n].reshape(-1) for n in fixed]
    v = [cur[n].detach().reshape(-1) for n in fixed]
    dropped = 0
    for path in NB201_CELL_PATHS:
        if any(NB201_OPS[arch[e]] == "none" for e in path):
            dropped += 1
            continue
        for k, cell in enumerate(net.cells):
            if not hasattr(cell, "edges"):
                continue
            for e in path:
                j, i = NB201_EDGES[e]
                op = NB201_OPS[arch[e]]
                if op in ("nor_conv_1x1", "nor_conv_3x3"):
                    prefix = f"cells.{k}.edges.{j}<-{i}.candidates.{arch[e]}."
                    for n in keep:
                        if n.startswith(prefix):
                            v0.append(ref[n].reshape(-1)), v.append(cur[n].detach().reshape(-1))
                elif op == "avg_pool_3x3":
                    c = cell.edges[f"{j}<-{i}"].candidates[4].channels
                    pool = torch.ones(c, 3, 3).reshape(-1) / 9
                    v0.append(pool), v.append(pool)
    if dropped == len(NB201_CELL_PATHS):
        return 0.0
    a, b = torch.cat(v0).double(), torch.cat(v).double()
    return torch.acos(torch.clamp(torch.dot(a, b) / (a.norm() * b.norm()), -1, 1)).item()


def test_nb201_matches_rlnas_naive_and_disconnected_is_zero():
    torch.manual_seed(0)
    net = build_space("nb201", num_classes=3, C=4, N=1, input_size=8)
    ref = {n: p.detach().clone() for n, p in net.named_parameters()}
    perturb(net, seed=3)
    tracker = AngleTracker.from_reference(net, ref, include_bn_affine=True, include_bias=True)
    tracker.compute_statistics(net)
    rng = np.random.default_rng(0)
    archs = rng.integers(0, 5, size=(40, 6)).tolist() + [[0] * 6, [1, 0, 0, 0, 0, 0], [3] * 6, [4, 2, 0, 0, 3, 1]]
    fast = tracker.path_angles(archs)
    naive = np.array([naive_nb201(net, ref, a) for a in archs])
    assert np.abs(fast - naive).max() <= 1e-6
    assert tracker.path_angle([0] * 6) == 0.0
    assert tracker.path_angle([1, 0, 0, 0, 0, 0]) == 0.0  # disconnected: every path contains none
    assert tracker.path_angle([3] * 6) > 0


def test_no_choice_is_a_clear_error():
    with pytest.raises(ValueError, match="no Choice"):
        AngleLayout.build(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Choice"):
        AngleTracker.from_reference(nn.Linear(2, 2), {})
