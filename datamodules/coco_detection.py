"""COCO-format detection folders (COCO 2017 itself, or any dataset exported in its JSON format).

Annotations are read with pycocotools and turned into torchvision's detection targets: ``dict(boxes=float32
(N, 4) xyxy, labels=int64 (N,), iscrowd=int64 (N,), area=float32 (N,), image_id=int64)``. COCO boxes are
``[x, y, w, h]`` in pixel-edge coordinates, so ``xyxy = [x, y, x + w, y + h]``; ``area`` is the annotation's own
(segment) area, which COCOeval's small/medium/large ranges use. Crowd annotations (``iscrowd=1``) are dropped from
training targets (they are not objects to learn; torchvision's reference does the same) and kept in evaluation
targets, where COCOeval, and torchmetrics given ``iscrowd``, let detections on crowd regions match them without
counting as false positives; dropping them would bias mAP low. Boxes without area are dropped. Category ids,
sparse in COCO (1..90), are mapped to contiguous labels ``1..K`` in sorted id order unless ``contiguous_labels=False``,
in which case the raw ids are the labels and ``num_classes = max id + 1`` (torchvision's convention for COCO: 91).
Images are float ``(3, H, W)`` in ``[0, 1]``; the detector resizes and normalises them.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from torch.utils.data import Dataset

from lightning_nd.datamodules.base import SplitDataModule
from lightning_nd.datamodules.shapes_detection import detection_collate


class CocoDetectionDataset(Dataset):
    """Images of one folder with their COCO annotations as torchvision targets.

    Args:
        image_dir: folder holding the files named in the annotation's ``images[].file_name``.
        annotation_file: the COCO JSON file.
        category_ids: the category ids of the label space, in label order (label ``i + 1`` is
            ``category_ids[i]``); ``None`` uses the file's sorted ids, or raw ids with ``contiguous=False``.
        contiguous: map category ids to ``1..K`` (``True``) or keep the raw ids as labels.
        hflip: flip images and boxes horizontally with probability 0.5 (training augmentation).
        remove_empty: drop images without any non-crowd annotation.
        keep_crowd: keep crowd annotations (with ``iscrowd=1``) in the targets: for evaluation, not training.

    Raises:
        FileNotFoundError: when the folder or the annotation file is missing.

    Example::

        ds = CocoDetectionDataset("coco/val2017", "coco/annotations/instances_val2017.json")
        image, target = ds[0]   # target: boxes (N, 4) xyxy, labels (N,) in 1..80, iscrowd, area, image_id
    """

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        category_ids: list[int] | None = None,
        contiguous: bool = True,
        hflip: bool = False,
        remove_empty: bool = False,
        keep_crowd: bool = False,
    ) -> None:
        from pycocotools.coco import COCO

        self.image_dir, annotation_file = Path(image_dir), Path(annotation_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder {self.image_dir} does not exist")
        if not annotation_file.is_file():
            raise FileNotFoundError(f"annotation file {annotation_file} does not exist")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO(str(annotation_file))
        self.category_ids = sorted(self.coco.getCatIds()) if category_ids is None else list(category_ids)
        self.contiguous, self.hflip, self.keep_crowd = contiguous, hflip, keep_crowd
        self.label_of = {c: (i + 1 if contiguous else c) for i, c in enumerate(self.category_ids)}
        self.ids = sorted(self.coco.getImgIds())
        if remove_empty:
            self.ids = [i for i in self.ids if bool((self.target(i)["iscrowd"] == 0).any())]

    def __len__(self) -> int:
        return len(self.ids)

    def target(self, image_id: int) -> dict[str, torch.Tensor]:
        """The torchvision target of one image id (no augmentation)."""
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
        boxes, labels, crowd, area = [], [], [], []
        for ann in anns:
            x, y, w, h = ann["bbox"]
            is_crowd = int(ann.get("iscrowd", 0))
            if (is_crowd and not self.keep_crowd) or w <= 0 or h <= 0 or ann["category_id"] not in self.label_of:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self.label_of[ann["category_id"]])
            crowd.append(is_crowd)
            area.append(float(ann.get("area", w * h)))
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "iscrowd": torch.tensor(crowd, dtype=torch.int64),
            "area": torch.tensor(area, dtype=torch.float32),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        import numpy as np
        from PIL import Image

        image_id = self.ids[index]
        info = self.coco.loadImgs(image_id)[0]
        with Image.open(self.image_dir / info["file_name"]) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0
        target = self.target(image_id)
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
            width = image.shape[-1]
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
            target["boxes"] = boxes
        return image, target


class CocoDetectionDataModule(SplitDataModule):
    """Detection data from a COCO-layout folder: ``<data_dir>/<split>/`` images and
    ``<data_dir>/annotations/instances_<split>.json``.

    The label space (and ``num_classes``, background included, torchvision's convention) comes from the
    training annotation file and is shared by all splits.

    Args:
        data_dir: the dataset root.
        train_split, val_split, test_split: folder names of the splits (``test_split=None`` reuses val).
        annotation_pattern: path of a split's annotation file relative to ``data_dir``; ``{split}`` is replaced.
        batch_size: images per training batch and per process.
        eval_batch_size: batch size for validation, test and predict; default ``batch_size``.
        num_workers: loader worker processes.
        contiguous_labels: map category ids to ``1..K`` (default) or keep raw COCO ids.
        hflip: random horizontal flips for training.
        remove_images_without_annotations: drop training images without boxes (torchvision's reference does).

    Raises:
        ValueError: for ``batch_size < 1`` or ``num_workers < 0``.
        FileNotFoundError: at setup, naming the missing folder or annotation file.

    Example::

        dm = CocoDetectionDataModule("/data/coco", batch_size=2, num_workers=4)
        model = DetectionModule(num_classes=dm.num_classes, ...)  # 81 for COCO 2017
    """

    collate_fn = staticmethod(detection_collate)  # images and targets stay lists (torchvision detectors)

    def __init__(
        self,
        data_dir: str = "data/coco",
        train_split: str = "train2017",
        val_split: str = "val2017",
        test_split: str | None = None,
        annotation_pattern: str = "annotations/instances_{split}.json",
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        contiguous_labels: bool = True,
        hflip: bool = True,
        remove_images_without_annotations: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.splits = {"train": train_split, "val": val_split, "test": test_split or val_split}
        self.annotation_pattern = annotation_pattern
        self.contiguous, self.hflip = contiguous_labels, hflip
        self.remove_empty = remove_images_without_annotations
        self._category_ids: list[int] | None = None

    def annotation_file(self, split: str) -> Path:
        """The annotation JSON of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        return self.data_dir / self.annotation_pattern.format(split=self.splits[split])

    @property
    def category_ids(self) -> list[int]:
        """Category ids of the training annotations, sorted: label ``i + 1`` is ``category_ids[i]``."""
        if self._category_ids is None:
            import json

            path = self.annotation_file("train")
            if not path.is_file():
                raise FileNotFoundError(f"annotation file {path} does not exist")
            self._category_ids = sorted(c["id"] for c in json.loads(path.read_text())["categories"])
        return self._category_ids

    @property
    def num_classes(self) -> int:
        """Classes including the background 0: ``K + 1``, or ``max id + 1`` for raw labels."""
        ids = self.category_ids
        return len(ids) + 1 if self.contiguous else max(ids) + 1

    def _dataset(self, split: str, train: bool) -> CocoDetectionDataset:
        return CocoDetectionDataset(
            self.data_dir / self.splits[split],
            self.annotation_file(split),
            category_ids=self.category_ids,
            contiguous=self.contiguous,
            hflip=train and self.hflip,
            remove_empty=train and self.remove_empty,
            keep_crowd=not train,
        )

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_dataset = self._dataset("train", train=True)
        if stage in (None, "fit", "validate"):
            self.val_dataset = self._dataset("val", train=False)
        if stage in (None, "test", "predict"):
            self.test_dataset = self._dataset("test", train=False)
