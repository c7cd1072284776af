"""CocoDetectionDataModule on a tiny COCO-format folder written from shapes images."""

import json

import pytest
import torch
from PIL import Image

from lightning_nd.datamodules import CocoDetectionDataModule, ShapesDetectionDataModule

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
    shapes = ShapesDetectionDataModule(image_size=64, max_size=24)
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
