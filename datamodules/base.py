"""The shared shape of every classification datamodule in lightning_nd.

A datamodule exposes ``train_dataset`` / ``val_dataset`` / ``test_dataset`` after ``setup`` plus
``num_classes`` and ``input_shape`` (C, H, W), so that models can check themselves against the data
before training and wrappers such as :class:`~lightning_nd.datamodules.RandomLabels` can swap the
training set without knowing how it was built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler


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


class ShuffleSampler(Sampler[int]):
    """A random permutation per epoch from ``generator``, drawn exactly once per epoch.

    (torch's ``RandomSampler`` draws one more permutation when its iterator is exhausted, which worker prefetching
    does and the single-process loader does not: the order would depend on ``num_workers``.)
    """

    def __init__(self, data_source: Any, generator: torch.Generator) -> None:
        self.data_source, self.generator = data_source, generator

    def __len__(self) -> int:
        return len(self.data_source)

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(len(self.data_source), generator=self.generator).tolist())


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that can skip its first ``skip_batches`` batches once (a mid-epoch resume) and remembers the
    state its sampler's generator had when the current epoch began.

    ``skip_batches`` is a constructor argument so that it survives Lightning re-creating the loader (DDP sampler
    injection). Skipped batches are loaded and dropped: their samples are the ones the interrupted run trained on.
    """

    def __init__(self, *args: Any, skip_batches: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip_batches = int(skip_batches)
        self.epoch_start_state: torch.Tensor | None = None

    def sampler_generator(self) -> torch.Generator | None:
        return getattr(self.sampler, "generator", None)

    def state_dict(self) -> dict[str, Any]:
        """Empty: the position lives in the datamodule's ``state_dict`` (which knows the trainer's progress); having
        the method tells Lightning that the loader resumes mid-epoch."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore here (see :meth:`state_dict`)."""

    def __iter__(self) -> Iterator[Any]:
        generator = self.sampler_generator()
        self.epoch_start_state = generator.get_state() if generator is not None else None
        skip, self.skip_batches = self.skip_batches, 0
        iterator = super().__iter__()
        for _ in range(skip):
            if next(iterator, None) is None:
                break
        return iterator


class SplitDataModule(pl.LightningDataModule):
    """Base of every lightning_nd datamodule: holds the three splits and builds their loaders.

    Subclasses fill ``train_dataset`` / ``val_dataset`` / ``test_dataset`` in an idempotent ``setup``; a loader
    asked for before ``setup`` runs it. ``collate_fn`` and ``drop_last`` are class attributes (detection batches
    are lists; classification drops a ragged last training batch).

    Resume. The training loader shuffles with a generator of its own, seeded from the global torch RNG when the
    loader is built (so ``seed_everything`` decides the order), and the datamodule's ``state_dict`` (saved in every
    checkpoint) holds that generator's state and, for a checkpoint taken mid-epoch, how many batches of the epoch
    were trained: a resumed run replays the same order and skips the trained batches, so it continues exactly
    where the interrupted run stopped (``trainer.fit(..., ckpt_path=...)`` == uninterrupted). Worker processes
    are seeded from a second, fixed-seed generator. Randomness inside the dataset (augmentation) is drawn from the
    worker's (or, with ``num_workers=0``, the global) RNG and is not part of this guarantee.

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
        self._train_loader: ResumableDataLoader | None = None
        self._resume: dict[str, Any] | None = None

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        dataset = getattr(self, f"{split}_dataset")
        if dataset is None:
            self.setup(None)
            dataset = getattr(self, f"{split}_dataset")
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__} has no {split} split after setup()")
        common = {
            "batch_size": batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "collate_fn": type(self).collate_fn,
            "drop_last": self.drop_last and shuffle and len(dataset) >= 2 * batch_size,  # type: ignore[arg-type]
        }
        if not shuffle:
            return DataLoader(dataset, **common)
        order = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))  # drawn from the global RNG
        workers = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_(generator=order)))
        skip = 0
        if self._resume is not None:
            order.set_state(self._resume["sampler_state"])
            skip = int(self._resume["skip_batches"])
            self._resume = None
        return ResumableDataLoader(
            dataset, sampler=ShuffleSampler(dataset, order), generator=workers, skip_batches=skip, **common
        )

    def train_dataloader(self) -> DataLoader:
        self._train_loader = self._loader("train", True, self.batch_size)  # type: ignore[assignment]
        return self._train_loader

    def state_dict(self) -> dict[str, Any]:
        """The training order's generator state and the batches of the current epoch already trained."""
        loader = self._train_loader
        generator = loader.sampler_generator() if loader is not None else None
        if generator is None:
            return {}
        trainer = getattr(self, "trainer", None)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0
        mid_epoch = trainer is not None and 0 < done < trainer.num_training_batches
        state = loader.epoch_start_state if mid_epoch and loader.epoch_start_state is not None else generator.get_state()
        return {"sampler_state": state.clone(), "skip_batches": done if mid_epoch else 0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the next training loader continues the saved order."""
        self._resume = dict(state_dict) if state_dict.get("sampler_state") is not None else None

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

