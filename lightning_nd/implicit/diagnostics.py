"""Does a DEQ use its equilibrium? Contraction estimate and the gap between one application and the solution.

A trained equilibrium model can degenerate into a one-layer network: its cell becomes so contractive that the first
application from ``z0`` already sits at the fixed point, and the solver iterations add nothing (issue 22: the trained
i-FPN scored the same mAP with 1, 2 or "solved" applications, its contraction factor had fallen from ~0.6 to 0.22).
Two numbers per sample tell the user which case they are in:

- ``contraction``: a power-iteration estimate of the spectral radius of the cell's Jacobian ``J_f(z*)`` at the
  solution (vector-Jacobian products, as locuslab/deq's and torchdeq's ``sradius`` estimates). Near 0 the cell
  forgets its state in one step; near or above 1 the solver needs many steps (or diverges).
- ``gap``: ``||f(z0) - z*|| / ||z*||``, the relative distance of one application from the start to the solved state
  the model outputs. Near 0 the model is its own explicit one-layer network; the equilibrium adds nothing.

:func:`diagnose_equilibrium` runs a model once, captures the input of every DEQ inside it, and returns one
:class:`EquilibriumReport` per DEQ; :func:`equilibrium_warnings` turns reports into messages when the equilibrium
adds nothing. Both run under ``torch.no_grad`` except for the vector-Jacobian products, which need autograd: they
leave ``torch.inference_mode`` for that (Lightning validates under it) and work on normal copies of the captured
inputs, so they can be called from a validation hook as they are.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_nd.implicit.deq import find_deqs
from lightning_nd.implicit.structure import State, flatten, solver_dtype, spec_of, unflatten, zeros_like_state

EPS = 1e-12


@dataclass(frozen=True)
class EquilibriumReport:
    """Whether one DEQ call used its equilibrium (means and extremes over the batch's samples).

    Attributes:
        contraction: mean over samples of the estimated spectral radius of ``J_f(z*)``.
        contraction_max: its largest value over the samples.
        gap: mean over samples of ``||f(z0) - z*|| / ||z*||`` (one application from the start vs the solution).
        gap_min: its smallest value over the samples.
        residual: largest relative residual ``||f(z*) - z*|| / ||f(z*)||`` of the solution used.
        nfe: cell evaluations of the solve.

    Raises:
        Nothing: a plain record, written by :func:`equilibrium_report`.

    Example::

        report = equilibrium_report(model.fpn.deq, injection)
        print(report.contraction, report.gap)
    """

    contraction: float
    contraction_max: float
    gap: float
    gap_min: float
    residual: float
    nfe: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """The fields as a flat dict of floats, names prefixed (for ``LightningModule.log_dict``)."""
        return {f"{prefix}{k}": float(getattr(self, k)) for k in
                ("contraction", "contraction_max", "gap", "gap_min", "residual", "nfe")}


def contraction_estimate(
    f: Callable[[State], State], z_star: State, iters: int = 20, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-sample power-iteration estimate of the spectral radius of ``J_f`` at ``z_star``.

    Iterates ``v <- v J / ||v J||`` with vector-Jacobian products of one recorded application of ``f`` (``iters``
    products, one graph) and returns ``||v J|| / ||v||`` of the last iterate, per sample. For a linear map this
    converges to the largest |eigenvalue| (tested against ``torch.linalg.eigvals``).

    Args:
        f: the cell as a function of the state (``lambda z: cell(z, x)``).
        z_star: the state to linearise at (a tensor or tuple of tensors with a batch dimension).
        iters: power iterations (>= 1).
        generator: random generator of the start vector (None: the global RNG).

    Returns:
        A ``(B,)`` float tensor.

    Raises:
        ValueError: for ``iters < 1``.

    Example::

        rho = contraction_estimate(lambda z: cell(z, x), z_star)   # (B,)
    """
    if isinstance(iters, bool) or not (isinstance(iters, int) and iters >= 1):
        raise ValueError(f"iters={iters!r} must be an integer >= 1")
    spec = spec_of(z_star)
    flat = flatten(z_star).detach()
    flat = flat.to(solver_dtype(flat.dtype))  # float64 stays float64, lower precisions run in float32
    with torch.enable_grad():
        leaf = flat.clone().requires_grad_()
        fz = flatten(f(unflatten(leaf, spec)))
        v = torch.randn(flat.shape, generator=generator, device=flat.device, dtype=flat.dtype)
        v = v / (v.norm(dim=1, keepdim=True) + EPS)
        ratio = torch.zeros(flat.shape[0], device=flat.device, dtype=flat.dtype)
        for _ in range(iters):
            (w,) = torch.autograd.grad(fz, leaf, v.to(fz.dtype), retain_graph=True)
            w = w.to(flat.dtype)
            norm = w.norm(dim=1)
            ratio = norm / (v.norm(dim=1) + EPS)
            v = w / (norm[:, None] + EPS)
    return ratio.detach()


def equilibrium_report(
    deq: nn.Module, x: Any, z0: State | None = None, *, iters: int = 20, generator: torch.Generator | None = None
) -> EquilibriumReport:
    """Solve ``deq`` for input ``x`` and measure its contraction and the gap of one application to the solution.

    The solve is the layer's own (its solver, tolerance and cap, in its current train/eval mode and ``mode``), so
    the numbers describe what the model outputs.

    Args:
        deq: a :class:`~lightning_nd.implicit.DEQ` (anything with ``cell`` and a ``forward(x, z0)``).
        x: the DEQ's input (the injection), as the model passes it.
        z0: the start state (default: zeros shaped like ``x``, as the layer does).
        iters: power iterations of :func:`contraction_estimate`.
        generator: random generator of the power iteration's start vector.

    Returns:
        An :class:`EquilibriumReport`.

    Raises:
        ValueError: if ``deq`` has no ``cell``, or for ``iters < 1``.

    Example::

        report = equilibrium_report(fpn.deq, fpn.injection(features))
    """
    cell = getattr(deq, "cell", None)
    if cell is None or not callable(cell):
        raise ValueError(f"equilibrium_report needs a DEQ with a callable .cell, got {type(deq).__name__}")
    with torch.inference_mode(False):
        return _report(deq, cell, _normal(x), None if z0 is None else _normal(z0), iters, generator)


def _normal(x: Any) -> Any:
    """``x`` with inference tensors (made under ``torch.inference_mode``) replaced by normal copies."""
    if isinstance(x, torch.Tensor):
        return x.clone() if x.is_inference() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_normal(v) for v in x)
    return x


def _report(deq: nn.Module, cell: Callable, x: Any, z0: State | None, iters: int,
            generator: torch.Generator | None) -> EquilibriumReport:
    z0 = zeros_like_state(x) if z0 is None else z0
    f = lambda z: cell(z, x)  # noqa: E731
    with torch.no_grad():
        z_star = deq(x, z0)
        nfe = int(deq.last_stats.forward.nfe) if getattr(deq, "last_stats", None) is not None else 0
        star = flatten(z_star)
        dtype = solver_dtype(star.dtype)
        star, one, again = star.to(dtype), flatten(f(z0)).to(dtype), flatten(f(z_star)).to(dtype)
        gap = (one - star).norm(dim=1) / (star.norm(dim=1) + EPS)
        residual = (again - star).norm(dim=1) / (again.norm(dim=1) + EPS)
    rho = contraction_estimate(f, z_star, iters=iters, generator=generator)
    return EquilibriumReport(
        contraction=float(rho.mean()), contraction_max=float(rho.max()), gap=float(gap.mean()),
        gap_min=float(gap.min()), residual=float(residual.max()), nfe=nfe,
    )


@contextlib.contextmanager
def capture_deq_inputs(model: nn.Module) -> Iterator[dict[str, tuple[nn.Module, Any, Any]]]:
    """While open, record ``{qualified name: (layer, x, z0)}`` of the last call of every DEQ inside ``model``.

    Raises:
        Nothing: hooks are removed on exit, also after an error.

    Example::

        with capture_deq_inputs(model) as captured:
            model(images)
        reports = {name: equilibrium_report(layer, x, z0) for name, (layer, x, z0) in captured.items()}
    """
    captured: dict[str, tuple[nn.Module, Any, Any]] = {}
    handles = []
    for name, layer in find_deqs(model):
        def hook(module: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            x = args[0] if args else kwargs["x"]
            z0 = args[1] if len(args) > 1 else kwargs.get("z0")
            captured[name] = (module, x, z0)
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def diagnose_equilibrium(
    model: nn.Module, run: Callable[[], Any], *, iters: int = 20, generator: torch.Generator | None = None
) -> dict[str, EquilibriumReport]:
    """Run ``run()`` (a forward of ``model``) once and report every DEQ inside ``model`` on the input it received.

    Args:
        model: the network holding the DEQ layers (found with :func:`~lightning_nd.implicit.find_deqs`).
        run: a no-argument callable doing one forward, e.g. ``lambda: model(images)``.
        iters: power iterations of the contraction estimate.
        generator: random generator of the power iteration's start vectors.

    Returns:
        ``{qualified DEQ name: EquilibriumReport}`` for every DEQ that ``run`` called (last call of each).

    Raises:
        ValueError: for ``iters < 1``.

    Example::

        # per validation batch, in a callback (Trainer(inference_mode=False)):
        reports = diagnose_equilibrium(pl_module, lambda: pl_module(images))
        for name, r in reports.items():
            pl_module.log_dict(r.as_dict(f"deq/{name}/"))
        for message in equilibrium_warnings(reports):
            rank_zero_warn(message)
    """
    with torch.inference_mode(False), capture_deq_inputs(model) as captured, torch.no_grad():
        run()
    return report_captured(captured, iters=iters, generator=generator)


def report_captured(
    captured: dict[str, tuple[nn.Module, Any, Any]], *, iters: int = 20, generator: torch.Generator | None = None
) -> dict[str, EquilibriumReport]:
    """:func:`equilibrium_report` of every DEQ call recorded by :func:`capture_deq_inputs`."""
    return {name: equilibrium_report(layer, x, z0, iters=iters, generator=generator)
            for name, (layer, x, z0) in captured.items()}


def equilibrium_warnings(
    reports: dict[str, EquilibriumReport], *, min_gap: float = 0.05, min_contraction: float = 0.1
) -> list[str]:
    """Messages for the DEQs whose equilibrium adds nothing over one application of their cell.

    A DEQ is flagged when its mean gap ``||f(z0) - z*|| / ||z*||`` is below ``min_gap`` (one application already
    gives the output) or its mean contraction is below ``min_contraction`` (the cell forgets its state at once, so
    iterating cannot matter).

    Args:
        reports: from :func:`diagnose_equilibrium`.
        min_gap: the smallest mean relative gap that counts as using the equilibrium (>= 0).
        min_contraction: the smallest mean contraction that counts as a recurrence (>= 0).

    Returns:
        One message per flagged DEQ (empty when all use their equilibrium).

    Raises:
        ValueError: for a negative or non-finite threshold.

    Example::

        for message in equilibrium_warnings(diagnose_equilibrium(model, lambda: model(x))):
            warnings.warn(message)
    """
    for name, value in (("min_gap", min_gap), ("min_contraction", min_contraction)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    out = []
    for name, r in reports.items():
        if r.gap < min_gap or r.contraction < min_contraction:
            out.append(
                f"DEQ {name!r} does not use its equilibrium: one application of its cell from z0 is within "
                f"{r.gap:.3g} (relative) of the solved state (threshold {min_gap}) and its contraction estimate is "
                f"{r.contraction:.3g} (threshold {min_contraction}); the solver iterations add little over an "
                "explicit one-layer network. Check the cell (a normalisation that makes it forget its state, an "
                "injection that drowns the state) or compare against the cell applied once."
            )
    return out
