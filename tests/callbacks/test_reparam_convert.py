"""ReparamConvert: conversion at setup, once per network, and resuming a converted run from its checkpoint."""

from __future__ import annotations

import multiprocessing
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_nd.callbacks import ReparamConvert
from lightning_nd.callbacks.reparam_convert import in_spawned_worker
from lightning_nd.datamodules import DigitsDataModule
from lightning_nd.modules import ImageClassifier
from lightning_nd.reparam import ACBlock, DiverseBranchBlock, ReparamBlock


def small_cnn(in_chans: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_chans, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def trainer(**kwargs) -> pl.Trainer:
    base = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1,
                "enable_progress_bar": False, "logger": False, "enable_checkpointing": False, "enable_model_summary": False}
    return pl.Trainer(**{**base, **kwargs})


def test_bad_arguments():
    with pytest.raises(MisconfigurationException, match="block='mobileone'"):
        ReparamConvert("mobileone")
    model = ImageClassifier(small_cnn(), num_classes=10, in_chans=1)
    with pytest.raises(MisconfigurationException, match="no network at .backbone"):
        trainer(callbacks=[ReparamConvert(attr="backbone")]).fit(model, datamodule=DigitsDataModule(batch_size=16))


def test_converts_once_and_resumes_from_checkpoint(tmp_path):
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=16)
    model = ImageClassifier(small_cnn(), num_classes=10, in_chans=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callback = ReparamConvert("dbb", block_kwargs={"internal_channels": 16})
    t1 = trainer(callbacks=[callback, ckpt], enable_checkpointing=True)
    t1.fit(model, datamodule=dm)
    assert callback.converted == 3 and all(isinstance(model.net[i], DiverseBranchBlock) for i in (0, 3, 6))
    assert model.net[0].dbb_1x1_kxk.conv1.out_channels == 16  # block_kwargs reached the block
    t1.validate(model, datamodule=dm)  # a second setup does not convert the converted network again
    assert sum(isinstance(m, ReparamBlock) for m in model.net.modules()) == 3
    # a fresh process: new module and callback; the converted checkpoint loads strictly into the converted model
    fresh = ImageClassifier(small_cnn(), num_classes=10, in_chans=1)
    t2 = trainer(callbacks=[ReparamConvert("dbb", block_kwargs={"internal_channels": 16})], max_epochs=2)
    t2.fit(fresh, datamodule=dm, ckpt_path=ckpt.last_model_path)
    assert t2.global_step == 4  # continued from step 2
    # a checkpoint from another block type does not load, and the message says why (issue 12 item 9)
    with pytest.raises(MisconfigurationException, match="holds a network converted to 'dbb' blocks.*block='dbb'"):
        trainer(callbacks=[ReparamConvert("acb")], max_epochs=2).fit(
            ImageClassifier(small_cnn(), num_classes=10, in_chans=1), datamodule=dm, ckpt_path=ckpt.last_model_path
        )


def test_preserve_keeps_the_trained_function():
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=16)
    model = ImageClassifier(small_cnn(), num_classes=10, in_chans=1)
    trainer().fit(model, datamodule=dm)
    x, _ = dm.sample_batch(8)
    model.eval()
    with torch.no_grad():
        before = model(x)
    t = trainer(callbacks=[ReparamConvert("acb", preserve=True)])
    t.validate(model, datamodule=dm)
    assert isinstance(model.net[0], ACBlock)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def _worker_probe(queue) -> None:
    queue.put(in_spawned_worker(SimpleNamespace(strategy=SimpleNamespace(launcher=object()))))


def test_spawned_worker_detection_uses_public_api():
    with_launcher = SimpleNamespace(strategy=SimpleNamespace(launcher=object()))
    assert not in_spawned_worker(with_launcher)  # the main process
    assert not in_spawned_worker(trainer())  # one device: no launcher
    ctx = multiprocessing.get_context("fork")  # what ddp_fork does; ddp_spawn's workers are multiprocessing children too
    queue = ctx.Queue()
    process = ctx.Process(target=_worker_probe, args=(queue,))
    process.start()
    try:
        assert queue.get(timeout=60) is True
    finally:
        process.join(timeout=60)


class UserModule(pl.LightningModule):
    """A user's module shaped unlike ours: the network in ``self.model``, a loss child, default callback arguments."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = small_cnn()
        self.model[0] = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_load_checkpoint(self, checkpoint):
        ReparamConvert.restore(self, checkpoint)  # the documented hook: rebuild the converted network first


def test_user_module_auto_attr_and_load_from_checkpoint(tmp_path):
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=16)
    model = UserModule()
    callback = ReparamConvert("acb")
    t = trainer(callbacks=[callback], limit_val_batches=0, default_root_dir=tmp_path)
    t.fit(model, datamodule=dm)
    assert callback.network_attr == "model" and isinstance(model.model[0], ACBlock)  # found without attr
    path = tmp_path / "converted.ckpt"
    t.save_checkpoint(path)
    restored = UserModule.load_from_checkpoint(path)  # strict: every converted key has a place
    assert isinstance(restored.model[0], ACBlock)
    x, _ = dm.sample_batch(8)
    model.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x))
    # without the recorded conversion the same load fails on the block keys (what the hook fixes)
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["lightning_nd_reparam"]
    torch.save(checkpoint, tmp_path / "unrecorded.ckpt")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        UserModule.load_from_checkpoint(tmp_path / "unrecorded.ckpt")


def test_auto_attr_needs_exactly_one_candidate():
    class TwoNets(UserModule):
        def __init__(self):
            super().__init__()
            self.teacher = small_cnn()

    with pytest.raises(MisconfigurationException, match=r"several children hold convolutions: \['model', 'teacher'\]"):
        ReparamConvert().convert(TwoNets())
    assert ReparamConvert(attr="teacher").convert(TwoNets()) == 3


def test_image_classifier_load_from_checkpoint_after_convert(tmp_path):
    """Our own module carries the hook: a checkpoint of a converted run loads without the callback."""
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=16)
    model = ImageClassifier(small_cnn(), num_classes=10, in_chans=1)
    t = trainer(callbacks=[ReparamConvert("dbb")], limit_val_batches=0, default_root_dir=tmp_path)
    t.fit(model, datamodule=dm)
    t.save_checkpoint(tmp_path / "converted.ckpt")
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "converted.ckpt", model=small_cnn())
    assert isinstance(restored.net[0], DiverseBranchBlock)
    x, _ = dm.sample_batch(8)
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x), model.eval()(x))


class EagerOptimizerModule(pl.LightningModule):
    """Builds its optimizer in ``__init__``: it holds the tensors that the conversion replaces (issue 27 item 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_cnn()
        self.opt = torch.optim.SGD(self.parameters(), lr=0.1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return self.opt


def test_optimizer_built_before_conversion_warns_and_missing_restore_hook_is_named():
    dm = DigitsDataModule(batch_size=16)
    with pytest.warns(UserWarning) as record:
        trainer(callbacks=[ReparamConvert("acb")], limit_val_batches=0).fit(EagerOptimizerModule(), datamodule=dm)
    messages = [str(w.message) for w in record]
    # 3 conv weights + 3 BN (weight, bias) replaced; the optimizer misses every block parameter but the final Linear's
    assert any("optimizer 0 (SGD) holds 9 parameters that the conversion replaced (e.g. net.0.weight" in m
               and "configure_optimizers" in m for m in messages), messages
    assert any("EagerOptimizerModule has no on_load_checkpoint hook" in m and "ReparamConvert.restore(self, "
               "checkpoint)" in m for m in messages), messages
    # the control: optimizer from configure_optimizers, the restore hook in place: neither warning
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(callbacks=[ReparamConvert("acb")], limit_val_batches=0).fit(UserModule(), datamodule=dm)
    assert not [w for w in record if "conversion replaced" in str(w.message) or "on_load_checkpoint" in str(w.message)]
