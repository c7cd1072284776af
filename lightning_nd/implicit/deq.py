"""``DEQ``: a deep equilibrium layer z* = f(z*, x), solved forward and differentiated implicitly.

Forward (equilibrium mode): the solver finds z* without recording a graph, then the cell is applied **once** with
autograd on, ``z = f(z*, x)``, so activation memory is that of one layer however many iterations the solver spent.
Backward, three choices (``backward=``):

- ``"ift"`` (default, exact): an ``autograd.Function`` replaces the incoming gradient ``dl/dz`` by the solution of
  the adjoint fixed point ``g = g J_f(z*) + dl/dz`` (solved with the configurable backward solver using
  vector-Jacobian products of the one recorded application), then ``g`` flows through that application into the
  parameters and the input: ``dl/dtheta = dl/dz (I - J)^-1 df/dtheta``. Passes ``torch.autograd.gradcheck``;
  unlike the tensor-hook form it survives repeated forwards and ``retain_graph`` (reference deq.md, section 3).
- ``"phantom"``: k tracked damped steps ``z <- tau f(z) + (1 - tau) z`` from the detached z* (torchdeq ``grad=k``).
  Cheaper but **biased**: on a slowly converging conv cell the 1-step gradient has cosine ~0.85 with the exact one
  and a quarter of its norm; k = 5-10 with tau = 0.7 gets closer (tested in tests/implicit/test_deq_gradients.py).
- ``mode="unrolled"``: n weight-tied applications from z0 with plain backprop (the locuslab warm-up stage; memory
  grows with n). ``DEQWarmup`` switches ``deq.mode`` between ``"unrolled"`` and ``"equilibrium"``.

The adjoint solve starts from ``g = dl/dz`` (not from zero), so when it makes no progress (a non-contractive cell, an
untrained MDEQ) a sample gets the 1-step, Jacobian-free gradient ``dl/dz`` (what torchdeq falls back to) instead of
an exactly-zero one; such samples are counted in :attr:`DEQ.backward_fallbacks` and reported with a warning.
Under autocast (``bf16-mixed``/``16-mixed``) the solver's cell evaluations and the adjoint vector-Jacobian products run
in float32 (``solve_fp32=True``), so tolerances below bf16's resolution (~3e-3 relative) are reachable; the one
recorded application that feeds the rest of the network still runs under autocast. When nothing upstream of the
layer requires a gradient (frozen cell, input without grad) the layer returns that application without any backward
machinery, so no adjoint solve runs.

Statistics of the last call are in :attr:`DEQ.last_stats` (:class:`DEQStats`): forward solver statistics at once,
backward solver statistics after ``loss.backward()``. With ``jac_reg=True`` a training forward also leaves the
Hutchinson estimate of ``||J_f(z*)||_F^2 / d`` in :attr:`DEQ.jac_loss` for the task to add to its loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_nd.implicit.jacobian import jacobian_loss
from lightning_nd.implicit.norm import reset_dropout
from lightning_nd.implicit.solvers import EPS, SolverStats, check_solver_args, get_solver, solve
from lightning_nd.implicit.structure import State, flatten, solver_dtype, spec_of, unflatten, zeros_like_state
from lightning_nd.implicit.warn import UnconvergedWarner, warn_user

BACKWARD_MODES = ("ift", "phantom")
MODES = ("equilibrium", "unrolled")


@dataclass
class DEQConfig:
    """Options of a :class:`DEQ`; every field is validated, unknown names are rejected by :meth:`build`.

    Raises:
        ValueError: for an unknown solver or solver option, ``tol <= 0``, ``max_iter < 1``, an unknown stop mode,
            backward or mode, ``phantom_steps < 1``, ``phantom_tau`` outside (0, 1], ``unroll_layers < 1``,
            ``jac_vecs < 1`` or ``warn_unconverged_every < 0``; :meth:`build` also for unknown field names.

    Example::

        cfg = DEQConfig(f_solver="broyden", f_max_iter=18, f_stop_mode="rel", b_solver="broyden", b_max_iter=20)
        deq = DEQ(cell, cfg, b_tol=1e-4)   # keywords override the config's fields
    """

    f_solver: str = "anderson"  # forward solver: fixed_point | anderson | broyden (registry name)
    f_max_iter: int = 30  # forward cap on cell evaluations
    f_tol: float = 1e-3  # forward tolerance on the worst sample's residual
    f_stop_mode: str = "abs"  # "abs" ||f(z)-z|| or "rel" ||f(z)-z|| / ||f(z)||
    f_solver_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"m": 6, "lam": 1e-4, "beta": 1.0}
    eval_f_max_iter: int | None = None  # forward cap in eval mode (None: f_max_iter)
    b_solver: str = "anderson"  # backward (adjoint) solver for backward="ift"
    b_max_iter: int = 30  # backward cap on vector-Jacobian products
    b_tol: float = 1e-6  # backward tolerance
    b_stop_mode: str = "abs"  # backward stop mode
    b_solver_kwargs: dict[str, Any] = field(default_factory=dict)  # backward solver options
    backward: str = "ift"  # "ift" (exact implicit gradient) or "phantom" (k damped tracked steps)
    phantom_steps: int = 5  # k for backward="phantom"
    phantom_tau: float = 0.7  # damping for backward="phantom"
    mode: str = "equilibrium"  # "equilibrium" (solve) or "unrolled" (weight-tied warm-up)
    unroll_layers: int = 5  # applications of the cell in mode="unrolled"
    jac_reg: bool = False  # compute the Jacobian-regularisation loss in training forwards
    jac_vecs: int = 1  # Hutchinson probe vectors
    warn_diverged: bool = True  # warn on a diverged forward solve and on adjoint solves that fall back to dl/dz
    warn_unconverged_every: int = 100  # warn about unconverged forward solves at most once per this many calls (0: never)
    solve_fp32: bool = True  # under autocast, solve and take adjoint products in float32 (bf16 floors at ~3e-3 rel)

    def __post_init__(self) -> None:
        check_solver_args(self.f_solver, self.f_tol, self.f_max_iter, self.f_stop_mode, self.f_solver_kwargs)
        check_solver_args(self.b_solver, self.b_tol, self.b_max_iter, self.b_stop_mode, self.b_solver_kwargs)
        if self.eval_f_max_iter is not None and not (isinstance(self.eval_f_max_iter, int) and self.eval_f_max_iter >= 1):
            raise ValueError(f"eval_f_max_iter={self.eval_f_max_iter} must be None or an integer >= 1")
        if self.backward not in BACKWARD_MODES:
            raise ValueError(f"backward={self.backward!r} must be one of {list(BACKWARD_MODES)}")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {list(MODES)}")
        if not (isinstance(self.phantom_steps, int) and self.phantom_steps >= 1):
            raise ValueError(f"phantom_steps={self.phantom_steps} must be an integer >= 1")
        if not 0.0 < self.phantom_tau <= 1.0:
            raise ValueError(f"phantom_tau={self.phantom_tau} must be in (0, 1]")
        if not (isinstance(self.unroll_layers, int) and self.unroll_layers >= 1):
            raise ValueError(f"unroll_layers={self.unroll_layers} must be an integer >= 1")
        if not (isinstance(self.jac_vecs, int) and self.jac_vecs >= 1):
            raise ValueError(f"jac_vecs={self.jac_vecs} must be an integer >= 1")
        if isinstance(self.warn_unconverged_every, bool) or not (
            isinstance(self.warn_unconverged_every, int) and self.warn_unconverged_every >= 0
        ):
            raise ValueError(f"warn_unconverged_every={self.warn_unconverged_every!r} must be an integer >= 0")
        for name in ("jac_reg", "warn_diverged", "solve_fp32"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")

    @classmethod
    def build(cls, config: DEQConfig | dict[str, Any] | None = None, **options: Any) -> DEQConfig:
        """Merge a config (object or dict) with keyword overrides.

        Raises:
            ValueError: for unknown option names (listing the allowed ones) or invalid values.
        """
        base = dataclasses.asdict(config) if isinstance(config, DEQConfig) else dict(config or {})
        merged = {**base, **options}
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(merged) - set(allowed))
        if unknown:
            raise ValueError(f"unknown DEQ option(s) {unknown}; allowed: {allowed}")
        return cls(**merged)


@dataclass
class DEQStats:
    """Statistics of one DEQ call.

    Attributes:
        mode: ``"equilibrium"`` or ``"unrolled"``.
        forward: forward solver statistics (for the unrolled mode: the residual of the last application).
        backward: adjoint solver statistics, filled in when ``backward()`` ran through this call (``"ift"`` only).
        jac_loss: value of the Jacobian-regularisation loss of this call, if computed.

    Raises:
        Nothing: a plain record, written by :class:`DEQ` (forward) and its implicit backward.

    Example::

        z = deq(x)
        z.sum().backward()
        fwd, bwd = deq.last_stats.forward, deq.last_stats.backward   # bwd is None for backward="phantom"
    """

    mode: str
    forward: SolverStats
    backward: SolverStats | None = None
    jac_loss: float | None = None


def _to_float32(x: Any) -> Any:
    """``x`` with every floating tensor (inside tuples, lists and dicts too) cast to float32; float64 is kept."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() and x.dtype != torch.float64 else x
    if isinstance(x, (tuple, list)):
        return type(x)(_to_float32(v) for v in x)
    if isinstance(x, dict):
        return type(x)((k, _to_float32(v)) for k, v in x.items())
    return x


def _any_requires_grad(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return x.requires_grad
    if isinstance(x, (tuple, list)):
        return any(_any_requires_grad(v) for v in x)
    if isinstance(x, dict):
        return any(_any_requires_grad(v) for v in x.values())
    return False


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError):  # device type without autocast support
        return False


class _ImplicitBackward(torch.autograd.Function):
    """Identity on ``fz = f(z*)`` whose backward solves ``g = g J + grad`` with VJPs through the saved application.

    ``f32`` (set when the forward ran under autocast with ``solve_fp32``) re-evaluates the cell once in float32 with
    autocast off, and the adjoint VJPs go through that evaluation instead of the low-precision recorded one.
    """

    @staticmethod
    def forward(
        ctx: Any, fz: torch.Tensor, z: torch.Tensor, layer: DEQ, record: DEQStats, f32: Any
    ) -> torch.Tensor:
        ctx.save_for_backward(fz, z)
        ctx.layer, ctx.cfg, ctx.record, ctx.f32 = layer, layer.config, record, f32
        return fz.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        if torch.is_grad_enabled():  # grad mode is on in a backward only with create_graph=True
            # (torch's @once_differentiable is not enough: autograd.grad(..., inputs=x) prunes its error node and
            # silently returns a partial second-order gradient)
            raise RuntimeError(
                "the implicit (ift) backward of a DEQ is first-order only: backward with create_graph=True "
                "(higher-order gradients) is not supported; use backward='phantom' or mode='unrolled' for those"
            )
        fz, z = ctx.saved_tensors
        cfg: DEQConfig = ctx.cfg
        dtype = solver_dtype(grad.dtype)
        g_out = grad.to(dtype)
        if ctx.f32 is not None:
            with torch.enable_grad(), torch.autocast(grad.device.type, enabled=False):
                z = z.detach().requires_grad_()
                fz = ctx.f32(z)

        def adjoint(g: torch.Tensor) -> torch.Tensor:
            (vjp,) = torch.autograd.grad(fz, z, g.to(fz.dtype), retain_graph=True)
            return vjp.to(dtype) + g_out

        with torch.autocast(grad.device.type, enabled=False):
            # start at dl/dz (the first fixed-point iterate from 0): a solve that never improves returns the
            # 1-step gradient, as torchdeq does, instead of the zero start
            g, stats = get_solver(cfg.b_solver)(
                adjoint,
                g_out.clone(),
                tol=cfg.b_tol,
                max_iter=cfg.b_max_iter,
                stop_mode=cfg.b_stop_mode,
                **cfg.b_solver_kwargs,
            )
        ctx.record.backward = stats
        ctx.layer._note_backward(stats)
        return g.to(grad.dtype), None, None, None, None


def _residual_stats(prev: torch.Tensor, last: torch.Tensor, n: int, cfg: DEQConfig) -> SolverStats:
    with torch.no_grad():
        prev, last = prev.detach().float(), last.detach().float()
        abs_res = (last - prev).norm(dim=1)
        rel_res = abs_res / (last.norm(dim=1) + EPS)
        metric = abs_res if cfg.f_stop_mode == "abs" else rel_res
        return SolverStats(
            solver="unrolled",
            nfe=n,
            nstep=torch.full_like(abs_res, n, dtype=torch.long),
            abs=abs_res,
            rel=rel_res,
            converged=metric < cfg.f_tol,
            diverged=not bool(torch.isfinite(abs_res).all()),
            tol=cfg.f_tol,
            stop_mode=cfg.f_stop_mode,
            max_iter=n,
            abs_trace=abs_res[:, None],
            rel_trace=rel_res[:, None],
        )


class DEQ(nn.Module):
    """Deep equilibrium layer around a cell ``cell(z, x) -> z`` (any ``nn.Module`` or callable).

    ``DEQ(cell, ...)(x, z0=None)`` returns ``f(z*, x)``, the cell applied once at the solver's equilibrium ``z*`` (the
    one application autograd records; equal to ``z*`` up to the residual), in the structure of the cell's output (that
    of ``z0``: a tensor or a tuple/list of tensors). ``z0`` defaults to zeros shaped like ``x``; pass it explicitly when the state differs from the input
    (multiscale states, other channel counts). Options are the fields of :class:`DEQConfig`, given as a config object,
    a dict, or keyword arguments (keywords win).

    Attributes:
        config: the validated :class:`DEQConfig`.
        mode: ``"equilibrium"`` or ``"unrolled"`` (mutable; set by ``DEQWarmup``).
        jac_reg: compute :attr:`jac_loss` in training forwards (mutable; set by a Jacobian schedule).
        f_max_iter_delta: added to ``f_max_iter`` in training forwards, floored at 1 (mutable; the forward-cap
            jitter of a Jacobian schedule, ``JacobianSchedule.cap_delta``).
        jac_probe_seed: seed of the Hutchinson probes of the next :attr:`jac_loss` (None: the global RNG); set per
            step by a schedule so resumed runs draw the same probes.
        last_stats: :class:`DEQStats` of the last call (None before the first); ``last_stats.backward`` is filled in
            by the backward pass.
        jac_loss: the differentiable Jacobian-regularisation loss of the last training forward, or None.
        backward_solves, backward_unconverged: adjoint solves run so far / those with a sample above ``b_tol``.
        backward_fallbacks: samples whose adjoint solve never improved on its start and got the 1-step gradient.
        warn_unconverged: warn (at most once per ``warn_unconverged_every`` calls) when a forward solve leaves
            samples above ``f_tol`` (mutable; ``DEQMonitor`` turns it off and acts on non-convergence itself).

    Raises:
        ValueError: for unknown option names (listing the allowed ones) or invalid values (unknown solver,
            ``tol <= 0``, ``max_iter < 1``, unknown stop mode, backward or mode).
        RuntimeError: in a multi-process training forward (equilibrium mode) if the cell holds ``SyncBatchNorm``.

    Example::

        cell = lambda z, x: torch.tanh(W(z) + x)   # W an nn.Linear with small weights
        deq = DEQ(cell, f_solver="anderson", f_tol=1e-4, backward="ift")
        z = deq(x)
        z.sum().backward()
        print(deq.last_stats.forward.nfe, deq.last_stats.backward.abs.max())
    """

    def __init__(self, cell: nn.Module | Any, config: DEQConfig | dict[str, Any] | None = None, **options: Any) -> None:
        super().__init__()
        if not callable(cell):
            raise TypeError(f"cell must be callable as cell(z, x), got {type(cell).__name__}")
        self.cell = cell
        self.config = DEQConfig.build(config, **options)
        self.mode = self.config.mode
        self.jac_reg = self.config.jac_reg
        self.f_max_iter_delta = 0
        self.jac_probe_seed: int | None = None
        self.last_stats: DEQStats | None = None
        self.jac_loss: torch.Tensor | None = None
        self.backward_solves = 0
        self.backward_unconverged = 0
        self.backward_fallbacks = 0
        self.warn_unconverged = self.config.warn_unconverged_every > 0
        self._unconverged_warner = UnconvergedWarner(self.config.warn_unconverged_every)

    def _note_backward(self, stats: SolverStats) -> None:
        """Count an adjoint solve; warn when some samples got the dl/dz fallback or the solve diverged."""
        unconverged = ~stats.converged
        fallback, missed = torch.stack([(unconverged & (stats.nstep == 1)).sum(), unconverged.sum()]).tolist()
        self.backward_solves += 1
        self.backward_unconverged += int(missed > 0)
        self.backward_fallbacks += fallback
        if self.config.warn_diverged and (fallback or stats.diverged):
            warn_user(
                f"DEQ adjoint (backward) solve made no progress or diverged: {fallback} of {stats.converged.numel()} "
                f"samples never improved on their start and get the 1-step gradient dl/dz instead of the implicit "
                f"one (counted in DEQ.backward_fallbacks; DEQMonitor logs bwd_fallback), {stats.num_diverged} "
                "diverged. The cell is not contractive at z*: use weight norm, Jacobian regularisation, warm-up, or "
                "backward='phantom'."
            )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"mode={self.mode}, f_solver={c.f_solver}, f_max_iter={c.f_max_iter}, f_tol={c.f_tol}, "
            f"backward={c.backward}, b_solver={c.b_solver}"
        )

    def _max_iter(self) -> int:
        if not self.training and self.config.eval_f_max_iter is not None:
            return self.config.eval_f_max_iter
        if self.training:
            return max(1, self.config.f_max_iter + self.f_max_iter_delta)
        return self.config.f_max_iter

    def forward(self, x: Any, z0: State | None = None) -> State:
        if self.mode not in MODES:
            raise ValueError(f"DEQ mode={self.mode!r} must be one of {list(MODES)}")
        z0 = zeros_like_state(x) if z0 is None else z0
        spec_of(z0)  # validates the structure
        self.jac_loss = None
        if isinstance(self.cell, nn.Module):
            reset_dropout(self.cell)  # one variational-dropout mask per forward, shared by all iterations
        if self.mode == "unrolled":
            return self._unrolled(x, z0)
        self._check_sync_batchnorm()
        return self._equilibrium(x, z0)

    def _check_sync_batchnorm(self) -> None:
        """SyncBatchNorm all-reduces on every cell call; ranks solve for different step counts, so it would hang."""
        if not (self.training and isinstance(self.cell, nn.Module) and torch.distributed.is_available()
                and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            return
        bad = [n for n, m in self.cell.named_modules() if isinstance(m, nn.SyncBatchNorm)]
        if bad:
            raise RuntimeError(
                f"DEQ cell has SyncBatchNorm layer(s) {bad} (Trainer(sync_batchnorm=True) converts BatchNorm): in "
                "equilibrium mode each rank stops its solver after a different number of steps, and SyncBatchNorm "
                "all-reduces on every cell call, so the ranks would deadlock. Use GroupNorm/LayerNorm inside the "
                "cell (as MDEQ does) or turn sync_batchnorm off; BatchNorm outside the DEQ is fine."
            )

    def _f(self, x: Any) -> Any:
        return lambda z: self.cell(z, x)

    def _f32(self, x: Any, device_type: str) -> Any:
        """The cell in float32 with autocast off (input and state cast), for solves under autocast."""
        x32 = _to_float32(x)

        def f(z: State) -> State:
            with torch.autocast(device_type, enabled=False):
                return self.cell(_to_float32(z), x32)

        return f

    def _needs_grad(self, x: Any) -> bool:
        """Whether anything upstream of the layer can receive a gradient (a plain callable cell: assume so)."""
        if not torch.is_grad_enabled():
            return False
        if not isinstance(self.cell, nn.Module):
            return True
        return _any_requires_grad(x) or any(p.requires_grad for p in self.cell.parameters())

    def _unrolled(self, x: Any, z0: State) -> State:
        cfg, f = self.config, self._f(x)
        z, prev = z0, z0
        with parametrize.cached():
            for _ in range(cfg.unroll_layers):
                prev, z = z, f(z)
            z_prev = flatten(prev)
            if self._want_jac():
                # the cell's Jacobian at the last input: recompute the last application from a leaf.
                leaf = z_prev.detach().requires_grad_()
                fz = flatten(f(unflatten(leaf, spec_of(prev))))
                self._set_jac(fz, leaf)
        self.last_stats = DEQStats("unrolled", _residual_stats(z_prev, flatten(z), cfg.unroll_layers, cfg))
        if self.jac_loss is not None:
            self.last_stats.jac_loss = float(self.jac_loss.detach())
        return z

    def _want_jac(self) -> bool:
        return self.jac_reg and self.training and torch.is_grad_enabled()

    def _set_jac(self, fz: torch.Tensor, z: torch.Tensor) -> None:
        gen = None
        if self.jac_probe_seed is not None:
            gen = torch.Generator(device=fz.device).manual_seed(self.jac_probe_seed)
        self.jac_loss = jacobian_loss(fz, z, self.config.jac_vecs, generator=gen)

    def _equilibrium(self, x: Any, z0: State) -> State:
        cfg, f = self.config, self._f(x)
        device_type = flatten(z0).device.type
        f32 = self._f32(x, device_type) if cfg.solve_fp32 and _autocast_on(device_type) else None
        with torch.no_grad(), parametrize.cached():
            z_star, fstats = solve(
                cfg.f_solver,
                f if f32 is None else f32,
                z0 if f32 is None else _to_float32(z0),
                tol=cfg.f_tol,
                max_iter=self._max_iter(),
                stop_mode=cfg.f_stop_mode,
                **cfg.f_solver_kwargs,
            )
        f_star, fstats.fz = fstats.fz, None  # not kept in last_stats: it is a whole state
        record = DEQStats("equilibrium", fstats)
        self.last_stats = record
        if fstats.diverged and cfg.warn_diverged:
            bad, nonfinite = fstats.diverged_indices, fstats.nonfinite_indices
            shown = f"{bad[:10]}{' ...' if len(bad) > 10 else ''}"
            warn_user(
                f"DEQ forward solve diverged ({cfg.f_solver}): {len(bad)} of {fstats.converged.numel()} samples "
                f"(batch indices {shown}) had a non-finite ({len(nonfinite)}) or exploding residual within "
                f"{fstats.nfe} evaluations; each keeps its best finite iterate (the start if none: check those "
                "inputs for NaN/inf). The other samples were solved as without them (per-sample stop and break). "
                "If finite inputs diverge, make the cell more contractive (weight norm, smaller weights, Jacobian "
                "regularisation) or lower the learning rate."
            )
        if self.warn_unconverged:
            self._unconverged_warner.note(fstats.converged, fstats.residual, fstats.tol, fstats.stop_mode, fstats.nfe)
        if not self._needs_grad(x):  # inference, or a frozen layer: one application, no backward machinery
            if f_star is not None and f32 is None:  # the solver already evaluated f(z*)
                return f_star
            with parametrize.cached():
                return f(z_star)
        spec = spec_of(z_star)
        z_flat = flatten(z_star)
        z_vec = z_flat.to(solver_dtype(z_flat.dtype)).detach().requires_grad_()
        with parametrize.cached():
            if cfg.backward == "ift":
                fz = f(unflatten(z_vec, spec))
                fz_spec, fz_vec = spec_of(fz), flatten(fz)
                if self._want_jac():
                    self._set_jac(fz_vec, z_vec)
                flat_f32 = None if f32 is None else (lambda v: flatten(f32(unflatten(v, spec)), torch.float32))
                out = unflatten(_ImplicitBackward.apply(fz_vec, z_vec, self, record, flat_f32), fz_spec)
            else:
                z, tau = z_vec, cfg.phantom_tau
                for k in range(cfg.phantom_steps):
                    fz = f(unflatten(z, spec))
                    fz_spec, fz_vec = spec_of(fz), flatten(fz)
                    if k == 0 and self._want_jac():
                        self._set_jac(fz_vec, z_vec)
                    z = fz_vec if tau == 1.0 else tau * fz_vec + (1.0 - tau) * z
                out = unflatten(z, fz_spec)
        if self.jac_loss is not None:
            record.jac_loss = float(self.jac_loss.detach())
        return out


def find_deqs(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every equilibrium layer inside ``module`` as ``(qualified name, layer)``, in ``module.named_modules()`` order.

    Duck-typed: a layer counts if it has ``last_stats``, ``mode`` and ``jac_reg`` attributes (the protocol the DEQ
    callbacks rely on), so wrappers of other libraries can join by offering the same attributes.
    """
    return [
        (name, m)
        for name, m in module.named_modules()
        if hasattr(m, "last_stats") and hasattr(m, "mode") and hasattr(m, "jac_reg")
    ]
