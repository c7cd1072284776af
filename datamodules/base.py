"""The shared shape of every classification datamodule in lightning_nd.

A datamodule exposes ``train_dataset`` / ``val_dataset`` / ``test_dataset`` after ``setup`` plus
``num_classes`` and ``input_shape`` (C, H, W), so that models can check themselves against the data
before training and wrappers such as :class:`~lightning_nd.datamodules.RandomLabels` can swap the
training set without knowing how it was built.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


class ImageTensorDataset(Dataset):
    """Grayscale uint8 images ``(N, H, W)`` with int labels, turned into normalised float ``(C, S, S)`` on access.

    Args:
        images: uint8 tensor ``(N, H, W)``.
        labels: int64 tensor ``(N,)``.
        scale: value that maps to 1.0 (255 for 8-bit images, 16 for sklearn digits).
        mean, std: normalisation after scaling.
        image_size: output side length; ``None`` keeps the input size.
        resize: ``"pad"`` centres the image in zeros (padding with the normalised background),
            ``"interpolate"`` rescales bilinearly.
        channels: the output channel count (the gray channel is replicated).
        augment: random crop with 2-pixel (4 for >= 28 px) padding and horizontal flip, seeded per call by torch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        scale: float,
        mean: float,
        std: float,
        image_size: int | None = None,
        resize: str = "pad",
        channels: int = 1,
        augment: bool = False,
        hflip: bool = True,
    ) -> None:
        self.images, self.labels = images, labels
        self.scale, self.mean, self.std = scale, mean, std
        self.image_size, self.resize, self.channels = image_size, resize, channels
        self.augment, self.hflip = augment, hflip

    def __len__(self) -> int:
        return len(self.labels)

    def transform(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.float() / self.scale - self.mean) / self.std
        x = x[None]
        size = self.image_size
        if size is not None and size != x.shape[-1]:
            if self.resize == "pad":
                total = size - x.shape[-1]
                before = total // 2
                background = -self.mean / self.std
                x = F.pad(x, (before, total - before, before, total - before), value=background)
            else:
                x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        if self.augment:
            pad = 4 if x.shape[-1] >= 28 else 2
            side = x.shape[-1]
            x = F.pad(x, (pad, pad, pad, pad), value=float(-self.mean / self.std))
            i, j = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            x = x[:, i : i + side, j : j + side]
            if self.hflip and torch.rand(()) < 0.5:
                x = x.flip(-1)
        return x.expand(self.channels, -1, -1).contiguous()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.labels[index]


def check_choice(name: str, value: object, allowed: tuple) -> None:
    """Raise ``ValueError`` naming ``value`` and the allowed set when it is not one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


class SplitDataModule(pl.LightningDataModule):
    """Base of every lightning_nd datamodule: holds the three splits and builds their loaders.

    Subclasses fill ``train_dataset`` / ``val_dataset`` / ``test_dataset`` in an idempotent ``setup``; a loader
    asked for before ``setup`` runs it. ``collate_fn`` and ``drop_last`` are class attributes (detection batches
    are lists; classification drops a ragged last training batch).

    Args:
        batch_size: samples per training batch and per process.
        num_workers: loader worker processes.
        eval_batch_size: batch size for validation, test and predict; defaults to ``batch_size``.

    Raises:
        ValueError: for ``batch_size < 1`` or ``num_workers < 0``.
    """

    collate_fn: Callable | None = None
    drop_last: bool = False

    def __init__(self, batch_size: int = 64, num_workers: int = 0, eval_batch_size: int | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        dataset = getattr(self, f"{split}_dataset")
        if dataset is None:
            self.setup(None)
            dataset = getattr(self, f"{split}_dataset")
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__} has no {split} split after setup()")
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=type(self).collate_fn,
            drop_last=self.drop_last and shuffle and len(dataset) >= 2 * batch_size,  # type: ignore[arg-type]
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


class ClassificationDataModule(SplitDataModule):
    """Base of the classification datamodules: the splits and loaders of :class:`SplitDataModule`, plus
    ``num_classes``, ``input_shape`` (C, H, W) and :meth:`sample_batch`.

    Args:
        batch_size, num_workers, eval_batch_size: see :class:`SplitDataModule`.
    """

    num_classes: int
    input_shape: tuple[int, int, int]
    drop_last = True

    def sample_batch(self, size: int = 32, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed (unshuffled) batch of ``size`` samples, e.g. for equivalence checks or training-free scores."""
        if self.train_dataset is None:
            self.setup("fit")
        dataset = {"train": self.train_dataset, "val": self.val_dataset, "test": self.test_dataset}[split]
        if dataset is None:
            self.setup("test")
            dataset = self.test_dataset
        items = [dataset[i] for i in range(min(size, len(dataset)))]  # type: ignore[arg-type]
        xs, ys = zip(*items)
        return torch.stack(xs), torch.as_tensor(ys)

