"""scikit-learn's bundled 8x8 handwritten digits: the embedded default dataset, never touches the network."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from lightning_nd.datamodules.base import ClassificationDataModule, ImageTensorDataset, check_choice


class DigitsDataModule(ClassificationDataModule):
    """1,797 images of 8x8 digits in 10 classes, with a fixed seeded train/val split.

    ``image_size=32, channels=3`` gives CIFAR-shaped inputs (3x32x32) so CIFAR networks run on it.
    The test split is the validation split (the dataset has no separate test set).

    Args:
        image_size: output side (>= 8); larger sizes pad or interpolate (``resize``).
        resize: ``"pad"`` (centre in background) or ``"interpolate"`` (bilinear upscaling).
        channels: 1, or 3 to replicate the gray channel.
        val_fraction: share of the data held out for validation, split by ``split_seed``.
        split_seed: seed of the split; independent of the training seed so runs compare on the same data.
        augment: random-crop augmentation of the training split.
        batch_size, num_workers, eval_batch_size: see :class:`ClassificationDataModule`.

    Raises:
        ValueError: on an image size below 8, an unknown resize mode, a channel count other than 1 or 3,
            or a validation fraction outside (0, 1).

    Example::

        dm = DigitsDataModule(image_size=32, channels=3)
        trainer.fit(model, datamodule=dm)
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int = 8,
        resize: Literal["pad", "interpolate"] = "interpolate",
        channels: int = 1,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        augment: bool = False,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        if image_size < 8:
            raise ValueError(f"image_size={image_size} is smaller than the 8x8 digits; allowed: >= 8")
        check_choice("resize", resize, ("pad", "interpolate"))
        check_choice("channels", channels, (1, 3))
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
        self.image_size, self.resize, self.channels = image_size, resize, channels
        self.val_fraction, self.split_seed, self.augment = val_fraction, split_seed, augment
        self.input_shape = (channels, image_size, image_size)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.uint8))  # values 0..16
        labels = torch.from_numpy(digits.target.astype(np.int64))
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = round(len(labels) * self.val_fraction)
        val_idx, train_idx = order[:n_val], order[n_val:]
        common = {
            "scale": 16.0, "mean": 0.3, "std": 0.4, "image_size": self.image_size, "resize": self.resize, "channels": self.channels
        }
        self.train_dataset = ImageTensorDataset(
            images[train_idx], labels[train_idx], augment=self.augment, hflip=False, **common
        )
        self.val_dataset = ImageTensorDataset(images[val_idx], labels[val_idx], **common)
        self.test_dataset = self.val_dataset
