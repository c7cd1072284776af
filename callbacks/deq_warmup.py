"""``DEQWarmup``: train equilibrium layers unrolled for the first N optimizer steps, then switch to solving.

locuslab/deq and locuslab/mdeq "pretrain" every DEQ as an ordinary weight-tied network (``NUM_LAYERS`` applications
of the cell with plain backprop) for ``PRETRAIN_STEPS`` steps before switching to the solver and the implicit
backward; the warm-up gives the cell a reasonable, more contractive starting point (MDEQ CIFAR TINY: 10 layers for
3,000 steps). This callback flips the ``mode`` attribute of every DEQ layer of the model (the protocol of
:func:`lightning_nd.implicit.find_deqs`) from ``"unrolled"`` to ``"equilibrium"`` when ``trainer.global_step`` reaches
``warmup_steps``. The mode is derived from the global step, so every rank and a resumed run agree; when fit ends
(or fails) inside the warm-up, the layers are put back in equilibrium mode. A multi-process fit whose DEQ cell holds
``SyncBatchNorm`` (``Trainer(sync_batchnorm=True)``) fails at fit start: the layer itself refuses it only at its
first equilibrium forward (ranks would deadlock), which would come after the whole warm-up.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from lightning_nd.implicit import find_deqs


class DEQWarmup(Callback):
    """Unrolled weight-tied training for ``warmup_steps`` optimizer steps, equilibrium mode afterwards.

    Args:
        warmup_steps: optimizer steps trained unrolled (locuslab ``PRETRAIN_STEPS``); 0 disables the warm-up.
        unroll_layers: applications of the cell while unrolled (``NUM_LAYERS``); None keeps each DEQ's
            ``unroll_layers`` option.
        eval_unrolled: evaluate unrolled too while the warm-up lasts (default: validation always solves).

    Attributes:
        switched_at: the global step at which training switched to equilibrium mode (None before).

    Raises:
        ValueError: for ``warmup_steps < 0`` or ``unroll_layers < 1``.
        MisconfigurationException: at setup, if the model has no DEQ layer; at fit start, on several processes, if
            a DEQ cell holds ``SyncBatchNorm``.

    Example::

        trainer = Trainer(callbacks=[DEQWarmup(warmup_steps=3000, unroll_layers=10), DEQMonitor()])
    """

    def __init__(self, warmup_steps: int = 0, unroll_layers: int | None = None, eval_unrolled: bool = False) -> None:
        super().__init__()
        if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
            raise ValueError(f"warmup_steps={warmup_steps} must be an integer >= 0")
        if unroll_layers is not None and not (isinstance(unroll_layers, int) and unroll_layers >= 1):
            raise ValueError(f"unroll_layers={unroll_layers} must be None or an integer >= 1")
        self.warmup_steps, self.unroll_layers, self.eval_unrolled = warmup_steps, unroll_layers, eval_unrolled
        self.switched_at: int | None = None

    def _set(self, pl_module: pl.LightningModule, mode: str) -> None:
        for _, deq in find_deqs(pl_module):
            deq.mode = mode

    def _in_warmup(self, trainer: pl.Trainer) -> bool:
        return trainer.global_step < self.warmup_steps

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        deqs = find_deqs(pl_module)
        if not deqs:
            raise MisconfigurationException(
                f"DEQWarmup found no DEQ layer in {type(pl_module).__name__}: it needs modules with `mode`, "
                "`last_stats` and `jac_reg` attributes (lightning_nd.implicit.DEQ)"
            )
        if self.unroll_layers is not None:
            for _, deq in deqs:
                if hasattr(deq, "config"):
                    deq.config = dataclasses.replace(deq.config, unroll_layers=self.unroll_layers)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the strategy's setup, where sync_batchnorm converts BatchNorm; the same answer on every rank
        if trainer.world_size <= 1:
            return
        bad = [
            f"{name}.cell.{sub}"
            for name, deq in find_deqs(pl_module)
            if isinstance(getattr(deq, "cell", None), nn.Module)
            for sub, m in deq.cell.named_modules()
            if isinstance(m, nn.SyncBatchNorm)
        ]
        if bad:
            raise MisconfigurationException(
                f"DEQ cell(s) hold SyncBatchNorm {bad} on {trainer.world_size} processes: ranks stop their solvers "
                "after different step counts and SyncBatchNorm all-reduces on every cell call, so training would "
                "deadlock after the warm-up. Use GroupNorm/LayerNorm in the cell or turn sync_batchnorm off."
            )

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._in_warmup(trainer):
            self._set(pl_module, "unrolled")
            return
        self._set(pl_module, "equilibrium")
        if self.switched_at is None and self.warmup_steps > 0:
            self.switched_at = trainer.global_step
            rank_zero_info(f"DEQWarmup: {self.warmup_steps} unrolled steps done, equilibrium mode from step "
                           f"{trainer.global_step}")

    def _eval_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        warm = self.eval_unrolled and trainer.state.fn == "fit" and self._in_warmup(trainer)
        self._set(pl_module, "unrolled" if warm else "equilibrium")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set(pl_module, "equilibrium")

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set(pl_module, "equilibrium")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._set(pl_module, "unrolled" if self._in_warmup(trainer) else "equilibrium")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a fit that ends (max_steps, early stop) inside the warm-up must not hand back an unrolled model
        self._set(pl_module, "equilibrium")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._set(pl_module, "equilibrium")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"warmup_steps": self.warmup_steps, "switched_at": self.switched_at}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.switched_at = state_dict.get("switched_at")
