"""Spaces: exact NAS-Bench-201 parameter counts and FLOPs, SPOS/ABS space shapes."""

import random

import pytest
import torch
from torch import nn

from lightning_nd.nas import (
    build_space,
    count_flops,
    count_params,
    decisions,
    export_subnet,
    list_spaces,
    set_arch,
    space_size,
)
from lightning_nd.nas.spaces import arch_to_str, register_space, str_to_arch

OFFICIAL = {  # index: (C10 MFLOPs, C10 Mparams) from the NATS-Bench records (nas.md §6)
    0: (15.64737, 0.129306),
    11: (113.95137, 0.802426),
    284: (11.71521, 0.101306),
}


def nb201_strings():
    """The official cell strings, in official index order, from the table shipped with the package."""
    from lightning_nd.nas.bench import NB201

    bench = NB201()
    return [bench.arch_str(i) for i in range(len(bench))]


def test_nb201_params_match_official_records_and_formula():
    strings = nb201_strings()
    net = build_space("nb201", num_classes=10)
    supernet_no_affine = build_space("nb201", num_classes=10, affine=False)
    indices = [0, 11, 284] + random.Random(0).sample(range(len(strings)), 5)
    for idx in indices:
        arch = str_to_arch(strings[idx])
        assert arch_to_str(arch) == strings[idx]
        sub = export_subnet(net, arch, inherit_weights=False)
        n3, n1 = arch.count(3), arch.count(2)
        assert count_params(sub) == 73306 + 243040 * n3 + 28000 * n1, strings[idx]
        no_affine = export_subnet(supernet_no_affine, arch, inherit_weights=False)  # official supernet: no cell BN affine
        assert count_params(sub) - count_params(no_affine) == 5 * 2 * (16 + 32 + 64) * (n3 + n1)  # BN affine per conv
        if idx in OFFICIAL:
            flops, params = OFFICIAL[idx]
            assert count_params(sub) == round(params * 1e6)
            # official MACs also count the 10 classifier-bias adds (1e-5 M)
            assert abs(count_flops(sub, (3, 32, 32)) / 1e6 - flops) <= 1.1e-5


def test_nb201_string_errors():
    with pytest.raises(ValueError, match="unknown op"):
        str_to_arch("|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|")
    with pytest.raises(ValueError):
        arch_to_str([5] * 6)


def test_shufflenet_spos_space():
    net = build_space("shufflenet", num_classes=1000)
    assert len(decisions(net)) == 20 and space_size(net) == 4**20
    assert not any(m.affine for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    sub = export_subnet(net, [2, 1, 0, 1, 2, 0, 2, 0, 2, 0, 2, 3, 0, 0, 0, 0, 3, 2, 3, 3])
    assert round(count_params(sub) / 1e6, 1) == 3.5  # SPOS README: 3.5M params, 323M FLOPs
    small = build_space("shufflenet", num_classes=5, in_chans=1, input_size=16,
                        stage_out_channels=(8, 16, 32, 48, 64, 64), stage_repeats=(1, 1, 2, 1))
    set_arch(small, [3, 2, 1, 0, 3])
    assert small(torch.randn(2, 1, 16, 16)).shape == (2, 5)


def test_mobilenet_abs_space():
    net = build_space("mobilenet", num_classes=10, in_chans=1, input_size=16, width_mult=0.25)
    found = decisions(net)
    assert len(found) == 21
    six = [i for i, d in enumerate(found) if len(d.names) == 6]
    assert six == [0, 4, 8, 12, 16, 20]
    assert space_size(net) == 6**6 * 7**15
    set_arch(net, [0] + [6 if len(d.names) == 7 else 5 for d in found[1:]])
    assert net(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_registry():
    assert {"nb201", "shufflenet", "mobilenet", "darts"} <= set(list_spaces())
    register_space("tiny_nb201", lambda **kw: build_space("nb201", C=4, N=1, **kw), overwrite=True)
    assert len(decisions(build_space("tiny_nb201"))) == 6
    with pytest.raises(ValueError, match="already registered"):
        register_space("nb201", lambda: None)
    with pytest.raises(ValueError, match="unknown search space"):
        build_space("no_such_space")
