"""ShapesDetectionDataModule: exact boxes, determinism, torchvision target format, validation."""

import numpy as np
import pytest
import torch

from lightning_nd.datamodules import ShapesDetectionDataModule
from lightning_nd.datamodules.shapes_detection import render_shapes


def _foreground(image: np.ndarray) -> np.ndarray:
    """Pixels whose colour differs from the most common colour (the flat background), from the image alone."""
    colours, inverse, counts = np.unique(image.reshape(-1, 3), axis=0, return_inverse=True, return_counts=True)
    return (inverse.reshape(image.shape[:2]) != counts.argmax())


def test_boxes_are_exact_extents_of_the_drawn_pixels():
    dm = ShapesDetectionDataModule(image_size=96, max_shapes=5)
    ds = dm.dataset("train")
    seen = set()
    for i in range(40):
        image, boxes, labels, masks = ds.render(i)
        fg = _foreground(image)
        covered = np.zeros_like(fg)
        for (x0, y0, x1, y1), mask in zip(boxes.astype(int), masks):
            inside = fg[y0:y1, x0:x1]
            # touches all four sides of its box: a drawn pixel in the first/last row and column
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            # the instance mask is exactly the foreground inside the box, and lies within the box
            assert np.array_equal(mask[y0:y1, x0:x1], inside)
            assert mask.sum() == inside.sum()
            covered[y0:y1, x0:x1] = True
        # no drawn pixel outside the boxes
        assert not (fg & ~covered).any()
        seen.update(labels.tolist())
    assert seen == {1, 2, 3}


def test_targets_follow_torchvision_convention_and_are_deterministic():
    dm = ShapesDetectionDataModule(batch_size=3, num_train=6, image_size=64, max_object_size=24, seed=5)
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 3
    for image, target in zip(images, targets):
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
        assert target["labels"].dtype == torch.int64 and (target["labels"] >= 1).all()
        assert (target["boxes"][:, 2:] > target["boxes"][:, :2]).all()
    assert dm.num_classes == 4 and dm.class_names == ("background", "circle", "rectangle", "triangle")
    a, b = dm.dataset("val")[3], ShapesDetectionDataModule(seed=5, image_size=64, max_object_size=24).dataset("val")[3]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    assert not torch.equal(dm.dataset("val")[0][0], dm.dataset("train")[0][0])  # splits never share images


def test_subset_of_shapes_and_empty_images():
    dm = ShapesDetectionDataModule(shapes=["triangle", "circle"], min_shapes=0, max_shapes=1, num_train=30)
    assert dm.num_classes == 3
    counts = [len(dm.dataset("train")[i][1]["boxes"]) for i in range(30)]
    assert 0 in counts and 1 in counts
    image, boxes, labels, masks = render_shapes(0, min_shapes=0, max_shapes=0)
    assert boxes.shape == (0, 4) and labels.shape == (0,) and masks.shape == (0, 96, 96)
    assert (image == image[0, 0]).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_shapes": 3, "max_shapes": 2}, "min_shapes"),
        ({"max_object_size": 200}, "max_object_size"),
        ({"shapes": ["hexagon"]}, "hexagon"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShapesDetectionDataModule(**kwargs)
