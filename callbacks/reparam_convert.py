"""``ReparamConvert``: give an existing Lightning project ACB / DBB / RepVGG training by adding one callback.

In ``setup`` (before the optimizer, the DDP wrap and any checkpoint restore) the callback replaces every eligible
``Conv2d -> BN`` pair of the LightningModule's network by a training-time block
(:func:`lightning_nd.reparam.convert_model`; pairs come from the traced dataflow, so pre-activation layouts keep their
function). Because it runs before the restore, a resumed run (``ckpt_path=...``) or a later
``trainer.test(ckpt_path="best")`` loads its converted checkpoint into the converted model. A converted network is
marked, so the conversion happens once per network however many times ``fit``/``test`` run.

The network is found without configuration when the LightningModule has exactly one child holding convolutions
(``self.net``, ``self.model``, ``self.backbone``, ...); the log says which attribute was used. Set ``attr`` when
there are several, or ``attr=None`` for the whole LightningModule.

Every checkpoint records the conversion (``checkpoint["lightning_nd_reparam"]``). To rebuild the module outside a
Trainer with ``LightningModule.load_from_checkpoint``, re-apply it in the module's ``on_load_checkpoint`` (Lightning
calls it before loading the weights)::

    class MyModule(pl.LightningModule):
        def on_load_checkpoint(self, checkpoint):
            ReparamConvert.restore(self, checkpoint)

Build the optimizer in ``configure_optimizers`` from ``self.parameters()`` (as every lightning_nd module does), not in
``__init__``, so it sees the new parameters: an optimizer that still holds the replaced tensors gets a warning at
``on_fit_start``, and a module without that ``on_load_checkpoint`` hook gets one at ``setup``. Pair with
:class:`~lightning_nd.callbacks.ReparamFuse` to write the fused
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
from torchmetrics import Metric
from typing_extensions import override

from lightning_nd.reparam import ReparamBlock, convert_model_with_report
from lightning_nd.reparam.convert import BLOCKS
from lightning_nd.reparam.protocol import METHODS, protocol_method

CONVERTED_MARK = "_lnd_reparam_converted"
TRAIN_FORM = "_lnd_train_form"
CHECKPOINT_KEY = "lightning_nd_reparam"
AUTO = "auto"


def _holds_network(module: nn.Module) -> bool:
    if isinstance(module, Metric):
        return False
    return any(isinstance(m, nn.Conv2d) or any(protocol_method(m, n) for n in METHODS) for m in module.modules())


def find_network_attr(pl_module: pl.LightningModule, attr: str | None, who: str) -> str | None:
    """The attribute to use: ``attr`` itself, or for ``attr="auto"`` the only child holding convolutions.

    Raises:
        MisconfigurationException: for ``"auto"`` with no or several candidates (naming them).
    """
    if attr != AUTO:
        return attr
    candidates = [name for name, child in pl_module.named_children() if _holds_network(child)]
    if len(candidates) != 1:
        found = f"several children hold convolutions: {candidates}" if candidates else "no child holds a convolution"
        raise MisconfigurationException(
            f"{who}(attr='auto'): {type(pl_module).__name__}: {found}; set attr to the attribute holding the network "
            "(dotted paths allowed), or attr=None for the whole LightningModule"
        )
    return candidates[0]


def resolve_network(pl_module: pl.LightningModule, attr: str | None, who: str) -> nn.Module:
    """``pl_module.<attr>`` (dotted paths allowed; ``"auto"`` as in :func:`find_network_attr`), or the module itself
    for ``attr=None``.

    Raises:
        MisconfigurationException: when the attribute is missing or not an ``nn.Module``.
    """
    attr = find_network_attr(pl_module, attr, who)
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


def example_input(trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> Any:
    """A sample input for models that ``torch.fx`` cannot trace: ``pl_module.example_input_array``, else the
    datamodule's ``sample_batch`` (lightning_nd datamodules), else ``None``."""
    if pl_module.example_input_array is not None:
        return pl_module.example_input_array
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is not None and hasattr(datamodule, "sample_batch"):
        batch = datamodule.sample_batch(2, "train")
        return batch[0] if isinstance(batch, (list, tuple)) else batch
    return None


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


def _block_of_keys(keys: list[str]) -> str | None:
    """The block type whose branch names appear in ``keys`` (state-dict keys), if any."""
    for name, cls in BLOCKS.items():
        branches = set(cls._branch_names) - {"identity"}
        if any(set(key.split(".")) & branches for key in keys):
            return name
    return None


class ReparamConvert(Callback):
    """Convert the network's conv+BN pairs into ACB, DBB or RepVGG blocks at ``setup``.

    Args:
        block: ``"acb"``, ``"dbb"`` or ``"repvgg"``.
        preserve: keep the network's function (extra branches start at zero), e.g. to fine-tune a trained model;
            default ``False`` (train from scratch with the blocks' own initialisation).
        attr: attribute of the LightningModule holding the network; ``"auto"`` (default) takes the only child that
            holds convolutions (``ImageClassifier``: ``net``; a user module: ``model``, ``backbone``, ...);
            ``None`` converts the whole LightningModule.
        block_kwargs: extra block arguments, e.g. ``{"gamma_init": 0.333}`` for ACB.

    Raises:
        MisconfigurationException: for an unknown block; at setup, a missing ``attr`` (or ``"auto"`` with no or
            several candidates), or resuming a checkpoint converted to another block type.
        ValueError: at setup, when the network has no eligible conv+BN pair.

    Example::

        trainer = Trainer(callbacks=[ReparamConvert("acb"), ReparamFuse()])
        trainer.fit(ImageClassifier("resnet18", num_classes=10), datamodule=dm)
    """

    def __init__(
        self,
        block: Literal["acb", "dbb", "repvgg"] = "acb",
        preserve: bool = False,
        attr: str | None = AUTO,
        block_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if block not in BLOCKS:
            raise MisconfigurationException(f"ReparamConvert(block={block!r}): allowed: {', '.join(map(repr, BLOCKS))}")
        self.block, self.preserve, self.attr = block, preserve, attr
        self.block_kwargs = dict(block_kwargs or {})
        self.converted = 0
        self.network_attr: str | None = None if attr == AUTO else attr  # the attribute actually used
        self._hook: Any = None
        self._replaced: dict[int, str] = {}  # id -> name of the parameters the blocks replaced

    def convert(self, pl_module: pl.LightningModule, trainer: pl.Trainer | None = None) -> int:
        """Convert the module's network now (idempotent); returns the number of new blocks.

        ``setup`` calls it; call it yourself before ``trainer.fit`` with ``strategy="ddp_spawn"``, whose main process
        runs no callback hook and only gets the workers' weights back through a ``strict=False`` load (converted keys
        would be dropped silently from an unconverted model).

        Raises:
            MisconfigurationException: when ``attr`` names no network.
            ValueError: when the network has no eligible conv+BN pair.
        """
        self.network_attr = find_network_attr(pl_module, self.attr, "ReparamConvert")
        if self.attr == AUTO:
            rank_zero_info(f"ReparamConvert: converting {type(pl_module).__name__}.{self.network_attr} (attr='auto')")
        restore_train_form(pl_module, self.network_attr)
        net = resolve_network(pl_module, self.network_attr, "ReparamConvert")
        if getattr(net, CONVERTED_MARK, None) is not None:
            return 0
        before = sum(isinstance(m, ReparamBlock) for m in net.modules())
        old_params = {id(p): name for name, p in net.named_parameters()}
        report = convert_model_with_report(
            net, self.block, self.preserve, example_input(trainer, pl_module), **self.block_kwargs
        )
        object.__setattr__(net, CONVERTED_MARK, self.block)
        kept = {id(p) for p in net.parameters()}
        prefix = f"{self.network_attr}." if self.network_attr else ""
        self._replaced = {k: prefix + name for k, name in old_params.items() if k not in kept}
        self.converted = sum(isinstance(m, ReparamBlock) for m in net.modules()) - before
        params = sum(p.numel() for p in net.parameters())
        rank_zero_info(f"ReparamConvert: {report.summary()} (preserve={self.preserve}); {params:,} parameters")
        return self.converted

    @staticmethod
    def restore(pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> bool:
        """Re-apply the conversion recorded in ``checkpoint`` to a freshly built module; returns whether it did.

        Call it from ``LightningModule.on_load_checkpoint`` so ``load_from_checkpoint`` rebuilds the converted
        network before the weights load. A no-op for a checkpoint without a conversion or an already converted network.

        Raises:
            MisconfigurationException: when the recorded attribute is not a network of ``pl_module``.
        """
        record = checkpoint.get(CHECKPOINT_KEY)
        if not record:
            return False
        callback = ReparamConvert(record["block"], attr=record["attr"], block_kwargs=record.get("block_kwargs"))
        return callback.convert(pl_module) > 0

    # ----------------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        converted_now = self.convert(pl_module, trainer)
        if converted_now and stage == "fit" and in_spawned_worker(trainer):
            rank_zero_warn(
                "ReparamConvert: converting inside a worker process (ddp_spawn, ddp_fork, ddp_notebook): the main "
                "process's model stays unconverted and will NOT receive the trained weights (Lightning loads them with "
                "strict=False). Call ReparamConvert(...).convert(model) before trainer.fit, or use the checkpoint / "
                "ReparamFuse's deploy file."
            )
        if converted_now and type(pl_module).on_load_checkpoint is pl.LightningModule.on_load_checkpoint:
            name = type(pl_module).__name__
            rank_zero_warn(
                f"ReparamConvert: {name} has no on_load_checkpoint hook, so {name}.load_from_checkpoint(...) outside a "
                f"Trainer cannot rebuild the converted network (missing/unexpected keys); add `def on_load_checkpoint("
                "self, checkpoint): ReparamConvert.restore(self, checkpoint)`"
            )
        if self._hook is None:  # Lightning loads checkpoint weights before callback state: check the keys as they load
            self._hook = pl_module.register_load_state_dict_pre_hook(self._check_checkpoint_keys)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the optimizers exist now (strategy.setup ran): one built before the conversion holds the replaced tensors
        current = {id(p) for p in pl_module.parameters()}
        for index, optimizer in enumerate(trainer.optimizers):
            held = [p for group in optimizer.param_groups for p in group["params"]]
            held_ids = {id(p) for p in held}
            stale = [self._replaced[id(p)] for p in held if id(p) in self._replaced and id(p) not in current]
            if not stale:
                continue
            untrained = sum(1 for p in pl_module.parameters() if p.requires_grad and id(p) not in held_ids)
            rank_zero_warn(
                f"ReparamConvert: optimizer {index} ({type(optimizer).__name__}) holds {len(stale)} parameters that the "
                f"conversion replaced (e.g. {', '.join(stale[:3])}) and misses {untrained} of the module's trainable "
                "parameters, so the converted layers would not train; build the optimizer in configure_optimizers "
                "from self.parameters() (it runs after the conversion), not in __init__"
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _check_checkpoint_keys(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Turn a block mismatch (an ACB checkpoint resumed with block='dbb') into a message instead of missing keys."""
        head = f"{prefix}{self.network_attr}." if self.network_attr else prefix
        ours = {k for k in module.state_dict() if k.startswith(head)}
        theirs = [k for k in state_dict if k.startswith(head)]
        unexpected = [k for k in theirs if k not in ours]
        if not unexpected and ours <= set(theirs):
            return
        found = _block_of_keys(unexpected)
        if found == self.block:
            return  # same block type, other differences: leave it to the strict load's own message
        if found:
            held, advice = f"a network converted to {found!r} blocks", f"resume with ReparamConvert(block={found!r})"
        else:
            held, advice = "an unconverted network", "load it into the plain model first, then convert (preserve=True)"
        example = unexpected[0] if unexpected else sorted(ours - set(theirs))[0]
        raise MisconfigurationException(
            f"ReparamConvert(block={self.block!r}): the checkpoint being loaded holds {held} (e.g. key {example!r}); "
            f"{advice}: a checkpoint loads only into the form it was written from"
        )

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"block": self.block, "attr": self.network_attr, "block_kwargs": self.block_kwargs}

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
