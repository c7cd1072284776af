import pytest
import torch

from lightning_nd.implicit import SOLVERS, SolverStats, register_solver, solve, solver_options
from tests.implicit.helpers import ConvCell, SlowConvCell

SOLVER_NAMES = ["fixed_point", "anderson", "broyden"]


def _contractive_map(seed=0, d=32, b=5):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=gen)
    a = 0.8 * a / torch.linalg.matrix_norm(a, 2)  # Lipschitz 0.8 with tanh
    c = torch.randn(b, d, generator=gen)
    return (lambda z: torch.tanh(z @ a.T + c)), torch.zeros(b, d)


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_solver_reaches_fixed_point(name, stop_mode):
    f, z0 = _contractive_map()
    with torch.no_grad():
        z, stats = solve(name, f, z0, tol=1e-5, max_iter=200, stop_mode=stop_mode)
        # the reference fixed point by long plain iteration (contraction 0.8: 1e-20 after 200 steps)
        ref = z0
        for _ in range(200):
            ref = f(ref)
        residual = (f(z) - z).norm(dim=1)
    assert isinstance(stats, SolverStats)
    assert stats.abs.shape == stats.rel.shape == stats.nstep.shape == (5,)
    assert bool(stats.converged.all()) and not stats.diverged
    assert stats.nfe < 200
    assert float(stats.residual.max()) < 1e-5
    # the reported residual is the true residual of the returned iterate
    torch.testing.assert_close(residual, stats.abs, rtol=1e-3, atol=1e-7)
    # contraction: distance to z* <= residual / (1 - 0.8)
    assert float((z - ref).norm(dim=1).max()) < 5 * float(residual.max()) + 1e-6
    assert stats.abs_trace.shape == (5, stats.nfe)


def test_accelerated_solvers_need_fewer_evaluations_on_conv_cell():
    cell = SlowConvCell(channels=4, radius=0.95)
    x = 0.5 * torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    nfe = {}
    with torch.no_grad():
        for name in SOLVER_NAMES:
            _, stats = solve(name, lambda z: cell(z, x), torch.zeros_like(x), tol=1e-4, max_iter=300)
            assert bool(stats.converged.all()), name
            nfe[name] = stats.nfe
    assert nfe["anderson"] < nfe["fixed_point"]
    assert nfe["broyden"] < nfe["fixed_point"]


def test_stops_when_worst_sample_meets_tolerance():
    # sample 0 converges at once (f constant), sample 1 slowly: the solve runs until sample 1 is done
    def f(z):
        out = 0.9 * z + 1.0
        return torch.stack([torch.ones_like(z[0]), out[1]])

    with torch.no_grad():
        z, stats = solve("fixed_point", f, torch.zeros(2, 3), tol=1e-3, max_iter=500)
    assert int(stats.nstep[0]) <= 2 and int(stats.nstep[1]) > 50
    assert stats.nfe == int(stats.nstep[1])
    assert float(stats.abs.max()) < 1e-3


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_map_without_fixed_point_returns_best_finite_iterate(name):
    def f(z):
        return z + 1.0 + z**2  # f(z) - z = 1 + z^2 > 0: no fixed point; plain iteration explodes

    with torch.no_grad():
        z, stats = solve(name, f, torch.zeros(2, 4), tol=1e-6, max_iter=100)
    assert torch.isfinite(z).all()
    assert not bool(stats.converged.any())
    # the best residual is the one at z0 = 0 (||1|| = 2): the lowest possible, kept although later iterates blow up
    torch.testing.assert_close(stats.abs, torch.full((2,), 2.0))
    torch.testing.assert_close(z, torch.zeros(2, 4))
    if name == "fixed_point":
        assert stats.diverged and stats.nfe < 100  # protective break: residual turned inf


def test_tuple_state_keeps_structure():
    x = torch.randn(3, 2, 4, 4)

    def f(z):
        a, b = z
        return torch.tanh(0.5 * a + x), 0.5 * b + a.mean(dim=(1, 2, 3))[:, None]

    with torch.no_grad():
        z, stats = solve("anderson", f, (torch.zeros_like(x), torch.zeros(3, 5)), tol=1e-6, max_iter=100)
    assert isinstance(z, tuple) and z[0].shape == x.shape and z[1].shape == (3, 5)
    fa, fb = f(z)
    torch.testing.assert_close(fa, z[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(fb, z[1], atol=1e-5, rtol=0)


def test_bf16_autocast_keeps_solver_state_float32():
    cell = ConvCell(channels=4, scale=0.5)
    x = torch.randn(2, 4, 6, 6)
    seen = []

    def f(z):
        seen.append(z.dtype)
        seen.append(cell.conv(z).dtype)  # bf16 when autocast is active inside f
        return cell(z, x).bfloat16()  # a bf16 output is cast back to the float32 state

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z, stats = solve("anderson", f, torch.zeros_like(x), tol=1e-2, max_iter=20)
    assert seen[0] == torch.float32 and torch.bfloat16 in seen  # f ran under autocast, fed float32 state
    assert z.dtype == torch.float32 and stats.abs.dtype == torch.float32
    assert torch.isfinite(z).all() and float(stats.abs.max()) < 1e-1


def test_works_under_inference_mode():
    f, z0 = _contractive_map()
    with torch.inference_mode():
        for name in SOLVER_NAMES:
            z, stats = solve(name, f, z0, tol=1e-4, max_iter=100)
            assert bool(stats.converged.all())


def test_registry_and_bad_input():
    assert {"fixed_point", "anderson", "broyden"} <= set(SOLVERS)
    f, z0 = _contractive_map()
    with pytest.raises(ValueError, match="unknown solver 'newton'.*anderson"):
        solve("newton", f, z0)
    with pytest.raises(ValueError, match="tol=0"):
        solve("anderson", f, z0, tol=0)
    with pytest.raises(ValueError, match="tol=-1"):
        solve("anderson", f, z0, tol=-1.0)
    with pytest.raises(ValueError, match="max_iter=0"):
        solve("anderson", f, z0, max_iter=0)
    with pytest.raises(ValueError, match="stop_mode='max'"):
        solve("anderson", f, z0, stop_mode="max")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['memory'\].*\['beta', 'lam', 'm', 'relative_lam'\]"):
        solve("anderson", f, z0, memory=3)
    with pytest.raises(ValueError, match="m=1"):
        solve("anderson", f, z0, m=1)
    assert solver_options("broyden") == ["memory"]

    def mine(f, z0, *, tol, max_iter, stop_mode):
        return SOLVERS["fixed_point"](f, z0, tol=tol, max_iter=max_iter, stop_mode=stop_mode)

    register_solver("test_mine", mine)
    try:
        with torch.no_grad():
            _, stats = solve("test_mine", f, z0, tol=1e-4, max_iter=100)
        assert bool(stats.converged.all())
        with pytest.raises(ValueError, match="already registered"):
            register_solver("test_mine", mine)
    finally:
        SOLVERS.pop("test_mine")
