import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_nd.callbacks import DEQMonitor, DEQWarmup
from lightning_nd.modules import DEQClassifier, ImageClassifier
from tests.implicit.helpers import BNCell, TinyDEQNet, tiny_loaders


class _Probe(Callback):
    def __init__(self):
        self.train, self.val = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        stats = pl_module.net.deq.last_stats
        self.train.append((stats.mode, stats.forward.nfe))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.val.append(pl_module.net.deq.last_stats.mode)


def _trainer(callbacks, **kw):
    opts = {
        "accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_checkpointing": False, "logger": False,
        "enable_model_summary": False, "num_sanity_val_steps": 0,
    }
    opts.update(kw)
    return pl.Trainer(callbacks=callbacks, **opts)


def _model():
    return DEQClassifier(
        TinyDEQNet(f_tol=1e-4, b_tol=1e-5, f_max_iter=20),
        num_classes=3,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
    )


def test_unrolled_then_equilibrium():
    probe, warm = _Probe(), DEQWarmup(warmup_steps=3, unroll_layers=2)
    train, val = tiny_loaders()
    _trainer([warm, probe], max_epochs=2).fit(_model(), train, val)
    modes = [m for m, _ in probe.train]
    assert modes == ["unrolled"] * 3 + ["equilibrium"] * 5
    assert all(n == 2 for m, n in probe.train if m == "unrolled")
    assert set(probe.val) == {"equilibrium"}  # validation always solves by default
    assert warm.switched_at == 3 and warm.state_dict() == {"warmup_steps": 3, "switched_at": 3}


def test_bad_arguments_and_missing_deq():
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        DEQWarmup(warmup_steps=-1)
    with pytest.raises(ValueError, match="unroll_layers=0"):
        DEQWarmup(unroll_layers=0)
    train, _ = tiny_loaders()
    with pytest.raises(MisconfigurationException, match="DEQWarmup found no DEQ layer"):
        _trainer([DEQWarmup(2)], max_steps=1).fit(ImageClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3)), 3), train)


def test_resumed_run_continues_exactly(tmp_path):
    """2 epochs straight vs 1 epoch + resume: same weights, same warm-up switch, same monitor state."""
    train, val = tiny_loaders()

    def run(max_epochs, ckpt_path=None, root="a"):
        pl.seed_everything(0)
        warm, monitor = DEQWarmup(warmup_steps=6, unroll_layers=3), DEQMonitor(histogram_every_n_epochs=0)
        ckpt = ModelCheckpoint(dirpath=tmp_path / root, save_last=True, save_top_k=0)
        model = _model()
        trainer = _trainer([warm, monitor, ckpt], max_epochs=max_epochs, enable_checkpointing=True)
        trainer.fit(model, train, val, ckpt_path=ckpt_path)
        return model, warm, monitor

    straight, warm_a, mon_a = run(2, root="a")
    run(1, root="b")
    resumed, warm_b, mon_b = run(2, ckpt_path=tmp_path / "b" / "last.ckpt", root="b")
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert warm_a.switched_at == warm_b.switched_at == 6
    assert mon_a.state_dict()["warnings_issued"] == mon_b.state_dict()["warnings_issued"]


def test_fit_ending_inside_the_warmup_leaves_the_model_in_equilibrium_mode():
    warm = DEQWarmup(warmup_steps=10, unroll_layers=2)
    model = _model()
    train, _ = tiny_loaders()
    _trainer([warm], max_steps=3).fit(model, train)
    assert model.net.deq.mode == "equilibrium"  # max_steps hit during the warm-up: not handed back unrolled
    assert warm.switched_at is None


def test_unrolled_warmup_batches_do_not_dilute_the_unconverged_share():
    monitor = DEQMonitor(unconverged_warn=1.0, histogram_every_n_epochs=0)
    model = DEQClassifier(TinyDEQNet(f_tol=1e-9, f_max_iter=2), num_classes=3)  # every solve ends unconverged
    train, _ = tiny_loaders()  # 4 batches: 2 unrolled, 2 solved
    trainer = _trainer([DEQWarmup(warmup_steps=2, unroll_layers=2), monitor], max_epochs=1)
    trainer.fit(model, train)
    assert float(trainer.logged_metrics["deq/unconverged_share"]) == 1.0  # 2 of 2 solved batches, not 2 of 4


def test_sync_batchnorm_in_a_deq_cell_fails_at_fit_start_not_after_the_warmup():
    """The DEQ refuses SyncBatchNorm at its first multi-process equilibrium forward: after the whole warm-up.

    (SyncBatchNorm needs GPUs; the check reads only ``trainer.world_size``, given here by a stand-in trainer.)
    """
    from types import SimpleNamespace

    from torch import nn

    warm = DEQWarmup(warmup_steps=100)
    model = DEQClassifier(TinyDEQNet(cell=BNCell()), num_classes=3)
    warm.on_fit_start(SimpleNamespace(world_size=2), model)  # plain BatchNorm: each rank normalises its own batch
    nn.SyncBatchNorm.convert_sync_batchnorm(model)
    warm.on_fit_start(SimpleNamespace(world_size=1), model)  # one process: SyncBatchNorm acts as BatchNorm
    with pytest.raises(MisconfigurationException, match=r"SyncBatchNorm \['net.deq.cell.bn'\] on 2 processes"):
        warm.on_fit_start(SimpleNamespace(world_size=2), model)
