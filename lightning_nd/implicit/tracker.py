"""Per-sample bookkeeping of a fixed-point solve: best iterate, stop test, divergence, statistics.

Every sample of a ``(B, D)`` solve is judged on its own (torchdeq keeps per-sample statistics too, but stops on the
batch's worst sample and has no protective break):

- **stop**: a sample whose residual in the stop mode drops below ``tol`` is *finished*: its returned iterate (and
  ``f`` of it) is frozen at that evaluation, whatever the solver does with the batch afterwards. The solve ends when
  every sample is finished or dead, or at the cap. A sample's result therefore depends only on its own trajectory,
  not on how long the rest of the batch needed.
- **divergence**: a sample whose residual turns non-finite or grows ``DIVERGENCE_FACTOR`` times above its first value
  is *dead*: it keeps its best finite iterate (``z0`` if none), is reported per sample (``diverged_samples``,
  ``nonfinite_samples``) and, from then on, is fed to ``f`` at that best iterate (:meth:`Tracker.guard`), so a NaN
  never reaches ``f`` through the solver's state; a batch-coupled cell cannot carry it to the other samples.

The tests of one evaluation are read back in **one** host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

DIVERGENCE_FACTOR = 1e6  # protective break: residual above this multiple of the sample's first residual
EPS = 1e-9  # relative-residual denominator guard


@dataclass
class SolverStats:
    """Statistics of one solve. Tensors are per sample (length B) and detached.

    Attributes:
        solver: registry name of the solver.
        nfe: function evaluations spent on the batch.
        nstep: per sample, the evaluation (1-based) that produced the returned iterate (0: none was finite).
        abs: per sample, absolute residual of the returned iterate (inf if none was finite).
        rel: per sample, relative residual of the returned iterate.
        converged: per sample, whether the residual in ``stop_mode`` is below ``tol``.
        diverged: whether any sample diverged (non-finite or exploding residual).
        tol, stop_mode, max_iter: the stopping rule used.
        abs_trace, rel_trace: ``(B, nfe)`` residual of every evaluated iterate.
        fz: ``f`` at the returned iterate (same structure as ``f``'s output) when the solver kept it (the built-in
            ones do), else None; :class:`~lightning_nd.implicit.DEQ` uses it at inference instead of evaluating the
            cell once more, and drops it.
        diverged_samples: per sample, whether its residual turned non-finite or exploded (it was stopped there and
            kept its best finite iterate).
        nonfinite_samples: per sample, whether its residual turned non-finite (NaN/inf; a subset of the above).

    Raises:
        Nothing: a plain record, built by the solvers (invalid solver arguments are rejected by ``solve``).

    Example::

        _, stats = solve("broyden", f, z0, tol=1e-4, max_iter=30)
        if stats.diverged:
            print(stats.num_diverged, "samples diverged:", stats.diverged_indices)
    """

    solver: str
    nfe: int
    nstep: torch.Tensor
    abs: torch.Tensor
    rel: torch.Tensor
    converged: torch.Tensor
    diverged: bool
    tol: float
    stop_mode: str
    max_iter: int
    abs_trace: torch.Tensor = field(repr=False)
    rel_trace: torch.Tensor = field(repr=False)
    fz: Any = field(default=None, repr=False)
    diverged_samples: torch.Tensor | None = field(default=None, repr=False)
    nonfinite_samples: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.diverged_samples is None:  # a record built by hand or by an older solver: batch-level flag only
            self.diverged_samples = torch.full_like(self.converged, self.diverged, dtype=torch.bool)
        if self.nonfinite_samples is None:
            self.nonfinite_samples = ~torch.isfinite(self.abs)

    @property
    def residual(self) -> torch.Tensor:
        """Per-sample residual in the stop mode."""
        return self.abs if self.stop_mode == "abs" else self.rel

    @property
    def num_diverged(self) -> int:
        """How many samples diverged."""
        return int(self.diverged_samples.sum())

    @property
    def diverged_indices(self) -> list[int]:
        """Batch indices of the diverged samples."""
        return self.diverged_samples.nonzero()[:, 0].tolist()

    @property
    def nonfinite_indices(self) -> list[int]:
        """Batch indices of the samples whose residual turned NaN/inf."""
        return self.nonfinite_samples.nonzero()[:, 0].tolist()

    def summary(self) -> dict[str, float]:
        """Scalars for logging: mean and max of the residuals (over finite samples) and steps, shares, counts."""
        finite = ~self.diverged_samples
        if not bool(finite.any()):  # every sample diverged: the means are over all of them
            finite = ~finite
        abs_ok, rel_ok = self.abs[finite], self.rel[finite]
        return {
            "nfe": float(self.nfe),
            "nstep_mean": float(self.nstep.float().mean()),
            "nstep_max": float(self.nstep.max()),
            "abs_mean": float(abs_ok.mean()),
            "abs_max": float(self.abs.max()),
            "rel_mean": float(rel_ok.mean()),
            "rel_max": float(self.rel.max()),
            "converged": float(self.converged.float().mean()),
            "diverged": float(self.diverged),
            "diverged_samples": float(self.num_diverged),
        }


class Tracker:
    """Keeps the best iterate per sample (and ``f`` of it), the traces and the per-sample stop/divergence state.

    The first recorded iterate must be ``z0`` (true of every solver here), so ``best_f`` pairs with ``best`` even for a
    sample that never improves. Iterates and values are kept by reference while every sample improves (no copy per
    step), so a solver must not modify them in place after recording them, and the returned iterate may be ``z0``
    itself (``solve`` passes a copy).

    Attributes:
        active: per sample, still being solved (neither finished nor dead).
        dead: per sample, diverged.
        any_dead: host-side copy of ``dead.any()`` (read in the evaluation's one synchronisation).
        stalled, any_stalled: with ``stall_steps > 0``, per sample (and host-side any): active, but neither improved
            nor restarted in the last ``stall_steps`` evaluations.
    """

    def __init__(self, z0: torch.Tensor, tol: float, stop_mode: str, stall_steps: int = 0) -> None:
        self.tol, self.stop_mode, self.stall_steps = tol, stop_mode, stall_steps
        b = z0.shape[0]
        self.best = z0
        self.best_f: torch.Tensor | None = None
        self.best_metric = torch.full((b,), float("inf"), dtype=z0.dtype, device=z0.device)
        self.best_step = torch.zeros(b, dtype=torch.long, device=z0.device)
        self.dead_step = torch.zeros_like(self.best_step)  # evaluation at which a sample died (0: alive)
        self.active = torch.ones(b, dtype=torch.bool, device=z0.device)
        self.any_dead = False
        self.restart_step = torch.zeros_like(self.best_step)  # evaluation of each sample's last solver restart
        self.stalled = torch.zeros_like(self.active)
        self.any_stalled = False
        # the stall test runs every `stall_every` evaluations (a restart is due within 1.5 x stall_steps), so its
        # few small ops are not paid on every evaluation
        self.stall_every = max(1, stall_steps // 2)
        self.abs_trace: list[torch.Tensor] = []
        self.rel_trace: list[torch.Tensor] = []
        self.limit: torch.Tensor | None = None  # per sample: DIVERGENCE_FACTOR x the first residual
        self.nfe = 0

    @property
    def dead(self) -> torch.Tensor:
        """Per sample: diverged."""
        return self.dead_step > 0

    def guard(self, f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``f`` that evaluates dead samples at their best finite iterate instead of the solver's (maybe NaN) one."""

        def guarded(z: torch.Tensor) -> torch.Tensor:
            if self.any_dead:
                z = torch.where(self.dead[:, None], self.best, z)
            return f(z)

        return guarded

    def record(self, z: torch.Tensor, fz: torch.Tensor, diff: torch.Tensor | None = None) -> bool:
        """Record the residual of iterate ``z`` (value ``fz``, ``diff = fz - z`` if known); True means stop."""
        self.nfe += 1
        abs_res = (fz - z if diff is None else diff).norm(dim=1)
        rel_res = abs_res / (fz.norm(dim=1) + EPS)
        self.abs_trace.append(abs_res)
        self.rel_trace.append(rel_res)
        metric = abs_res if self.stop_mode == "abs" else rel_res
        if self.limit is None:  # a non-finite first residual gives a limit nothing passes (the sample dies at once)
            big = torch.finfo(abs_res.dtype).max
            self.limit = (DIVERGENCE_FACTOR * (abs_res + EPS)).nan_to_num(nan=-1.0, posinf=big).clamp_max(big)
        # few small ops per evaluation (they are the overhead on cheap cells): `ok` is False for NaN, inf and an
        # explosion alike; a live sample below tol is necessarily better than its best (which is >= tol)
        live = self.active & (abs_res <= self.limit)
        newly_dead = self.active ^ live
        better = live & (metric < self.best_metric)
        self.best_metric = torch.where(better, metric, self.best_metric)
        self.best_step = torch.where(better, self.nfe, self.best_step)
        self.dead_step = torch.where(newly_dead, self.nfe, self.dead_step)
        self.active = live & ~(metric < self.tol)
        checks = [~self.active.any(), better.all(), newly_dead.any()]
        check_stall = self.stall_steps > 0 and self.nfe % self.stall_every == 0
        if check_stall:
            last = torch.maximum(self.best_step, self.restart_step)
            self.stalled = self.active & (self.nfe - last >= self.stall_steps)
            checks.append(self.stalled.any())
        # one host synchronisation per evaluation for the stopping test, the copy-free update and the stall test
        done, all_better, died, *stalled = torch.stack(checks).tolist()
        self.any_stalled = bool(stalled and stalled[0])
        if all_better:
            self.best, self.best_f = z, fz
        else:
            self.best = torch.where(better[:, None], z, self.best)
            self.best_f = fz if self.best_f is None else torch.where(better[:, None], fz, self.best_f)
        self.any_dead = self.any_dead or bool(died)
        return done

    def restarted(self, mask: torch.Tensor) -> None:
        """Note that the solver restarted the samples in ``mask`` now (their stall clock starts again)."""
        self.restart_step = torch.where(mask, self.nfe, self.restart_step)

    def stats(self, name: str, max_iter: int) -> SolverStats:
        abs_trace, rel_trace = torch.stack(self.abs_trace, dim=1), torch.stack(self.rel_trace, dim=1)
        # residuals of the kept iterates, read from the traces once instead of tracked per evaluation
        kept = self.best_step > 0
        index = (self.best_step - 1).clamp_min(0)[:, None]
        inf = torch.full_like(self.best_metric, float("inf"))
        dead = self.dead
        # a sample died on a NaN/inf residual (rather than an explosion) if its residual at death is not finite
        at_death = abs_trace.gather(1, (self.dead_step - 1).clamp_min(0)[:, None])[:, 0]
        return SolverStats(
            solver=name,
            nfe=self.nfe,
            nstep=self.best_step,
            abs=torch.where(kept, abs_trace.gather(1, index)[:, 0], inf),
            rel=torch.where(kept, rel_trace.gather(1, index)[:, 0], inf),
            converged=self.best_metric < self.tol,
            diverged=self.any_dead,
            tol=self.tol,
            stop_mode=self.stop_mode,
            max_iter=max_iter,
            abs_trace=abs_trace,
            rel_trace=rel_trace,
            fz=self.best_f,
            diverged_samples=dead,
            nonfinite_samples=dead & ~torch.isfinite(at_death),
        )
