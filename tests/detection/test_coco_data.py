"""CocoDetectionDataModule on a tiny COCO-format folder written from shapes images."""

import contextlib
import io
import json

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_iou

from lightning_nd.datamodules import CocoDetectionDataModule, ShapesDetectionDataModule
from lightning_nd.modules import DetectionModule

CATEGORY_IDS = {1: 3, 2: 7, 3: 11}  # shapes label -> sparse COCO category id


def _write_split(root, split, dataset, n):
    (root / split).mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        image, target = dataset[i]
        name = f"img_{i:03d}.png"
        pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(root / split / name)
        image_id = 100 + i
        images.append({"id": image_id, "file_name": name, "height": image.shape[1], "width": image.shape[2]})
        if i == n - 1:
            continue  # the last image has no annotations
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            x0, y0, x1, y1 = box
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": CATEGORY_IDS[label],
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    # a crowd region on the first image: must not become a target
    anns.append({"id": len(anns) + 1, "image_id": 100, "category_id": 3, "bbox": [0, 0, 10, 10], "area": 100,
                 "iscrowd": 1})
    cats = [{"id": c, "name": n} for n, c in zip(("circle", "rectangle", "triangle"), CATEGORY_IDS.values())]
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))


@pytest.fixture
def coco_root(tmp_path):
    shapes = ShapesDetectionDataModule(image_size=64, max_object_size=24)
    _write_split(tmp_path / "coco", "train2017", shapes.dataset("train"), 4)
    _write_split(tmp_path / "coco", "val2017", shapes.dataset("val"), 3)
    return tmp_path / "coco", shapes


def test_coco_targets_equal_the_source_boxes(coco_root):
    root, shapes = coco_root
    dm = CocoDetectionDataModule(str(root), batch_size=2, hflip=False, remove_images_without_annotations=False)
    assert dm.category_ids == [3, 7, 11] and dm.num_classes == 4
    dm.setup("fit")
    assert len(dm.train_dataset) == 4 and len(dm.val_dataset) == 3
    source = shapes.dataset("train")
    for i in range(4):
        image, target = dm.train_dataset[i]
        src_image, src_target = source[i]
        assert torch.allclose(image, src_image, atol=0.5 / 255 + 1e-6)  # PNG round trip
        if i == 3:
            assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
        else:
            assert torch.equal(target["boxes"], src_target["boxes"])
            assert torch.equal(target["labels"], src_target["labels"])  # contiguous labels 1..3 in id order
        assert int(target["image_id"]) == 100 + i
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, list) and len(targets) == 2


def test_coco_raw_ids_flip_and_empty_removal(coco_root):
    root, shapes = coco_root
    dm = CocoDetectionDataModule(str(root), contiguous_labels=False, hflip=True, remove_images_without_annotations=True)
    assert dm.num_classes == 12
    dm.setup("fit")
    assert len(dm.train_dataset) == 3 and len(dm.val_dataset) == 3  # empty image dropped from train only
    torch.manual_seed(0)
    flipped = 0
    for _ in range(8):
        image, target = dm.train_dataset[0]
        src_image, src_target = shapes.dataset("train")[0]
        assert set(target["labels"].tolist()) <= {3, 7, 11}
        if not torch.allclose(image, src_image, atol=1e-2):
            flipped += 1
            expected = src_target["boxes"].clone()
            expected[:, [0, 2]] = 64 - src_target["boxes"][:, [2, 0]]
            assert torch.equal(target["boxes"], expected)
            assert torch.allclose(image, src_image.flip(-1), atol=0.5 / 255 + 1e-6)
    assert 0 < flipped < 8


def test_coco_missing_files(tmp_path):
    dm = CocoDetectionDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="batch_size"):
        CocoDetectionDataModule(batch_size=0)


def _cocoeval_map(annotation_file, detections):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
        ev = COCOeval(gt, gt.loadRes(detections), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0]


class _Replay(torch.nn.Module):
    """Replays fixed detections for the (unshuffled) evaluation images, in order."""

    def __init__(self, detections):
        super().__init__()
        self.detections, self.i = detections, 0
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images, targets=None):
        out = self.detections[self.i: self.i + len(images)]
        self.i += len(images)
        return out


def test_map_with_crowd_regions_equals_cocoeval(coco_root):
    """A confident detection on a crowd region is ignored by COCOeval; dropping crowds made it a false positive."""
    root, _ = coco_root
    dm = CocoDetectionDataModule(str(root), batch_size=2, hflip=False)
    dm.setup("validate")
    val = dm.val_dataset
    crowd_target = val.target(100)
    assert crowd_target["iscrowd"].tolist().count(1) == 1  # evaluation targets keep the crowd region
    real = crowd_target["boxes"][crowd_target["iscrowd"] == 0]
    crowd_box = crowd_target["boxes"][crowd_target["iscrowd"] == 1][0]
    assert float(box_iou(crowd_box[None], real).max()) < 0.5  # the crowd detection cannot match a real object

    label_to_cat = dict(zip((1, 2, 3), sorted(CATEGORY_IDS.values())))
    for shift in (0.0, 2.0):
        preds, coco_dets = [], []
        for image_id in val.ids:
            t = val.target(image_id)
            keep = t["iscrowd"] == 0
            boxes, labels = t["boxes"][keep] + shift, t["labels"][keep]
            scores = torch.linspace(0.9, 0.5, len(boxes))
            if image_id == 100:  # the most confident detection of the set covers the crowd region
                boxes = torch.cat([crowd_box[None], boxes])
                labels = torch.cat([t["labels"][~keep], labels])
                scores = torch.cat([torch.ones(1), scores])
            preds.append({"boxes": boxes, "scores": scores, "labels": labels})
            for (x0, y0, x1, y1), label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist()):
                coco_dets.append({"image_id": image_id, "category_id": label_to_cat[label], "score": score,
                                  "bbox": [x0, y0, x1 - x0, y1 - y0]})
        expected = _cocoeval_map(dm.annotation_file("val"), coco_dets)
        model = DetectionModule(_Replay(preds), num_classes=dm.num_classes)
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        got = trainer.validate(model, dm, verbose=False)[0]["val/map"]
        assert got == pytest.approx(expected, abs=1e-6), shift
        if shift == 0.0:
            assert expected == pytest.approx(1.0)
