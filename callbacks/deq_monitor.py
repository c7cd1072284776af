"""``DEQMonitor``: log the solver statistics of every DEQ layer and stop a run whose equilibrium blows up.

Every DEQ layer leaves the statistics of its last call in ``last_stats`` (forward solver at once, backward solver after
``backward()``; :func:`lightning_nd.implicit.find_deqs` finds them). This callback

- logs per training step (and per validation epoch) the forward/backward evaluations and the mean/max absolute and
  relative residuals (max over the batch, since solvers stop on the worst sample) and the converged share;
- accumulates fixed-bin histograms of the per-sample relative residuals and step counts and draws them at the end of
  each training epoch (``log_image``; TensorBoard also gets native histograms);
- warns when more than ``unconverged_warn`` of an epoch's equilibrium-mode training batches (unrolled warm-up
  batches do not count) ended with some sample above the forward tolerance, and likewise for the backward (adjoint)
  tolerance; logs the share of samples whose adjoint solve fell back to the 1-step gradient (``bwd_fallback``);
- stops the run (or raises, ``on_unconverged``) when, for ``unconverged_patience`` consecutive equilibrium-mode
  training steps, more than ``stop_unconverged_share`` of a DEQ's samples ended their forward solve above
  ``unconverged_factor`` times its tolerance: a non-contractive cell otherwise trains, step after step, on states that
  are no equilibria (warm-up steps neither count nor reset the streak). The factor keeps budget-limited but healthy
  runs going: the shipped MDEQ-tiny recipe ends every solve above its rel 2e-2 (6 evaluations), at most ~15x it;
- checks before every backward whether the loss is NaN/inf or a forward residual is non-finite, hit the solver's
  protective break or exceeds ``explode_threshold``, and before every optimizer step whether a backward (adjoint)
  residual is non-finite or hit the protective break. The decision is reduced over ranks (any rank), then either the
  run stops cleanly (``on_divergence="stop"``: the step's gradients are dropped so no NaN reaches the weights, the
  trainer stops, and the reason is reported and kept in ``stop_reason``) or :class:`DEQDivergenceError` is raised
  on every rank (``"raise"``). A NaN loss is never trained on silently.
- Under a loss scaler (``precision="16-mixed"``) a diverged adjoint that left non-finite gradients is the scaler's
  normal overflow: the scaler skips that step and lowers its scale, so the monitor lets it, and trips only when more
  than ``max_scaler_skips`` steps in a row fail that way (a persistent failure) or the loss itself is non-finite. An
  adjoint that exploded with finite gradients (the scaler would train on them) trips as without a scaler.
- on the first validation batch of each epoch (``check_equilibrium``) logs whether each DEQ uses its equilibrium:
  the contraction estimate of its cell at the solution and the gap between one application of the cell and the solved
  state (``deq/val_contraction``, ``deq/val_gap``, :mod:`lightning_nd.implicit.diagnostics`), and warns when the
  equilibrium adds nothing over an explicit one-layer network.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_nd.implicit import find_deqs
from lightning_nd.implicit.diagnostics import capture_deq_inputs, equilibrium_warnings, report_captured
from lightning_nd.utils import log_image

REL_BINS = torch.logspace(-8, 2, 41)  # bin edges of the relative-residual histogram (1e-8 ... 1e2)
MAX_STEPS_BIN = 256  # step counts above this share the last bin
DIVERGENCE_ACTIONS = ("stop", "raise")


class DEQDivergenceError(RuntimeError):
    """Raised by :class:`DEQMonitor` (``on_divergence="raise"``) when the loss or an equilibrium residual blows up.

    Raises:
        Nothing itself: it is the error raised (on every rank) by the monitor.

    Example::

        try:
            trainer.fit(model, datamodule=dm)      # trainer with DEQMonitor(on_divergence="raise")
        except DEQDivergenceError as err:
            print("diverged:", err)
    """


class DEQNonConvergenceError(DEQDivergenceError):
    """Raised by :class:`DEQMonitor` (``on_unconverged="raise"``) when forward solves stay far from equilibrium.

    Raises:
        Nothing itself: it is the error raised (on every rank) by the monitor.

    Example::

        try:
            trainer.fit(model, datamodule=dm)      # trainer with DEQMonitor(on_unconverged="raise")
        except DEQNonConvergenceError as err:
            print("not converging:", err)
    """


def _hist_rel(values: torch.Tensor) -> torch.Tensor:
    v = values.detach().float().cpu().clamp(REL_BINS[0], REL_BINS[-1])
    v = torch.where(torch.isfinite(v), v, REL_BINS[-1].expand_as(v))
    idx = torch.bucketize(v, REL_BINS[1:-1])
    return torch.bincount(idx, minlength=len(REL_BINS) - 1).double()


def _hist_steps(values: torch.Tensor) -> torch.Tensor:
    return torch.bincount(values.detach().cpu().long().clamp(0, MAX_STEPS_BIN), minlength=MAX_STEPS_BIN + 1).double()


def _exploded(stats: Any) -> str:
    """What blew up: the samples, the residual they reached (not the best iterate's), and the best iterates'."""
    trace = stats.abs_trace
    bad = stats.diverged_samples
    rows = trace[bad] if bool(bad.any()) else trace
    finite = rows[torch.isfinite(rows)]
    nonfinite = int((~torch.isfinite(rows)).any(dim=1).sum())
    peak = f"{float(finite.max()):.3g}" if finite.numel() else "none finite"
    idx = bad.nonzero()[:, 0].tolist()
    return (f"is non-finite or exploded in {len(idx)} of {bad.numel()} samples (indices {idx[:10]}"
            f"{' ...' if len(idx) > 10 else ''}): the exploded abs residual reached {peak} (non-finite in "
            f"{nonfinite}) from a first residual of {float(trace[:, 0].max()):.3g}; the best iterates kept have abs "
            f"residual up to {float(stats.abs.max()):.3g}")


class DEQMonitor(Callback):
    """Log DEQ solver statistics, warn about unconverged batches, stop on exploding or NaN residuals.

    Args:
        log_every_n_steps: log the per-step scalars every this many training batches.
        histogram_every_n_epochs: draw the residual/step histograms every this many epochs (0: never).
        unconverged_warn: warn when the share of unconverged training batches in an epoch exceeds this (in [0, 1]).
        explode_threshold: an absolute forward residual above this counts as exploded (None: only NaN/inf and the
            solver's protective break count).
        on_divergence: ``"stop"`` (drop the step's gradients, stop the trainer, report the reason) or ``"raise"``.
        log_validation: also log validation solver statistics (epoch means).
        max_scaler_skips: under an enabled loss scaler, consecutive steps with a diverged adjoint and non-finite
            gradients tolerated (the scaler skips them) before the run counts as diverged.
        stop_unconverged_share: share of a DEQ's samples (in (0, 1)) that, above ``unconverged_factor`` x its
            forward tolerance, make a training step count as unconverged (None: never stop for non-convergence).
        unconverged_factor: a sample counts as unconverged when its forward residual (in the layer's stop mode)
            exceeds this multiple of ``f_tol`` (>= 1).
        unconverged_patience: consecutive unconverged equilibrium-mode training steps that stop the run.
        on_unconverged: ``"stop"`` (stop the trainer after the step, report the reason) or ``"raise"``
            (:class:`DEQNonConvergenceError`).
        check_equilibrium: on the first validation batch of each epoch, log each DEQ's contraction estimate and
            one-application gap and warn when its equilibrium adds nothing (costs one more solve and 20
            vector-Jacobian products per DEQ, once per epoch).

    Attributes:
        stop_reason: the message of the divergence that stopped the run (None if none).
        warnings_issued: number of unconverged-share warnings so far.
        scaler_skips: consecutive steps so far whose diverged adjoint was left to the loss scaler.
        scaler_skips_total: all such steps of the run.
        unconverged_streak: consecutive unconverged equilibrium-mode training steps so far.
        longest_unconverged_streak: the longest such streak of the run.

    Raises:
        ValueError: for a non-positive ``log_every_n_steps``, a negative ``histogram_every_n_epochs``,
            ``unconverged_warn`` outside [0, 1], a non-positive ``explode_threshold``, an unknown ``on_divergence``
            or ``on_unconverged``, a negative ``max_scaler_skips``, ``stop_unconverged_share`` outside (0, 1),
            ``unconverged_factor < 1``, ``unconverged_patience < 1`` or a non-bool ``check_equilibrium``.
        DEQDivergenceError: during training with ``on_divergence="raise"`` when the run diverges.
        DEQNonConvergenceError: during training with ``on_unconverged="raise"`` when solves stay unconverged.

    Example::

        trainer = Trainer(callbacks=[DEQMonitor(unconverged_warn=0.3, on_divergence="stop")])
    """

    def __init__(
        self,
        log_every_n_steps: int = 1,
        histogram_every_n_epochs: int = 1,
        unconverged_warn: float = 0.5,
        explode_threshold: float | None = 1e6,
        on_divergence: str = "stop",
        log_validation: bool = True,
        max_scaler_skips: int = 20,
        stop_unconverged_share: float | None = 0.5,
        unconverged_factor: float = 20.0,
        unconverged_patience: int = 50,
        on_unconverged: str = "stop",
        check_equilibrium: bool = True,
    ) -> None:
        super().__init__()
        if not (isinstance(log_every_n_steps, int) and log_every_n_steps >= 1):
            raise ValueError(f"log_every_n_steps={log_every_n_steps} must be an integer >= 1")
        if not (isinstance(histogram_every_n_epochs, int) and histogram_every_n_epochs >= 0):
            raise ValueError(f"histogram_every_n_epochs={histogram_every_n_epochs} must be an integer >= 0")
        if not 0.0 <= unconverged_warn <= 1.0:
            raise ValueError(f"unconverged_warn={unconverged_warn} must be in [0, 1]")
        if explode_threshold is not None and not explode_threshold > 0:
            raise ValueError(f"explode_threshold={explode_threshold} must be None or > 0")
        if on_divergence not in DIVERGENCE_ACTIONS:
            raise ValueError(f"on_divergence={on_divergence!r} must be one of {list(DIVERGENCE_ACTIONS)}")
        if not (isinstance(max_scaler_skips, int) and max_scaler_skips >= 0):
            raise ValueError(f"max_scaler_skips={max_scaler_skips} must be an integer >= 0")
        share_ok = isinstance(stop_unconverged_share, (int, float)) and 0.0 < stop_unconverged_share < 1.0
        if stop_unconverged_share is not None and not share_ok:
            raise ValueError(f"stop_unconverged_share={stop_unconverged_share!r} must be None or a number in (0, 1)")
        if isinstance(unconverged_factor, bool) or not (
            isinstance(unconverged_factor, (int, float)) and unconverged_factor >= 1.0
        ):
            raise ValueError(f"unconverged_factor={unconverged_factor!r} must be a number >= 1")
        if isinstance(unconverged_patience, bool) or not (
            isinstance(unconverged_patience, int) and unconverged_patience >= 1
        ):
            raise ValueError(f"unconverged_patience={unconverged_patience!r} must be an integer >= 1")
        if on_unconverged not in DIVERGENCE_ACTIONS:
            raise ValueError(f"on_unconverged={on_unconverged!r} must be one of {list(DIVERGENCE_ACTIONS)}")
        if not isinstance(check_equilibrium, bool):
            raise ValueError(f"check_equilibrium={check_equilibrium!r} must be True or False")
        self.check_equilibrium = check_equilibrium
        self._capture: contextlib.ExitStack | None = None
        self.stop_unconverged_share, self.unconverged_factor = stop_unconverged_share, unconverged_factor
        self.unconverged_patience, self.on_unconverged = unconverged_patience, on_unconverged
        self.unconverged_streak = self.longest_unconverged_streak = 0
        self.log_every_n_steps, self.histogram_every_n_epochs = log_every_n_steps, histogram_every_n_epochs
        self.unconverged_warn, self.explode_threshold = unconverged_warn, explode_threshold
        self.on_divergence, self.log_validation = on_divergence, log_validation
        self.max_scaler_skips = max_scaler_skips
        self.stop_reason: str | None = None
        self.warnings_issued = 0
        self.scaler_skips, self.scaler_skips_total = 0, 0
        self._pending: str | None = None
        self._reset_epoch()
        self._reset_val()

    # ----------------------------------------------------------------- accumulators
    def _reset_epoch(self) -> None:
        self.batches, self.unconverged = 0, 0  # equilibrium-mode training batches / those with a sample above f_tol
        self.bwd_batches, self.bwd_unconverged = 0, 0  # the same for the adjoint solve and b_tol
        self.worst_rel = 0.0
        self.hist: dict[str, torch.Tensor] = {}

    def _reset_val(self) -> None:
        self.val_sums: dict[str, float] = {}
        self.val_batches = 0

    def _add_hist(self, key: str, counts: torch.Tensor) -> None:
        self.hist[key] = self.hist[key] + counts if key in self.hist else counts

    @staticmethod
    def _prefix(name: str, n: int) -> str:
        return "deq/" if n == 1 else f"deq/{name}/"

    @staticmethod
    def _scalars(stats: Any, tag: str) -> dict[str, float]:
        s = stats.summary()
        return {
            f"{tag}_steps": s["nfe"],
            f"{tag}_abs_mean": s["abs_mean"],
            f"{tag}_abs_max": s["abs_max"],
            f"{tag}_rel_mean": s["rel_mean"],
            f"{tag}_rel_max": s["rel_max"],
            f"{tag}_converged": s["converged"],
        }

    @staticmethod
    def _loss_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return scaler if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled() else None

    @staticmethod
    def _nonfinite_grads(optimizer: Any) -> bool:
        """Whether the scaler will skip this step (its own test: some gradient is inf/NaN after unscaling)."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        return bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    # ----------------------------------------------------------------- divergence
    def _divergence(self, pl_module: pl.LightningModule, loss: torch.Tensor) -> str | None:
        if not bool(torch.isfinite(loss.detach()).all()):
            return f"training loss is {float(loss.detach().float().mean())}"
        for name, deq in find_deqs(pl_module):
            stats = getattr(deq.last_stats, "forward", None)
            if stats is None:
                continue
            worst = float(stats.abs.max())
            if not math.isfinite(worst) or stats.diverged:
                return f"forward residual of DEQ {name!r} " + _exploded(stats)
            if self.explode_threshold is not None and worst > self.explode_threshold:
                return (f"forward residual of DEQ {name!r} exploded: the best iterate's abs residual is {worst:.3g} > "
                        f"explode_threshold={self.explode_threshold}")
        return None

    @staticmethod
    def _backward_divergence(pl_module: pl.LightningModule) -> str | None:
        for name, deq in find_deqs(pl_module):
            stats = getattr(deq.last_stats, "backward", None)
            if stats is None:
                continue
            if stats.diverged:
                return (f"backward (adjoint) residual of DEQ {name!r} " + _exploded(stats)
                        + ": its implicit gradient is unusable")
        return None

    def _trip(self, trainer: pl.Trainer, reason: str | None) -> bool:
        """Reduce the decision over ranks; then raise, or keep the message for ``on_before_optimizer_step``."""
        if not trainer.strategy.reduce_boolean_decision(reason is not None, all=False):
            return False
        msg = (
            f"DEQMonitor stopped training at step {trainer.global_step} (epoch {trainer.current_epoch}): "
            f"{reason or 'another rank diverged'}. The equilibrium diverged: lower the learning rate, use weight "
            "norm / Jacobian regularisation, more warm-up steps, or a more stable solver."
        )
        if self.on_divergence == "raise":
            raise DEQDivergenceError(msg)
        self._pending = msg
        return True

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._trip(trainer, self._divergence(pl_module, loss))

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # _pending agrees across ranks (set after a reduction), so every rank takes the same branch here
        if self._pending is None:
            reason = self._backward_divergence(pl_module)
            if self._loss_scaler(trainer) is not None:
                # an overflow makes the gradients non-finite and the scaler skips the step; a finite explosion (the
                # solver's best iterate is used) would be trained on, so it trips below as without a scaler
                overflow = reason is not None and self._nonfinite_grads(optimizer)
                overflow = trainer.strategy.reduce_boolean_decision(overflow, all=False)
                self.scaler_skips = self.scaler_skips + 1 if overflow else 0
                self.scaler_skips_total += int(overflow)
                if overflow and self.scaler_skips <= self.max_scaler_skips:
                    return  # the scaler skips a step with non-finite gradients and lowers its scale
                if overflow:
                    reason = (f"{self.scaler_skips} steps in a row with a diverged adjoint under the loss scaler "
                              f"(max_scaler_skips={self.max_scaler_skips}); last: {reason or 'on another rank'}")
            if not self._trip(trainer, reason):
                return
        optimizer.zero_grad(set_to_none=True)  # parameters without gradients are skipped: no NaN reaches the weights
        self._stop(trainer, self._pending)
        self._pending = None

    # ----------------------------------------------------------------- training statistics
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        deqs = [(n, d) for n, d in find_deqs(pl_module) if getattr(d, "last_stats", None) is not None]
        if not deqs:
            return
        metrics: dict[str, float] = {}
        solved = unconverged = bwd_seen = bwd_unconverged = False
        worst: tuple[float, str, Any] | None = None  # the DEQ with the largest share far above f_tol
        for name, deq in deqs:
            fwd, bwd = deq.last_stats.forward, deq.last_stats.backward
            prefix = self._prefix(name, len(deqs))
            metrics.update({prefix + k: v for k, v in self._scalars(fwd, "fwd").items()})
            if deq.last_stats.mode == "equilibrium":  # warm-up (unrolled) batches have no solver to judge
                solved = True
                unconverged |= not bool(fwd.converged.all())
                self.worst_rel = max(self.worst_rel, float(fwd.rel.max()))
                self._add_hist("fwd_rel", _hist_rel(fwd.rel))
                self._add_hist("fwd_steps", _hist_steps(fwd.nstep))
                if self.stop_unconverged_share is not None:
                    share = float((~(fwd.residual <= self.unconverged_factor * fwd.tol)).float().mean())  # NaN counts
                    worst = worst if worst is not None and worst[0] >= share else (share, name, fwd)
            if bwd is not None:
                bwd_seen = True
                bwd_unconverged |= not bool(bwd.converged.all())
                metrics.update({prefix + k: v for k, v in self._scalars(bwd, "bwd").items()})
                metrics[prefix + "bwd_fallback"] = float(((bwd.nstep == 1) & ~bwd.converged).float().mean())
                self._add_hist("bwd_rel", _hist_rel(bwd.rel))
                self._add_hist("bwd_steps", _hist_steps(bwd.nstep))
            metrics[prefix + "unrolled"] = float(deq.last_stats.mode == "unrolled")
        self.batches += int(solved)
        self.unconverged += int(unconverged)
        self.bwd_batches += int(bwd_seen)
        self.bwd_unconverged += int(bwd_unconverged)
        if batch_idx % self.log_every_n_steps == 0:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        if worst is not None:  # a warm-up (unrolled) step neither counts nor resets the streak
            self._check_unconverged(trainer, *worst)

    def _check_unconverged(self, trainer: pl.Trainer, share: float, name: str, fwd: Any) -> None:
        """Count consecutive steps with most samples far above f_tol; stop or raise after ``unconverged_patience``."""
        self.unconverged_streak = self.unconverged_streak + 1 if share > self.stop_unconverged_share else 0
        self.longest_unconverged_streak = max(self.longest_unconverged_streak, self.unconverged_streak)
        here = self.unconverged_streak >= self.unconverged_patience
        if not trainer.strategy.reduce_boolean_decision(here, all=False):
            return
        residual = fwd.residual[torch.isfinite(fwd.residual)]
        median = f"{float(residual.median()):.3g}" if residual.numel() else "non-finite"
        msg = (
            f"DEQMonitor stopped training at step {trainer.global_step} (epoch {trainer.current_epoch}): for "
            f"{self.unconverged_patience} consecutive training steps{'' if here else ' (on another rank)'} more "
            f"than {self.stop_unconverged_share:.0%} of the samples of DEQ {name!r} ended their forward solve above {self.unconverged_factor:g} x f_tol (last "
            f"step on this rank: {share:.0%} of the samples, median {fwd.stop_mode} residual {median} against "
            f"f_tol={fwd.tol:g}, after {fwd.nfe} evaluations). The layer is training on states that are not "
            "equilibria, so its implicit gradient is not the gradient of the loss. Fix: make the cell contractive "
            "(weight norm, Jacobian regularisation, a longer DEQWarmup, a lower learning rate), raise f_max_iter or "
            "use anderson/broyden, or loosen f_tol; DEQMonitor(stop_unconverged_share=None) turns this check off."
        )
        if self.on_unconverged == "raise":
            raise DEQNonConvergenceError(msg)
        self._stop(trainer, msg)

    def _stop(self, trainer: pl.Trainer, reason: str) -> None:
        trainer.should_stop = True
        self.stop_reason = reason
        rank_zero_warn(reason)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for _, deq in find_deqs(pl_module):
            if hasattr(deq, "warn_unconverged"):
                deq.warn_unconverged = False  # this callback reports and acts on non-convergence instead

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts = [float(self.batches), float(self.unconverged), float(self.bwd_batches), float(self.bwd_unconverged)]
        counts = trainer.strategy.reduce(torch.tensor(counts, device=pl_module.device), reduce_op="sum").tolist()
        for tag, batches, unconverged, advice in (
            ("", counts[0], counts[1], "Raise f_max_iter, loosen f_tol, use Anderson/Broyden, or add Jacobian "
             "regularisation."),
            ("bwd_", counts[2], counts[3], "Raise b_max_iter, loosen b_tol, or stabilise the cell (weight norm, "
             "Jacobian regularisation); unconverged adjoints give inexact gradients."),
        ):
            if batches == 0:
                continue
            share = unconverged / batches
            pl_module.log(f"deq/{tag}unconverged_share", share, on_step=False, on_epoch=True)
            if share > self.unconverged_warn:
                self.warnings_issued += 1
                which = "backward (adjoint)" if tag else "forward"
                worst = "" if tag else f"; worst relative residual on rank 0 {self.worst_rel:.3g}"
                rank_zero_warn(
                    f"DEQMonitor: {share:.0%} of the equilibrium training batches of epoch {trainer.current_epoch} "
                    f"ended with samples above the {which} tolerance (threshold {self.unconverged_warn:.0%}{worst}). "
                    + advice
                )
        every = self.histogram_every_n_epochs
        if every and (trainer.current_epoch + 1) % every == 0 and self.hist:
            self._draw(trainer)
        self._reset_epoch()

    def _draw(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:  # log_image only writes on rank 0; no collectives below
            return
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        keys = [k for k in ("fwd_rel", "fwd_steps", "bwd_rel", "bwd_steps") if k in self.hist]
        fig = Figure(figsize=(3.2 * len(keys), 2.6))  # an Agg canvas of its own: the global backend is left alone
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(keys), squeeze=False)
        for ax, key in zip(axes[0], keys):
            counts = self.hist[key].numpy()
            if key.endswith("_rel"):
                edges = REL_BINS.numpy()
                ax.bar(edges[:-1], counts, width=edges[1:] - edges[:-1], align="edge")
                ax.set_xscale("log")
                ax.set_xlabel("relative residual")
            else:
                last = int(max(counts.nonzero()[0].max() + 1, 2))
                ax.bar(range(last), counts[:last])
                ax.set_xlabel("solver step of the returned iterate")
            ax.set_title(key.replace("_", " "))
        fig.tight_layout()
        log_image(trainer, "deq/histograms", fig)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for key in keys:
                    values = self.hist[key]
                    centers = torch.arange(len(values), dtype=torch.float64)
                    logger.experiment.add_histogram(
                        f"deq/{key}", centers.repeat_interleave(values.long()), trainer.global_step
                    )

    # ----------------------------------------------------------------- validation statistics
    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.check_equilibrium and batch_idx == 0 and dataloader_idx == 0 and not trainer.sanity_checking:
            self._capture = contextlib.ExitStack()
            self._captured = self._capture.enter_context(capture_deq_inputs(pl_module))

    def _report_equilibrium(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._capture.close()
        self._capture = None
        # its own generator: drawing from the global RNG would change the training that follows (exact resume)
        generator = torch.Generator(device=pl_module.device).manual_seed(trainer.current_epoch)
        reports = report_captured(self._captured, generator=generator)
        for name, report in reports.items():
            prefix = self._prefix(name, len(reports)).replace("deq/", "deq/val_", 1)
            values = {prefix + k: v for k, v in report.as_dict().items() if k.startswith(("contraction", "gap"))}
            pl_module.log_dict(values, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)
        for message in equilibrium_warnings(reports):
            rank_zero_warn(message)

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.log_validation and not trainer.sanity_checking:
            deqs = [(n, d) for n, d in find_deqs(pl_module) if getattr(d, "last_stats", None) is not None]
            for name, deq in deqs:
                prefix = self._prefix(name, len(deqs)).replace("deq/", "deq/val_", 1)
                for k, v in self._scalars(deq.last_stats.forward, "fwd").items():
                    self.val_sums[prefix + k] = self.val_sums.get(prefix + k, 0.0) + v
            self.val_batches += int(bool(deqs))
        if self._capture is not None:  # after reading the batch's statistics: the check solves once more
            self._report_equilibrium(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.val_batches and not trainer.sanity_checking:
            pl_module.log_dict(
                {k: v / self.val_batches for k, v in self.val_sums.items()}, on_step=False, on_epoch=True, sync_dist=True
            )
        self._reset_val()

    # ----------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "unconverged": self.unconverged,
            "bwd_batches": self.bwd_batches,
            "bwd_unconverged": self.bwd_unconverged,
            "scaler_skips": self.scaler_skips,
            "scaler_skips_total": self.scaler_skips_total,
            "worst_rel": self.worst_rel,
            "hist": {k: v.clone() for k, v in self.hist.items()},
            "stop_reason": self.stop_reason,
            "warnings_issued": self.warnings_issued,
            "unconverged_streak": self.unconverged_streak,
            "longest_unconverged_streak": self.longest_unconverged_streak,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches, self.unconverged = state_dict["batches"], state_dict["unconverged"]
        self.bwd_batches = state_dict.get("bwd_batches", 0)  # absent in checkpoints of older versions
        self.bwd_unconverged = state_dict.get("bwd_unconverged", 0)
        self.scaler_skips = state_dict.get("scaler_skips", 0)
        self.scaler_skips_total = state_dict.get("scaler_skips_total", 0)
        self.worst_rel = state_dict["worst_rel"]
        self.hist = {k: v.clone() for k, v in state_dict["hist"].items()}
        self.stop_reason, self.warnings_issued = state_dict["stop_reason"], state_dict["warnings_issued"]
        self.unconverged_streak = state_dict.get("unconverged_streak", 0)
        self.longest_unconverged_streak = state_dict.get("longest_unconverged_streak", 0)
