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

    start = torch.zeros(2, 4)
    with torch.no_grad():
        z, stats = solve(name, f, start, tol=1e-6, max_iter=100)
        z_one, _ = solve(name, f, start, tol=1e-6, max_iter=1)
    start.add_(7.0)  # the returned start is a copy, not the caller's tensor
    assert torch.equal(z_one, torch.zeros(2, 4))
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
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['memory'\].*\['beta', 'lam', 'm', 'relative_lam', 'restart_after'\]"):
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


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_solver_returns_f_of_the_returned_iterate(name):
    # a contraction (every sample improves each step: the copy-free path), a map whose best iterate stays z0 while
    # later ones blow up, and a batch where one sample is done at once (both: the per-sample selection path)
    def exploding(z):
        return z + 1.0 + z**2

    def mixed(z):
        return torch.stack([torch.ones_like(z[0]), 0.9 * z[1] + 1.0])

    contraction, z0 = _contractive_map()
    cases = [(contraction, z0, 1e-5), (exploding, torch.zeros(2, 4), 1e-6), (mixed, torch.zeros(2, 3), 1e-3)]
    with torch.no_grad():
        for f, start, tol in cases:
            z, stats = solve(name, f, start, tol=tol, max_iter=60)
            assert torch.equal(stats.fz, f(z))  # the very value the solver evaluated, not an approximation
    # structured states: fz has f's structure and dtypes
    x = torch.randn(3, 2, 4, 4)

    def pair(z):
        a, b = z
        return torch.tanh(0.5 * a + x), (0.5 * b + a.mean(dim=(1, 2, 3))[:, None]).double()

    with torch.no_grad():
        z, stats = solve(name, pair, (torch.zeros_like(x), torch.zeros(3, 5)), tol=1e-4, max_iter=60)
    assert isinstance(stats.fz, tuple) and stats.fz[1].dtype == torch.float64
    for got, want in zip(stats.fz, pair(z)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, check_dtype=True)


def test_deq_inference_reuses_the_solvers_value_of_the_equilibrium(monkeypatch):
    # Inference returns f(z*) without evaluating the cell once more; a solver that does not report fz (a user's)
    # gets the extra evaluation. Both give the same output, bit for bit.
    from lightning_nd.implicit import DEQ

    def without_value(f, z0, **kwargs):
        z, stats = SOLVERS["anderson"](f, z0, **kwargs)
        stats.fz = None
        return z, stats

    monkeypatch.setitem(SOLVERS, "test_anderson_without_value", without_value)
    cell = ConvCell(channels=4, scale=0.5).eval()
    calls = []
    cell.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(3, 4, 6, 6)
    outs = {}
    with torch.no_grad():
        for solver in ("anderson", "test_anderson_without_value"):
            calls.clear()
            deq = DEQ(cell, f_solver=solver, f_tol=1e-4, f_max_iter=30).eval()
            outs[solver] = deq(x)
            outs[solver + " calls"] = len(calls) - deq.last_stats.forward.nfe
            assert deq.last_stats.forward.fz is None  # a whole state is not kept in the stats
    assert torch.equal(outs["anderson"], outs["test_anderson_without_value"])
    assert outs["anderson calls"] == 0 and outs["test_anderson_without_value calls"] == 1


def test_anderson_history_buffers_are_reused_only_where_safe():
    from lightning_nd.implicit.solvers import _HISTORY

    f, z0 = _contractive_map()
    _HISTORY.idle.clear()
    with torch.no_grad():
        z_first, _ = solve("anderson", f, z0, tol=1e-6, max_iter=50)
        pooled = {t.data_ptr() for t in _HISTORY.idle}
        assert len(pooled) == 2  # F and G, lent back after the solve
        z_again, _ = solve("anderson", f, z0, tol=1e-6, max_iter=50)  # runs on the reused (dirty) buffers
        assert torch.equal(z_first, z_again) and {t.data_ptr() for t in _HISTORY.idle} == pooled

        # a solve nested inside another's f (a DEQ inside a DEQ cell) gets its own buffers
        def outer(z):
            inner, _ = solve("anderson", lambda u: 0.5 * torch.tanh(u) + z, torch.zeros_like(z), tol=1e-7, max_iter=40)
            return f(inner)

        z_nested, _ = solve("anderson", outer, z0, tol=1e-6, max_iter=50)
    _HISTORY.idle.clear()
    with torch.no_grad():
        z_fresh, _ = solve("anderson", outer, z0, tol=1e-6, max_iter=50)
    assert torch.equal(z_nested, z_fresh)
    assert len(_HISTORY.idle) <= _HISTORY.max_idle

    # inference-mode buffers are not lent to a later no_grad solve (writing them there would raise)
    _HISTORY.idle.clear()
    with torch.inference_mode():
        solve("anderson", f, z0, tol=1e-6, max_iter=50)
    with torch.no_grad():
        z_after, _ = solve("anderson", f, z0, tol=1e-6, max_iter=50)
    assert torch.equal(z_after, z_first)

    # with autograd on nothing is pooled (a graph could still read a lent buffer)
    _HISTORY.idle.clear()
    c = torch.randn(5, 32, requires_grad=True)
    z, stats = solve("anderson", lambda z: 0.5 * torch.tanh(z) + c, torch.zeros(5, 32), tol=1e-6, max_iter=30)
    assert not _HISTORY.idle and bool(stats.converged.all()) and z.requires_grad


def _reference_anderson(f, z0, max_iter, m, lam):
    """Textbook Anderson (locuslab/deq form, absolute lam, beta 1) in float64, its Gram matrix rebuilt every step."""
    xs, fs = [z0], [f(z0)]
    xs.append(fs[0])
    fs.append(f(xs[1]))
    for _ in range(2, max_iter):
        x_hist, f_hist = torch.stack(xs[-m:], 1), torch.stack(fs[-m:], 1)
        g = f_hist - x_hist
        n = g.shape[1]
        h = torch.zeros(z0.shape[0], n + 1, n + 1, dtype=z0.dtype)
        h[:, 0, 1:] = h[:, 1:, 0] = 1.0
        h[:, 1:, 1:] = g @ g.transpose(1, 2) + lam * torch.eye(n, dtype=z0.dtype)
        rhs = torch.zeros(z0.shape[0], n + 1, 1, dtype=z0.dtype)
        rhs[:, 0] = 1.0
        alpha = torch.linalg.solve(h, rhs)[:, 1:, 0]
        xs.append((alpha[:, None] @ f_hist)[:, 0])
        fs.append(f(xs[-1]))
    residual = torch.stack([(fx - x).norm(dim=1) for x, fx in zip(xs, fs)], 1)
    best = residual.argmin(dim=1)
    return torch.stack(xs, 1)[torch.arange(z0.shape[0]), best]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_anderson_follows_the_reference_iteration(dtype, tol):
    # every Gram path: float32 products (tol >= 1e-4), float32 residuals summed in float64 (below), float64 state;
    # a history of 4 over 9 evaluations wraps the circular buffer
    f, z0 = _contractive_map(seed=3, d=40, b=6)
    f64 = lambda z: f(z.float()).double()  # noqa: E731  (deterministic, so both solvers see the same map)
    with torch.no_grad():
        z, stats = solve("anderson", f if dtype == torch.float32 else f64, z0.to(dtype), tol=tol, max_iter=9,
                         stop_mode="abs", m=4, lam=1e-4, relative_lam=False)
    assert stats.nfe >= 6  # several mixing steps, the history wrapped
    expected = _reference_anderson(f64, z0.double(), max_iter=stats.nfe, m=4, lam=1e-4)
    torch.testing.assert_close(z.double(), expected, rtol=0, atol=2e-5 if dtype == torch.float32 else 1e-12)
