import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision

from lightning_nd.callbacks import DEQDivergenceError, DEQMonitor
from lightning_nd.callbacks.deq_monitor import DEQNonConvergenceError, _exploded
from lightning_nd.modules import DEQClassifier
from tests.implicit.helpers import SlowConvCell, TinyDEQNet, tiny_loaders


def _fp16_amp():
    """fp16 AMP with a GradScaler. ``precision="16-mixed"`` becomes bf16 on CPU in Lightning, so build the plugin."""
    return MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))


def _trainer(callbacks, **kw):
    opts = {
        "accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_progress_bar": False, "enable_checkpointing": False,
        "logger": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
    }
    opts.update(kw)
    return pl.Trainer(callbacks=callbacks, **opts)


def _model(**deq):
    return DEQClassifier(TinyDEQNet(**{"f_tol": 1e-4, "b_tol": 1e-5, **deq}), num_classes=3)


def test_logs_statistics_and_histograms(tmp_path):
    monitor = DEQMonitor(unconverged_warn=1.0)
    logger = CSVLogger(tmp_path, name="run")
    trainer = _trainer([monitor], logger=logger, log_every_n_steps=1)
    train, val = tiny_loaders()
    trainer.fit(_model(), train, val)
    keys = set(trainer.logged_metrics)
    for key in ("deq/fwd_steps", "deq/fwd_rel_max", "deq/fwd_abs_mean", "deq/fwd_converged", "deq/bwd_steps",
                "deq/bwd_rel_max", "deq/bwd_fallback", "deq/unconverged_share", "deq/bwd_unconverged_share",
                "deq/val_fwd_rel_mean", "deq/val_fwd_steps"):
        assert key in keys, key
    assert 1 <= float(trainer.logged_metrics["deq/fwd_steps"]) <= 30
    pngs = list((tmp_path / "run").rglob("media/deq_histograms_*.png"))
    assert len(pngs) == 1
    assert monitor.warnings_issued == 0 and monitor.stop_reason is None


def test_warns_when_too_many_batches_unconverged():
    monitor = DEQMonitor(unconverged_warn=0.5, histogram_every_n_epochs=0)
    train, _ = tiny_loaders()
    match = r"100% of the equilibrium training batches of epoch 0 ended with samples above the forward"
    with pytest.warns(UserWarning, match=match):
        _trainer([monitor]).fit(_model(f_max_iter=1, f_tol=1e-9), train)
    assert monitor.warnings_issued == 1


def test_warns_when_too_many_adjoint_solves_unconverged():
    monitor = DEQMonitor(unconverged_warn=0.5, histogram_every_n_epochs=0)
    train, _ = tiny_loaders()
    trainer = _trainer([monitor])
    with pytest.warns(UserWarning, match=r"100% of the equilibrium .* above the backward \(adjoint\) tolerance"):
        trainer.fit(_model(b_max_iter=2, b_tol=1e-12), train)
    assert monitor.warnings_issued == 1 and float(trainer.logged_metrics["deq/bwd_unconverged_share"]) == 1.0
    assert float(trainer.logged_metrics["deq/unconverged_share"]) == 0.0  # the forward solves converged


class _NaNAt(DEQClassifier):
    """Returns a NaN loss from training batch ``at`` on."""

    def __init__(self, at):
        super().__init__(TinyDEQNet(f_tol=1e-4, b_tol=1e-5), num_classes=3)
        self.at = at
        self.weights_seen = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.weights_seen.append(self.net.head.weight.detach().clone())
        return loss * float("nan") if batch_idx >= self.at else loss


def test_nan_loss_stops_run_without_touching_weights():
    monitor = DEQMonitor()
    model = _NaNAt(2)
    train, _ = tiny_loaders()
    with pytest.warns(UserWarning, match="DEQMonitor stopped training at step 2 .*training loss is nan"):
        trainer = _trainer([monitor], max_epochs=3)
        trainer.fit(model, train)
    assert "training loss is nan" in monitor.stop_reason
    assert trainer.global_step == 3 and len(model.weights_seen) == 3  # stopped right after the bad batch
    # the NaN step did not update anything: weights equal those before the bad batch, all finite
    for p in model.parameters():
        assert torch.isfinite(p).all()
    assert torch.equal(model.net.head.weight, model.weights_seen[2])


def test_exploding_residual_raises_clear_error():
    monitor = DEQMonitor(explode_threshold=1e-12, on_divergence="raise")
    train, _ = tiny_loaders()
    with pytest.raises(DEQDivergenceError, match=r"forward residual of DEQ 'net.deq' exploded: .* > explode_threshold"):
        _trainer([monitor]).fit(_model(), train)


def test_state_dict_roundtrip_and_validation():
    monitor = DEQMonitor()
    monitor.batches, monitor.unconverged, monitor.worst_rel = 5, 2, 0.3
    monitor.hist = {"fwd_rel": torch.arange(3.0)}
    monitor.warnings_issued = 1
    other = DEQMonitor()
    other.load_state_dict(monitor.state_dict())
    assert (other.batches, other.unconverged, other.worst_rel, other.warnings_issued) == (5, 2, 0.3, 1)
    assert torch.equal(other.hist["fwd_rel"], torch.arange(3.0))
    monitor.hist["fwd_rel"].add_(1.0)  # the loaded state is a copy, not shared with the saved one
    assert torch.equal(other.hist["fwd_rel"], torch.arange(3.0))
    with pytest.raises(ValueError, match="on_divergence='ignore'.*'stop', 'raise'"):
        DEQMonitor(on_divergence="ignore")
    with pytest.raises(ValueError, match="unconverged_warn=1.5"):
        DEQMonitor(unconverged_warn=1.5)
    with pytest.raises(ValueError, match="log_every_n_steps=0"):
        DEQMonitor(log_every_n_steps=0)
    with pytest.raises(ValueError, match="explode_threshold=-1"):
        DEQMonitor(explode_threshold=-1.0)


@pytest.mark.parametrize("scaled", [False, True])
def test_exploding_backward_residual_stops_before_the_weights_change(scaled):
    """z <- 3 z + x: two forward steps stay finite, but the adjoint iteration g <- 3 g + dl/dz explodes (protective
    break). Its best iterate is finite, so a loss scaler would not skip the step: it is a divergence either way."""
    net = TinyDEQNet(cell=lambda z, x: 3.0 * z + x, f_solver="fixed_point", f_max_iter=2, b_solver="fixed_point",
                     b_max_iter=40)
    model = DEQClassifier(net, num_classes=3)
    before = [p.detach().clone() for p in model.parameters()]
    monitor = DEQMonitor()
    train, _ = tiny_loaders()
    with pytest.warns(UserWarning, match=r"stopped training at step 0 .*backward \(adjoint\) residual of DEQ 'net.deq'"):
        trainer = _trainer([monitor], plugins=[_fp16_amp()] if scaled else None)
        trainer.fit(model, train)
    assert model.net.deq.last_stats.backward.diverged and not model.net.deq.last_stats.forward.diverged
    assert trainer.global_step == 1 and "backward (adjoint)" in monitor.stop_reason
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


class _OverflowAt(DEQClassifier):
    """Injects an infinite gradient into the DEQ output on the training batches in ``at`` (a loss-scale overflow)."""

    def __init__(self, at):
        super().__init__(TinyDEQNet(f_tol=1e-4, b_tol=1e-5), num_classes=3)
        self.at = set(at)
        self.net.deq.register_forward_hook(self._inject)

    def _inject(self, module, args, out):
        if self.training and out.requires_grad and self.trainer.global_step in self.at:
            out.register_hook(lambda g: g * float("inf"))


def test_adjoint_overflow_without_a_loss_scaler_stops_the_run():
    """Without a scaler nothing skips the step: a divergence. (With one, the scaler skips it and the run trains on:
    ``tests/test_conditions_deq.py::test_loss_scaler_with_injected_overflow``.)"""
    monitor = DEQMonitor(histogram_every_n_epochs=0)
    train, _ = tiny_loaders()
    trainer = _trainer([monitor], max_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the DEQ's own adjoint warning
        trainer.fit(_OverflowAt(at={1}), train)
    assert trainer.global_step == 2 and "backward (adjoint)" in monitor.stop_reason


def test_persistent_overflow_under_a_loss_scaler_stops_the_run():
    monitor = DEQMonitor(histogram_every_n_epochs=0, max_scaler_skips=2)
    train, _ = tiny_loaders()
    trainer = _trainer([monitor], max_epochs=1, plugins=[_fp16_amp()])
    with pytest.warns(UserWarning, match=r"3 steps in a row with a diverged adjoint under the loss scaler"):
        trainer.fit(_OverflowAt(at={0, 1, 2, 3}), train)
    assert trainer.global_step == 3 and monitor.scaler_skips == 3
    with pytest.raises(ValueError, match="max_scaler_skips=-1"):
        DEQMonitor(max_scaler_skips=-1)


class _LinearCell(torch.nn.Module):
    """z <- A z + x with A a self-adjoint conv of spectral radius 1.5: not contractive (issue 23, point 3)."""

    def __init__(self, channels=4, radius=1.5):
        super().__init__()
        self.conv = SlowConvCell(channels, radius=radius).conv  # self-adjoint, normalised to the radius

    def forward(self, z, x):
        return self.conv(z) + x


@pytest.mark.parametrize("action", ["stop", "raise"])
def test_non_contractive_cell_stops_the_run_within_patience(action):
    # Anderson on the linear radius-1.5 cell ends every solve with relative residuals ~1e-2, 100x f_tol: the run
    # used to train all its steps on these states with one warning at epoch end. patience 3 of 16 steps.
    monitor = DEQMonitor(unconverged_patience=3, on_unconverged=action, histogram_every_n_epochs=0)
    model = DEQClassifier(TinyDEQNet(cell=_LinearCell(), f_tol=1e-4, f_stop_mode="rel"), num_classes=3)
    train, _ = tiny_loaders()
    trainer = _trainer([monitor], max_epochs=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the layer's adjoint warnings
        if action == "raise":
            with pytest.raises(DEQNonConvergenceError, match=r"for 3 consecutive training steps more than 50%"):
                trainer.fit(model, train)
            return
        with pytest.warns(UserWarning, match=r"DEQMonitor stopped training at step 3 .*3 consecutive training steps"):
            trainer.fit(model, train)
    assert trainer.global_step == 3 and monitor.longest_unconverged_streak == 3
    reason = monitor.stop_reason
    for part in ("of the samples of DEQ 'net.deq'", "100% of the samples", "median rel residual", "f_tol=0.0001",
                 "Fix: make the cell contractive", "stop_unconverged_share=None"):
        assert part in reason, part
    assert not model.net.deq.warn_unconverged  # the monitor acts instead of the layer's own warning


def test_unconverged_streak_needs_consecutive_steps_and_survives_a_checkpoint():
    monitor = DEQMonitor(unconverged_patience=3, stop_unconverged_share=0.5, histogram_every_n_epochs=0)
    train, _ = tiny_loaders()
    # a contractive cell at a reachable tolerance never counts
    _trainer([monitor], max_epochs=2).fit(_model(), train)
    assert monitor.longest_unconverged_streak == 0 and monitor.stop_reason is None
    # the streak counts consecutive steps only: a step at or below the share resets it (a stub trainer, one rank)
    stub = SimpleNamespace(strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
                           global_step=7, current_epoch=0, should_stop=False)
    fwd = SimpleNamespace(residual=torch.full((4,), 0.5), stop_mode="rel", tol=1e-4, nfe=6)
    for share in (0.9, 0.9, 0.5, 0.9, 0.9):
        monitor._check_unconverged(stub, share, "deq", fwd)
    assert monitor.longest_unconverged_streak == 2 and not stub.should_stop and monitor.stop_reason is None
    with pytest.warns(UserWarning, match=r"for 3 consecutive training steps more than 50% of the samples of DEQ 'deq'"):
        monitor._check_unconverged(stub, 0.9, "deq", fwd)
    assert stub.should_stop and monitor.unconverged_streak == 3
    monitor.unconverged_streak = 2
    other = DEQMonitor()
    other.load_state_dict(monitor.state_dict())
    assert other.unconverged_streak == 2
    for bad in ({"stop_unconverged_share": 1.0}, {"stop_unconverged_share": "0.5"}, {"unconverged_factor": 0.5},
                {"unconverged_factor": None}, {"unconverged_patience": 0}, {"on_unconverged": "warn"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DEQMonitor(**bad)


def test_exploded_message_names_the_exploded_residual_not_the_best_iterate():
    from lightning_nd.implicit import solve

    with torch.no_grad():
        # f(z) - z = 1 + z^2: plain iteration explodes; the best iterate is z0 with residual ||1|| = 2
        _, stats = solve("fixed_point", lambda z: z + 1.0 + z**2, torch.zeros(2, 4), tol=1e-6, max_iter=100)
    message = _exploded(stats)
    peak = float(stats.abs_trace[torch.isfinite(stats.abs_trace)].max())
    assert peak > 1e6 * 2.0
    assert f"reached {peak:.3g}" in message and "kept have abs residual up to 2" in message
    assert "2 of 2 samples (indices [0, 1])" in message


@pytest.mark.fashion_mnist
def test_shipped_mdeq_config_does_not_trip_the_monitor(repo_root):
    # configs/implicit/mdeq_tiny_fashion.yaml ends every solve above its rel 2e-2 (6 evaluations): budget-limited,
    # not failing (residuals at most ~15x f_tol over 300 measured steps). With its warm-up skipped (the untrained
    # cell is the hardest case: over 60 steps at batch 8 one early step counts as unconverged, the others none), the
    # shipped share and factor must not let even 5 consecutive steps count, 10x below the shipped patience.
    from lightning_nd.cli import create_cli

    cli = create_cli(["-c", f"{repo_root}/configs/implicit/mdeq_tiny_fashion.yaml", "--trainer.logger=false",
                      "--trainer.max_steps=20", "--trainer.limit_val_batches=0", "--data.batch_size=8",
                      "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false"], run=False)
    callbacks = {type(c).__name__: c for c in cli.trainer.callbacks}
    monitor, warmup = callbacks["DEQMonitor"], callbacks["DEQWarmup"]
    assert monitor.stop_unconverged_share == 0.5 and monitor.unconverged_patience == 50  # the shipped defaults
    assert monitor.unconverged_factor == 20.0
    warmup.warmup_steps = 0
    monitor.unconverged_patience = 5
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 20 and monitor.stop_reason is None
    assert cli.model.net.deq.last_stats.mode == "equilibrium"  # judged from the first step
    assert monitor.longest_unconverged_streak < 5


class _StateFreeCell(torch.nn.Module):
    """f(z, x) = tanh(conv(x)): ignores its state, so one application already is the equilibrium."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, z, x):
        return torch.tanh(self.conv(x)) + 0 * z  # z stays in the graph: its Jacobian is exactly 0


def test_equilibrium_check_logs_contraction_and_gap_without_touching_the_training_rng():
    train, val = tiny_loaders()
    shuffled = torch.utils.data.DataLoader(train.dataset, batch_size=8, shuffle=True)  # epoch 2 draws from the RNG
    trained = {}
    for check in (True, False):
        torch.manual_seed(0)
        model = _model()
        trainer = _trainer([DEQMonitor(check_equilibrium=check, histogram_every_n_epochs=0)], max_epochs=2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, shuffled, val)
        assert not any("does not use its equilibrium" in str(w.message) for w in caught)
        if check:  # the healthy ConvCell(scale=0.6): a contraction, and iterating it moves the state
            assert 0.05 < float(trainer.logged_metrics["deq/val_contraction"]) <= 0.6 + 1e-3
            assert float(trainer.logged_metrics["deq/val_gap"]) > 0.05
        else:
            assert "deq/val_contraction" not in trainer.logged_metrics
        trained[check] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(trained[True], trained[False]))


def test_equilibrium_check_warns_when_the_cell_ignores_its_state():
    train, val = tiny_loaders()
    model = DEQClassifier(TinyDEQNet(cell=_StateFreeCell(), f_tol=1e-4, b_tol=1e-5), num_classes=3)
    trainer = _trainer([DEQMonitor(histogram_every_n_epochs=0)])
    with pytest.warns(UserWarning, match="does not use its equilibrium"):
        trainer.fit(model, train, val)
    assert float(trainer.logged_metrics["deq/val_gap"]) < 1e-6
    with pytest.raises(ValueError, match="check_equilibrium"):
        DEQMonitor(check_equilibrium="yes")
