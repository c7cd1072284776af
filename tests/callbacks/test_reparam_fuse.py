"""ReparamFuse: verified deploy model at fit end, swap for test/predict (also with ckpt_path="best", twice), bf16,
exports, failure handling, and one 2-process ddp_spawn fit with ReparamConvert + ReparamFuse."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning.pytorch as pl
import onnx
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_nd.callbacks import ReparamConvert, ReparamFuse
from lightning_nd.datamodules import DigitsDataModule
from lightning_nd.modules import ImageClassifier
from lightning_nd.reparam import ReparamBlock, count_batchnorms, load_deploy
from tests.callbacks.test_reparam_convert import small_cnn, trainer
from tests.reparam._helpers import rel_err


class Probe(Callback):
    """Records the BatchNorm count of the network each test batch runs through."""

    def __init__(self):
        self.batchnorms: list[int] = []

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.batchnorms.append(count_batchnorms(pl_module.net))


def test_bad_arguments():
    for kwargs, match in [({"export": ["tflite"]}, "export"), ({"check_samples": 0}, "check_samples"),
                          ({"rtol": -1.0}, "rtol"), ({"swap": True, "attr": None}, "swap"),
                          ({"methods": ("convert",)}, "methods")]:
        with pytest.raises(MisconfigurationException, match=match):
            ReparamFuse(**kwargs)


def test_fuse_swap_and_test_best_checkpoint_twice(tmp_path):
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=32)
    model = ImageClassifier(small_cnn(), num_classes=10, in_chans=1)
    fuse, probe = ReparamFuse(swap=True, export=["torchscript", "onnx"]), Probe()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max")
    t = trainer(callbacks=[ReparamConvert("acb"), fuse, probe, ckpt], enable_checkpointing=True, max_epochs=2,
                limit_train_batches=3, default_root_dir=tmp_path)
    t.fit(model, datamodule=dm)
    # fit end: the module keeps its training form (ddp_spawn hands weights back through a strict=False load)
    assert sum(isinstance(m, ReparamBlock) and not m.deploy for m in model.net.modules()) == 3
    report = json.loads((tmp_path / "reparam_report.json").read_text())
    assert report == fuse.report and report["passed"] and report["max_rel_error"] <= 1e-5
    assert report["params_deploy"] < report["params_train"] and report["batchnorms_deploy"] == 0
    deploy = load_deploy(fuse.deploy_file)
    x, _ = dm.sample_batch(8)
    model.eval()
    with torch.no_grad():
        assert rel_err(model(x), deploy(x)) <= 1e-5
        assert rel_err(deploy(x), load_deploy(tmp_path / "deploy.ts")(x)) <= 1e-6
    onnx.checker.check_model(onnx.load(str(tmp_path / "deploy.onnx")))
    # test the best checkpoint, twice: the checkpoint loads into the training form, the test runs the deploy form
    results = [t.test(model, datamodule=dm, ckpt_path="best", verbose=False)[0] for _ in range(2)]
    assert probe.batchnorms and set(probe.batchnorms) == {0}
    assert count_batchnorms(model.net) == 0
    # the same checkpoint tested in training form, without ReparamFuse, gives the same metrics
    reference = ImageClassifier(small_cnn(), num_classes=10, in_chans=1)
    ref = trainer(callbacks=[ReparamConvert("acb")]).test(reference, datamodule=dm, ckpt_path=ckpt.best_model_path,
                                                          verbose=False)[0]
    for result in results:
        assert result["test/acc"] == pytest.approx(ref["test/acc"])
        assert result["test/loss"] == pytest.approx(ref["test/loss"], rel=1e-5)
    # fit again: setup puts the training form back, so training continues on the branches
    t2 = trainer(callbacks=[ReparamConvert("acb"), ReparamFuse(save=False)])
    t2.fit(model, datamodule=dm)
    assert sum(isinstance(m, ReparamBlock) and not m.deploy for m in model.net.modules()) == 3


def test_bf16_weights(tmp_path):
    pl.seed_everything(0)
    model = ImageClassifier(small_cnn(), num_classes=10, in_chans=1)
    fuse = ReparamFuse()
    t = trainer(callbacks=[ReparamConvert("repvgg"), fuse], precision="bf16-true", default_root_dir=tmp_path)
    t.fit(model, datamodule=DigitsDataModule(batch_size=16))
    assert fuse.report["dtype"] == "bfloat16" and fuse.report["passed"]
    deploy = load_deploy(fuse.deploy_file)
    assert all(p.dtype == torch.bfloat16 for p in deploy.parameters())


def test_failed_check_raises_and_writes_no_model(tmp_path):
    model = ImageClassifier(small_cnn(), num_classes=10, in_chans=1)
    t = trainer(callbacks=[ReparamConvert("dbb"), ReparamFuse(rtol=1e-15)], default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="strict=True: no deploy model written"):
        t.fit(model, datamodule=DigitsDataModule(batch_size=16))
    assert (tmp_path / "reparam_report.json").is_file() and not (tmp_path / "deploy.pt").exists()


def test_nothing_to_fuse_warns_and_checks_a_training_batch(tmp_path):
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    model = ImageClassifier(net, num_classes=10, in_chans=1)
    fuse = ReparamFuse(input_shape=(1, 8, 8))
    dm = DigitsDataModule(batch_size=16)
    dm.setup("fit")
    t = trainer(callbacks=[fuse], default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="nothing to fuse"):
        t.fit(model, train_dataloaders=dm.train_dataloader())  # no datamodule: the first training batch checks
    assert fuse.report["passed"] and fuse.report["max_rel_error"] == 0.0 and fuse.report["check_batch"][0] == 8


class RankCheck(Callback):
    """Inside the workers: after fit end, the fused model on disk equals this rank's trained network."""

    def on_fit_end(self, trainer, pl_module):
        deploy = load_deploy(Path(trainer.strategy.broadcast(str(trainer.default_root_dir))) / "deploy.pt")
        x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        net = copy.deepcopy(pl_module.net).eval()
        with torch.no_grad():
            assert rel_err(net(x), deploy(x)) <= 1e-5


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_spawn_fit_convert_and_fuse(tmp_path):
    pl.seed_everything(0)
    model = ImageClassifier(small_cnn(), num_classes=10, in_chans=1)
    convert = ReparamConvert("repvgg")
    convert.convert(model)  # ddp_spawn: the main process runs no hook, so convert before fit to get weights back
    initial = copy.deepcopy(model.net.state_dict())
    # (SyncBatchNorm cannot be wrapped by DDP on CPU: "SyncBatchNorm layers only work with GPU modules"; SyncBN fusion
    # is covered by tests/reparam/test_blocks.py::test_syncbn_blocks_fuse)
    t = trainer(strategy="ddp_spawn", devices=2, default_root_dir=tmp_path,
                callbacks=[convert, ReparamFuse(), RankCheck()])
    t.fit(model, datamodule=DigitsDataModule(batch_size=16))
    report = json.loads((tmp_path / "reparam_report.json").read_text())
    assert report["passed"] and report["batchnorms_deploy"] == 0
    # the main process got the trained training-form weights back (no fused keys dropped by the strict=False load)
    trained = model.net.state_dict()
    assert not torch.equal(trained["0.conv_kxk.conv.weight"], initial["0.conv_kxk.conv.weight"])
    deploy = load_deploy(tmp_path / "deploy.pt")
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        assert rel_err(model(x), deploy(x)) <= 1e-5
