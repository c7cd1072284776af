"""``ReparamConvert``: give an existing Lightning project ACB / DBB / RepVGG training by adding one callback.

In ``setup`` (before the optimizer, the DDP wrap and any checkpoint restore) the callback replaces every eligible
``Conv2d -> BN`` pair of the LightningModule's network by a training-time block
(:func:`lightning_nd.reparam.convert_model`). Because it runs before the restore, a resumed run (``ckpt_path=...``) or
a later ``trainer.test(ckpt_path="best")`` loads its converted checkpoint into the converted model. A converted network
is marked, so the conversion happens once per network however many times ``fit``/``test`` run.

Build the optimizer in ``configure_optimizers`` from ``self.parameters()`` (as every lightning_nd module does), not in
``__init__``, so it sees the new parameters. Pair with :class:`~lightning_nd.callbacks.ReparamFuse` to write the fused
deploy model at the end of fit.
"""

from __future__ import annotations

import multiprocessing
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from lightning_nd.reparam import ReparamBlock, convert_model
from lightning_nd.reparam.convert import BLOCKS

CONVERTED_MARK = "_lnd_reparam_converted"
TRAIN_FORM = "_lnd_train_form"


def resolve_network(pl_module: pl.LightningModule, attr: str | None, who: str) -> nn.Module:
    """``pl_module.<attr>`` (dotted paths allowed), or the module itself for ``attr=None``.

    Raises:
        MisconfigurationException: when the attribute is missing or not an ``nn.Module``.
    """
    if attr is None:
        return pl_module
    target: Any = pl_module
    for part in attr.split("."):
        target = getattr(target, part, None)
    if not isinstance(target, nn.Module):
        children = [name for name, _ in pl_module.named_children()]
        raise MisconfigurationException(
            f"{who}(attr={attr!r}): {type(pl_module).__name__} has no network at .{attr} (its children: {children}); "
            "set attr to the attribute holding the network, or attr=None for the whole LightningModule"
        )
    return target


def set_network(pl_module: pl.LightningModule, attr: str, value: nn.Module) -> None:
    """Put ``value`` at ``pl_module.<attr>`` (dotted paths allowed)."""
    *parents, name = attr.split(".")
    owner: Any = pl_module
    for part in parents:
        owner = getattr(owner, part)
    setattr(owner, name, value)


def in_spawned_worker(trainer: pl.Trainer) -> bool:
    """Whether this process is a worker that the strategy's launcher started with ``multiprocessing``.

    True under ``ddp_spawn`` / ``ddp_fork`` / ``ddp_notebook``: the worker trains a copy of the model, and the main
    process only gets its weights back through a ``strict=False`` load. False in the main process, with a single
    device, and under ``strategy="ddp"``, whose workers re-run the script (``subprocess``) and whose rank 0 is the main
    process. Uses only public API (``Strategy.launcher`` and ``multiprocessing.parent_process``).
    """
    return trainer.strategy.launcher is not None and multiprocessing.parent_process() is not None


def restore_train_form(pl_module: pl.LightningModule, attr: str | None) -> bool:
    """If ``ReparamFuse(swap=True)`` put a deploy network at ``attr``, put the training form back; returns whether it did.

    The deploy network remembers its training form (an unregistered attribute), so any callback instance, in any
    later ``fit``/``test``, can undo the swap before a checkpoint is loaded.
    """
    if attr is None:
        return False
    current = resolve_network(pl_module, attr, "ReparamConvert")
    train_form = getattr(current, TRAIN_FORM, None)
    if not isinstance(train_form, nn.Module):
        return False
    train_form.train(current.training)
    set_network(pl_module, attr, train_form)
    return True


class ReparamConvert(Callback):
    """Convert the network's conv+BN pairs into ACB, DBB or RepVGG blocks at ``setup``.

    Args:
        block: ``"acb"``, ``"dbb"`` or ``"repvgg"``.
        preserve: keep the network's function (extra branches start at zero), e.g. to fine-tune a trained model;
            default ``False`` (train from scratch with the blocks' own initialisation).
        attr: attribute of the LightningModule holding the network (``ImageClassifier`` keeps it in ``net``);
            ``None`` converts the whole LightningModule.
        block_kwargs: extra block arguments, e.g. ``{"gamma_init": 0.333}`` for ACB.

    Raises:
        MisconfigurationException: for an unknown block, or (at setup) a missing ``attr``.
        ValueError: at setup, when the network has no eligible conv+BN pair.

    Example::

        trainer = Trainer(callbacks=[ReparamConvert("acb"), ReparamFuse()])
        trainer.fit(ImageClassifier("resnet18", num_classes=10), datamodule=dm)
    """

    def __init__(
        self,
        block: Literal["acb", "dbb", "repvgg"] = "acb",
        preserve: bool = False,
        attr: str | None = "net",
        block_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if block not in BLOCKS:
            raise MisconfigurationException(f"ReparamConvert(block={block!r}): allowed: {', '.join(map(repr, BLOCKS))}")
        self.block, self.preserve, self.attr = block, preserve, attr
        self.block_kwargs = dict(block_kwargs or {})
        self.converted = 0

    def convert(self, pl_module: pl.LightningModule) -> int:
        """Convert the module's network now (idempotent); returns the number of new blocks.

        ``setup`` calls it; call it yourself before ``trainer.fit`` with ``strategy="ddp_spawn"``, whose main process
        runs no callback hook and only gets the workers' weights back through a ``strict=False`` load (converted keys
        would be dropped silently from an unconverted model).

        Raises:
            MisconfigurationException: when ``attr`` names no network.
            ValueError: when the network has no eligible conv+BN pair.
        """
        restore_train_form(pl_module, self.attr)
        net = resolve_network(pl_module, self.attr, "ReparamConvert")
        if getattr(net, CONVERTED_MARK, None) is not None:
            return 0
        before = sum(isinstance(m, ReparamBlock) for m in net.modules())
        convert_model(net, self.block, preserve=self.preserve, **self.block_kwargs)
        object.__setattr__(net, CONVERTED_MARK, self.block)
        self.converted = sum(isinstance(m, ReparamBlock) for m in net.modules()) - before
        params = sum(p.numel() for p in net.parameters())
        rank_zero_info(
            f"ReparamConvert: {self.converted} conv+BN pairs -> {self.block} blocks "
            f"(preserve={self.preserve}); {params:,} parameters in training form"
        )
        return self.converted

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.convert(pl_module) and stage == "fit" and in_spawned_worker(trainer):
            rank_zero_warn(
                "ReparamConvert: converting inside a worker process (ddp_spawn, ddp_fork, ddp_notebook): the main "
                "process's model stays unconverted and will NOT receive the trained weights (Lightning loads them with strict=False). "
                "Call ReparamConvert(...).convert(model) before trainer.fit, or use the checkpoint / ReparamFuse's "
                "deploy file."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"block": self.block, "preserve": self.preserve, "converted": self.converted}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("block", self.block) != self.block:
            raise MisconfigurationException(
                f"ReparamConvert: the checkpoint was trained with block={state_dict['block']!r}, "
                f"this run converts to block={self.block!r}"
            )
        self.converted = state_dict.get("converted", self.converted)
