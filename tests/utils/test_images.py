"""Pictures reach every kind of logger: PNG files for CSV-only runs, wandb offline, TensorBoard."""

import lightning.pytorch as pl
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image

from lightning_nd.datamodules import DigitsDataModule
from lightning_nd.modules import ImageClassifier
from lightning_nd.utils import atomic_save, log_image


class DrawAtEpochEnd(Callback):
    def __init__(self):
        self.written = []

    def on_train_epoch_end(self, trainer, pl_module):
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [1, 0])
        self.written += log_image(trainer, "test/curve", fig)


def _fit(logger):
    cb = DrawAtEpochEnd()
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[cb],
    )
    trainer.fit(ImageClassifier("resnet10t", in_chans=1), datamodule=DigitsDataModule(image_size=16))
    return cb


def test_csv_logger_gets_png_files(tmp_path):
    cb = _fit(CSVLogger(tmp_path))
    (png,) = cb.written
    assert png.parent.name == "media" and png.name == "test_curve_1.png"
    image = np.asarray(Image.open(png))
    assert image.ndim == 3 and image.shape[2] == 3 and image.std() > 0  # a real drawing, not a blank


def test_tensorboard_logger_receives_the_image(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    cb = _fit(logger)
    assert cb.written == []  # TensorBoard took the image itself
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "test/curve" in events.Tags()["images"]


def test_wandb_offline_receives_the_image(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(save_dir=str(tmp_path), project="lnd-test")
    _fit(logger)
    import wandb

    wandb.finish()
    pngs = list(tmp_path.rglob("media/images/test/curve*.png"))
    assert pngs, sorted(str(p) for p in tmp_path.rglob("*"))[:40]


def test_atomic_save_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "model.pt"
    atomic_save({"w": torch.ones(3)}, target)
    with pytest.raises((AttributeError, TypeError, __import__("pickle").PicklingError)):
        atomic_save({"bad": lambda: None}, target)  # pickling fails midway
    assert torch.load(target)["w"].sum() == 3  # the previous file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary left behind
