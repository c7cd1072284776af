"""Issue 12's condition matrix, re-parameterization row: ReparamConvert + ReparamFuse under the conditions a real
training job meets. Each cell asserts a result, not only "no crash".

| condition | what is asserted |
|---|---|
| bf16-mixed | the deploy model equals the trained training form in fp32 eval (<= 1e-5 relative) |
| validation in inference mode, deploy swapped in | metrics equal the training form's on the same weights |
| num_workers=2, persistent workers | the trained weights equal those of the num_workers=0 run, bit for bit |
| accumulate_grad_batches=2 | half the optimizer steps; the deploy model equals the training form |
| gradient clipping | the clipped norm covers every new branch parameter (all in the optimizer) |
| killed after a mid-epoch checkpoint, resumed | weights, BN statistics and the deploy output equal the uninterrupted run |
| 2-rank ddp_spawn | ``tests/callbacks/test_reparam_fuse.py::test_ddp_spawn_fit_convert_and_fuse`` |
| SyncBatchNorm, 2 GPUs | written below, skipped without 2 CUDA devices |
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_nd.callbacks import ReparamConvert, ReparamFuse
from lightning_nd.datamodules import DigitsDataModule
from lightning_nd.modules import ImageClassifier
from lightning_nd.reparam import ACBlock, count_batchnorms, load_deploy
from tests.callbacks.test_reparam_convert import small_cnn
from tests.reparam._helpers import rel_err

BATCHES = 4  # training batches per epoch


def fit(tmp_path, fuse: ReparamFuse | None = None, ckpt_path=None, extra=(), num_workers=0, **kwargs):
    """Seeded ACB run on digits: 2 epochs x 4 batches; returns the module and the trainer."""
    pl.seed_everything(0)
    model = ImageClassifier(small_cnn(), num_classes=10, in_chans=1)
    options = {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "limit_train_batches": BATCHES,
               "limit_val_batches": 1, "enable_progress_bar": False, "logger": False, "enable_checkpointing": False,
               "enable_model_summary": False, "default_root_dir": tmp_path}
    callbacks = [ReparamConvert("acb"), fuse or ReparamFuse(), *extra]
    trainer = pl.Trainer(**{**options, **kwargs}, callbacks=callbacks)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16, num_workers=num_workers), ckpt_path=ckpt_path)
    return model, trainer


def deploy_matches(model: ImageClassifier, deploy_file: str) -> float:
    x, _ = DigitsDataModule().sample_batch(16)
    model.eval()
    with torch.no_grad():
        return rel_err(model(x), load_deploy(deploy_file)(x))


def test_bf16_mixed(tmp_path):
    fuse = ReparamFuse()
    model, _ = fit(tmp_path, fuse, precision="bf16-mixed")
    assert fuse.report["passed"] and fuse.report["dtype"] == "float32"  # mixed: weights stay fp32
    assert deploy_matches(model, fuse.deploy_file) <= 1e-5


def test_validation_in_inference_mode_runs_the_deploy_form(tmp_path):
    fuse = ReparamFuse(swap=True, save=False)
    model, trainer = fit(tmp_path, fuse, inference_mode=True)
    reference = trainer.validate(model, datamodule=DigitsDataModule(batch_size=16), verbose=False)[0]
    assert count_batchnorms(model.net) == 0 and fuse.report["passed"]  # validated the deploy net
    plain = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=True, limit_val_batches=1,
                       callbacks=[ReparamConvert("acb")])
    trained = plain.validate(model, datamodule=DigitsDataModule(batch_size=16), verbose=False)[0]
    assert isinstance(model.net[0], ACBlock)  # setup put the training form back
    assert trained["val/acc"] == reference["val/acc"]
    assert trained["val/loss"] == pytest.approx(reference["val/loss"], rel=1e-5)


def test_persistent_workers_train_the_same_weights(tmp_path):
    fuse = ReparamFuse()
    with_workers, _ = fit(tmp_path / "w", fuse, num_workers=2)
    without, _ = fit(tmp_path / "n")
    for key, value in without.state_dict().items():
        assert torch.equal(value, with_workers.state_dict()[key]), key
    assert fuse.report["passed"] and deploy_matches(with_workers, fuse.deploy_file) <= 1e-5


def test_accumulate_grad_batches(tmp_path):
    fuse = ReparamFuse()
    model, trainer = fit(tmp_path, fuse, accumulate_grad_batches=2)
    assert trainer.global_step == 2 * BATCHES // 2
    assert deploy_matches(model, fuse.deploy_file) <= 1e-5


class ClippedNorm(Callback):
    """After each step, the norm of the (clipped) gradients of every parameter, and which had none."""

    def __init__(self):
        self.norms: list[float] = []
        self.without_grad: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = {n: p.grad for n, p in pl_module.named_parameters() if p.requires_grad}
        self.without_grad |= {n for n, g in grads.items() if g is None}
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values() if g is not None])))


def test_gradient_clipping_covers_the_new_branches(tmp_path):
    probe = ClippedNorm()
    fit(tmp_path, extra=[probe], gradient_clip_val=0.05, gradient_clip_algorithm="norm", limit_val_batches=0)
    assert not probe.without_grad  # the ACB branches are trained (and clipped) with the rest
    assert max(probe.norms) <= 0.05 * (1 + 1e-4)


def test_killed_mid_epoch_and_resumed_equals_uninterrupted(tmp_path):
    fuse_full = ReparamFuse(deploy_path=str(tmp_path / "full" / "deploy.pt2"))
    full, _ = fit(tmp_path / "full", fuse_full)
    kill_at = BATCHES + 2  # mid-epoch 1: the checkpoint is the last thing the killed run wrote
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=kill_at, save_top_k=-1)
    fit(tmp_path / "killed", extra=[ckpt], max_steps=kill_at, enable_checkpointing=True)
    fuse = ReparamFuse(deploy_path=str(tmp_path / "resumed" / "deploy.pt2"))
    resumed, trainer = fit(tmp_path / "resumed", fuse, ckpt_path=str(next((tmp_path / "ckpt").glob("*.ckpt"))))
    assert trainer.global_step == 2 * BATCHES
    for key, value in full.state_dict().items():  # weights and BN running statistics
        assert torch.equal(value, resumed.state_dict()[key]), key
    x, _ = DigitsDataModule().sample_batch(16)
    with torch.no_grad():
        torch.testing.assert_close(load_deploy(fuse.deploy_file)(x), load_deploy(fuse_full.deploy_file)(x),
                                   rtol=0, atol=0)


@pytest.mark.ddp
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm under DDP needs 2 CUDA devices")
def test_sync_batchnorm_on_two_gpus(tmp_path):  # pragma: no cover - GPU only
    pl.seed_everything(0)
    model = ImageClassifier(small_cnn(), num_classes=10, in_chans=1)
    convert, fuse = ReparamConvert("acb"), ReparamFuse()
    convert.convert(model)  # ddp_spawn: the main process runs no hook
    trainer = pl.Trainer(accelerator="gpu", devices=2, strategy="ddp_spawn", sync_batchnorm=True, max_epochs=1,
                         limit_train_batches=BATCHES, limit_val_batches=1, logger=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, callbacks=[convert, fuse])
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    assert fuse.report is None or fuse.report["passed"]  # the report lives in the workers; the file is the proof
    assert deploy_matches(model.cpu(), str(tmp_path / "deploy.pt2")) <= 1e-5
