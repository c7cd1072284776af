"""RandomLabels: seeded, fixed across epochs, about uniform, same on every rank, validation untouched."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_nd.datamodules import DigitsDataModule, RandomLabels
from lightning_nd.modules import ImageClassifier


def _labels(seed):
    dm = RandomLabels(DigitsDataModule(), seed=seed)
    dm.setup("fit")
    return dm


def test_random_labels_properties():
    dm = _labels(0)
    train = dm.datamodule.train_dataset
    labels = torch.stack([train[i][1] for i in range(len(train))])
    true = train.dataset.labels
    # fixed: a second pass (another epoch) sees the same labels; a fresh module with the same seed too
    assert torch.equal(labels, torch.stack([train[i][1] for i in range(len(train))]))
    assert torch.equal(labels, _labels(0).labels)
    assert not torch.equal(labels, _labels(1).labels)
    # random: agreement with the true labels near chance (1/10), every class present about uniformly
    assert abs((labels == true).float().mean().item() - 0.1) < 0.04
    counts = torch.bincount(labels, minlength=10).float()
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()
    # inputs and validation labels untouched
    assert torch.equal(train[3][0], train.dataset[3][0])
    assert torch.equal(
        dm.val_dataloader().dataset.labels, DigitsDataModule().sample_batch(1)[1].new_tensor(_val_labels())
    )
    assert dm.num_classes == 10 and dm.input_shape == (1, 8, 8)
    # setup twice does not relabel twice
    dm.setup("fit")
    assert torch.equal(dm.datamodule.train_dataset.labels, labels)


def _val_labels():
    plain = DigitsDataModule()
    plain.setup("fit")
    return plain.val_dataset.labels.tolist()


def test_random_labels_rejects_a_datamodule_without_classes():
    with pytest.raises(ValueError, match="int num_classes"):
        RandomLabels(pl.LightningDataModule())


class GatherAndCompare(Callback):
    """Inside each DDP worker: labels, seen label batches and trained weights agree across the 2 ranks."""

    def on_train_end(self, trainer, pl_module):
        import torch.distributed as dist

        labels = trainer.datamodule.labels
        gathered = [torch.empty_like(labels) for _ in range(2)]
        dist.all_gather(gathered, labels)
        assert torch.equal(gathered[0], gathered[1]), "random labels differ across ranks"
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        weights = [torch.empty_like(flat) for _ in range(2)]
        dist.all_gather(weights, flat)
        assert torch.equal(weights[0], weights[1]), "weights differ across ranks after DDP training"


@pytest.mark.ddp
def test_ddp_fit_with_random_labels():
    pl.seed_everything(0)
    model = ImageClassifier("resnet10t", num_classes=10, in_chans=1)
    trainer = pl.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_steps=3,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[GatherAndCompare()],
    )
    trainer.fit(model, datamodule=RandomLabels(DigitsDataModule(image_size=16, batch_size=16), seed=3))
    assert trainer.state.finished
