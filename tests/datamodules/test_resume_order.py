"""A run killed at a checkpoint and resumed trains on exactly the batches of the uninterrupted run (issue 12)."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_nd.datamodules import DigitsDataModule, RandomLabels


class Recorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(64, 10)
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(int((x.flatten(1).sum(1) * 1000).round().long().sum()) ^ int((y * 7919).sum()))
        return nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp_path, max_steps, ckpt_path=None, num_workers=0, every=None):
    pl.seed_everything(3)
    dm = RandomLabels(DigitsDataModule(batch_size=128, num_workers=num_workers))
    model = Recorder()
    callbacks = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1)] if every else []
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks, enable_checkpointing=bool(every), limit_val_batches=0)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.parametrize("kill_at", [4, 11, 15])  # mid-epoch 0, end of epoch 0 (11 batches per epoch), mid-epoch 1
def test_resume_replays_the_uninterrupted_order(tmp_path, kill_at):
    full = _fit(tmp_path / "full", 24)
    first = _fit(tmp_path / "a", kill_at, every=kill_at)
    ckpt = next((tmp_path / "a").glob(f"*step={kill_at}.ckpt"))
    resumed = _fit(tmp_path / "b", 24, ckpt_path=str(ckpt))
    assert first == full[:kill_at]
    assert resumed == full[kill_at:]
    assert len(set(full[:11])) == 11 and full[:11] != full[11:22]  # shuffled, and reshuffled each epoch


def test_seed_everything_drives_order_and_labels(tmp_path):
    def labels_and_order(seed):
        pl.seed_everything(seed)
        dm = RandomLabels(DigitsDataModule(batch_size=128))
        dm.setup("fit")
        return dm.labels[:20].tolist(), next(iter(dm.train_dataloader()))[1][:20].tolist()

    assert labels_and_order(0) == labels_and_order(0)
    assert labels_and_order(0)[0] != labels_and_order(1)[0]
    assert labels_and_order(0)[1] != labels_and_order(1)[1]
