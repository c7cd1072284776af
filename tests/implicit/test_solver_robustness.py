"""Issue 23: solvers at least as robust as torchdeq's (memory wrap, per-sample handling, Anderson stalls, warnings)."""

import warnings

import pytest
import torch

from lightning_nd.implicit import DEQ, solve
from tests.implicit.helpers import ConvCell, SlowConvCell, group_norm_problem


def _plain_reference(f, z0, steps=4000):
    z = z0
    for _ in range(steps):
        z = f(z)
    return z


@pytest.mark.parametrize("memory", [10, 27])
def test_broyden_keeps_converging_past_its_memory(memory):
    # issue 23, point 1: with the circular buffer of locuslab/mdeq (memory 27) this float64 GroupNorm cell hit the
    # protective break at evaluation 131, unconverged; restarting from -I when the memory is full keeps converging.
    # Tolerance: the cell contracts (radii <= ~0.95 at z*), so the distance to z* is below tol / (1 - 0.95) = 2e-9;
    # 4,000 plain steps reach a residual of 2e-15. 1e-6 is the bound, far above both.
    cell, x = group_norm_problem()
    f = lambda z: cell(z, x)  # noqa: E731
    with torch.no_grad():
        z, stats = solve("broyden", f, torch.zeros_like(x), tol=1e-10, max_iter=300, memory=memory)
        ref = _plain_reference(f, torch.zeros_like(x))
    assert stats.nfe > memory + 2  # the memory was used up (and restarted) before convergence
    assert bool(stats.converged.all()) and not stats.diverged
    torch.testing.assert_close(z, ref, rtol=0, atol=1e-6)


def test_broyden_default_memory_matches_full_memory_on_the_group_norm_cell():
    # the default memory (100) holds every factor of this solve: the same iterates as an unlimited memory
    cell, x = group_norm_problem()
    f = lambda z: cell(z, x)  # noqa: E731
    with torch.no_grad():
        z, stats = solve("broyden", f, torch.zeros_like(x), tol=1e-10, max_iter=300)
        z_full, full = solve("broyden", f, torch.zeros_like(x), tol=1e-10, max_iter=300, memory=300)
    assert stats.nfe == full.nfe < 100
    torch.testing.assert_close(z, z_full, rtol=0, atol=0)


def _nan_batch(x, index=3):
    bad = x.clone()
    bad[index, 0, 2, 2] = float("nan")
    return bad


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_nan_sample_leaves_the_clean_samples_equal_to_their_clean_batch_outputs(solver):
    # issue 23, point 2: one NaN pixel stopped the whole batch after one evaluation (clean samples 90 % off).
    # Now every sample is stopped and broken on its own, so a clean sample follows the same iterates as in the
    # clean batch. Tolerance 1e-5: float32 outputs of size ~1 (eps 6e-8); a batched kernel could round one sample
    # differently when another sample's values change, a few ulps, amplified by the solver's sensitivity
    # 1 / (1 - 0.9) = 10: ~1e-6. 1e-5 leaves a margin; a spoiled solve is off by ~1e-1.
    cell = ConvCell(4, scale=0.9)
    x = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    deq = DEQ(cell, f_solver=solver, f_tol=1e-4, f_stop_mode="rel", f_max_iter=60).eval()
    with torch.no_grad():
        clean = deq(x)
        clean_stats = deq.last_stats.forward
        with pytest.warns(RuntimeWarning, match=r"diverged \(" + solver + r"\): 1 of 8 samples \(batch indices \[3\]"):
            out = deq(_nan_batch(x))
    stats = deq.last_stats.forward
    keep = torch.arange(8) != 3
    torch.testing.assert_close(out[keep], clean[keep], rtol=0, atol=1e-5)
    assert bool(clean_stats.converged.all()) and bool(stats.converged[keep].all()) and not bool(stats.converged[3])
    assert stats.diverged and stats.num_diverged == 1 and stats.diverged_indices == [3]
    assert stats.nonfinite_indices == [3] and stats.summary()["diverged_samples"] == 1.0
    assert stats.nfe == clean_stats.nfe  # the NaN sample did not hold the batch either
    assert torch.isfinite(stats.abs[keep]).all() and float(stats.abs[3]) == float("inf") and int(stats.nstep[3]) == 0


def test_exploding_sample_is_broken_alone():
    # sample 0 explodes under plain iteration (z <- 3 z + 1: residual x3 per step, past 1e6 x its first at step
    # 14), the others contract (z <- 0.5 z + 1, 25 steps to 1e-6): they converge exactly as when solved alone, the
    # exploded sample keeps its best (first) iterate
    def f(z):
        return torch.cat([3.0 * z[:1] + 1.0, 0.5 * z[1:] + 1.0])

    with torch.no_grad():
        z, stats = solve("fixed_point", f, torch.zeros(4, 5), tol=1e-6, max_iter=100)
        z_alone, alone = solve("fixed_point", lambda v: 0.5 * v + 1.0, torch.zeros(3, 5), tol=1e-6, max_iter=100)
    assert stats.diverged_indices == [0] and stats.nonfinite_indices == []
    assert not bool(stats.converged[0]) and bool(stats.converged[1:].all())
    assert stats.nfe == alone.nfe > 14
    torch.testing.assert_close(z[1:], z_alone, rtol=0, atol=0)
    torch.testing.assert_close(z[0], torch.zeros(5), rtol=0, atol=0)


@pytest.mark.parametrize("problem", ["group_norm", "slow_tanh"])
def test_anderson_default_does_not_stall_where_the_absolute_rule_converges(problem):
    # issue 23, point 5: on slowly contracting cells Anderson's default must converge, and in no more evaluations
    # than the absolute lambda of locuslab/deq and torchdeq (which needs 89 here and reaches only 1 of 3 samples of
    # the GroupNorm cell in 300; benchmarks/results/deq_solvers.md)
    if problem == "group_norm":
        cell, x = group_norm_problem()
        tol = 1e-10
    else:
        cell = SlowConvCell(channels=4, radius=0.95)
        x = 0.5 * torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        tol = 1e-5
    f = lambda z: cell(z, x)  # noqa: E731
    with torch.no_grad():
        _, ours = solve("anderson", f, torch.zeros_like(x), tol=tol, max_iter=300)
        _, absolute = solve("anderson", f, torch.zeros_like(x), tol=tol, max_iter=300, relative_lam=False)
    assert bool(ours.converged.all()) and not ours.diverged
    assert ours.nfe <= absolute.nfe
    if problem == "group_norm":
        assert not bool(absolute.converged.all())  # the absolute rule stalls here (as torchdeq's does)


def _non_contractive_deq(**options):
    cell = ConvCell(4, scale=3.0)  # tanh(conv(z) + x), conv norm up to 3: no contraction
    return DEQ(cell, f_solver="fixed_point", f_max_iter=5, f_tol=1e-6, **options)


def test_layer_warns_once_per_n_calls_outside_lightning_and_points_at_the_caller():
    deq = _non_contractive_deq(warn_unconverged_every=5)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(12):
            deq(x)
    ours = [w for w in caught if "did not converge" in str(w.message)]
    assert len(ours) == 3  # calls 1, 6 and 11
    assert "100% of the samples of the last 5 call(s) ended above f_tol=1e-06" in str(ours[1].message)
    assert all(w.filename == __file__ for w in ours)  # the user's line, not the library's
    quiet = _non_contractive_deq(warn_unconverged_every=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet(x)
    with pytest.raises(ValueError, match="warn_unconverged_every=-1 must be an integer >= 0"):
        _non_contractive_deq(warn_unconverged_every=-1)


def test_adjoint_warning_points_at_the_backward_call():
    w = torch.nn.Parameter(torch.eye(6) * 1.5)
    deq = DEQ(lambda z, x: z @ w + x, f_solver="fixed_point", f_max_iter=2, b_solver="fixed_point", b_max_iter=20,
              warn_unconverged_every=0)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="adjoint") as caught:
        deq(x).sum().backward()
    assert [r.filename for r in caught if "adjoint" in str(r.message)] == [__file__]
