from functools import partial

import lightning.pytorch as pl
import pytest
import torch

from lightning_nd.callbacks import DEQMonitor, DEQWarmup
from lightning_nd.modules import DEQClassifier
from tests.implicit.helpers import BNCell, TinyDEQNet, tiny_loaders


def _fit(devices: int, batch_size: int) -> DEQClassifier:
    pl.seed_everything(0)
    model = DEQClassifier(
        TinyDEQNet(f_tol=1e-5, b_tol=1e-6, f_max_iter=60, b_max_iter=60),
        num_classes=3,
        optimizer=partial(torch.optim.SGD, lr=0.5),  # picklable for ddp_spawn
    )
    train, _ = tiny_loaders(n=16, batch_size=batch_size)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", max_steps=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[DEQMonitor(histogram_every_n_epochs=0), DEQWarmup(warmup_steps=1, unroll_layers=3)],
    )
    trainer.fit(model, train)
    return model


@pytest.mark.ddp
@pytest.mark.slow
def test_two_process_ddp_matches_single_process():
    """Implicit backward (and one unrolled warm-up step) under 2-process DDP = full batch in one process.

    Two SGD steps: the first unrolled (DEQWarmup), the second with the solver and the implicit backward; the
    network has no BatchNorm, so per-rank half batches average to the full-batch gradient exactly.
    """
    single = _fit(devices=1, batch_size=16)
    ddp = _fit(devices=2, batch_size=8)
    start = DEQClassifier(TinyDEQNet(), num_classes=3)
    moved = False
    for (name, p), q, p0 in zip(single.named_parameters(), ddp.parameters(), start.parameters()):
        torch.testing.assert_close(q, p, atol=2e-6, rtol=1e-5, msg=name)
        moved |= not torch.allclose(p, p0)
    assert moved  # the steps changed the weights, so the comparison is about gradients


def test_sync_batchnorm_inside_the_cell_fails_clearly_instead_of_deadlocking(monkeypatch):
    """Ranks stop the solver after different step counts; SyncBatchNorm all-reduces per cell call -> a hang.

    (Real SyncBatchNorm needs GPUs; the check only reads the process-group size, faked here.)
    """
    from torch import nn

    from lightning_nd.implicit import DEQ

    deq = DEQ(nn.SyncBatchNorm.convert_sync_batchnorm(BNCell(2)), f_max_iter=5)
    x = torch.randn(2, 2, 4, 4)
    deq(x)  # not distributed: SyncBatchNorm acts as BatchNorm, nothing to deadlock
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(RuntimeError, match=r"SyncBatchNorm layer\(s\) \['bn'\].*deadlock.*GroupNorm"):
        deq(x)
    deq.eval()  # eval SyncBatchNorm uses running statistics: no collective
    deq(x)
