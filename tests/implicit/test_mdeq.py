import pytest
import torch
from torch.nn.utils import parametrize

from lightning_nd.implicit import MDEQ, DEQConfig, MDEQCell, VariationalDropout

TINY = {"channels": [4, 8], "head_channels": [2, 4], "final_channels": 16, "expansion": 2, "groups": 2}


def test_mdeq_shapes_and_multiscale_state():
    net = MDEQ(num_classes=5, in_chans=1, deq={"f_max_iter": 6, "b_max_iter": 6}, **TINY)
    x = torch.randn(3, 1, 13, 13)
    zs = net.features(x)
    assert [tuple(z.shape) for z in zs] == [(3, 4, 13, 13), (3, 8, 7, 7)]
    logits = net(x)
    assert logits.shape == (3, 5)
    logits.sum().backward()
    stats = net.deq.last_stats
    assert stats.forward.nfe <= 6 and stats.backward is not None
    # every parameter of the equilibrium cell receives a gradient through the implicit backward
    for name, p in net.cell.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_mdeq_cell_reaches_equilibrium_and_eval_under_inference_mode():
    net = MDEQ(num_classes=3, in_chans=1, dropout=0.0, deq={"f_max_iter": 20, "f_tol": 1e-4}, **TINY)
    net.eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.inference_mode():
        logits = net(x)
    assert logits.shape == (2, 3) and not logits.requires_grad
    fwd = net.deq.last_stats.forward
    # GroupNorm makes the untrained cell scale-invariant and only marginally contractive (training and Jacobian
    # regularisation make it converge); the solver still cuts the relative residual well below its start of 1.0.
    assert torch.isfinite(logits).all() and not fwd.diverged
    assert float(fwd.rel.max()) < 0.6 and float(fwd.rel_trace[:, 0].min()) > 0.99


def test_variational_dropout_mask_is_shared_across_iterations_and_reset_per_forward():
    drop = VariationalDropout(0.5)
    z = torch.ones(4, 6, 3, 3)
    a, b = drop(z), drop(z)
    torch.testing.assert_close(a, b)
    assert set(a.unique().tolist()) <= {0.0, 2.0}
    assert bool((a[:, :, 0, 0, None, None] == a).all())  # channel-wise mask
    drop.reset()
    torch.manual_seed(1)
    c = drop(z)
    assert not torch.equal(a, c)
    drop.eval()
    torch.testing.assert_close(drop(z), z)
    with pytest.raises(ValueError, match="p=1.0"):
        VariationalDropout(1.0)

    net = MDEQ(num_classes=3, in_chans=1, dropout=0.5, deq={"f_max_iter": 4}, **TINY)
    masks = []
    block = net.cell.blocks[0].drop
    orig = block.forward

    def spy(x):
        out = orig(x)
        masks.append(block.mask.clone())
        return out

    block.forward = spy
    net(torch.randn(2, 1, 8, 8))
    first = len(masks)
    assert first >= 4 and all(torch.equal(m, masks[0]) for m in masks)  # one mask for all solver iterations
    net(torch.randn(2, 1, 8, 8))
    assert not torch.equal(masks[-1], masks[0])  # a new mask for the next forward


def test_weight_norm_is_computed_once_per_solve():
    cell = MDEQCell([4, 8], expansion=2, groups=2, weight_norm=True)
    conv = cell.blocks[0].conv1
    assert parametrize.is_parametrized(conv, "weight")
    calls = []
    wn = conv.parametrizations.weight[0]
    orig = wn.forward
    wn.forward = lambda *a: (calls.append(1), orig(*a))[1]
    net = MDEQ(num_classes=3, in_chans=1, deq={"f_max_iter": 8, "f_tol": 1e-9}, **TINY)
    net.deq.cell = cell  # swap in the spied cell with matching channels
    net(torch.randn(2, 1, 8, 8))
    assert net.deq.last_stats.forward.nfe == 8
    assert len(calls) == 2  # once for the solve (no grad), once for the tracked application


def test_bad_arguments():
    with pytest.raises(ValueError, match="head_channels"):
        MDEQ(channels=[4, 8], head_channels=[2])
    with pytest.raises(ValueError, match="channels=\\[\\]"):
        MDEQCell([])
    with pytest.raises(ValueError, match=r"unknown DEQ option\(s\) \['threshold'\]"):
        MDEQ(deq={"threshold": 10}, **TINY)
    assert MDEQ(deq=DEQConfig(f_solver="broyden"), **TINY).deq.config.f_solver == "broyden"


def test_fixed_point_reuse_restarts_from_the_last_equilibrium_for_a_repeated_input():
    torch.manual_seed(0)
    net = MDEQ(num_classes=3, in_chans=1, dropout=0.0, deq={"f_max_iter": 8}, reuse_fixed_point=True, **TINY)
    net.eval()
    starts = []
    solve = net.deq.forward
    net.deq.forward = lambda x, z0=None: (starts.append([z.clone() for z in z0]), solve(x, z0))[1]
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        first = net.features(x)
        net.features(x)
        warm_start_residual = net.deq.last_stats.forward.rel_trace[:, 0]
        net.features(torch.randn(2, 1, 8, 8))
    assert all(float(z.abs().max()) == 0.0 for z in starts[0])  # a new input starts from zeros
    for z0, z in zip(starts[1], first):  # the repeated input starts from the last equilibrium
        torch.testing.assert_close(z0, z, rtol=0.0, atol=0.0)
    assert float(warm_start_residual.max()) < 0.9  # not the relative residual 1.0 of a cold start from zeros
    assert all(float(z.abs().max()) == 0.0 for z in starts[2])
    plain = MDEQ(num_classes=3, in_chans=1, dropout=0.0, deq={"f_max_iter": 8}, **TINY)
    assert plain.reuse_fixed_point is False
