"""Random labels for RLNAS: the training labels of any classification datamodule replaced by seeded noise."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset


class RelabeledDataset(Dataset):
    """``dataset`` with its labels replaced by ``labels`` (same length); the inputs are untouched."""

    def __init__(self, dataset: Dataset, labels: torch.Tensor) -> None:
        if len(labels) != len(dataset):  # type: ignore[arg-type]
            raise ValueError(f"got {len(labels)} labels for a dataset of {len(dataset)} samples")  # type: ignore[arg-type]
        self.dataset, self.labels = dataset, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = self.dataset[index]
        return x, self.labels[index]


class RandomLabels(pl.LightningDataModule):
    """Wrap a datamodule and replace its training labels with uniform random ones (RLNAS).

    The labels are drawn once, from a generator seeded by ``seed`` alone (default: the global torch seed, i.e.
    ``seed_everything``'s, agreed across DDP ranks), so they are identical on every rank and in every epoch and do
    not disturb the global RNG; validation and test labels stay true.
    The wrapped datamodule must expose ``train_dataset`` after ``setup`` and a ``num_classes`` attribute,
    as every lightning_nd classification datamodule does.

    Args:
        datamodule: the datamodule to wrap.
        seed: seed of the label draw (``None``: ``torch.initial_seed()``, set by ``seed_everything``).

    Raises:
        ValueError: when the wrapped datamodule has no ``num_classes`` or no ``train_dataset`` after setup.

    Example::

        dm = RandomLabels(FashionMNISTDataModule(image_size=32, channels=3), seed=0)
    """

    def __init__(self, datamodule: pl.LightningDataModule, seed: int | None = None) -> None:
        super().__init__()
        if not isinstance(getattr(datamodule, "num_classes", None), int):
            raise ValueError(
                f"RandomLabels needs a datamodule with an int num_classes; {type(datamodule).__name__} has none"
            )
        self.datamodule, self.seed = datamodule, seed
        self.labels: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return self.datamodule.num_classes  # type: ignore[attr-defined]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.datamodule.input_shape  # type: ignore[attr-defined]

    def __getattr__(self, name: str):
        # Everything else (batch_size, sample_batch, val_dataset, ...) comes from the wrapped datamodule.
        if name.startswith("__") or name in ("datamodule", "seed", "labels"):
            raise AttributeError(name)
        return getattr(self.__dict__.get("datamodule") or super().__getattribute__("datamodule"), name)

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        inner = self.datamodule
        inner.setup(stage)
        train = getattr(inner, "train_dataset", None)
        if train is None:
            if stage in ("fit", None):
                raise ValueError(f"{type(inner).__name__} exposes no train_dataset after setup; RandomLabels needs one")
            return
        if isinstance(train, RelabeledDataset):
            return
        seed = self.seed if self.seed is not None else torch.initial_seed() % 2**63
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            seed = trainer.strategy.broadcast(seed, src=0)  # setup runs on every rank
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, self.num_classes, (len(train),), generator=generator)
        inner.train_dataset = RelabeledDataset(train, self.labels)

    def train_dataloader(self) -> DataLoader:
        return self.datamodule.train_dataloader()

    def state_dict(self) -> dict:
        self.datamodule.trainer = getattr(self, "trainer", None)  # the wrapped module reads the epoch progress
        return self.datamodule.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.datamodule.load_state_dict(state_dict)

    def val_dataloader(self) -> DataLoader:
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.datamodule.test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.datamodule.predict_dataloader()
