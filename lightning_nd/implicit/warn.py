"""Warnings of the equilibrium layers: pointed at the user's call, and the non-convergence warning rate-limited.

A warning raised deep inside a solve (or inside the adjoint solve, which autograd calls from ``loss.backward()``)
should name the line of the user's code that led there, not a line of the library: :func:`user_stacklevel` counts the
frames of this package's solver/layer modules and of torch between the warning and that line.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

_IMPLICIT_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _internal(filename: str) -> bool:
    return filename.startswith(_IMPLICIT_DIR) or filename.startswith(_TORCH_DIR)


def user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the caller: the first frame outside lightning_nd.implicit and torch."""
    frame = sys._getframe(1)  # the function about to warn
    level = 1
    while frame is not None and _internal(os.path.abspath(frame.f_code.co_filename)):
        frame = frame.f_back
        level += 1
    return level


def warn_user(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` attributed to the user's line (see :func:`user_stacklevel`)."""
    warnings.warn(message, category, stacklevel=user_stacklevel())


class UnconvergedWarner:
    """Counts forward solves with samples above the tolerance and warns at most once per ``every`` calls.

    The first unconverged call warns at once; later ones only when ``every`` calls have passed since the last
    warning, with the share of unconverged samples over those calls, so a training loop outside Lightning hears about
    a non-contractive cell without a warning per step.

    Args:
        every: calls between warnings (0: never warn).

    Raises:
        ValueError: if ``every`` is not an integer >= 0.

    Example::

        warner = UnconvergedWarner(every=100)
        warner.note(stats.converged, stats.residual, stats.tol, stats.stop_mode, stats.nfe)  # after each solve
    """

    def __init__(self, every: int) -> None:
        if isinstance(every, bool) or not (isinstance(every, int) and every >= 0):
            raise ValueError(f"warn_unconverged_every={every!r} must be an integer >= 0")
        self.every = every
        self.calls = 0  # forward solves since the last warning
        self.samples = 0
        self.unconverged = 0
        self.warned = False

    def note(self, converged: torch.Tensor, residual: torch.Tensor, tol: float, stop_mode: str, nfe: int) -> None:
        """Count one solve (per-sample ``converged`` and ``residual``); warn if due."""
        if not self.every:
            return
        self.calls += 1
        missed, worst = torch.stack([(~converged).sum().to(residual.dtype), residual.max()]).tolist()
        self.samples += converged.numel()
        self.unconverged += int(missed)
        if not missed or (self.warned and self.calls < self.every):
            return
        share = self.unconverged / max(self.samples, 1)
        warn_user(
            f"DEQ forward solve did not converge: {share:.0%} of the samples of the last {self.calls} call(s) ended "
            f"above f_tol={tol:g} ({stop_mode}); this call: {int(missed)} of {converged.numel()} samples, worst "
            f"{stop_mode} residual {worst:.3g} after {nfe} evaluations. The layer returns f at a non-equilibrium "
            "state: raise f_max_iter, use anderson/broyden, make the cell contractive (weight norm, Jacobian "
            "regularisation, warm-up), or loosen f_tol. (Warned at most once per "
            f"{self.every} calls; DEQ(warn_unconverged_every=0) silences it, DEQMonitor acts on it in Lightning.)"
        )
        self.warned = True
        self.calls = self.samples = self.unconverged = 0
