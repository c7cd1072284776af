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

from lightning_nd.nas.angle import AngleLayout, AngleStats, tracked_parameters
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
        include_bn_affine: count BN/GroupNorm/LayerNorm affine parameters (RLNAS) besides conv/linear weights (ABS).
        include_bias: count conv/linear biases too.
        identity: an identity op contributes nothing (``"none"``, ABS) or an ``eye(C)`` pseudo-weight (``"eye"``,
            RLNAS). Pooling always counts as a constant 1/k² kernel; ``none`` drops the path.
        heatmap: log a decision x op heat-map picture of the op angles at each computation.

    Raises:
        MisconfigurationException: for intervals < 1, both intervals ``None``, or an unknown ``identity``.
        ValueError: at setup, for a model without ``Choice`` layers.
        RuntimeError: when angles are asked before :meth:`compute_statistics` ran.

    Example::

        tracker = AngleTracker(every_n_epochs=1, identity="eye", include_bn_affine=True)   # RLNAS
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
        include_bn_affine: bool = False,
        include_bias: bool = False,
        identity: Literal["none", "eye"] = "none",
        heatmap: bool = True,
    ) -> None:
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and value < 1:
                raise MisconfigurationException(f"{name}={value} must be >= 1 or None")
        if every_n_epochs is None and every_n_steps is None:
            raise MisconfigurationException("set every_n_epochs or every_n_steps; with both None nothing is tracked")
        if identity not in ("none", "eye"):
            raise MisconfigurationException(f"identity={identity!r} is not one of ('none', 'eye')")
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.include_bn_affine, self.include_bias, self.identity = include_bn_affine, include_bias, identity
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
        names = list(tracked_parameters(net, tracker.include_bn_affine, tracker.include_bias))
        missing = [n for n in names if n not in reference_state]
        if missing:
            raise ValueError(f"reference_state lacks {len(missing)} tracked weights, e.g. {missing[:3]}")
        tracker.reference = {n: reference_state[n].detach().clone() for n in names}
        return tracker

    # ---------------------------------------------------------------- public API
    def reset_reference(self, module: nn.Module) -> None:
        """Make the current weights the new reference (ABS's one-time reset)."""
        net = supernet_of(module)
        params = tracked_parameters(net, self.include_bn_affine, self.include_bias)
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
            self._layout = AngleLayout.build(
                net, self.include_bn_affine, self.include_bias, self.identity, self._channels
            )
        params = dict(net.named_parameters())
        self.stats = AngleStats.compute(self._layout, params, self.reference)
        return self.stats

    def _require_stats(self) -> AngleStats:
        if self.stats is None:
            raise RuntimeError("no angle statistics yet: call compute_statistics(pl_module) first")
        return self.stats

    def path_angles(self, archs: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """Angles (radians) of many paths, an ``(n, decisions)`` array-like; larger = moved further (better)."""
        return self._require_stats().path_angles(np.asarray(archs, dtype=np.int64))

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
        """A decision x op heat map of op angles (blank for parameter-free ops)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        width = max(len(row) for row in angles)
        grid = np.full((len(angles), width), np.nan)
        for i, row in enumerate(angles):
            grid[i, : len(row)] = row
        longest = max(found, key=lambda d: len(d.names)).names
        prefix = all(d.names == longest[: len(d.names)] for d in found)
        names = longest if prefix else [str(i) for i in range(width)]
        fig = Figure(figsize=(1.2 + 0.9 * width, 1.0 + 0.3 * len(angles)), dpi=80)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis")
        ax.set_xticks(range(width), names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(found)), [d.key for d in found], fontsize=7)
        ax.set_title(f"op angle (rad), step {step}", fontsize=9)
        fig.colorbar(image, ax=ax)
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
