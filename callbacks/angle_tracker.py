"""``AngleTracker``: the AngleNAS convergence metric for every path and op of a supernet, from one cheap pass.

The reference weights θ0 are copied in ``on_train_start`` — after DDP has broadcast rank 0's weights and before
the first optimizer step — unless they were restored from a checkpoint, and are kept in the callback's
``state_dict`` so a resumed run keeps measuring against the true initial weights. At its interval the tracker
computes, under ``no_grad`` in float64, per-block statistics (dot product and both squared norms; see
:mod:`lightning_nd.nas.angle`) from which every path angle and op angle follows exactly, logs the op angles and a
decision x op heat map, and answers ``path_angle(arch)`` / ``path_angles(archs)`` / ``op_angles()`` for other
callbacks (``ProgressivePruner``, ``EvolutionSearch``). Weights are identical on every rank, so no collective is
needed; each rank computes its own copy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from lightning_nd.nas.angle import AngleLayout, AngleStats, angle_vector, tracked_parameters
from lightning_nd.nas.arch import decisions, get_arch, list_choices
from lightning_nd.utils import log_image


def supernet_of(module: nn.Module) -> nn.Module:
    """The network a callback works on: ``pl_module.net`` when present, else the module itself."""
    net = getattr(module, "net", None)
    return net if isinstance(net, nn.Module) else module


class AngleTracker(Callback):
    """Track the angle between current and initial weights of every path and op (AngleNAS / ABS / RLNAS).

    Args:
        every_n_epochs: compute and log at the end of every n-th training epoch (``None``: never by epoch).
        every_n_steps: also compute and log every n optimizer steps (``None``: never by step).
        preset: the official angle vector of a paper and space: ``"rlnas_nb201"``, ``"abs_nb201"`` (the same
            vector), ``"rlnas_mobilenet"`` or ``"abs_mobilenet"`` (see
            :data:`~lightning_nd.nas.angle.ANGLE_PRESETS`); overrides the three loose flags below.
        include_bn_affine: (custom spaces) count every BN/GroupNorm/LayerNorm affine parameter besides the
            conv/linear weights. None of the official vectors does this (RLNAS-MobileNet takes two BNs per op).
        include_bias: (custom spaces) count conv/linear biases too.
        identity: (custom spaces) an identity op contributes nothing (``"none"``, ABS and NB201) or an ``eye(C)``
            pseudo-weight (``"eye"``, RLNAS-MobileNet). Pooling always counts as a constant 1/k² kernel; ``none``
            drops the path.
        cells_only: leave the fixed layers (stem, reductions, classifier) out of the vector: only the chosen
            ops' weights (ranks NB201 cells far better on small supernets, see ``benchmarks/search_quality.py``).
        weight_free: angle of degenerate paths (every route cut by ``none`` or parameter-free):
            ``"zero"`` ranks them last, ``"official"`` keeps the official values (see
            :class:`~lightning_nd.nas.angle.AngleStats`).
        heatmap: log a decision x op heat-map picture of the op angles at each computation.

    Raises:
        MisconfigurationException: for intervals < 1, both intervals ``None``, an unknown ``preset``,
            ``identity`` or ``weight_free``.
        ValueError: at setup, for a model without ``Choice`` layers.
        RuntimeError: when angles are asked before :meth:`compute_statistics` ran.

    Example::

        tracker = AngleTracker(every_n_epochs=1, preset="rlnas_nb201")
        trainer = Trainer(callbacks=[tracker]); trainer.fit(SupernetModule("nb201"), datamodule=dm)
        tracker.compute_statistics(model); tracker.path_angle([3, 3, 3, 3, 3, 3])

        # standalone, on a saved supernet and its initial weights:
        tracker = AngleTracker.from_reference(net, initial_state_dict)
        tracker.compute_statistics(net); tracker.path_angles(archs)
    """

    def __init__(
        self,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        preset: str | None = None,
        include_bn_affine: bool = False,
        include_bias: bool = False,
        identity: Literal["none", "eye"] = "none",
        cells_only: bool = False,
        weight_free: Literal["zero", "official"] = "zero",
        heatmap: bool = True,
    ) -> None:
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and value < 1:
                raise MisconfigurationException(f"{name}={value} must be >= 1 or None")
        if every_n_epochs is None and every_n_steps is None:
            raise MisconfigurationException("set every_n_epochs or every_n_steps; with both None nothing is tracked")
        if weight_free not in ("zero", "official"):
            raise MisconfigurationException(f"weight_free={weight_free!r} is not one of ('zero', 'official')")
        try:
            self.vector = angle_vector(preset, include_bn_affine, include_bias, identity, cells_only)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.preset, self.weight_free = preset, weight_free
        self.heatmap = heatmap
        self.reference: dict[str, torch.Tensor] | None = None
        self.stats: AngleStats | None = None
        self._layout: AngleLayout | None = None
        self._channels: dict[str, int] = {}
        self._hooks: dict[str, Any] = {}

    # ---------------------------------------------------------------- standalone use
    @classmethod
    def from_reference(cls, net: nn.Module, reference_state: Mapping[str, torch.Tensor], **kwargs: Any) -> AngleTracker:
        """A tracker for ``net`` measuring against ``reference_state`` (a ``state_dict`` of its initial weights).

        Raises:
            ValueError: for a model without ``Choice`` layers or a reference missing tracked weights.
        """
        tracker = cls(**kwargs)
        tracker._require_choices(net)
        names = list(tracked_parameters(net, tracker.vector))
        missing = [n for n in names if n not in reference_state]
        if missing:
            raise ValueError(f"reference_state lacks {len(missing)} tracked weights, e.g. {missing[:3]}")
        tracker.reference = {n: reference_state[n].detach().clone() for n in names}
        return tracker

    # ---------------------------------------------------------------- public API
    def reset_reference(self, module: nn.Module) -> None:
        """Make the current weights the new reference (ABS's one-time reset)."""
        net = supernet_of(module)
        params = tracked_parameters(net, self.vector)
        self.reference = {n: p.detach().clone() for n, p in params.items()}
        self.stats = None

    @torch.no_grad()
    def compute_statistics(self, module: nn.Module) -> AngleStats:
        """One float64 pass over the tracked weights; afterwards every path/op angle is available.

        Raises:
            RuntimeError: when no reference weights exist yet.
        """
        net = supernet_of(module)
        if self.reference is None:
            raise RuntimeError("AngleTracker has no reference weights yet: fit must start, or use from_reference")
        if self._layout is None:
            self._layout = AngleLayout.build(net, self.vector, self._channels)
        params = dict(net.named_parameters())
        self.stats = AngleStats.compute(self._layout, params, self.reference)
        return self.stats

    def _require_stats(self) -> AngleStats:
        if self.stats is None:
            raise RuntimeError("no angle statistics yet: call compute_statistics(pl_module) first")
        return self.stats

    def path_angles(self, archs: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """Angles (radians) of many paths, an ``(n, decisions)`` array-like; larger = moved further (better)."""
        return self._require_stats().path_angles(np.asarray(archs, dtype=np.int64), self.weight_free)

    def path_angle(self, arch: Sequence[int]) -> float:
        """Angle (radians) of one path."""
        return float(self.path_angles([list(arch)])[0])

    def op_angles(self) -> list[list[float]]:
        """Per decision, per op: the angle of the op's own weights (NaN for parameter-free ops)."""
        return self._require_stats().op_angles()

    # ---------------------------------------------------------------- hooks
    def _require_choices(self, net: nn.Module) -> None:
        if not list_choices(net):
            raise ValueError(
                f"AngleTracker needs a supernet with Choice layers, but {type(net).__name__} has none; wrap the "
                "searchable ops in lightning_nd.nas.Choice"
            )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        net = supernet_of(pl_module)
        self._require_choices(net)
        self._layout = None
        for hook in self._hooks.values():
            hook.remove()
        # input channels size the pseudo-weights of parameter-free ops; each hook removes itself once it saw one
        self._hooks = {c.label: c.register_forward_pre_hook(self._record_channels) for c in list_choices(net)}

    def _record_channels(self, choice: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim >= 2:
            self._channels.setdefault(choice.label, int(args[0].shape[1]))
            hook = self._hooks.pop(choice.label, None)
            if hook is not None:
                hook.remove()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.reference is None:
            self.reset_reference(pl_module)
        else:
            device = next(supernet_of(pl_module).parameters()).device
            self.reference = {n: t.to(device) for n, t in self.reference.items()}

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        n = self.every_n_steps
        if n is not None and trainer.global_step % n == 0 and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self._track(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = self.every_n_epochs
        if n is not None and (trainer.current_epoch + 1) % n == 0:
            self._track(trainer, pl_module)

    def _track(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stats = self.compute_statistics(pl_module)
        if not trainer.loggers:
            return
        net = supernet_of(pl_module)
        found = decisions(net)
        angles = stats.op_angles()
        metrics = {
            f"angle/{d.key}/{name}": value
            for d, row in zip(found, angles)
            for name, value in zip(d.names, row)
            if not np.isnan(value)
        }
        try:
            metrics["angle/path"] = self.path_angle(get_arch(net))
        except ValueError:
            pass
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.heatmap and trainer.is_global_zero:
            log_image(trainer, "nas/angle_heatmap", self.heatmap_figure(found, angles, trainer.global_step))

    @staticmethod
    def heatmap_figure(found: list, angles: list[list[float]], step: int) -> Any:
        """A decision x op heat map of op angles, each cell labelled with its value.

        Ops without weights (none, skip, pooling) are light grey and marked "no w"; ops masked by the pruner
        (``Decision.alive``) are hatched dark grey and marked "pruned", whatever their angle.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle

        width = max(len(row) for row in angles)
        grid = np.full((len(angles), width), np.nan)
        for i, row in enumerate(angles):
            grid[i, : len(row)] = row
        longest = max(found, key=lambda d: len(d.names)).names
        prefix = all(d.names == longest[: len(d.names)] for d in found)
        names = longest if prefix else [str(i) for i in range(width)]
        pruned = np.zeros(grid.shape, dtype=bool)
        for i, d in enumerate(found):
            alive = set(d.alive)
            pruned[i, : len(d.names)] = [o not in alive for o in range(len(d.names))]
        shown = np.ma.masked_where(np.isnan(grid) | pruned, grid)
        fig = Figure(figsize=(2.5 + 1.3 * width, 1.6 + 0.45 * len(angles)), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.set_facecolor("#e6e6e6")  # ops without weights
        image = ax.imshow(shown, aspect="auto", cmap="viridis")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if j >= len(found[i].names):
                    continue
                if pruned[i, j]:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#505050", hatch="//", edgecolor="white"))
                    label, color = "pruned", "white"
                elif np.isnan(grid[i, j]):
                    label, color = "no weights", "#606060"
                else:
                    label = f"{grid[i, j]:.3f}"
                    color = "white" if grid[i, j] < np.nanmean(shown.filled(np.nan)) else "black"
                ax.text(j, i, label, ha="center", va="center", fontsize=9, color=color)
        ax.set_xticks(range(width), names, rotation=30, ha="right", fontsize=10)
        ax.set_yticks(range(len(found)), [d.key for d in found], fontsize=10)
        ax.set_title(f"op angle (rad) at step {step}; grey: no weights, hatched: pruned", fontsize=11)
        fig.colorbar(image, ax=ax).ax.tick_params(labelsize=9)
        fig.tight_layout()
        return fig

    # ---------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        reference = None if self.reference is None else {n: t.detach().cpu() for n, t in self.reference.items()}
        return {"reference": reference, "channels": dict(self._channels)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = state_dict.get("reference")
        self._channels = dict(state_dict.get("channels") or {})
        self._layout, self.stats = None, None
