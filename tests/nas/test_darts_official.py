"""The DARTS space against ports of the official code: ``quark0/darts`` ``cnn/operations.py`` + ``cnn/model.py``
(``NetworkCIFAR``; parameter count and outputs of the retrain network) and RLNAS
``darts_search_space/cifar10/rlnas/evolution_search/test_server.py`` (``get_arch_vector`` / ``get_angle``: the
``rlnas_darts`` angle preset to <= 1e-6 rad on random paths). The ports keep the official module layout and
indexing (``op[1]``, ``_ops[4].op[1]``, the dil conv BN "bias" read from ``op[3].weight``), rewritten in float64."""

import copy

import numpy as np
import torch
from torch import nn

from lightning_nd.nas import AngleLayout, AngleStats, PathSampler, build_space, decisions, used_mask
from lightning_nd.nas.angle import ANGLE_PRESETS
from lightning_nd.nas.spaces.darts import GENOTYPES, build_network
from lightning_nd.nas.spaces.darts_ops import FactorizedReduce, Identity

# ------------------------------------------------------------------------------------------- official NetworkCIFAR


class OReLUConvBN(nn.Module):
    def __init__(self, c_in, c_out, k, stride, pad, affine=True):
        super().__init__()
        self.op = nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, bias=False),
                                nn.BatchNorm2d(c_out, affine=affine))

    def forward(self, x):
        return self.op(x)


class ODilConv(nn.Module):
    def __init__(self, c_in, c_out, k, stride, pad, dil, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel_size=k, stride=stride, padding=pad, dilation=dil, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, kernel_size=1, padding=0, bias=False), nn.BatchNorm2d(c_out, affine=affine))

    def forward(self, x):
        return self.op(x)


class OSepConv(nn.Module):
    def __init__(self, c_in, c_out, k, stride, pad, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel_size=k, stride=stride, padding=pad, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, kernel_size=1, padding=0, bias=False), nn.BatchNorm2d(c_in, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel_size=k, stride=1, padding=pad, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, kernel_size=1, padding=0, bias=False), nn.BatchNorm2d(c_out, affine=affine))

    def forward(self, x):
        return self.op(x)


class OFactorizedReduce(nn.Module):
    def __init__(self, c_in, c_out, affine=True):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


OOPS = {
    "avg_pool_3x3": lambda C, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    "max_pool_3x3": lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": lambda C, stride, affine: nn.Identity() if stride == 1 else OFactorizedReduce(C, C, affine=affine),
    "sep_conv_3x3": lambda C, stride, affine: OSepConv(C, C, 3, stride, 1, affine=affine),
    "sep_conv_5x5": lambda C, stride, affine: OSepConv(C, C, 5, stride, 2, affine=affine),
    "dil_conv_3x3": lambda C, stride, affine: ODilConv(C, C, 3, stride, 2, 2, affine=affine),
    "dil_conv_5x5": lambda C, stride, affine: ODilConv(C, C, 5, stride, 4, 2, affine=affine),
}


class OCell(nn.Module):
    def __init__(self, genotype, c_pp, c_p, C, reduction, reduction_prev):
        super().__init__()
        self.preprocess0 = OFactorizedReduce(c_pp, C) if reduction_prev else OReLUConvBN(c_pp, C, 1, 1, 0)
        self.preprocess1 = OReLUConvBN(c_p, C, 1, 1, 0)
        op_names, indices = zip(*(genotype.reduce if reduction else genotype.normal))
        self._concat = genotype.reduce_concat if reduction else genotype.normal_concat
        self._steps, self.multiplier = len(op_names) // 2, len(self._concat)
        self._ops = nn.ModuleList(OOPS[n](C, 2 if reduction and i < 2 else 1, True) for n, i in zip(op_names, indices))
        self._indices = indices

    def forward(self, s0, s1):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self._steps):
            h1 = self._ops[2 * i](states[self._indices[2 * i]])
            h2 = self._ops[2 * i + 1](states[self._indices[2 * i + 1]])
            states += [h1 + h2]
        return torch.cat([states[i] for i in self._concat], dim=1)


class OAuxiliaryHeadCIFAR(nn.Module):
    def __init__(self, C, num_classes):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=True), nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(768, num_classes)


class ONetworkCIFAR(nn.Module):
    def __init__(self, C, num_classes, layers, auxiliary, genotype):
        super().__init__()
        self._layers = layers
        c_curr = 3 * C
        self.stem = nn.Sequential(nn.Conv2d(3, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr))
        c_pp, c_p, c_curr = c_curr, c_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in [layers // 3, 2 * layers // 3]
            if reduction:
                c_curr *= 2
            cell = OCell(genotype, c_pp, c_p, c_curr, reduction, reduction_prev)
            reduction_prev = reduction
            self.cells += [cell]
            c_pp, c_p = c_p, cell.multiplier * c_curr
            if i == 2 * layers // 3:
                c_aux = c_p
        if auxiliary:
            self.auxiliary_head = OAuxiliaryHeadCIFAR(c_aux, num_classes)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_p, num_classes)

    def forward(self, x):
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(self.global_pooling(s1).view(x.shape[0], -1))


def count_parameters(model):
    """``utils.count_parameters_in_MB`` without the /1e6: every parameter not named ``auxiliary``."""
    return int(sum(np.prod(v.size()) for name, v in model.named_parameters() if "auxiliary" not in name))


def test_darts_v2_parameter_count_equals_the_official_network():
    official = ONetworkCIFAR(36, 10, 20, True, GENOTYPES["darts_v2"])
    ours = build_network("darts_v2", C=36, layers=20, num_classes=10, auxiliary=True, drop_path_prob=0.2)
    expected = count_parameters(official)
    assert count_parameters(ours) == expected
    assert 3.3e6 < expected < 3.4e6  # the paper's 3.3M
    aux = sum(p.numel() for n, p in official.named_parameters() if "auxiliary" in n)
    assert sum(p.numel() for p in ours.auxiliary_head.parameters()) == aux
    no_aux = build_network("darts_v2", C=36, layers=20, num_classes=10)
    assert sum(p.numel() for p in no_aux.parameters()) == expected


def test_genotype_network_outputs_equal_the_official_network():
    torch.manual_seed(0)
    for name in ("darts_v1", "rlnas_cifar10"):
        official = ONetworkCIFAR(8, 10, 5, False, GENOTYPES[name]).double().eval()
        ours = build_network(name, C=8, layers=5, num_classes=10).double().eval()
        for a, b in zip(ours.parameters(), official.parameters(), strict=True):
            assert a.shape == b.shape
            with torch.no_grad():
                a.copy_(b)
        for a, b in zip(ours.buffers(), official.buffers(), strict=True):
            b.copy_(torch.rand_like(b) + 0.5 if b.is_floating_point() else b)
            a.copy_(b)
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        torch.testing.assert_close(ours(x), official(x), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------- official angle
PATHS = [[0, 2, 3, 4, 5], [0, 2, 3, 5], [0, 2, 4, 5], [0, 2, 5], [0, 3, 4, 5], [0, 3, 5], [0, 4, 5], [0, 5],
         [1, 2, 3, 4, 5], [1, 2, 3, 5], [1, 2, 4, 5], [1, 2, 5], [1, 3, 4, 5], [1, 3, 5], [1, 4, 5], [1, 5],
         [0, 2, 3, 4], [0, 2, 4], [0, 3, 4], [0, 4], [1, 2, 3, 4], [1, 2, 4], [1, 3, 4], [1, 4],
         [0, 2, 3], [0, 3], [1, 2, 3], [1, 3], [0, 2], [1, 2]]
NONE, MAX_POOLING_3x3, AVG_POOL_3x3, SKIP_CONNECT, SEP_CONV_3x3, SEP_CONV_5x5, DIL_CONV_3x3, DIL_CONV_5x5 = range(8)


def official_arch_vector(model, normal_cand, reduction_cand, layers):
    """RLNAS ``TestServer.get_arch_vector``; ``cells[i]._ops[e]._ops[o]`` is our ``nodes[j-2].edges[k].candidates[o]``."""
    def edge_ops(cell, k, j):
        return model.cells[cell].nodes[j - 2].edges[k].candidates

    cand = [reduction_cand if layer in [layers // 3, 2 * layers // 3] else normal_cand for layer in range(layers)]
    arch_vector, extra = [], []
    extra += [torch.cat([model.stem[0].weight.reshape(-1), model.stem[1].weight.reshape(-1),
                         model.stem[1].bias.reshape(-1)])]
    for i in range(len(model.cells)):
        pre0, pre1 = model.cells[i].preprocess0, model.cells[i].preprocess1
        if isinstance(pre0, FactorizedReduce):
            s0 = torch.cat([pre0.conv_1.weight.reshape(-1), pre0.conv_2.weight.reshape(-1), pre0.bn.weight.reshape(-1),
                            pre0.bn.bias.reshape(-1)])
        else:
            s0 = torch.cat([pre0[1].weight.reshape(-1), pre0[2].weight.reshape(-1), pre0[2].bias.reshape(-1)])
        s1 = torch.cat([pre1[1].weight.reshape(-1), pre1[2].weight.reshape(-1), pre1[2].bias.reshape(-1)])
        extra += [s0, s1]
        param_list = []
        for path in PATHS:
            param_cell = []
            for index in range(1, len(path)):
                j, k = path[index], path[index - 1]
                offset = sum(range(2, j))
                c = cand[i][k + offset]
                ops = edge_ops(i, k, j)
                if c == NONE:
                    param_cell = []
                    break
                elif c in (MAX_POOLING_3x3, AVG_POOL_3x3):
                    shape = ops[4][1].weight.shape
                    pooling = torch.ones([shape[0], shape[2], shape[3]], dtype=torch.float64) * (1 / 9.0)
                    param_cell += [torch.cat([pooling.reshape(-1), ops[c][1].weight.reshape(-1), ops[c][1].bias.reshape(-1)])]
                elif c == SKIP_CONNECT:
                    if isinstance(ops[c], FactorizedReduce):
                        param_cell += [torch.cat([ops[c].conv_1.weight.reshape(-1), ops[c].conv_2.weight.reshape(-1),
                                                  ops[c].bn.weight.reshape(-1), ops[c].bn.bias.reshape(-1)])]
                    elif isinstance(ops[c], Identity):
                        shape = ops[4][6].weight.shape
                        param_cell += [torch.eye(shape[0], shape[0], dtype=torch.float64).reshape(-1)]
                    else:
                        raise Exception("Invalid operators !")
                elif c in (SEP_CONV_3x3, SEP_CONV_5x5):
                    param_cell += [torch.cat([ops[c][1].weight.reshape(-1), ops[c][2].weight.reshape(-1),
                                              ops[c][5].weight.reshape(-1), ops[c][6].weight.reshape(-1)])]
                    param_cell += [torch.cat([ops[c][3].weight.reshape(-1), ops[c][3].bias.reshape(-1),
                                              ops[c][7].weight.reshape(-1), ops[c][7].bias.reshape(-1)])]
                elif c in (DIL_CONV_3x3, DIL_CONV_5x5):
                    param_cell += [torch.cat([ops[c][1].weight.reshape(-1), ops[c][2].weight.reshape(-1)])]
                    # sic: the official code reads op[3].weight for the bias as well
                    param_cell += [torch.cat([ops[c][3].weight.reshape(-1), ops[c][3].weight.reshape(-1)])]
                else:
                    raise Exception("Invalid operators !")
            if len(param_cell) != 0:
                param_list.append(torch.cat(param_cell))
        if len(param_list) != 0:
            arch_vector.append(torch.cat(param_list, dim=0))
    extra.append(model.classifier.weight.reshape(-1))
    return torch.cat(arch_vector + extra, dim=0)


def official_angle(initial_model, model, cand, layers):
    with torch.no_grad():
        v1 = official_arch_vector(initial_model, cand[:14], cand[14:], layers)
        v2 = official_arch_vector(model, cand[:14], cand[14:], layers)
        return torch.acos(torch.nn.CosineSimilarity(dim=0)(v1, v2)).item()


def to_official_cand(found, arch):
    """Our (input choice, edge op) architecture in RLNAS's encoding: 14 op indices per cell, ``none`` = unchosen."""
    used = used_mask(found, [arch])[0]
    index = {d.key: i for i, d in enumerate(found)}
    cand = []
    for kind in ("normal", "reduce"):
        for j in range(2, 6):
            for k in range(j):
                e = index[f"{kind}.n{j}<-{k}"]
                cand.append(int(arch[e]) if used[e] else NONE)
    return cand


def trained_pair(allow_none, seed):
    torch.manual_seed(seed)
    net = build_space("darts", num_classes=10, in_chans=3, C=4, layers=3, affine=True, allow_none=allow_none).double()
    initial = copy.deepcopy(net)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.05 + 0.5 * torch.rand((), generator=g).item()))
    return initial, net


def test_rlnas_darts_preset_matches_the_official_angle():
    initial, net = trained_pair(allow_none=False, seed=0)
    found = decisions(net)
    sampler = PathSampler(net, seed=3)
    archs = np.array([sampler.sample(step) for step in range(100)])
    layout = AngleLayout.build(net, ANGLE_PRESETS["rlnas_darts"])
    stats = AngleStats.compute(layout, dict(net.named_parameters()), dict(initial.named_parameters()))
    ours = stats.path_angles(archs, weight_free="official")
    official = np.array([official_angle(initial, net, to_official_cand(found, a), 3) for a in archs])
    assert official.std() > 1e-3  # the paths differ
    np.testing.assert_allclose(ours, official, rtol=0, atol=1e-6)


def test_rlnas_darts_preset_with_none_on_chosen_edges():
    initial, net = trained_pair(allow_none=True, seed=1)
    found = decisions(net)
    sampler = PathSampler(net, seed=4)
    archs = np.array([sampler.sample(step) for step in range(40)])
    assert (archs == NONE).any()
    mult = net.angle_multiplicity(archs)
    archs = archs[mult.sum(axis=1) > 0]  # every route cut: the official vector keeps only the fixed layers
    layout = AngleLayout.build(net, ANGLE_PRESETS["rlnas_darts"])
    stats = AngleStats.compute(layout, dict(net.named_parameters()), dict(initial.named_parameters()))
    ours = stats.path_angles(archs, weight_free="official")
    official = np.array([official_angle(initial, net, to_official_cand(found, a), 3) for a in archs])
    np.testing.assert_allclose(ours, official, rtol=0, atol=1e-6)
