import numpy as np

from lightning_nd.nas import ArchCost, CostConstraint, PathSampler, build_space
from lightning_nd.nas.sampler import uniform_archs


def test_table_equals_exact_subnet_counts():
    for net, shape in [
        (build_space("nb201", num_classes=3, C=4, N=1, input_size=8), (3, 8, 8)),
        (build_space("mobilenet", num_classes=5, in_chans=1, input_size=16, width_mult=0.25,
                     layers=[(32, 2), (32, 1), (56, 2), (56, 1)]), (1, 16, 16)),
    ]:
        table, exact = ArchCost(net, shape), ArchCost(net, shape, exact=True)
        archs = uniform_archs(np.random.default_rng(0), PathSampler(net).options(), 3)
        for arch in archs.tolist():
            assert table.flops(arch) == exact.flops(arch) and table.params(arch) == exact.params(arch)
        assert np.array_equal(table.flops_many(archs), [table.flops(a) for a in archs.tolist()])
        ok = CostConstraint(table, flops_range=(None, np.median(table.flops_many(archs))), params_range=(0, None))
        assert ok.mask(archs).tolist() == [ok(a) for a in archs.tolist()]
