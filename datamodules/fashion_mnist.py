"""Fashion-MNIST (60k train + 10k test, 28x28, 10 classes) from local idx files, offline by default."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lightning_nd.datamodules.base import ClassificationDataModule, ImageTensorDataset, check_choice

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw): uint8 payload after a 16-byte (images) or 8-byte (labels) header."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem, folder / "FashionMNIST" / "raw" / stem):
        if candidate.is_file():
            return candidate
    return None


class FashionMNISTDataModule(ClassificationDataModule):
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, a folder of idx files, or a download.

    The validation split is ``val_size`` images held out of the official training set by ``split_seed``;
    the test split is the official 10k test set. ``train_subset`` keeps a seeded subset of the remaining
    training images for CPU-sized runs.

    Args:
        data_dir: folder with the four idx files (``.gz`` or raw, or torchvision's ``FashionMNIST/raw``).
        download: fetch the files with torchvision into ``data_dir`` when they are missing (needs network).
        image_size: output side (>= 28): 32 with ``channels=3`` gives CIFAR-shaped inputs.
        resize: ``"pad"`` or ``"interpolate"``.
        channels: 1, or 3 to replicate the gray channel.
        val_size: images held out of the training set for validation.
        train_subset: keep only this many training images (``None``: all).
        split_seed: seed of the split and the subset.
        augment: random crop + horizontal flip on the training split.
        batch_size, num_workers, eval_batch_size: see :class:`ClassificationDataModule`.

    Raises:
        FileNotFoundError: at setup, when no idx files are found and ``download`` is off; the message names the
            folder and the three ways to get the data.
        ValueError: on bad sizes, an unknown resize mode or a channel count other than 1 or 3.

    Example::

        dm = FashionMNISTDataModule(image_size=32, channels=3, train_subset=10_000)
    """

    num_classes = 10

    def __init__(
        self,
        data_dir: str = DEBIAN_DIR,
        download: bool = False,
        batch_size: int = 128,
        image_size: int = 28,
        resize: Literal["pad", "interpolate"] = "pad",
        channels: int = 1,
        val_size: int = 5000,
        train_subset: int | None = None,
        split_seed: int = 0,
        augment: bool = False,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        if image_size < 28:
            raise ValueError(f"image_size={image_size} is smaller than the 28x28 images; allowed: >= 28")
        check_choice("resize", resize, ("pad", "interpolate"))
        check_choice("channels", channels, (1, 3))
        if not 0 < val_size < 60000:
            raise ValueError(f"val_size={val_size} must be in [1, 59999]")
        if train_subset is not None and not 0 < train_subset <= 60000 - val_size:
            raise ValueError(f"train_subset={train_subset} must be in [1, {60000 - val_size}] or None")
        self.data_dir, self.download = Path(data_dir), download
        self.image_size, self.resize, self.channels = image_size, resize, channels
        self.val_size, self.train_subset, self.split_seed, self.augment = val_size, train_subset, split_seed, augment
        self.input_shape = (channels, image_size, image_size)

    def _paths(self) -> dict[str, Path]:
        found = {key: _find(self.data_dir, stem) for key, stem in _FILES.items()}
        missing = [key for key, path in found.items() if path is None]
        if missing and self.download:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(self.data_dir), train=True, download=True)
            FashionMNIST(str(self.data_dir), train=False, download=True)
            found = {key: _find(self.data_dir, stem) for key, stem in _FILES.items()}
            missing = [key for key, path in found.items() if path is None]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST not found in data_dir={str(self.data_dir)!r} (missing {', '.join(missing)}). "
                f"Options: `apt-get install dataset-fashion-mnist` (files land in {DEBIAN_DIR}), "
                "set data_dir to a folder with the four idx files, or pass download=True when online."
            )
        return found  # type: ignore[return-value]

    def prepare_data(self) -> None:
        self._paths()

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        paths = self._paths()
        arrays = {key: torch.from_numpy(read_idx(path).copy()) for key, path in paths.items()}
        train_images, train_labels = arrays["train_images"], arrays["train_labels"].long()
        order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(self.split_seed))
        val_idx, train_idx = order[: self.val_size], order[self.val_size :]
        if self.train_subset is not None:
            train_idx = train_idx[: self.train_subset]
        common = {
            "scale": 255.0,
            "mean": 0.2860,
            "std": 0.3530,
            "image_size": self.image_size,
            "resize": self.resize,
            "channels": self.channels,
        }
        self.train_dataset = ImageTensorDataset(
            train_images[train_idx], train_labels[train_idx], augment=self.augment, **common
        )
        self.val_dataset = ImageTensorDataset(train_images[val_idx], train_labels[val_idx], **common)
        self.test_dataset = ImageTensorDataset(arrays["test_images"], arrays["test_labels"].long(), **common)
