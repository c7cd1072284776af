"""``DetectionModule``: torchvision's RetinaNet / FCOS as a LightningModule, with an FPN or an implicit FPN neck.

The network is plain torchvision: a backbone (torchvision ResNet or any timm ``features_only`` model, never
downloaded unless ``backbone_weights`` asks for it) whose ``fpn`` attribute is either torchvision's
``FeaturePyramidNetwork`` or :class:`~lightning_nd.implicit.ImplicitFPN` (same constructor, same output), then
the detector's anchor generator and head. Anchors are sized from the pyramid's real strides (``anchor_scale``
times the stride, three scales per octave and three aspect ratios for RetinaNet, like torchvision's defaults;
one point per location of size ``stride`` for FCOS), so the same code serves 96-pixel shapes and 800-pixel COCO.

Training logs the detector's losses (``train/loss`` and one entry per loss term) and, with an implicit neck and a
:class:`~lightning_nd.implicit.JacobianSchedule` (``jac_reg``), adds the neck's Jacobian-regularisation loss on the
steps the schedule selects (``train/jac_loss``, ``train/jac_weight``; same recipe and helper as ``DEQClassifier``,
:func:`~lightning_nd.implicit.jacobian.jacobian_step`); validation and test compute
COCO mAP with torchmetrics' ``MeanAveragePrecision`` (pycocotools backend) and log ``{val,test}/map``,
``/map_50``, ``/map_75`` and ``/mar_100``; ``predict_step`` returns torchvision's list of
``dict(boxes, scores, labels)``. Targets may carry COCO's ``iscrowd`` (and ``area``): crowd boxes are dropped from
the training targets (torchvision's reference does the same) and passed to the metric, which, like ``COCOeval``,
ignores detections on crowd regions instead of counting them as false positives. The metric (:func:`coco_map`)
also keeps each target's ``image_id`` and evaluates every image once, so the padding a ``DistributedSampler`` adds
under DDP (it repeats images to even out the ranks) does not count them twice.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from functools import partial
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.detection import MeanAveragePrecision
from typing_extensions import override

from lightning_nd.implicit.deq import find_deqs
from lightning_nd.implicit.jacobian import JacobianSchedule, jacobian_step
from lightning_nd.modules.classifier import configure_optimization

DETECTORS = ("retinanet", "fcos")
NECKS = ("fpn", "ifpn")
EXTRA_BLOCKS = ("p6p7", "pool", "none")
NORMS = ("batch", "frozen")


def detection_optimizer(params: Any) -> torch.optim.Optimizer:
    """SGD lr 0.01, momentum 0.9, weight decay 1e-4: torchvision's detection reference (and the i-FPN paper)."""
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)


class FeatureBackbone(nn.Module):
    """``fpn(body(x))`` with torchvision's ``BackboneWithFPN`` attributes ``body``, ``fpn`` and ``out_channels``.

    Args:
        body: maps images to an ``OrderedDict`` of feature maps, highest resolution first.
        fpn: the neck, called on that dict.
        out_channels: channels of every neck output.

    Raises:
        Nothing at construction; the parts raise their own errors when called.

    Example::

        backbone = FeatureBackbone(IntermediateLayerGetter(resnet18(), {"layer3": "0", "layer4": "1"}),
                                   ImplicitFPN([256, 512], 64), out_channels=64)
        RetinaNet(backbone, num_classes=4)
    """

    def __init__(self, body: nn.Module, fpn: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.body, self.fpn, self.out_channels = body, fpn, out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


class TimmFeatures(nn.Module):
    """A timm ``features_only`` model whose list output becomes an ``OrderedDict`` named ``"0"``, ``"1"``, ...

    Args:
        model: a timm model created with ``features_only=True``.

    Raises:
        Nothing at construction; the wrapped model raises its own errors when called.

    Example::

        body = TimmFeatures(timm.create_model("resnet10t", features_only=True, out_indices=(2, 3)))
        feats = body(images)   # OrderedDict("0": stride 8, "1": stride 16)
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict((str(i), f) for i, f in enumerate(self.model(x)))


def _body(backbone: str, returned_layers: list[int], weights: str | None, norm: str, trainable_layers: int) -> nn.Module:
    if backbone.startswith("timm:"):
        import timm

        name = backbone[len("timm:") :]
        if not timm.is_model(name):
            raise ValueError(f"backbone {backbone!r}: {name!r} is not in timm's registry")
        return TimmFeatures(timm.create_model(name, pretrained=weights is not None, features_only=True,
                                              out_indices=tuple(returned_layers)))
    import torchvision
    from torchvision.models._utils import IntermediateLayerGetter

    if backbone not in ("resnet18", "resnet34", "resnet50", "resnet101"):
        raise ValueError(f"backbone={backbone!r} is not supported; allowed: 'resnet18', 'resnet34', 'resnet50', "
                         "'resnet101' (torchvision) or 'timm:<name>' (a timm features_only model)")
    if not returned_layers or any(k not in (1, 2, 3, 4) for k in returned_layers):
        raise ValueError(f"returned_layers={returned_layers} must be a non-empty subset of [1, 2, 3, 4]")
    from torchvision.ops.misc import FrozenBatchNorm2d

    net = getattr(torchvision.models, backbone)(
        weights=weights, norm_layer=FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d
    )
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    for name, parameter in net.named_parameters():
        if not any(name.startswith(layer) for layer in trainable) and not (trainable_layers == 5 and name.startswith("bn1")):
            parameter.requires_grad_(False)
    return IntermediateLayerGetter(net, {f"layer{k}": str(i) for i, k in enumerate(sorted(returned_layers))})


def build_detector(
    detector: str = "retinanet",
    num_classes: int = 4,
    backbone: str = "resnet18",
    neck: str = "fpn",
    returned_layers: list[int] | None = None,
    out_channels: int = 64,
    extra_blocks: str = "p6p7",
    anchor_scale: float = 4.0,
    min_size: int = 96,
    max_size: int = 96,
    neck_kwargs: dict[str, Any] | None = None,
    backbone_weights: str | None = None,
    backbone_norm: str = "batch",
    trainable_layers: int = 5,
    **detector_kwargs: Any,
) -> nn.Module:
    """Build a torchvision RetinaNet or FCOS with an FPN or implicit-FPN neck (arguments as in :class:`DetectionModule`).

    Raises:
        ValueError: for an unknown detector, neck, extra block or backbone, or bad sizes.
    """
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead
    from torchvision.models.detection.retinanet import RetinaNetHead
    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    for name, value, allowed in (("detector", detector, DETECTORS), ("neck", neck, NECKS),
                                 ("extra_blocks", extra_blocks, EXTRA_BLOCKS), ("backbone_norm", backbone_norm, NORMS)):
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers={trainable_layers} must be in 0..5")
    if out_channels < 1 or anchor_scale <= 0 or min_size < 16 or max_size < min_size:
        raise ValueError(f"need out_channels >= 1, anchor_scale > 0, 16 <= min_size <= max_size; got {out_channels}, "
                         f"{anchor_scale}, {min_size}, {max_size}")
    body = _body(backbone, list(returned_layers or [2, 3, 4]), backbone_weights, backbone_norm, trainable_layers)
    probe = 256  # divisible by the stride of P7, so strides come out exact
    was_training = body.training
    body.eval()
    with torch.no_grad():
        feats = body(torch.zeros(1, 3, probe, probe))
    body.train(was_training)
    in_channels = [f.shape[1] for f in feats.values()]
    strides = [probe // f.shape[-1] for f in feats.values()]
    extra = {"p6p7": LastLevelP6P7(out_channels, out_channels), "pool": LastLevelMaxPool(), "none": None}[extra_blocks]
    strides += [strides[-1] * 2**k for k in range(1, {"p6p7": 3, "pool": 2, "none": 1}[extra_blocks])]
    if neck == "fpn":
        fpn: nn.Module = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra, **(neck_kwargs or {}))
    else:
        from lightning_nd.implicit.ifpn import ImplicitFPN

        fpn = ImplicitFPN(in_channels, out_channels, extra_blocks=extra, **(neck_kwargs or {}))
    net_backbone = FeatureBackbone(body, fpn, out_channels)
    groups = head_groups(out_channels)
    if detector == "retinanet":
        sizes = tuple(tuple(round(anchor_scale * s * 2 ** (k / 3)) for k in range(3)) for s in strides)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        head = RetinaNetHead(out_channels, anchors.num_anchors_per_location()[0], num_classes,
                             norm_layer=partial(nn.GroupNorm, groups))
        return RetinaNet(net_backbone, num_classes, min_size=min_size, max_size=max_size, anchor_generator=anchors,
                         head=head, **detector_kwargs)
    anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
    head = FCOSHead(out_channels, 1, num_classes)
    if groups != 32:  # torchvision hard-codes GroupNorm(32, C), which needs C >= 64 on 1x1 maps
        for tower in (head.classification_head.conv, head.regression_head.conv):
            for i, layer in enumerate(tower):
                if isinstance(layer, nn.GroupNorm):
                    tower[i] = nn.GroupNorm(groups, out_channels)
    return FCOS(net_backbone, num_classes, min_size=min_size, max_size=max_size, anchor_generator=anchors,
                head=head, **detector_kwargs)


def head_groups(channels: int) -> int:
    """GroupNorm groups of the heads: torchvision's 32 from 64 channels on, else the most groups of >= 2 channels."""
    if channels >= 64 and channels % 32 == 0:
        return 32
    return next(g for g in (16, 8, 4, 2, 1) if channels % g == 0 and (channels // g >= 2 or g == 1))


class CocoMeanAveragePrecision(MeanAveragePrecision):
    """``MeanAveragePrecision`` that evaluates each ``image_id`` once (the first time it was seen, over all ranks).

    A ``DistributedSampler`` pads the evaluation set so every rank gets as many images; the padded images would
    otherwise enter COCO's matching twice (twice the ground truth and twice the detections). Targets without an
    ``image_id`` are always kept.

    Raises:
        ValueError: as ``MeanAveragePrecision.update`` for malformed inputs.

    Example::

        metric = coco_map()
        metric.update(preds, [{"boxes": b, "labels": l, "iscrowd": c, "image_id": torch.tensor(7)}])
        metric.compute()["map"]
    """

    _PER_IMAGE = ("detection_box", "detection_mask", "detection_scores", "detection_labels", "groundtruth_box",
                  "groundtruth_mask", "groundtruth_labels", "groundtruth_crowds", "groundtruth_area")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("image_ids", default=[], dist_reduce_fx=None)

    @override
    def update(self, preds: list[dict[str, torch.Tensor]], target: list[dict[str, torch.Tensor]]) -> None:
        super().update(preds, target)
        for t in target:
            image_id = torch.as_tensor(t.get("image_id", -1))  # a tensor, or an int as torchvision's wrappers give
            self.image_ids.append(image_id.reshape(1).to(device=t["labels"].device, dtype=torch.int64))

    @override
    def compute(self) -> dict:
        seen: set[int] = set()
        keep = []
        for i, image_id in enumerate(torch.cat(self.image_ids).tolist() if self.image_ids else []):
            if image_id < 0 or image_id not in seen:
                keep.append(i)
                seen.add(image_id)
        if len(keep) == len(self.image_ids):
            return super().compute()
        saved = {name: getattr(self, name) for name in self._PER_IMAGE}
        try:
            for name, states in saved.items():
                if len(states) == len(self.image_ids):
                    setattr(self, name, [states[i] for i in keep])
            return super().compute()
        finally:
            for name, states in saved.items():
                setattr(self, name, states)


def coco_map() -> CocoMeanAveragePrecision:
    """torchmetrics' COCO mAP with pycocotools' exact float64 IoU and recall thresholds, one entry per image id.

    torchmetrics' defaults come from ``torch.linspace`` in float32 (0.55 becomes 0.550000011920929), which flips
    matches whose IoU sits exactly on a threshold (common with integer boxes) and makes the result differ from
    ``COCOeval``'s own.
    """
    return CocoMeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        backend="pycocotools",
        iou_thresholds=np.linspace(0.5, 0.95, 10).tolist(),
        rec_thresholds=np.linspace(0.0, 1.0, 101).tolist(),
    )


class DetectionModule(pl.LightningModule):
    """Train and evaluate a torchvision detector (RetinaNet or FCOS), with an FPN or an implicit FPN neck.

    Batches are ``(list_of_images, list_of_targets)`` with torchvision targets ``dict(boxes xyxy, labels)``, as
    produced by :class:`~lightning_nd.datamodules.ShapesDetectionDataModule` and
    :class:`~lightning_nd.datamodules.CocoDetectionDataModule`. The detector lives in ``self.net``; its neck is
    ``self.net.backbone.fpn``, where callbacks such as ``DEQMonitor`` find the implicit FPN's DEQ.

    Args:
        detector: ``"retinanet"``, ``"fcos"``, or a ready torchvision-style detector module (then the
            construction arguments below are ignored).
        num_classes: classes including the background (torchvision's convention; 4 for the three shapes).
        backbone: ``"resnet18"``/``"resnet34"``/``"resnet50"``/``"resnet101"`` (torchvision, BatchNorm, from
            scratch) or ``"timm:<name>"`` (a timm ``features_only`` model).
        neck: ``"fpn"`` (torchvision's ``FeaturePyramidNetwork``) or ``"ifpn"`` (:class:`ImplicitFPN`).
        returned_layers: backbone stages fed to the neck (ResNet ``layer1..4``, or timm ``out_indices``);
            default ``[2, 3, 4]`` (strides 8, 16, 32 on a ResNet, as in RetinaNet).
        out_channels: channels of the pyramid and the head (torchvision: 256).
        extra_blocks: ``"p6p7"`` (RetinaNet and FCOS: two stride-2 convs on the last level), ``"pool"`` or ``"none"``.
        anchor_scale: RetinaNet anchor base size in units of the level's stride (torchvision: 4, i.e. 32 at P3).
        min_size, max_size: the detector's resize range (torchvision's ``GeneralizedRCNNTransform``).
        neck_kwargs: extra arguments of the neck (e.g. solver options of ``ImplicitFPN``).
        detector_kwargs: extra arguments of ``RetinaNet``/``FCOS`` (``score_thresh``, ``detections_per_img``...).
        backbone_weights: torchvision weights name (e.g. ``"DEFAULT"``) or any value for timm pretrained weights;
            ``None`` (default) trains from scratch and never downloads.
        backbone_norm: torchvision ResNet norm: ``"batch"`` (from scratch; use ``sync_batchnorm`` on several
            GPUs) or ``"frozen"`` (``FrozenBatchNorm2d``, torchvision's choice with pretrained weights).
        trainable_layers: torchvision ResNet stages trained, counted from ``layer4`` (5 = all, torchvision's
            pretrained default is 3).
        optimizer: callable taking the parameters; default SGD 0.01, momentum 0.9, weight decay 1e-4.
        lr_scheduler: callable taking the optimizer, stepped every epoch (e.g. ``MultiStepLR``).
        warmup_steps: linear learning-rate warm-up over the first optimizer steps (torchvision reference: 1000).
        warmup_factor: learning-rate factor at step 0 of the warm-up.
        jac_reg: Jacobian-regularisation schedule of the implicit neck (weight, probability, growth, stop epoch,
            forward-cap jitter; locuslab/deq's recipe); default off. Needs a DEQ in the network (``neck="ifpn"``).
            The weighted loss is added to the detector's summed loss on the steps the schedule selects.

    Raises:
        ValueError: for an unknown detector, neck or backbone, ``num_classes < 2``, a negative warm-up, ``jac_reg``
            with a network without a DEQ layer (``neck="fpn"``), a DEQ layer built with ``jac_reg=True`` (the
            schedule decides), at setup when the datamodule's ``num_classes`` differs from the model's, and in
            training for a label outside ``1 .. num_classes - 1``.

    Example::

        model = DetectionModule("retinanet", num_classes=4, backbone="resnet18", neck="ifpn",
                                jac_reg=JacobianSchedule(weight=0.5, prob=0.1, cap_jitter=2))
        trainer.fit(model, datamodule=ShapesDetectionDataModule(batch_size=2))
    """

    def __init__(
        self,
        detector: str | nn.Module = "retinanet",
        num_classes: int = 4,
        backbone: str = "resnet18",
        neck: str = "fpn",
        returned_layers: list[int] | None = None,
        out_channels: int = 64,
        extra_blocks: str = "p6p7",
        anchor_scale: float = 4.0,
        min_size: int = 96,
        max_size: int = 96,
        neck_kwargs: dict[str, Any] | None = None,
        detector_kwargs: dict[str, Any] | None = None,
        backbone_weights: str | None = None,
        backbone_norm: str = "batch",
        trainable_layers: int = 5,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_steps: int = 0,
        warmup_factor: float = 0.001,
        jac_reg: JacobianSchedule | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be >= 2 (background included)")
        if warmup_steps < 0 or not 0.0 < warmup_factor <= 1.0:
            raise ValueError(f"need warmup_steps >= 0 and 0 < warmup_factor <= 1, got {warmup_steps}, {warmup_factor}")
        # a detector given as a module is not a hyper-parameter; its name is (load_from_checkpoint rebuilds it)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"] + (["detector"] if isinstance(detector, nn.Module) else []))
        if isinstance(detector, nn.Module):
            self.net = detector
        else:
            self.net = build_detector(
                detector, num_classes, backbone, neck, returned_layers=returned_layers, out_channels=out_channels,
                extra_blocks=extra_blocks, anchor_scale=anchor_scale, min_size=min_size, max_size=max_size,
                neck_kwargs=neck_kwargs, backbone_weights=backbone_weights, backbone_norm=backbone_norm,
                trainable_layers=trainable_layers, **(detector_kwargs or {}),
            )
        self.num_classes = num_classes
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.warmup_steps, self.warmup_factor = warmup_steps, warmup_factor
        self.val_map, self.test_map = coco_map(), coco_map()
        self.jac_schedule = self._check_jac_reg(jac_reg)

    def _check_jac_reg(self, jac_reg: JacobianSchedule | None) -> JacobianSchedule | None:
        if jac_reg is not None and not isinstance(jac_reg, JacobianSchedule):
            raise ValueError(f"jac_reg must be a JacobianSchedule or None, got {type(jac_reg).__name__}")
        deqs = find_deqs(self.net)
        if jac_reg is not None and not deqs:
            neck = type(getattr(getattr(self.net, "backbone", None), "fpn", None)).__name__
            raise ValueError(
                f"jac_reg={jac_reg} needs an implicit neck (a DEQ layer), but the detector has none (neck: {neck}); "
                "use neck='ifpn' or drop jac_reg"
            )
        flagged = [name for name, m in deqs if m.jac_reg]
        if flagged:  # a flag set on the layer would compute a loss nobody adds, or be overridden by the schedule
            raise ValueError(
                f"DEQ layer(s) {flagged} were built with jac_reg=True (e.g. neck_kwargs jac_reg), which "
                "DetectionModule does not read; configure the regularisation with "
                "DetectionModule(jac_reg=JacobianSchedule(weight=..., prob=...))"
            )
        return jac_reg

    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_classes = getattr(datamodule, "num_classes", None)
        if isinstance(data_classes, int) and data_classes != self.num_classes:
            raise ValueError(
                f"model num_classes={self.num_classes} does not match the data: {type(datamodule).__name__} has "
                f"num_classes={data_classes} (background included); set the model's num_classes to {data_classes}"
            )

    @override
    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        return self.net(images, targets)

    def _check_labels(self, targets: list[dict[str, torch.Tensor]]) -> None:
        for t in targets:
            labels = t["labels"]
            if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) >= self.num_classes):
                raise ValueError(
                    f"target labels {sorted(set(labels.tolist()))} fall outside 1..{self.num_classes - 1} "
                    f"(num_classes={self.num_classes} includes the background 0)"
                )

    @staticmethod
    def _without_crowds(targets: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Crowd regions are not objects to learn (torchvision's reference drops them for training)."""
        out = []
        for t in targets:
            crowd = t.get("iscrowd")
            if crowd is not None and bool(crowd.any()):
                keep = crowd == 0
                t = {k: (v[keep] if k in ("boxes", "labels", "iscrowd", "area") else v) for k, v in t.items()}
            out.append(t)
        return out

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        targets = self._without_crowds(list(targets))
        self._check_labels(targets)
        size = len(images)
        regularised = (nullcontext() if self.jac_schedule is None
                       else jacobian_step(self.net, self.jac_schedule, self.global_step, self.current_epoch))
        with regularised as jac:
            losses = self.net(list(images), list(targets))
        loss = sum(losses.values())
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=size)
        if jac is not None and jac.loss is not None:
            # train/loss stays the detector's loss (comparable with the FPN's); the regulariser is logged apart
            self.log("train/jac_loss", jac.loss.detach(), on_step=True, on_epoch=True, batch_size=size)
            self.log("train/jac_weight", jac.weight, on_step=True, on_epoch=False, batch_size=size)
            loss = loss + jac.weight * jac.loss
        return loss

    def _evaluate(self, batch: Any, metric: MeanAveragePrecision) -> None:
        images, targets = batch
        preds = self.net(list(images))
        metric.update(
            [{k: p[k].detach() for k in ("boxes", "scores", "labels")} for p in preds],
            [{k: t[k] for k in ("boxes", "labels", "iscrowd", "area", "image_id") if k in t} for t in targets],
        )

    def _log_map(self, stage: str, metric: MeanAveragePrecision) -> None:
        result = metric.compute()
        for key in ("map", "map_50", "map_75", "mar_100"):
            self.log(f"{stage}/{key}", result[key].float(), prog_bar=key == "map")
        metric.reset()

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.val_map)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_map("val", self.val_map)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_map)

    @override
    def on_test_epoch_end(self) -> None:
        self._log_map("test", self.test_map)

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> list[dict[str, torch.Tensor]]:
        images = batch[0] if isinstance(batch, (tuple, list)) and isinstance(batch[0], (tuple, list)) else batch
        return self.net(list(images))

    def _warmup(self) -> float:
        if self.global_step >= self.warmup_steps:
            return 1.0
        alpha = self.global_step / self.warmup_steps
        return self.warmup_factor * (1 - alpha) + alpha

    @override
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        # scale the lr for this step only, so the scheduler's own state is never touched (exact on resume)
        factor = self._warmup()
        saved = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor
        optimizer.step(closure=optimizer_closure)
        for group, lr in zip(optimizer.param_groups, saved):
            group["lr"] = lr

    @override
    def configure_optimizers(self) -> Any:
        return configure_optimization(self, self.optimizer or detection_optimizer, self.lr_scheduler)
