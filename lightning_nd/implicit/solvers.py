"""Fixed-point solvers for z* = f(z*): plain/damped iteration, Anderson acceleration, limited-memory Broyden.

Every solver works on a ``(B, D)`` matrix (one flattened state per sample), keeps its own state in float32 (float64
stays float64) even under bf16/fp16 autocast, and reports **per-sample** statistics (:class:`SolverStats`): absolute
residual ``||f(z) - z||``, relative residual ``||f(z) - z|| / (||f(z)|| + 1e-9)``, the step at which the returned
iterate was found, and the traces. The iterate returned is the **best** one per sample (lowest residual in the stop
mode), starting from ``z0`` itself, so a solver that never improves still returns something finite. Stopping and
divergence are **per sample** (:mod:`lightning_nd.implicit.tracker`): a sample below the tolerance is finished and its
result frozen; a sample whose residual turns non-finite or grows ``1e6`` times above its first value is dead, keeps its
best finite iterate, is reported in ``stats.diverged_samples`` and never changes the other samples' results. The
solve ends when every sample is finished or dead, or at the cap. Those tests are read back in **one** host
synchronisation per evaluation; everything else, including Anderson's fallback for singular systems, stays on the
device.

:func:`solve` is the entry point; it accepts a tensor or a tuple/list of tensors for ``z0`` (``f`` then receives and
returns the same structure) and looks the solver up in the registry by name: ``"fixed_point"`` (alias
``"fixed_point_iter"``), ``"anderson"``, ``"broyden"``. :func:`register_solver` adds more.

Example::

    z, stats = solve("anderson", lambda z: 0.5 * torch.tanh(z) + x, torch.zeros_like(x), tol=1e-6, max_iter=50)
    print(stats.nfe, stats.abs.max())
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lightning_nd.implicit.structure import State, flatten, solver_dtype, spec_of, unflatten
from lightning_nd.implicit.tracker import DIVERGENCE_FACTOR, EPS, SolverStats, Tracker

__all__ = [
    "DIVERGENCE_FACTOR", "EPS", "SOLVERS", "STOP_MODES", "SolverStats", "anderson", "broyden", "check_solver_args",
    "fixed_point", "get_solver", "register_solver", "solve", "solver_options",
]

STOP_MODES = ("abs", "rel")
GRAM_FLOAT64_BELOW_TOL = 1e-4  # Anderson sums its Gram matrix in float64 for tolerances below this
# Defaults chosen from the solver battery (benchmarks/results/deq_solvers.md): with 100 factors no converged battery
# solve restarts (the slowest, linear rho 0.99, takes 91 evaluations, torchdeq's full memory 92); 27 (locuslab/mdeq)
# restarts and needs up to 1.3x the evaluations. Anderson: the relative lambda never needed more evaluations than the
# absolute one (1.5-4x fewer), and clearing a stalled sample's history after 2m evaluations without progress lowered
# the residual of the stalling MDEQ cell at initialisation without changing any converging solve.
BROYDEN_MEMORY = 100

FlatFn = Callable[[torch.Tensor], torch.Tensor]


class _HistoryPool:
    """Reusable ``(B, m, D)`` history buffers for Anderson solves on CPU.

    On CPU a fresh multi-megabyte tensor is new memory from the OS (glibc hands large frees back), paid for with a
    page fault per 4 KiB on first touch; an MDEQ-tiny inference call at batch 250 allocates 47 MB of history per
    solve. The pool keeps the buffers of recent solves (at most ``max_idle`` tensors, the newest first) and lends them
    for the duration of one solve, so nested solves and threads get distinct ones. It is used only without autograd
    (a graph could still read a buffer) and on CPU (the CUDA caching allocator already reuses memory).
    """

    def __init__(self, max_idle: int = 6) -> None:
        self.max_idle = max_idle
        self.idle: list[torch.Tensor] = []
        self._lock = threading.Lock()

    @contextmanager
    def lend(self, like: torch.Tensor, shape: tuple[int, ...], count: int) -> Iterator[list[torch.Tensor]]:
        if like.device.type != "cpu" or torch.is_grad_enabled():
            yield [like.new_empty(shape) for _ in range(count)]
            return
        inference = torch.is_inference_mode_enabled()  # inference tensors cannot be written outside inference mode
        taken: list[torch.Tensor] = []
        with self._lock:
            keep = []
            for t in self.idle:
                fits = t.shape == shape and t.dtype == like.dtype and t.is_inference() == inference
                (taken if fits and len(taken) < count else keep).append(t)
            self.idle = keep
        taken += [like.new_empty(shape) for _ in range(count - len(taken))]
        try:
            yield taken
        finally:
            with self._lock:
                self.idle = (taken + self.idle)[: self.max_idle]


_HISTORY = _HistoryPool()


def fixed_point(
    f: FlatFn, z0: torch.Tensor, *, tol: float, max_iter: int, stop_mode: str, tau: float = 1.0
) -> tuple[torch.Tensor, SolverStats]:
    """Damped fixed-point iteration ``z <- tau * f(z) + (1 - tau) * z`` on a ``(B, D)`` matrix.

    Args:
        tau: damping in (0, 1]; 1 is plain iteration.
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"fixed_point tau={tau} must be in (0, 1]")
    track = Tracker(z0, tol, stop_mode)
    f = track.guard(f)
    z = z0
    for _ in range(max_iter):
        fz = f(z)
        if track.record(z, fz):
            break
        z = fz if tau == 1.0 else tau * fz + (1.0 - tau) * z
    return track.best, track.stats("fixed_point", max_iter)


def anderson(
    f: FlatFn,
    z0: torch.Tensor,
    *,
    tol: float,
    max_iter: int,
    stop_mode: str,
    m: int = 6,
    lam: float = 1e-4,
    beta: float = 1.0,
    relative_lam: bool = True,
    restart_after: int | None = None,
) -> tuple[torch.Tensor, SolverStats]:
    """Anderson acceleration with history ``m``, Tikhonov regularisation ``lam`` and mixing ``beta``.

    ``relative_lam=True`` (default) scales ``lam`` by the mean of ``diag(G G^T)`` so the regularisation does not swamp
    the system once residuals are small (with the absolute ``lam`` of locuslab/deq and torchdeq, Anderson degrades
    to averaging near the tolerance and can need more evaluations than plain iteration); ``False`` gives their form.
    Solves the bordered system ``[[0, 1^T], [1, G G^T + lam I]] [nu, alpha] = [1, 0]`` per sample with
    ``torch.linalg.solve_ex``; a sample whose system is singular falls back to a plain step (``alpha`` = the newest
    iterate) instead of failing the batch (locuslab/deq#20).

    Args:
        restart_after: a sample whose best residual has not improved for this many evaluations has its history
            cleared (all but the newest pair; safeguarded Anderson): a stale, ill-conditioned history otherwise keeps
            extrapolating from the same points without progress. None (default): ``2 * m``; 0 never restarts.
    """
    if m < 2:
        raise ValueError(f"anderson m={m} must be >= 2")
    if lam < 0:
        raise ValueError(f"anderson lam={lam} must be >= 0")
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"anderson beta={beta} must be in (0, 1]")
    if restart_after is None:
        restart_after = 2 * m
    if isinstance(restart_after, bool) or not (isinstance(restart_after, int) and restart_after >= 0):
        raise ValueError(f"anderson restart_after={restart_after!r} must be None or an integer >= 0")
    b, d = z0.shape
    # history buffers f(iterates), residuals f(x) - x and (only needed for mixing) iterates: only the first `filled`
    # slots are ever read, so they need no zero fill, and on CPU they are reused between solves (`_HistoryPool`)
    with _HISTORY.lend(z0, (b, m, d), 2 if beta == 1.0 else 3) as buffers:
        return _anderson(f, z0, tol, max_iter, stop_mode, m, lam, beta, relative_lam, restart_after, *buffers)


def _anderson(
    f: FlatFn,
    z0: torch.Tensor,
    tol: float,
    max_iter: int,
    stop_mode: str,
    m: int,
    lam: float,
    beta: float,
    relative_lam: bool,
    restart_after: int,
    F: torch.Tensor,
    G: torch.Tensor,
    X: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SolverStats]:
    b = z0.shape[0]
    track = Tracker(z0, tol, stop_mode, stall_steps=restart_after)
    f = track.guard(f)
    GG = z0.new_zeros(b, m, m)  # Gram matrix of the residuals, updated one row per step
    # The Gram matrix enters normal equations, so near a tight tolerance its rounding decides whether the solve still
    # converges (an ill-conditioned adjoint solve to 1e-8 does only with a float64 sum). A float64 sum converts the
    # whole (b, filled, d) product first, 4-9x slower at batch 250, so it is used only where it can matter: tolerances
    # below 1e-4; looser solves (the recipes' 2e-2 / 5e-2) sum in the solver's own dtype
    gram_dtype = torch.float64 if tol < GRAM_FLOAT64_BELOW_TOL else z0.dtype
    filled = 0
    valid: torch.Tensor | None = None  # (b, m) history slots in use per sample, once some sample has restarted

    def store(slot: int, x: torch.Tensor, fx: torch.Tensor) -> bool:
        nonlocal filled
        F[:, slot] = fx
        if torch.is_grad_enabled():  # out= records no autograd history
            G[:, slot] = fx - x
        else:
            torch.sub(fx, x, out=G[:, slot])
        if X is not None:
            X[:, slot] = x
        filled = min(filled + 1, m)
        if valid is not None:
            valid[:, slot] = True
        # (b, filled): a (1, d) x (d, filled) product per sample, faster on CPU than vecdot (which builds the whole
        # (b, filled, d) product first) and than the (filled, d) x (d, 1) bmm (benchmarks/deq_profile.py times all
        # three). Below the float64 threshold the broadcast product is summed in float64 (see `gram_dtype`)
        if gram_dtype == G.dtype:
            row = (G[:, slot, None] @ G[:, :filled].transpose(1, 2))[:, 0]
        else:
            row = (G[:, :filled] * G[:, slot, None]).sum(-1, dtype=gram_dtype).to(G.dtype)
        GG[:, slot, :filled] = row
        GG[:, :filled, slot] = row
        return track.record(x, fx, G[:, slot])

    if store(0, z0, f(z0)) or max_iter == 1:
        return track.best, track.stats("anderson", max_iter)
    x1 = F[:, 0].clone()
    if store(1, x1, f(x1)):
        return track.best, track.stats("anderson", max_iter)
    H = z0.new_zeros(b, m + 1, m + 1)
    H[:, 0, 1:] = 1.0
    H[:, 1:, 0] = 1.0
    y = z0.new_zeros(b, m + 1, 1)
    y[:, 0] = 1.0
    eye = torch.eye(m, dtype=z0.dtype, device=z0.device)
    for k in range(2, max_iter):
        n, newest = filled, (k - 1) % m
        if track.any_stalled:  # clear the stalled samples' histories but for the newest pair
            if valid is None:
                valid = torch.ones(b, m, dtype=torch.bool, device=z0.device)
            valid = valid & ~track.stalled[:, None]
            valid[:, newest] = True
            track.restarted(track.stalled)
        gram = GG[:, :n, :n]
        if valid is None:
            diag = gram.diagonal(dim1=1, dim2=2).mean(dim=1)
        else:
            # a cleared slot gets an identity row and column and a 0 in the border: its alpha is exactly 0
            v = valid[:, :n]
            gram = torch.where(v[:, :, None] & v[:, None, :], gram, 0.0) + torch.diag_embed((~v).to(gram.dtype))
            H[:, 0, 1 : n + 1] = v
            H[:, 1 : n + 1, 0] = v
            diag = (gram.diagonal(dim1=1, dim2=2) * v).sum(dim=1) / v.sum(dim=1)
        scale = diag.clamp_min(1e-30)[:, None, None] if relative_lam else 1.0
        H[:, 1 : n + 1, 1 : n + 1] = gram + lam * scale * eye[:n, :n]
        sol, info = torch.linalg.solve_ex(H[:, : n + 1, : n + 1], y[:, : n + 1])
        alpha = sol[:, 1 : n + 1, 0]
        bad = (info != 0) | ~torch.isfinite(alpha).all(dim=1)
        plain = torch.zeros_like(alpha)
        plain[:, newest] = 1.0  # newest stored pair
        alpha = torch.where(bad[:, None], plain, alpha)  # unconditionally: no host synchronisation to test `bad`
        new = (alpha[:, None] @ F[:, :n])[:, 0]
        if X is not None:
            new = beta * new + (1.0 - beta) * (alpha[:, None] @ X[:, :n])[:, 0]
        if store(k % m, new, f(new)):
            break
    return track.best, track.stats("anderson", max_iter)


def _rmatvec(us: torch.Tensor, vts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x^T (-I + U^T V) for the inverse-Jacobian estimate; ``us``, ``vts`` are ``(B, L, D)`` (rows contiguous).

    The ``(B, L, D) x (B, D)`` products are a broadcast multiply + sum: several times faster on CPU than the
    equivalent batched matrix-vector einsum/bmm for these thin shapes.
    """
    if us.shape[1] == 0:
        return -x
    return -x + torch.einsum("bl,bld->bd", (us * x[:, None]).sum(-1), vts)


def _matvec(us: torch.Tensor, vts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(-I + U^T V) x for the inverse-Jacobian estimate."""
    if us.shape[1] == 0:
        return -x
    return -x + torch.einsum("bld,bl->bd", us, (vts * x[:, None]).sum(-1))


def broyden(
    f: FlatFn, z0: torch.Tensor, *, tol: float, max_iter: int, stop_mode: str, memory: int = BROYDEN_MEMORY
) -> tuple[torch.Tensor, SolverStats]:
    """Limited-memory ("good") Broyden on g(z) = f(z) - z, without line search (locuslab/mdeq, torchdeq).

    The inverse Jacobian of g is approximated by ``-I + U V^T`` with at most ``memory`` rank-1 factors, so the
    solver's memory is ``2 * memory * D`` per sample whatever ``max_iter`` is (the full-memory variant of locuslab/deq
    grows with the cap, locuslab/deq#28). When the memory is full the estimate **restarts** from ``-I`` (restarted
    Broyden). locuslab/mdeq instead overwrites the oldest factor in a circular buffer, but each factor was built on
    all the earlier ones, so the remaining product is no secant approximation at all: past the wrap the steps can go
    anywhere (with memory 27 the float64 GroupNorm cell of tests/implicit/test_solver_robustness.py hits the
    protective break at evaluation 131, the one of issue 23 at 52).
    """
    if isinstance(memory, bool) or not (isinstance(memory, int) and memory >= 1):
        raise ValueError(f"broyden memory={memory!r} must be an integer >= 1")
    b, d = z0.shape
    mem = min(memory, max_iter)
    track = Tracker(z0, tol, stop_mode)
    f = track.guard(f)
    z = z0
    fz = f(z)
    gz = fz - z
    if track.record(z, fz, gz):
        return track.best, track.stats("broyden", max_iter)
    # rank-1 factors u_i (as rows) and v_i^T: J_g^-1 ~ -I + sum_i u_i v_i^T. Only the first `used` slots are ever
    # read, so no zero fill (at memory 100 and MDEQ sizes a fill costs more than the evaluations of a short solve)
    us = z0.new_empty(b, mem, d)
    vts = z0.new_empty(b, mem, d)
    update = gz  # -(-I)^{-1} g
    used = 0
    while track.nfe < max_iter:
        z_new = z + update
        fz = f(z_new)
        g_new = fz - z_new
        dz, dg = z_new - z, g_new - gz
        z, gz = z_new, g_new
        if track.record(z, fz, gz):
            break
        if used == mem:  # restart: the next secant update starts again from -I
            used = 0
        part_u, part_vt = us[:, :used], vts[:, :used]
        vt = _rmatvec(part_u, part_vt, dz)
        denom = torch.einsum("bd,bd->b", vt, dg)
        ok = torch.isfinite(denom) & (denom.abs() > 1e-30)
        u = (dz - _matvec(part_u, part_vt, dg)) / torch.where(ok, denom, torch.ones_like(denom))[:, None]
        u = torch.where(ok[:, None] & torch.isfinite(u), u, torch.zeros_like(u))
        vt = torch.where(ok[:, None] & torch.isfinite(vt), vt, torch.zeros_like(vt))
        us[:, used] = u
        vts[:, used] = vt
        used += 1
        update = -_matvec(us[:, :used], vts[:, :used], gz)
    return track.best, track.stats("broyden", max_iter)


SOLVERS: dict[str, Callable[..., tuple[torch.Tensor, SolverStats]]] = {}


def register_solver(name: str, fn: Callable[..., tuple[torch.Tensor, SolverStats]] | None = None) -> Any:
    """Register a solver ``fn(f, z0, *, tol, max_iter, stop_mode, **options) -> (z, SolverStats)`` under ``name``.

    Usable as ``register_solver("name", fn)`` or as a decorator ``@register_solver("name")``.

    Raises:
        ValueError: if the name is already taken.
    """

    def deco(func: Callable[..., tuple[torch.Tensor, SolverStats]]) -> Callable[..., tuple[torch.Tensor, SolverStats]]:
        if name in SOLVERS:
            raise ValueError(f"a solver named {name!r} is already registered")
        SOLVERS[name] = func
        return func

    return deco(fn) if fn is not None else deco


register_solver("fixed_point", fixed_point)
register_solver("fixed_point_iter", fixed_point)  # torchdeq's name
register_solver("anderson", anderson)
register_solver("broyden", broyden)


def get_solver(name: str) -> Callable[..., tuple[torch.Tensor, SolverStats]]:
    """Look a solver up by name.

    Raises:
        ValueError: for an unknown name, listing the registered ones.
    """
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[name]


def solver_options(name: str) -> list[str]:
    """The solver-specific keyword options of ``name`` (for example ``['beta', 'lam', 'm']`` for Anderson)."""
    params = inspect.signature(get_solver(name)).parameters
    return sorted(p for p in params if p not in ("f", "z0", "tol", "max_iter", "stop_mode"))


def check_solver_args(name: str, tol: float, max_iter: int, stop_mode: str, options: dict[str, Any]) -> None:
    """Validate a solver call without running it.

    Raises:
        ValueError: for an unknown solver, a tolerance that is not a finite number > 0, ``max_iter`` not an integer
            >= 1 (booleans included), an unknown stop mode or option.
    """
    get_solver(name)
    if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol={tol!r} must be a finite number > 0")
    if isinstance(max_iter, bool) or not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter={max_iter!r} must be an integer >= 1")
    if stop_mode not in STOP_MODES:
        raise ValueError(f"stop_mode={stop_mode!r} must be one of {list(STOP_MODES)}")
    unknown = sorted(set(options) - set(solver_options(name)))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for solver {name!r}; allowed: {solver_options(name)}")


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError):  # device type without autocast support
        return False, torch.float32


def solve(
    name: str,
    f: Callable[[State], State],
    z0: State,
    *,
    tol: float = 1e-3,
    max_iter: int = 40,
    stop_mode: str = "abs",
    **options: Any,
) -> tuple[State, SolverStats]:
    """Find z* = f(z*) from ``z0`` with the solver registered as ``name``.

    ``f`` receives and returns the structure of ``z0`` (a tensor or a tuple/list of tensors with a shared batch
    dimension). The solver's own arithmetic runs in float32 with autocast disabled; ``f`` itself runs under the
    caller's autocast state, and its output is cast back to float32. Call it under ``torch.no_grad()`` (or inference
    mode) unless you want to differentiate through the iterations, which only ``"fixed_point"`` supports (Anderson and
    Broyden update their histories in place); for gradients of an equilibrium use :class:`~lightning_nd.implicit.DEQ`.

    Args:
        name: registry name (``"fixed_point"``, ``"anderson"``, ``"broyden"``, or one you registered).
        f: the map whose fixed point is wanted.
        z0: the initial iterate.
        tol: tolerance on the worst sample's residual in ``stop_mode``.
        max_iter: cap on function evaluations.
        stop_mode: ``"abs"`` or ``"rel"``.
        **options: solver-specific options (``solver_options(name)`` lists them).

    Returns:
        The best iterate per sample (same structure and dtypes as ``z0``) and its :class:`SolverStats` (whose ``fz``
        is ``f`` at that iterate, in ``f``'s output structure and dtypes).

    Raises:
        ValueError: for an unknown solver or option, ``tol <= 0``, ``max_iter < 1`` or an unknown stop mode.
    """
    check_solver_args(name, tol, max_iter, stop_mode, options)
    spec = spec_of(z0)
    z0_flat = flatten(z0)
    device_type, dtype = z0_flat.device.type, solver_dtype(z0_flat.dtype)
    enabled, ac_dtype = _autocast_state(device_type)

    out_spec = None  # structure of f's output, read at the first evaluation (for stats.fz)

    def flat_f(v: torch.Tensor) -> torch.Tensor:
        nonlocal out_spec
        if enabled:
            with torch.autocast(device_type, dtype=ac_dtype, enabled=True):
                out = f(unflatten(v, spec))
        else:  # no autocast to restore: no context switch per evaluation (its cost shows on cheap cells)
            out = f(unflatten(v, spec))
        if out_spec is None:
            out_spec = spec_of(out)
        return flatten(out, dtype)

    # the solver's own arithmetic never runs under autocast
    with torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext():
        # a copy: the solvers may return the start itself (no iterate improved on it), which must not be the caller's
        start = z0_flat.to(dtype, copy=True)
        z, stats = get_solver(name)(flat_f, start, tol=tol, max_iter=max_iter, stop_mode=stop_mode, **options)
    if stats.fz is not None:
        stats.fz = unflatten(stats.fz, out_spec)
    return unflatten(z, spec), stats
