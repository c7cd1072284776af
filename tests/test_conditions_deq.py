"""Issue-12 condition matrix, DEQ family: DEQClassifier + DEQMonitor + DEQWarmup under the conditions of real jobs.

Each cell trains a tiny DEQ network (stem conv -> DEQ(conv cell) -> linear, no BatchNorm) for a few steps and
asserts a result, not only "no crash":

| Condition | Cell | Asserts |
|---|---|---|
| ``bf16-mixed`` | ``test_bf16_mixed`` | solves reach f_tol (fp32 solve under autocast), loss finite, weights move |
| loss scaler + injected overflow | ``test_loss_scaler_with_injected_overflow`` | the scaler skips that step only, the run goes on |
| validation under inference mode | ``test_validation_under_inference_mode`` | val loss == a manual ``no_grad`` pass |
| ``num_workers=2`` persistent | ``test_persistent_workers_match_in_process_loading`` | same weights as ``num_workers=0`` |
| ``accumulate_grad_batches=2`` | ``test_gradient_accumulation_matches_the_full_batch`` | == one batch of twice the size |
| gradient clipping | ``test_gradient_clipping_bounds_the_update`` | the SGD update has exactly the clip norm |
| kill mid-epoch + resume | ``test_kill_after_mid_epoch_checkpoint_and_resume`` | weights, warm-up and monitor == uninterrupted |
| 2-rank ``ddp_spawn`` | ``tests/implicit/test_deq_ddp.py::test_two_process_ddp_matches_single_process`` | == one process |
| SyncBN (GPU) | ``test_sync_batchnorm_cell_under_ddp_fails_clearly`` | clear error, no hang (needs 2 GPUs) |
| fp16 kernels (GPU) | ``test_fp16_mixed_on_cuda`` | ``16-mixed`` with its own scaler converges (needs CUDA) |

On CPU, Lightning turns ``precision="16-mixed"`` into bf16, so the scaler cell builds the fp16 ``MixedPrecision``
plugin with a ``GradScaler`` itself (CPU autocast supports fp16).
"""

from __future__ import annotations

import warnings
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import TensorDataset

from lightning_nd.callbacks import DEQMonitor, DEQWarmup
from lightning_nd.datamodules.base import ClassificationDataModule
from lightning_nd.modules import DEQClassifier
from tests.conditions_helpers import GradNorms, KillAt, Killed, OverflowAt, weights
from tests.implicit.helpers import BNCell, TinyDEQNet

TIGHT = {"f_tol": 1e-6, "b_tol": 1e-7, "f_max_iter": 60, "b_max_iter": 60}


class TinyData(ClassificationDataModule):
    """32 random 1x6x6 images, 3 classes; the training order is shuffled by the datamodule's own generator."""

    num_classes, input_shape = 3, (1, 6, 6)

    def __init__(self, batch_size: int = 8, num_workers: int = 0) -> None:
        super().__init__(batch_size, num_workers)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            gen = torch.Generator().manual_seed(0)
            ds = TensorDataset(torch.randn(32, 1, 6, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen))
            self.train_dataset = self.val_dataset = self.test_dataset = ds


def _model(lr: float = 0.5, **deq) -> DEQClassifier:
    return DEQClassifier(TinyDEQNet(**{**TIGHT, **deq}), num_classes=3, optimizer=partial(torch.optim.SGD, lr=lr))


def _trainer(callbacks=(), **kw) -> pl.Trainer:
    opts = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "limit_val_batches": 0}
    return pl.Trainer(callbacks=list(callbacks), **{**opts, **kw})


def _callbacks(warmup_steps: int = 1):
    return [DEQWarmup(warmup_steps=warmup_steps, unroll_layers=3), DEQMonitor(histogram_every_n_epochs=0)]


def _fit(model, data, callbacks=None, **kw):
    pl.seed_everything(0)
    trainer = _trainer(_callbacks() if callbacks is None else callbacks, **kw)
    trainer.fit(model, data)
    return trainer


class _Probe(Callback):
    """Records the loss and the solver statistics of every training batch."""

    def __init__(self) -> None:
        self.losses, self.fwd = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.fwd.append(pl_module.net.deq.last_stats)


def test_bf16_mixed():
    model, probe = _model(f_tol=1e-4, b_tol=1e-5), _Probe()
    start = weights(model)
    trainer = _fit(model, TinyData(), [*_callbacks(), probe], max_steps=4, precision="bf16-mixed")
    assert trainer.global_step == 4 and all(torch.isfinite(torch.tensor(probe.losses)))
    solved = [s.forward for s in probe.fwd if s.mode == "equilibrium"]
    assert len(solved) == 3 and all(bool(s.converged.all()) and s.nfe < 60 for s in solved)
    assert all(bool(s.backward.converged.all()) for s in probe.fwd if s.mode == "equilibrium")
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), start))


def test_loss_scaler_with_injected_overflow():
    model, overflow = _model(), OverflowAt(step=2, layer=lambda m: m.net.deq)
    callbacks = [*_callbacks(), overflow]
    scaler = torch.amp.GradScaler("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the DEQ reports its diverged adjoint
        trainer = _fit(model, TinyData(), callbacks, max_steps=4,
                       plugins=[MixedPrecision("16-mixed", device="cpu", scaler=scaler)])
    monitor = callbacks[1]
    assert trainer.global_step == 4 and monitor.stop_reason is None
    assert (monitor.scaler_skips_total, monitor.scaler_skips) == (1, 0)  # one skip, then the count restarts
    assert scaler.get_scale() == 2.0**15  # one skipped step halved the initial 2**16
    w = overflow.weights
    assert all(torch.equal(p, q) for p, q in zip(w[2], w[3]))  # the overflow step changed nothing
    assert any(not torch.equal(p, q) for p, q in zip(w[3], weights(model)))  # the next one trained


def test_validation_under_inference_mode():
    model, data = _model(), TinyData()
    _fit(model, data, max_steps=2)
    trainer = _trainer(_callbacks(), inference_mode=True, limit_val_batches=None)
    metrics = trainer.validate(model, data, verbose=False)[0]
    model.eval()
    with torch.no_grad():
        x, y = data.val_dataset.tensors
        expected = sum(float(torch.nn.functional.cross_entropy(model(x[i:i + 8]), y[i:i + 8])) for i in (0, 8, 16, 24))
    assert metrics["val/loss"] == pytest.approx(expected / 4, rel=1e-6)
    assert model.net.deq.mode == "equilibrium" and 0 < metrics["deq/val_fwd_steps"] <= 60


def test_persistent_workers_match_in_process_loading():
    results = []
    for workers in (0, 2):
        model, data = _model(), TinyData(num_workers=workers)
        trainer = _fit(model, data, max_epochs=2)
        if workers:
            assert trainer.train_dataloader.persistent_workers
        results.append(weights(model))
    for p, q in zip(*results):
        assert torch.equal(p, q)


def test_gradient_accumulation_matches_the_full_batch():
    runs = []
    for batch_size, accumulate in ((16, 1), (8, 2)):
        model = _model()
        trainer = _fit(model, TinyData(batch_size=batch_size), max_steps=2, accumulate_grad_batches=accumulate)
        assert trainer.global_step == 2
        runs.append(weights(model))
    # per-sample solves stop on the batch's worst sample, so the iterates differ within the tolerances
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4)


def test_gradient_clipping_bounds_the_update():
    norms = GradNorms()
    _fit(_model(), TinyData(), [*_callbacks(warmup_steps=0), norms], max_steps=2, gradient_clip_val=1e-3,
         gradient_clip_algorithm="norm")
    assert min(norms.before) > 1e-2  # the clip is active (the implicit gradients are larger) ...
    assert norms.after == pytest.approx([1e-3, 1e-3], rel=1e-4)  # ... and the step used the clipped norm


def test_kill_after_mid_epoch_checkpoint_and_resume(tmp_path):
    """4 batches per epoch, warm-up 4 steps, checkpoint every 3 steps; killed at step 5, resumed from step 3."""

    def run(root, kill=None, ckpt_path=None):
        pl.seed_everything(0)
        model, data = _model(), TinyData()
        callbacks = [*_callbacks(warmup_steps=4),
                     ModelCheckpoint(dirpath=tmp_path / root, every_n_train_steps=3, save_top_k=-1)]
        if kill is not None:
            callbacks.append(KillAt(kill))
        trainer = _trainer(callbacks, max_epochs=2, enable_checkpointing=True)
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model, callbacks, trainer

    straight, cb_a, _ = run("a")
    with pytest.raises(Killed):
        run("b", kill=5)
    ckpt = tmp_path / "b" / "epoch=0-step=3.ckpt"
    assert ckpt.is_file()
    resumed, cb_b, trainer = run("b", ckpt_path=ckpt)
    assert trainer.global_step == 8
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert cb_a[0].switched_at == cb_b[0].switched_at == 4
    assert cb_a[1].state_dict() == cb_b[1].state_dict()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm runs on GPUs only (2 needed for DDP)")
@pytest.mark.ddp
def test_sync_batchnorm_cell_under_ddp_fails_clearly():
    """Without the DEQ's check, ranks solving for different step counts deadlock in SyncBatchNorm's all-reduce."""
    model = DEQClassifier(TinyDEQNet(cell=BNCell()), num_classes=3, optimizer=partial(torch.optim.SGD, lr=0.1))
    trainer = pl.Trainer(accelerator="gpu", devices=2, strategy="ddp_spawn", sync_batchnorm=True, max_steps=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(Exception, match="SyncBatchNorm"):
        trainer.fit(model, TinyData())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 AMP kernels and Lightning's 16-mixed need CUDA")
def test_fp16_mixed_on_cuda():
    model, probe = _model(f_tol=1e-4, b_tol=1e-5), _Probe()
    trainer = _fit(model, TinyData(), [*_callbacks(), probe], max_steps=4, accelerator="gpu", precision="16-mixed")
    assert trainer.global_step == 4 and all(torch.isfinite(torch.tensor(probe.losses)))
    assert all(bool(s.forward.converged.all()) for s in probe.fwd if s.mode == "equilibrium")
