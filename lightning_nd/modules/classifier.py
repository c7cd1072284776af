"""``ImageClassifier``: the thin LightningModule around any classification network."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum 0.9, lr 0.05, weight decay 5e-4: the default of every lightning_nd module."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


def create_network(model: nn.Module | str, num_classes: int, in_chans: int, **kwargs: Any) -> nn.Module:
    """Return ``model`` itself, or build a timm model by name (never pretrained: nothing is downloaded).

    Raises:
        ValueError: for a name timm does not know, with close matches.
    """
    if isinstance(model, nn.Module):
        return model
    import timm

    if not timm.is_model(model):
        close = timm.list_models(f"*{model.split('_')[0]}*")[:10]
        raise ValueError(f"unknown model name {model!r}: not in timm's registry (close matches: {close})")
    return timm.create_model(model, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


def configure_optimization(
    module: pl.LightningModule, optimizer: OptimizerCallable | None, lr_scheduler: LRSchedulerCallable | None
) -> Any:
    """Build the optimizer from the module's parameters at ``configure_optimizers`` time (after callbacks changed it)."""
    opt = (optimizer or default_optimizer)(module.parameters())
    if lr_scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_scheduler(opt), "interval": "epoch"}}


def check_against_data(module: pl.LightningModule, net: nn.Module, num_classes: int) -> None:
    """Compare the network with the attached datamodule before training: class count and input size.

    Raises:
        ValueError: when the datamodule's ``num_classes`` differs from the model's, or when a dummy batch of
            the data's ``input_shape`` does not pass through the network.
    """
    datamodule = getattr(module.trainer, "datamodule", None)
    if datamodule is None:
        return
    data_classes = getattr(datamodule, "num_classes", None)
    if isinstance(data_classes, int) and data_classes > 0 and data_classes != num_classes:
        raise ValueError(
            f"model num_classes={num_classes} does not match the data: {type(datamodule).__name__} has "
            f"{data_classes} classes; set model num_classes to {data_classes}"
        )
    shape = getattr(datamodule, "input_shape", None)
    if shape is None:
        return
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(2, *shape))
    except RuntimeError as err:
        raise ValueError(
            f"input of shape {tuple(shape)} from {type(datamodule).__name__} does not fit the network "
            f"(image size too small or wrong channel count?): {str(err).splitlines()[0]}"
        ) from err
    finally:
        net.train(was_training)
    if isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[1] != num_classes:
        raise ValueError(f"network outputs {out.shape[1]} logits but num_classes={num_classes}")


class ImageClassifier(pl.LightningModule):
    """Train any ``nn.Module`` or timm model name as an image classifier.

    Logs ``{train,val,test}/loss`` and ``/acc`` (top-1), plus ``/acc_top5`` when there are more than 5 classes.
    The network lives in ``self.net``; callbacks such as ``ReparamConvert`` and ``ReparamFuse`` act on it.

    Args:
        model: a network, or a timm model name (built with ``pretrained=False``). A name is saved in the
            hyperparameters, so ``ImageClassifier.load_from_checkpoint(path)`` rebuilds it; for a network, pass
            ``model=`` to ``load_from_checkpoint`` again.
        num_classes: classes of the task; checked against the datamodule before training.
        in_chans: input channels, for timm models.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        optimizer: a callable taking the parameters (``torch.optim.SGD`` with init args from YAML);
            default :func:`default_optimizer`.
        lr_scheduler: a callable taking the optimizer, stepped every epoch; default none.
        model_kwargs: extra arguments for ``timm.create_model``.
        aux_weight: weight of the auxiliary head's loss, for networks that leave auxiliary logits in
            ``net.aux_logits`` during training (DARTS's ``NetworkCIFAR`` with ``auxiliary=True``: 0.4, its default).
        drop_path_ramp: raise the network's ``drop_path_prob`` linearly from 0 at the first epoch to its configured
            value at ``max_epochs`` (DARTS: ``drop_path_prob * epoch / epochs``); False keeps it constant.

    Raises:
        ValueError: for an unknown timm name, ``num_classes < 2``, a label smoothing outside [0, 1), a negative
            ``aux_weight``, ``drop_path_ramp`` for a network without ``drop_path_prob``, and at setup for a class
            count or input size that does not match the data.

    Example::

        model = ImageClassifier("resnet18", num_classes=10, in_chans=3)
        trainer.fit(model, datamodule=DigitsDataModule(image_size=32, channels=3))
    """

    def __init__(
        self,
        model: nn.Module | str = "resnet18",
        num_classes: int = 10,
        in_chans: int = 3,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        model_kwargs: dict[str, Any] | None = None,
        aux_weight: float = 0.4,
        drop_path_ramp: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be >= 2")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        if not aux_weight >= 0.0:
            raise ValueError(f"aux_weight={aux_weight} must be >= 0")
        self.save_hyperparameters(ignore=["model", "optimizer", "lr_scheduler"])
        if isinstance(model, str):  # a timm name rebuilds the network in load_from_checkpoint; a module cannot
            self.hparams["model"] = model
        self.net = create_network(model, num_classes, in_chans, **(model_kwargs or {}))
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self.aux_weight, self.drop_path_ramp = aux_weight, drop_path_ramp
        self.drop_path_max = getattr(self.net, "drop_path_prob", None)
        if drop_path_ramp and self.drop_path_max is None:
            raise ValueError(f"drop_path_ramp=True needs a network with a drop_path_prob; {type(self.net).__name__} "
                             "has none (use drop_path_ramp=False)")
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        top5 = num_classes > 5
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{name}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
                for stage in ("train", "val", "test")
                for name, k in (("acc", 1), ("acc_top5", 5))
                if k == 1 or top5
            }
        )

    @override
    def setup(self, stage: str) -> None:
        check_against_data(self, self.net, self.num_classes)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing if stage == "train" else 0.0)
        aux = getattr(self.net, "aux_logits", None) if stage == "train" else None
        if aux is not None and self.aux_weight > 0:
            loss = loss + self.aux_weight * F.cross_entropy(aux, y, label_smoothing=self.label_smoothing)
        self.log(
            f"{stage}/loss",
            loss,
            prog_bar=stage != "test",
            on_step=stage == "train",
            on_epoch=True,
            sync_dist=stage != "train",
        )
        for key, metric in self.metrics.items():
            if key.startswith(stage + "_"):
                metric(logits.detach(), y)
                self.log(
                    f"{stage}/{key[len(stage) + 1 :]}",
                    metric,
                    prog_bar=key.endswith("_acc"),
                    on_epoch=True,
                    on_step=False,
                )
        return loss

    @override
    def on_train_epoch_start(self) -> None:
        if self.drop_path_ramp:  # from the epoch alone, so a resumed run continues the same schedule
            self.net.drop_path_prob = self.drop_path_max * self.current_epoch / max(self.trainer.max_epochs, 1)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).softmax(-1)

    @override
    def configure_optimizers(self) -> Any:
        return configure_optimization(self, self.optimizer, self.lr_scheduler)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A run trained with ReparamConvert saved block weights: rebuild the blocks before they load, so that
        # ``ImageClassifier.load_from_checkpoint`` works without the callback. Imported here: callbacks import modules.
        from lightning_nd.callbacks.reparam_convert import ReparamConvert

        ReparamConvert.restore(self, checkpoint)
