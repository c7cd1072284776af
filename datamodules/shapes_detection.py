"""Synthetic object detection: circles, rectangles and triangles on flat backgrounds, with exact boxes.

Every image is rendered on demand from its own seed ``(seed, split, index)``, so a dataset is deterministic,
independent of the loader order and of worker processes, and costs no disk. Each shape is rasterised into a
boolean mask first and its box is read off that mask (``[x0, y0, x1, y1]`` in pixel-edge coordinates: pixel
column ``c`` spans ``[c, c + 1)``), so the box is exactly the extent of the drawn pixels. Shapes never overlap
(their boxes keep a one-pixel gap), so nothing is occluded, and each shape has its own colour, at least
``min_contrast`` away from the background in some channel.

Targets follow torchvision's detection convention: ``dict(boxes=float32 (N, 4) xyxy, labels=int64 (N,))`` with
labels ``1..K`` (``0`` is the background), and a batch is ``(list_of_images, list_of_targets)``. Images are
float ``(3, H, W)`` in ``[0, 1]``; torchvision detectors normalise them themselves.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_nd.datamodules.base import SplitDataModule

SHAPES = ("circle", "rectangle", "triangle")


def detection_collate(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[list, list]:
    """Collate detection samples as lists: images may differ in size and targets in box count."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def _shape_mask(kind: str, rng: np.random.Generator, size: int, min_size: int, max_size: int) -> np.ndarray | None:
    """Rasterise one shape into a tight boolean mask (every row and column of the mask holds a shape pixel)."""
    if kind == "rectangle":
        h, w = rng.integers(min_size, max_size + 1, size=2)
        mask = np.ones((h, w), dtype=bool)
    elif kind == "circle":
        r = int(rng.integers(max(min_size // 2, 1), max_size // 2 + 1))
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        mask = yy**2 + xx**2 <= r * r
    elif kind == "triangle":
        h, w = rng.integers(min_size, max_size + 1, size=2)
        # one vertex on the top edge, two on the bottom edge, jittered: a filled triangle, tested at pixel centres
        top = rng.uniform(0, w)
        left, right = sorted(rng.uniform(0, w, size=2))
        if right - left < w / 3:
            left, right = 0.0, float(w)
        verts = np.array([[top, 0.0], [left, float(h)], [right, float(h)]])
        yy, xx = np.mgrid[0:h, 0:w] + 0.5
        pts = np.stack([xx, yy], -1)

        def side(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return (b[0] - a[0]) * (pts[..., 1] - a[1]) - (b[1] - a[1]) * (pts[..., 0] - a[0])

        s = [side(verts[i], verts[(i + 1) % 3]) for i in range(3)]
        mask = ((s[0] >= 0) & (s[1] >= 0) & (s[2] >= 0)) | ((s[0] <= 0) & (s[1] <= 0) & (s[2] <= 0))
    else:  # pragma: no cover - guarded by the datamodule's validation
        raise ValueError(f"unknown shape {kind!r}; allowed: {SHAPES}")
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) < 2 or len(cols) < 2 or mask.shape[0] > size or mask.shape[1] > size:
        return None
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def render_shapes(
    seed: tuple[int, ...] | int,
    image_size: int = 96,
    min_shapes: int = 1,
    max_shapes: int = 4,
    min_object_size: int = 12,
    max_object_size: int = 40,
    shapes: tuple[str, ...] = SHAPES,
    min_contrast: float = 0.3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw one image; return ``(image HxWx3 float32, boxes (N, 4) xyxy, labels (N,) 1-based, masks (N, H, W))``.

    A shape is placed only where its box, grown by one pixel, meets no earlier box; after 50 failed placements
    the image keeps the shapes it has (at least ``min_shapes`` is therefore a target, not a guarantee, for
    crowded settings; the defaults always reach it).
    """
    rng = np.random.default_rng(seed)
    bg = rng.uniform(0.0, 1.0, size=3)
    image = np.broadcast_to(bg, (image_size, image_size, 3)).astype(np.float32).copy()
    want = int(rng.integers(min_shapes, max_shapes + 1))
    boxes: list[list[int]] = []
    labels: list[int] = []
    masks: list[np.ndarray] = []
    colours = [bg]
    for _ in range(50 * max(want, 1)):
        if len(boxes) >= want:
            break
        label = int(rng.integers(len(shapes)))
        mask = _shape_mask(shapes[label], rng, image_size, min_object_size, max_object_size)
        if mask is None:
            continue
        h, w = mask.shape
        y0, x0 = int(rng.integers(0, image_size - h + 1)), int(rng.integers(0, image_size - w + 1))
        box = [x0, y0, x0 + w, y0 + h]
        if any(box[0] <= b[2] and b[0] <= box[2] and box[1] <= b[3] and b[1] <= box[3] for b in boxes):
            continue  # touching or overlapping an earlier shape (the gap keeps boxes tight on visible pixels)
        colour = rng.uniform(0.0, 1.0, size=3)
        if any(np.abs(colour - c).max() < min_contrast for c in colours):
            continue
        full = np.zeros((image_size, image_size), dtype=bool)
        full[y0 : y0 + h, x0 : x0 + w] = mask
        image[full] = colour.astype(np.float32)
        boxes.append(box)
        labels.append(label + 1)
        masks.append(full)
        colours.append(colour)
    return (
        image,
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64),
        np.asarray(masks, dtype=bool).reshape(-1, image_size, image_size),
    )


class ShapesDataset(Dataset):
    """``length`` rendered images of one split; item ``i`` is ``(image (3, S, S), dict(boxes, labels, image_id))``.

    Args:
        length: number of images.
        seed: base seed; image ``i`` of split ``split_id`` is drawn from ``(seed, split_id, i)``.
        split_id: 0 train, 1 val, 2 test (so the splits never share images).
        render_kwargs: keyword arguments of :func:`render_shapes`.

    Raises:
        IndexError: for an index outside ``0 .. length - 1``.

    Example::

        ds = ShapesDataset(100, seed=0, split_id=0, image_size=64, max_object_size=24)
        image, target = ds[0]   # (3, 64, 64) float in [0, 1]; target["boxes"] (N, 4) xyxy, target["labels"] (N,)
    """

    def __init__(self, length: int, seed: int, split_id: int, **render_kwargs: Any) -> None:
        self.length, self.seed, self.split_id, self.render_kwargs = length, seed, split_id, render_kwargs

    def __len__(self) -> int:
        return self.length

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The raw arrays of image ``index`` (see :func:`render_shapes`), including the instance masks."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        return render_shapes((self.seed, self.split_id, index), **self.render_kwargs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, boxes, labels, _ = self.render(index)
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "image_id": torch.tensor(index, dtype=torch.int64),
        }
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), target


class ShapesDetectionDataModule(SplitDataModule):
    """Deterministic synthetic detection data: circles, rectangles and triangles with exact boxes.

    The embedded default of the detection family: no files, no downloads, seconds to render. ``num_classes``
    follows torchvision (``len(shapes) + 1``: the background is class 0), so it can be compared directly with a
    detector's ``num_classes``.

    Args:
        batch_size: images per training batch and per process.
        num_train, num_val, num_test: images per split.
        image_size: side length of the square images.
        min_shapes, max_shapes: objects per image (``min_shapes=0`` yields some images without boxes,
            ``max_shapes=0`` only such images).
        min_object_size, max_object_size: side length range of a shape's box, in pixels (named apart from the
            detector's ``min_size``/``max_size`` resize range, so the two never collide in a run's hyperparameters).
        shapes: which shapes to draw, a subset of ``("circle", "rectangle", "triangle")``; label ``i + 1`` is
            ``shapes[i]``.
        seed: base seed of all splits.
        num_workers: loader worker processes.
        eval_batch_size: batch size for validation, test and predict; default ``batch_size``.

    Raises:
        ValueError: for non-positive sizes or counts, ``min_shapes > max_shapes``, ``min_object_size > max_object_size``, a
            ``max_object_size`` larger than the image, or an unknown or repeated shape name.

    Example::

        dm = ShapesDetectionDataModule(image_size=96, batch_size=2)
        dm.setup("fit")
        images, targets = next(iter(dm.train_dataloader()))  # lists; targets[0]["boxes"] is (N, 4) xyxy
    """

    collate_fn = staticmethod(detection_collate)  # images and targets stay lists (torchvision detectors)

    def __init__(
        self,
        batch_size: int = 2,
        num_train: int = 256,
        num_val: int = 32,
        num_test: int = 32,
        image_size: int = 96,
        min_shapes: int = 1,
        max_shapes: int = 4,
        min_object_size: int = 12,
        max_object_size: int = 40,
        shapes: tuple[str, ...] | list[str] = SHAPES,
        seed: int = 0,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        for name, value in (("num_train", num_train), ("image_size", image_size),
                            ("min_object_size", min_object_size)):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        for name, value in (("num_val", num_val), ("num_test", num_test), ("min_shapes", min_shapes),
                            ("max_shapes", max_shapes)):
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0")
        if min_shapes > max_shapes:
            raise ValueError(f"min_shapes={min_shapes} must be <= max_shapes={max_shapes}")
        if min_object_size < 3 or min_object_size > max_object_size:
            raise ValueError(f"need 3 <= min_object_size <= max_object_size, got min_object_size={min_object_size}, "
                             f"max_object_size={max_object_size}")
        if max_object_size > image_size:
            raise ValueError(f"max_object_size={max_object_size} must be <= image_size={image_size}")
        shapes = tuple(shapes)
        unknown = [s for s in shapes if s not in SHAPES]
        if not shapes or unknown or len(set(shapes)) != len(shapes):
            raise ValueError(f"shapes={list(shapes)} must be distinct names from {SHAPES}")
        self.save_hyperparameters()
        self.seed, self.shapes = seed, shapes
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.render_kwargs = {"image_size": image_size, "min_shapes": min_shapes, "max_shapes": max_shapes,
                                  "min_object_size": min_object_size, "max_object_size": max_object_size, "shapes": shapes}
        self.num_classes = len(shapes) + 1
        self.class_names = ("background", *shapes)
        self.input_shape = (3, image_size, image_size)

    def dataset(self, split: str) -> ShapesDataset:
        """The dataset of ``split`` (``"train"``, ``"val"`` or ``"test"``), built without ``setup``."""
        if split not in self.sizes:
            raise ValueError(f"split={split!r} is not supported; allowed: {tuple(self.sizes)}")
        split_id = tuple(self.sizes).index(split)
        return ShapesDataset(self.sizes[split], self.seed, split_id, **self.render_kwargs)

    def setup(self, stage: str | None = None) -> None:
        self.train_dataset, self.val_dataset, self.test_dataset = (self.dataset(s) for s in ("train", "val", "test"))
