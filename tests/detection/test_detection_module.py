"""DetectionModule: training with FPN / i-FPN, mAP against pycocotools, empty targets, class-count errors."""

import contextlib
import io

import lightning.pytorch as pl
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from lightning_nd.callbacks import DEQMonitor
from lightning_nd.datamodules import ShapesDetectionDataModule
from lightning_nd.modules import DetectionModule

TINY = {"returned_layers": [2, 3], "out_channels": 32, "min_size": 64, "max_size": 64}


def _trainer(**kw):
    kw = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
          "enable_model_summary": False, **kw}
    return pl.Trainer(**kw)


class _LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_ifpn_retinanet_loss_falls_on_shapes():
    pl.seed_everything(0)
    data = ShapesDetectionDataModule(num_train=2, num_val=2, batch_size=2, image_size=64, max_object_size=24)
    model = DetectionModule("retinanet", num_classes=4, neck="ifpn", **TINY,
                            optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    recorder, monitor = _LossRecorder(), DEQMonitor(histogram_every_n_epochs=0)
    trainer = _trainer(max_steps=15, limit_val_batches=0, callbacks=[recorder, monitor])
    trainer.fit(model, data)
    losses = recorder.losses
    assert len(losses) == 15 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.5 * first, losses
    stats = model.net.backbone.fpn.last_stats
    assert stats.forward.nfe >= 2 and stats.backward is not None  # it was solved, and differentiated implicitly
    # DEQMonitor finds the i-FPN's DEQ inside the detector like any other DEQ and logs its solver statistics
    metrics = trainer.callback_metrics
    assert metrics["deq/fwd_steps"] == stats.forward.nfe and metrics["deq/bwd_steps"] >= 1
    assert 0 <= float(metrics["deq/fwd_rel_max"]) < 1 and monitor.stop_reason is None


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
@pytest.mark.parametrize("detector", ["retinanet", "fcos"])
def test_images_without_boxes_train(detector):
    torch.manual_seed(0)
    model = DetectionModule(detector, num_classes=4, neck="ifpn", **TINY)
    data = ShapesDetectionDataModule(image_size=64, max_object_size=24)
    (image, target), (image2, _) = data.dataset("train")[0], data.dataset("train")[1]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    for batch in ([image, image2], [target, empty]), ([image2], [empty]):  # mixed, and only empty
        model.zero_grad(set_to_none=True)
        loss = model.training_step(batch, 0)
        loss.backward()
        assert torch.isfinite(loss)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    # a whole run on data without any box (max_shapes=0) goes through fit and validation
    data = ShapesDetectionDataModule(num_train=2, num_val=2, min_shapes=0, max_shapes=0, image_size=64, max_object_size=24)
    trainer = _trainer(fast_dev_run=1)
    trainer.fit(model, data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_class_count_mismatch_fails_at_setup_with_a_clear_error():
    model = DetectionModule("retinanet", num_classes=5, **TINY)
    data = ShapesDetectionDataModule(num_train=2, num_val=2, image_size=64, max_object_size=24)
    with pytest.raises(ValueError, match=r"num_classes=5 does not match the data.*num_classes=4"):
        _trainer(fast_dev_run=1).fit(model, data)
    small = DetectionModule("retinanet", num_classes=3, **TINY)
    batch = ShapesDetectionDataModule(image_size=64, max_object_size=24).dataset("train")[3]
    batch = ([batch[0]], [{"boxes": torch.tensor([[1.0, 1, 20, 20]]), "labels": torch.tensor([3])}])
    with pytest.raises(ValueError, match=r"labels \[3\] fall outside 1..2"):
        small.training_step(batch, 0)
    with pytest.raises(ValueError, match="neck='bifpn'"):
        DetectionModule(neck="bifpn")
    with pytest.raises(ValueError, match="backbone='vgg'"):
        DetectionModule(backbone="vgg")


class _Oracle(nn.Module):
    """Returns the ground truth of the (unshuffled) validation set in order, shifted by ``shift`` pixels."""

    def __init__(self, targets, shift):
        super().__init__()
        self.targets, self.shift, self.i = targets, shift, 0
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, images, targets=None):
        out = []
        for _ in images:
            t = self.targets[self.i % len(self.targets)]
            self.i += 1
            n = len(t["boxes"])
            out.append({"boxes": t["boxes"] + self.shift, "scores": torch.linspace(1.0, 0.5, n), "labels": t["labels"]})
        return out


def _pycocotools_map(targets, shift):
    images, gts, dts = [], [], []
    for i, t in enumerate(targets):
        images.append({"id": i, "height": 64, "width": 64})
        scores = torch.linspace(1.0, 0.5, len(t["boxes"]))
        for (x0, y0, x1, y1), label, score in zip(t["boxes"].tolist(), t["labels"].tolist(), scores.tolist()):
            gts.append({"id": len(gts) + 1, "image_id": i, "category_id": label, "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
            dts.append({"image_id": i, "category_id": label, "score": score,
                        "bbox": [x0 + shift, y0 + shift, x1 - x0, y1 - y0]})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": gts, "categories": [{"id": c} for c in (1, 2, 3)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dts), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0]


def test_map_perfect_is_one_and_shifted_is_lower_matching_pycocotools():
    data = ShapesDetectionDataModule(num_val=20, batch_size=2, image_size=64, max_object_size=24)
    targets = [data.dataset("val")[i][1] for i in range(20)]
    results = {}
    for shift in (0.0, 3.0):
        model = DetectionModule(_Oracle(targets, shift), num_classes=4)
        metrics = _trainer().validate(model, data, verbose=False)[0]
        results[shift] = metrics["val/map"]
        assert metrics["val/map"] == pytest.approx(_pycocotools_map(targets, shift), abs=1e-6)
    assert results[0.0] == pytest.approx(1.0)
    assert results[3.0] < 0.7


def test_predict_returns_torchvision_detections():
    torch.manual_seed(0)
    model = DetectionModule("fcos", num_classes=4, **TINY)
    data = ShapesDetectionDataModule(num_test=3, batch_size=2, image_size=64, max_object_size=24)
    batches = _trainer().predict(model, data)
    assert len(batches) == 2 and [len(b) for b in batches] == [2, 1]
    for det in batches[0]:
        assert set(det) == {"boxes", "scores", "labels"} and det["boxes"].shape[-1] == 4


def test_warmup_scales_the_learning_rate_without_touching_the_schedule():
    model = DetectionModule("retinanet", num_classes=4, warmup_steps=10, warmup_factor=0.1, **TINY)
    data = ShapesDetectionDataModule(num_train=6, batch_size=2, image_size=64, max_object_size=24)
    seen = []

    class Spy(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(optimizer.param_groups[0]["lr"])

    trainer = _trainer(max_steps=3, limit_val_batches=0, callbacks=[Spy()])
    trainer.fit(model, data)
    assert seen == pytest.approx([0.01 * 0.1, 0.01 * (0.1 * 0.9 + 0.1), 0.01 * (0.1 * 0.8 + 0.2)])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)


def test_hyperparameters_rebuild_the_same_detector_and_backbone_options():
    torch.manual_seed(0)
    model = DetectionModule("fcos", num_classes=4, neck="ifpn", **TINY).eval()
    clone = DetectionModule(**model.hparams).eval()  # what load_from_checkpoint does
    clone.load_state_dict(model.state_dict())
    image = ShapesDetectionDataModule(image_size=64, max_object_size=24).dataset("val")[0][0]
    with torch.no_grad():
        a, b = model([image])[0], clone([image])[0]
    assert type(clone.net).__name__ == "FCOS" and torch.equal(a["scores"], b["scores"])

    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = DetectionModule("retinanet", num_classes=4, backbone_norm="frozen", trainable_layers=2, **TINY)
    body = frozen.net.backbone.body
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    trainable = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3"}  # layer4 is cut off (returned_layers=[2, 3]); layer2, layer1 and the stem frozen
    with pytest.raises(ValueError, match="backbone_norm='group'"):
        DetectionModule(backbone_norm="group")


def test_timm_features_backbone_with_ifpn():
    torch.manual_seed(0)
    model = DetectionModule("retinanet", num_classes=4, backbone="timm:resnet10t", neck="ifpn", **TINY)
    fpn = model.net.backbone.fpn
    assert fpn.in_channels_list == [128, 256]  # timm's feature_info channels of out_indices 2, 3
    image, target = ShapesDetectionDataModule(image_size=64, max_object_size=24).dataset("train")[0]
    losses = model.net([image], [target])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values()) and fpn.last_stats.backward is not None
    with pytest.raises(ValueError, match="not in timm's registry"):
        DetectionModule(backbone="timm:no_such_net")


def test_map_counts_each_image_id_once_like_an_unpadded_evaluation():
    """DistributedSampler padding repeats images; the metric must evaluate each image id once."""
    from torchmetrics.detection import MeanAveragePrecision

    from lightning_nd.modules.detection import coco_map

    def item(image_id, gt, det):
        target = {"boxes": torch.tensor([gt]), "labels": torch.tensor([1]), "image_id": torch.tensor(image_id)}
        pred = {"boxes": torch.tensor([det]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
        return pred, target

    a = item(0, [0.0, 0, 10, 10], [0.0, 0, 10, 13])  # IoU 0.77: a true positive only at low IoU thresholds
    b = item(1, [20.0, 20, 30, 30], [20.0, 20, 30, 30])
    reference, padded, naive = coco_map(), coco_map(), MeanAveragePrecision(box_format="xyxy", backend="pycocotools")
    reference.update([a[0], b[0]], [a[1], b[1]])
    for metric in (padded, naive):
        metric.update([a[0], b[0]], [a[1], b[1]])
        metric.update([a[0]], [a[1]])  # the padding sample of a 2-rank run over 3 "slots"
    expected = float(reference.compute()["map"])
    assert float(padded.compute()["map"]) == pytest.approx(expected, abs=1e-9)
    assert float(padded.compute()["map"]) == pytest.approx(expected, abs=1e-9)  # compute leaves the states intact
    assert abs(float(naive.compute()["map"]) - expected) > 1e-3  # the duplicate does move plain mAP


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_training_ignores_crowd_boxes():
    torch.manual_seed(0)
    model = DetectionModule("retinanet", num_classes=4, **TINY)
    image, target = ShapesDetectionDataModule(image_size=64, max_object_size=24).dataset("train")[0]
    crowd = {**target, "boxes": torch.cat([target["boxes"], torch.tensor([[0.0, 0, 30, 30]])]),
             "labels": torch.cat([target["labels"], torch.tensor([1])]),
             "iscrowd": torch.tensor([0] * len(target["labels"]) + [1])}
    torch.testing.assert_close(model.training_step(([image], [crowd]), 0), model.training_step(([image], [target]), 0))
