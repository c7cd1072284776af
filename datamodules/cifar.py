"""CIFAR-10 / CIFAR-100 through torchvision, with the standard crop + flip augmentation (for GPU users)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import random_split

from lightning_nd.datamodules.base import ClassificationDataModule, check_choice

CIFAR_STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class CIFARDataModule(ClassificationDataModule):
    """CIFAR-10 or CIFAR-100 (torchvision) with random crop (pad 4) + horizontal flip for training.

    Args:
        data_dir: torchvision root folder.
        num_classes: 10 or 100.
        download: let torchvision download the archive when it is missing (needs network).
        val_size: images held out of the training set for validation (0: validate on the test set).
        split_seed: seed of that split.
        augment: crop + flip on the training split.
        batch_size, num_workers, eval_batch_size: see :class:`ClassificationDataModule`.

    Raises:
        ValueError: on a class count other than 10 or 100.
        FileNotFoundError: at setup, when the data is missing and ``download`` is off.

    Example::

        dm = CIFARDataModule("data/", num_classes=10, download=True, batch_size=128, num_workers=4)
    """

    input_shape = (3, 32, 32)

    def __init__(
        self,
        data_dir: str = "data",
        num_classes: int = 10,
        download: bool = False,
        batch_size: int = 128,
        val_size: int = 0,
        split_seed: int = 0,
        augment: bool = True,
        num_workers: int = 4,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        check_choice("num_classes", num_classes, (10, 100))
        self.data_dir, self.num_classes, self.download = data_dir, num_classes, download
        self.val_size, self.split_seed, self.augment = val_size, split_seed, augment

    def _datasets(self, train: bool, augment: bool):
        from torchvision import datasets, transforms

        mean, std = CIFAR_STATS[self.num_classes]
        steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
        transform = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])
        cls = datasets.CIFAR10 if self.num_classes == 10 else datasets.CIFAR100
        try:
            return cls(str(Path(self.data_dir)), train=train, transform=transform, download=self.download)
        except RuntimeError as err:
            raise FileNotFoundError(
                f"CIFAR-{self.num_classes} not found in data_dir={self.data_dir!r}; pass download=True when online "
                "or point data_dir at a torchvision CIFAR root"
            ) from err

    def prepare_data(self) -> None:
        if self.download:
            self._datasets(True, False)
            self._datasets(False, False)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        train = self._datasets(True, self.augment)
        self.test_dataset = self._datasets(False, False)
        if self.val_size:
            generator = torch.Generator().manual_seed(self.split_seed)
            self.train_dataset, self.val_dataset = random_split(
                train, [len(train) - self.val_size, self.val_size], generator
            )
        else:
            self.train_dataset, self.val_dataset = train, self.test_dataset
