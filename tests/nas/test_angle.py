"""The decomposed angle equals the naive concatenated angle (float64, <= 1e-6 rad), and each preset equals a port of
the official code (RLNAS/ABS NB201 ``weight_angle.py``, ABS ``get_arch_vector``, RLNAS ``test_server.py``)."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from lightning_nd.callbacks import AngleTracker
from lightning_nd.nas import AngleLayout, AngleStats, Choice, build_space
from lightning_nd.nas.angle import ANGLE_PRESETS, angle_vector, tracked_parameters
from lightning_nd.nas.bench import is_connected
from lightning_nd.nas.spaces.nb201 import NB201_OPS, arch_to_str


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
    layout = AngleLayout.build(net, angle_vector(None, bn, bn, identity), channels={"l1": 3, "l2": 3})
    stats = AngleStats.compute(layout, dict(net.named_parameters()), ref)
    archs = np.array(list(itertools.product(range(4), range(4))))
    fast = stats.path_angles(archs, weight_free="official")
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
    assert np.isnan(ops[0][2])  # skip: no weights, whatever its pseudo-weight
    assert np.isnan(ops[0][3])  # pooling: no weights (its constant kernel never moves)


def _cos_angle(v0, v):
    a, b = torch.cat(v0).double(), torch.cat(v).double()
    return torch.acos(torch.clamp(torch.dot(a, b) / (a.norm() * b.norm()), -1, 1)).item()


def official_nb201(init, cur, net, arch, cells_only=False, abs_code=False):
    """Port of ``get_arch_angle`` (RLNAS ``nas_bench_201/exps/algos/weight_angle.py``; with ``abs_code`` ABS
    ``NAS-Bench-201/exps/angle/weight_angle.py``, which lacks RLNAS's "every path holds none -> 0" rule and so returns
    the fixed layers' angle for a disconnected cell), with the official parameter names mapped to ours (``op.1`` ->
    ``1``, ``edges.j<-i.k`` -> ``edges.j<-i.candidates.k``)."""
    cells = [k for k, c in enumerate(net.cells) if hasattr(c, "edges")]
    fixed_cells = [k for k, c in enumerate(net.cells) if not hasattr(c, "edges")]
    head = ["stem.0.weight", "stem.1.weight", "stem.1.bias"]
    tail = ["lastact.0.weight", "lastact.0.bias", "classifier.weight", "classifier.bias"]
    fixed_names = [f"cells.{k}.{n}" for k in fixed_cells for n in (
        "conv_a.1.weight", "conv_a.2.weight", "conv_a.2.bias", "conv_b.1.weight", "conv_b.2.weight", "conv_b.2.bias",
        "downsample.1.weight")]
    v0, v = [], []
    if not cells_only:
        v0 += [init[n].reshape(-1) for n in head + fixed_names + tail]
        v += [cur[n].reshape(-1) for n in head + fixed_names + tail]
    nodes = [[arch[0]], [arch[1], arch[2]], [arch[3], arch[4], arch[5]]]  # node j-1 <- inputs 0..j-1
    none_paths = 0
    for path in [[0, 3], [0, 2, 3], [0, 1, 2, 3], [0, 1, 3]]:
        for k in cells:
            p0, p = [], []
            hit_none = False
            for idx in range(1, len(path)):
                i, j = path[idx], path[idx - 1]
                op = NB201_OPS[nodes[i - 1][j]]
                if op == "none":
                    p0, p, hit_none = [], [], True
                    none_paths += 1
                    break
                if op == "avg_pool_3x3":
                    shape = init[f"cells.{k}.edges.{i}<-{j}.candidates.3.1.weight"].shape
                    pool = torch.ones(shape[0], shape[2], shape[3]).reshape(-1) / 9.0
                    p0.append(pool), p.append(pool.clone())
                elif op in ("nor_conv_1x1", "nor_conv_3x3"):
                    name = f"cells.{k}.edges.{i}<-{j}.candidates.{NB201_OPS.index(op)}.1.weight"
                    p0.append(init[name].reshape(-1)), p.append(cur[name].reshape(-1))
            if not p:
                if hit_none:
                    break
                continue
            v0.append(torch.cat(p0)), v.append(torch.cat(p))
    if (none_paths == 4 and not abs_code) or not v:
        return 0.0
    return _cos_angle(v0, v)


def official_mobilenet(init, cur, net, arch, rlnas):
    """Port of ABS ``get_arch_vector`` (``SPOS/shrinking/shrinking.py``) and RLNAS ``test_server.py``."""
    identity = net.features[1].names.index("identity")
    names = ["stem.0.weight", "first.0.weight", "first.3.weight", "conv_last.0.weight", "classifier.weight"]
    v0, v = [init[n].reshape(-1) for n in names], [cur[n].reshape(-1) for n in names]
    for i, c in enumerate(arch):
        if c != identity:
            parts = ["0.weight", "1.weight", "1.bias", "3.weight", "4.weight", "4.bias", "6.weight"] if rlnas else [
                "0.weight", "3.weight", "6.weight"]
            v0.append(torch.cat([init[f"features.{i}.candidates.{c}.{n}"].reshape(-1) for n in parts]))
            v.append(torch.cat([cur[f"features.{i}.candidates.{c}.{n}"].reshape(-1) for n in parts]))
        elif rlnas:
            ch = net.features[i].candidates[identity].channels
            v0.append(torch.eye(ch, ch).reshape(-1)), v.append(torch.eye(ch, ch).reshape(-1))
    return _cos_angle(v0, v)


def _trained_pair(net, seed):
    init = {n: p.detach().clone() for n, p in net.state_dict().items()}
    perturb(net, seed=seed)
    return init, {n: p.detach().clone() for n, p in net.state_dict().items()}


@pytest.mark.parametrize("preset", ["rlnas_nb201", "abs_nb201"])
@pytest.mark.parametrize("cells_only", [False, True])
def test_nb201_presets_match_the_official_code(preset, cells_only):
    torch.manual_seed(0)
    net = build_space("nb201", num_classes=3, C=4, N=2, input_size=8, affine=False)  # the official one-shot supernet
    init, cur = _trained_pair(net, seed=3)
    tracker = AngleTracker.from_reference(net, init, preset=preset, cells_only=cells_only, weight_free="official")
    tracker.compute_statistics(net)
    rng = np.random.default_rng(0)
    archs = rng.integers(0, 5, size=(150, 6)).tolist() + [[0] * 6, [1, 0, 0, 0, 0, 0], [4, 0, 0, 4, 0, 0]]
    archs += [[2, 3, 1, 0, 0, 0], [0, 3, 4, 0, 2, 0]]  # disconnected, with weights on the cut edges
    fast = tracker.path_angles(archs)
    official = np.array([official_nb201(init, cur, net, a, cells_only, preset == "abs_nb201") for a in archs])
    assert np.abs(fast - official).max() <= 1e-6
    assert fast.std() > 1e-3
    disconnected = [a for a in archs if not is_connected(arch_to_str(a))]
    if preset == "abs_nb201" and not cells_only:  # ABS: the fixed layers' angle, the same for every cut cell
        assert len(disconnected) > 3 and np.ptp(tracker.path_angles(disconnected)) < 1e-12
        assert tracker.path_angles(disconnected).min() > 1e-3
    else:
        assert (tracker.path_angles(disconnected) == 0).all()


@pytest.mark.parametrize("preset", ["rlnas_mobilenet", "abs_mobilenet"])
def test_mobilenet_presets_match_the_official_code(preset):
    torch.manual_seed(0)
    net = build_space("mobilenet", num_classes=5, input_size=32, width_mult=0.25)
    init, cur = _trained_pair(net, seed=4)
    tracker = AngleTracker.from_reference(net, init, preset=preset)
    tracker.compute_statistics(net)
    rng = np.random.default_rng(1)
    options = [len(c) for c in net.features]
    archs = [[int(rng.integers(n)) for n in options] for _ in range(120)]
    fast = tracker.path_angles(archs)
    official = np.array([official_mobilenet(init, cur, net, a, preset.startswith("rlnas")) for a in archs])
    assert np.abs(fast - official).max() <= 1e-6
    assert fast.std() > 1e-4


def test_presets_pick_the_official_weights():
    net = build_space("mobilenet", num_classes=5, input_size=32, width_mult=0.25)
    rlnas = tracked_parameters(net, ANGLE_PRESETS["rlnas_mobilenet"])
    assert "features.0.candidates.0.1.weight" in rlnas and "features.0.candidates.0.7.weight" not in rlnas
    assert "stem.1.weight" not in rlnas and "classifier.bias" not in rlnas
    nb = tracked_parameters(build_space("nb201", C=4, N=1, affine=True), ANGLE_PRESETS["rlnas_nb201"])
    assert "stem.1.weight" in nb and "classifier.bias" in nb
    assert not any(".edges." in n and not n.endswith(".1.weight") for n in nb)  # cell ops: conv weights only
    with pytest.raises(ValueError, match="unknown angle preset"):
        angle_vector("no_such_preset")


def test_degenerate_cells_rank_last():
    """Disconnected cells and cells whose surviving routes are parameter-free get angle 0 (documented rule)."""
    torch.manual_seed(0)
    net = build_space("nb201", num_classes=3, C=4, N=1, input_size=8, affine=False)
    init, _ = _trained_pair(net, seed=5)
    tracker = AngleTracker.from_reference(net, init, preset="rlnas_nb201")
    tracker.compute_statistics(net)
    pool_only = [0, 0, 0, 4, 0, 0]  # 0->3 avg pool; every other route cut by none
    skip_pool = [1, 0, 4, 1, 0, 0]  # skip/pool on every surviving route
    conv = [0, 0, 0, 3, 0, 0]
    angles = tracker.path_angles([pool_only, skip_pool, conv, [0] * 6])
    assert angles[0] == angles[1] == angles[3] == 0.0 and angles[2] > 0
    official = AngleTracker.from_reference(net, init, preset="rlnas_nb201", weight_free="official")
    official.compute_statistics(net)
    fixed_only = official.path_angles([pool_only, skip_pool])
    assert (fixed_only > 0).all()  # officially: the fixed layers' angle (+ pool constants), not a cell property


def test_no_choice_is_a_clear_error():
    with pytest.raises(ValueError, match="no Choice"):
        AngleLayout.build(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Choice"):
        AngleTracker.from_reference(nn.Linear(2, 2), {})
