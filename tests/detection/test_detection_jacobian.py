"""Jacobian regularisation of the implicit FPN in DetectionModule (issue 15): scheduled, seeded, resumed exactly."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_nd.datamodules import ShapesDetectionDataModule
from lightning_nd.implicit import JacobianSchedule
from lightning_nd.modules import DetectionModule

TINY = {"returned_layers": [2, 3], "out_channels": 16, "min_size": 64, "max_size": 64}
CAP = 5
# an unreachable tolerance: every forward solve runs exactly to its (jittered) cap, so the cap is observable
EXACT_CAP = {"f_max_iter": CAP, "f_tol": 1e-12, "b_max_iter": 3}


def _data(num_train: int = 4) -> ShapesDetectionDataModule:
    return ShapesDetectionDataModule(num_train=num_train, num_val=2, batch_size=2, image_size=64, max_object_size=24)


class _Record(pl.Callback):
    """Per step: (step, forward NFE, Jacobian loss or None, returned loss, logged detector loss)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, float | None, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        deq = pl_module.net.backbone.fpn.deq
        jac = None if deq.jac_loss is None else float(deq.jac_loss)
        self.rows.append((trainer.global_step - 1, deq.last_stats.forward.nfe, jac, float(outputs["loss"]),
                          float(trainer.callback_metrics["train/loss_step"])))
        assert deq.jac_reg is False and deq.f_max_iter_delta == 0 and deq.jac_probe_seed is None  # restored


def _fit(schedule: JacobianSchedule, epochs: int, ckpt_path=None, save_to=None) -> _Record:
    torch.manual_seed(0)
    model = DetectionModule("retinanet", num_classes=4, neck="ifpn", neck_kwargs=EXACT_CAP, jac_reg=schedule,
                            optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), **TINY)
    rec = _Record()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[rec])
    trainer.fit(model, _data(), ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return rec


def _schedule() -> JacobianSchedule:
    return JacobianSchedule(weight=0.5, prob=0.5, cap_jitter=2, seed=5)


def test_detection_adds_the_scheduled_jacobian_loss_and_a_resumed_run_repeats_it(tmp_path):
    sched = _schedule()
    full = _fit(sched, 3)  # 2 steps per epoch
    steps = [row[0] for row in full.rows]
    assert steps == list(range(6))
    active = [sched.active(step, step // 2) for step in steps]
    assert any(active) and not all(active)  # both kinds of step occur (seed chosen for it)
    for (step, nfe, jac, loss, detector_loss), on in zip(full.rows, active):
        assert nfe == CAP + sched.cap_delta(step, step // 2)  # the cap jitter reached the i-FPN's solver
        if on:  # a finite, positive Jacobian loss, weighted into the returned loss (train/loss stays the detector's)
            assert jac is not None and 0 < jac < float("inf")
            assert loss == pytest.approx(detector_loss + sched.weight_at(step) * jac, rel=1e-5)
        else:  # no double backward, nothing added
            assert jac is None and loss == pytest.approx(detector_loss, rel=1e-6)
    ckpt = tmp_path / "epoch1.ckpt"
    _fit(_schedule(), 1, save_to=ckpt)
    resumed = _fit(_schedule(), 3, ckpt_path=ckpt)
    tail = full.rows[len(full.rows) - len(resumed.rows):]
    assert len(resumed.rows) == 4
    assert [r[:2] + (r[2] is None,) for r in resumed.rows] == [r[:2] + (r[2] is None,) for r in tail]
    torch.testing.assert_close([r[3] for r in resumed.rows], [r[3] for r in tail], rtol=1e-5, atol=1e-6)


def test_detection_logs_jac_loss_and_weight_only_on_active_steps():
    for prob, expect in ((1.0, True), (0.0, False)):
        torch.manual_seed(0)
        model = DetectionModule("retinanet", num_classes=4, neck="ifpn", jac_reg=JacobianSchedule(weight=0.3, prob=prob),
                                **TINY)
        trainer = pl.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, _data(2))
        logged = trainer.logged_metrics
        if expect:
            assert float(logged["train/jac_weight"]) == pytest.approx(0.3)
            assert 0 < float(logged["train/jac_loss_step"]) < float("inf")
        else:
            assert "train/jac_weight" not in logged and "train/jac_loss_step" not in logged


def test_jac_reg_needs_an_implicit_neck_and_owns_the_flag():
    with pytest.raises(ValueError, match="needs an implicit neck.*FeaturePyramidNetwork.*neck='ifpn'"):
        DetectionModule("retinanet", num_classes=4, neck="fpn", jac_reg=JacobianSchedule(weight=1.0), **TINY)
    with pytest.raises(ValueError, match=r"\['backbone.fpn.deq'\] were built with jac_reg=True"):
        DetectionModule("retinanet", num_classes=4, neck="ifpn", neck_kwargs={"jac_reg": True}, **TINY)
    with pytest.raises(ValueError, match="jac_reg must be a JacobianSchedule"):
        DetectionModule("retinanet", num_classes=4, neck="ifpn", jac_reg={"weight": 1.0}, **TINY)
    # without a schedule the FPN detector builds as before
    assert DetectionModule("retinanet", num_classes=4, neck="fpn", **TINY).jac_schedule is None


def test_jacobian_loss_under_bf16_autocast_as_the_coco_configs_train():
    # the COCO configs combine bf16-mixed with jac_reg: the double backward runs through the autocast application
    torch.manual_seed(0)
    model = DetectionModule("retinanet", num_classes=4, neck="ifpn", jac_reg=JacobianSchedule(weight=0.5, prob=1.0),
                            **TINY)
    rec = _Record()
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=0, logger=False, precision="bf16-mixed",
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[rec])
    trainer.fit(model, _data())
    assert len(rec.rows) == 2
    for _, _, jac, loss, detector_loss in rec.rows:
        assert jac is not None and 0 < jac < float("inf") and torch.isfinite(torch.tensor(loss))
        assert loss == pytest.approx(detector_loss + 0.5 * jac, rel=1e-3)
    grads = [p.grad for p in model.net.backbone.fpn.cell.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
