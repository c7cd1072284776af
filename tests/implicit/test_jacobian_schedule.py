"""Jacobian-regularisation schedule: the forward-cap jitter of locuslab/deq, seeded, applied, and resumed exactly."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_nd.implicit import DEQ, JacobianSchedule
from lightning_nd.implicit.jacobian import jacobian_step
from lightning_nd.modules import DEQClassifier
from tests.implicit.helpers import ConvCell, TinyDEQNet, tiny_loaders

CAP = 6


def test_cap_jitter_is_seeded_and_only_on_regularised_steps():
    s = JacobianSchedule(weight=1.0, prob=0.5, cap_jitter=2, seed=3)
    deltas = [s.cap_delta(step, 0) for step in range(300)]
    active = [s.active(step, 0) for step in range(300)]
    assert deltas == [JacobianSchedule(weight=1.0, prob=0.5, cap_jitter=2, seed=3).cap_delta(k, 0) for k in range(300)]
    assert all(d == 0 for d, a in zip(deltas, active) if not a)  # the cap moves only when the loss is computed
    assert {d for d, a in zip(deltas, active) if a} == {-2, -1, 0, 1}  # randint(-delta, 2), as locuslab/deq
    other = [JacobianSchedule(weight=1.0, prob=0.5, cap_jitter=2, seed=4).cap_delta(k, 0) for k in range(300)]
    assert other != deltas
    assert all(JacobianSchedule(weight=1.0, cap_jitter=0).cap_delta(k, 0) == 0 for k in range(20))
    stopped = JacobianSchedule(weight=1.0, cap_jitter=2, stop_epoch=5)
    assert all(stopped.cap_delta(k, 5) == 0 for k in range(20)) and any(stopped.cap_delta(k, 4) for k in range(20))
    with pytest.raises(ValueError, match="cap_jitter=-1"):
        JacobianSchedule(cap_jitter=-1)


def test_cap_delta_moves_the_training_cap_only_and_is_floored_at_one():
    deq = DEQ(ConvCell(4, scale=0.6), f_tol=1e-12, f_max_iter=CAP, eval_f_max_iter=3)
    x = torch.randn(2, 4, 5, 5)
    deq.f_max_iter_delta = -2
    deq(x)
    assert deq.last_stats.forward.nfe == CAP - 2
    deq.f_max_iter_delta = -50
    deq(x)
    assert deq.last_stats.forward.nfe == 1
    deq.eval()
    deq(x)
    assert deq.last_stats.forward.nfe == 3  # the eval cap is not jittered


class _Record(Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[int, int, bool, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        deq = pl_module.net.deq
        self.rows.append((trainer.global_step - 1, deq.last_stats.forward.nfe, deq.jac_loss is not None,
                          float(outputs["loss"])))
        assert deq.f_max_iter_delta == 0 and deq.jac_reg is False  # restored after the step


def _fit(epochs: int, ckpt_path=None, save_to=None) -> _Record:
    torch.manual_seed(0)
    model = DEQClassifier(
        TinyDEQNet(f_tol=1e-12, f_max_iter=CAP, b_max_iter=4), num_classes=3,
        jac_reg=JacobianSchedule(weight=0.5, prob=0.5, cap_jitter=2, seed=11),
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
    )
    rec = _Record()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[rec])
    train, _ = tiny_loaders()
    trainer.fit(model, train, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return rec


def test_jitter_is_applied_and_a_resumed_run_repeats_the_uninterrupted_one(tmp_path):
    full = _fit(3)
    sched = JacobianSchedule(weight=0.5, prob=0.5, cap_jitter=2, seed=11)
    # every step's forward ran exactly to its jittered cap (the tolerance is unreachable)
    assert [nfe for _, nfe, _, _ in full.rows] == [CAP + sched.cap_delta(step, 0) for step, *_ in full.rows]
    assert [jac for *_, jac, _ in full.rows] == [sched.active(step, 0) for step, *_ in full.rows]
    assert len({nfe for _, nfe, _, _ in full.rows}) > 1
    ckpt = tmp_path / "epoch1.ckpt"
    _fit(1, save_to=ckpt)
    resumed = _fit(3, ckpt_path=ckpt)
    tail = full.rows[len(full.rows) - len(resumed.rows):]
    assert [r[:3] for r in resumed.rows] == [r[:3] for r in tail]
    torch.testing.assert_close([r[3] for r in resumed.rows], [r[3] for r in tail], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("f_max_iter", 0, "max_iter=0"),
        ("b_max_iter", 2.5, "max_iter=2.5"),
        ("f_max_iter", True, "max_iter=True"),
        ("f_tol", 0.0, "tol=0.0"),
        ("b_tol", float("nan"), "tol=nan"),
        ("f_tol", float("inf"), "tol=inf"),
        ("eval_f_max_iter", 0, "eval_f_max_iter=0"),
        ("b_stop_mode", "relative", "stop_mode='relative'"),
    ],
)
def test_solver_caps_and_tolerances_are_validated_at_construction(option, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DEQ(ConvCell(4), **{option: value})


def test_jacobian_step_is_a_function_of_the_step_and_restores_the_layers():
    torch.manual_seed(0)
    net, x = TinyDEQNet(f_tol=1e-12, f_max_iter=CAP), torch.randn(4, 1, 8, 8)
    sched = JacobianSchedule(weight=0.5, prob=0.5, cap_jitter=2, seed=3)

    def run(steps):
        rows = []
        for step in steps:
            with jacobian_step(net, sched, step, 0) as jac:
                net(x).sum()
            rows.append((jac.active, jac.cap_delta, net.deq.last_stats.forward.nfe,
                         None if jac.loss is None else float(jac.loss)))
            assert (net.deq.jac_reg, net.deq.f_max_iter_delta, net.deq.jac_probe_seed) == (False, 0, None)
        return rows

    rows = run(range(12))
    assert {r[0] for r in rows} == {True, False}
    assert all((r[3] is not None) == r[0] and r[2] == CAP + r[1] for r in rows)
    assert run(range(6, 12)) == rows[6:]  # a resumed run: same coin flips, caps and Hutchinson probes
    with pytest.raises(RuntimeError, match="boom"), jacobian_step(net, JacobianSchedule(weight=1.0), 0, 0):
        assert net.deq.jac_reg is True
        raise RuntimeError("boom")
    assert net.deq.jac_reg is False  # restored after an exception too
    with pytest.raises(ValueError, match="at least one DEQ layer"), jacobian_step(torch.nn.Linear(2, 2), sched, 0, 0):
        pass
