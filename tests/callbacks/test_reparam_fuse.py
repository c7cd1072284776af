"""ReparamFuse: verified deploy model at fit end, swap for test/predict (also with ckpt_path="best", twice), bf16,
exports, deploy files loaded in a fresh process, user modules shaped unlike ours, failure handling, and one 2-process
ddp_spawn fit with ReparamConvert + ReparamFuse."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import onnx
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_nd.callbacks import ReparamConvert, ReparamFuse
from lightning_nd.callbacks.reparam_fuse import relative_error
from lightning_nd.datamodules import DigitsDataModule
from lightning_nd.modules import ImageClassifier
from lightning_nd.reparam import ACBlock, ReparamBlock, count_batchnorms, load_deploy
from lightning_nd.reparam.deploy_io import read_report
from tests.callbacks.test_reparam_convert import UserModule, small_cnn, trainer
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
    assert (tmp_path / "reparam_report.json").is_file() and not (tmp_path / "deploy.pt2").exists()
    assert not (tmp_path / "deploy_weights.pt").exists()


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
        deploy = load_deploy(Path(trainer.strategy.broadcast(str(trainer.default_root_dir))) / "deploy.pt2")
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
    deploy = load_deploy(tmp_path / "deploy.pt2")
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        assert rel_err(model(x), deploy(x)) <= 1e-5


FRESH_PROCESS = """
import sys, torch
program = torch.export.load(sys.argv[1]).module()          # plain torch: no lightning_nd, no training code
x, y = torch.load(sys.argv[2])
assert "lightning_nd" not in sys.modules and "tests" not in sys.modules
torch.testing.assert_close(program(x), y, rtol=1e-5, atol=1e-6)
from lightning_nd.reparam import load_deploy
torch.testing.assert_close(load_deploy(sys.argv[1])(x), y, rtol=1e-5, atol=1e-6)
assert not any(name == "tests" or name.startswith("tests.") for name in sys.modules)
print("fresh process ok")
"""


def test_deploy_file_loads_in_a_fresh_process(tmp_path):
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=16)
    model = UserModule()  # defined in the tests package: a fresh process cannot import it
    fuse = ReparamFuse()  # default arguments find model.model
    trainer(callbacks=[ReparamConvert("dbb"), fuse], default_root_dir=tmp_path, limit_val_batches=0).fit(
        model, datamodule=dm)
    assert fuse.network_attr == "model" and fuse.report["passed"]
    x, _ = dm.sample_batch(5)  # another batch size than the export's: the batch dimension is dynamic
    model.eval()
    with torch.no_grad():
        y = model(x)
    torch.save((x, y), tmp_path / "xy.pt")
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(FRESH_PROCESS))
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(script), fuse.deploy_file, str(tmp_path / "xy.pt")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(repo), "PATH": ""})
    assert done.returncode == 0 and "fresh process ok" in done.stdout, done.stderr[-2000:]
    # the weights-only file: a rebuilt training form is fused and loaded strictly
    rebuilt = UserModule()
    ReparamConvert("dbb").convert(rebuilt)
    net = load_deploy(tmp_path / "deploy_weights.pt", model=rebuilt.model)
    with torch.no_grad():
        torch.testing.assert_close(net(x), y, rtol=1e-5, atol=1e-6)
    assert read_report(fuse.deploy_file)["max_rel_error"] == fuse.report["max_rel_error"]
    with pytest.raises(ValueError, match="holds weights only"):
        load_deploy(tmp_path / "deploy_weights.pt")


class FusionNet(nn.Module):
    """A feature-fusion child named ``fuse`` (a module, not the protocol's method) and a deliberately frozen BN."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        y = self.stem(x)
        return self.head(self.fuse(torch.cat([y, y.flip(-1)], 1)))


class FrozenBNModule(UserModule):
    def __init__(self):
        super().__init__()
        self.model = FusionNet()

    def on_train_epoch_start(self):
        self.model.stem[1].eval()  # a frozen BN: running statistics stay fixed


def test_child_named_fuse_and_frozen_bn_flag_survive_fit(tmp_path):
    model = FrozenBNModule()
    fuse = ReparamFuse()
    trainer(callbacks=[ReparamConvert("acb"), fuse], default_root_dir=tmp_path, limit_val_batches=0).fit(
        model, datamodule=DigitsDataModule(batch_size=16))
    assert isinstance(model.model.fuse[0], ACBlock)  # the child named fuse was converted, not called
    assert fuse.report["passed"] and fuse.report["batchnorms_deploy"] == 0
    assert model.model.stem[1].training is False and model.model.fuse[0].training is True  # flags kept per module


def test_relative_error_restores_every_flag():
    net = small_cnn().train()
    net[1].eval()
    other = copy.deepcopy(net)
    relative_error(net, other, torch.randn(2, 1, 8, 8))
    assert [m.training for m in net.modules()] == [m.training for m in other.modules()]
    assert net[1].training is False and net[4].training is True


class Drift(nn.Module):
    """A third-party module whose ``reparameterize()`` is not exact: it scales its (only) output path by ``gain``."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain, self.scale = gain, 1.0

    def forward(self, x):
        return x * self.scale

    def reparameterize(self):
        self.scale = self.gain


class TwoOutputs(nn.Module):
    """Returns ``(logits, {"features": f})``: only the second output goes through ``Drift``."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.body, self.drift, self.head = small_cnn()[:6], Drift(gain), nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        f = self.body(x)
        return self.head(f), {"features": self.drift(f)}


class TupleModule(pl.LightningModule):
    def __init__(self, gain: float) -> None:
        super().__init__()
        self.net = TwoOutputs(gain)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x)[0], y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_every_output_tensor_of_a_tuple_is_verified(tmp_path):
    dm = DigitsDataModule(batch_size=16)
    exact = ReparamFuse(save=False)
    trainer(callbacks=[exact], limit_val_batches=0, default_root_dir=tmp_path / "exact").fit(TupleModule(1.0), datamodule=dm)
    assert exact.report["passed"] and exact.report["outputs_checked"] == 2
    assert exact.report["max_rel_error"] <= 1e-5  # 2 folded convs + Linear in float32
    # only the dict's tensor changes: a check of the first output alone would pass
    with pytest.raises(RuntimeError, match="differs from the training form by 0.5"):
        trainer(callbacks=[ReparamFuse(save=False)], limit_val_batches=0, default_root_dir=tmp_path / "drift").fit(
            TupleModule(1.5), datamodule=dm)
    report = json.loads((tmp_path / "drift" / "reparam_report.json").read_text())
    assert report["worst_output"] == "[1]['features']" and report["output_rel_errors"]["[0]"] <= 1e-5
