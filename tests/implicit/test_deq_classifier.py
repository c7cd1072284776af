import os

import lightning.pytorch as pl
import pytest
import torch

from lightning_nd.cli import create_cli, main
from lightning_nd.implicit import DEQConfig, JacobianSchedule
from lightning_nd.modules import DEQClassifier
from tests.implicit.helpers import TinyDEQNet, tiny_loaders


def test_jacobian_schedule():
    s = JacobianSchedule(weight=2.5, prob=0.3, increment=0.1, increment_every=10, start_step=20, stop_epoch=5,
                         warmup_weight=0.03, seed=7)
    assert s.weight_at(0) == 2.5 and s.weight_at(19) == 2.5
    assert s.weight_at(45) == pytest.approx(2.7)  # +0.1 per 10 steps after step 20
    assert s.weight_at(45, warmup=True) == 0.03
    flips = [s.active(step, 0) for step in range(400)]
    assert flips == [JacobianSchedule(**vars(s)).active(step, 0) for step in range(400)]  # rank/resume agreement
    assert 0.2 < sum(flips) / 400 < 0.4
    assert not any(s.active(step, 5) for step in range(50))  # off from stop_epoch
    assert not any(JacobianSchedule(weight=0.0).active(step, 0) for step in range(10))
    assert all(JacobianSchedule(weight=1.0).active(step, 0) for step in range(10))
    with pytest.raises(ValueError, match="prob=1.5"):
        JacobianSchedule(prob=1.5)
    with pytest.raises(ValueError, match="weight=-1"):
        JacobianSchedule(weight=-1.0)


@pytest.mark.parametrize("prob", [1.0, 0.0])
def test_classifier_adds_jacobian_loss_on_scheduled_steps(prob):
    model = DEQClassifier(TinyDEQNet(f_tol=1e-4), num_classes=3, jac_reg=JacobianSchedule(weight=0.5, prob=prob))
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    train, _ = tiny_loaders()
    trainer.fit(model, train)
    logged = trainer.logged_metrics
    if prob == 1.0:
        assert float(logged["train/jac_weight"]) == 0.5 and float(logged["train/jac_loss_step"]) > 0
    else:
        assert "train/jac_weight" not in logged
    assert model.net.deq.jac_reg is False  # flag only on during the scheduled step


def test_classifier_needs_a_deq():
    with pytest.raises(ValueError, match="at least one DEQ layer"):
        DEQClassifier(torch.nn.Linear(3, 3), num_classes=3)
    with pytest.raises(ValueError, match="model_kwargs and deq only apply"):
        DEQClassifier(TinyDEQNet(), num_classes=3, model_kwargs={"channels": [4]})
    with pytest.raises(ValueError, match="model_kwargs and deq only apply"):
        DEQClassifier(TinyDEQNet(), num_classes=3, deq=DEQConfig(f_max_iter=4))
    with pytest.raises(ValueError, match=r"given twice, as deq and as model_kwargs\['deq'\]"):
        DEQClassifier(num_classes=3, in_chans=1, model_kwargs={"deq": {"f_max_iter": 4}}, deq=DEQConfig(f_max_iter=5))
    with pytest.raises(ValueError, match=r"\['deq'\] were built with jac_reg=True.*JacobianSchedule"):
        DEQClassifier(TinyDEQNet(jac_reg=True), num_classes=3)


def test_tiny_fashion_config_runs(repo_root):
    main(["fit", "-c", f"{repo_root}/configs/implicit/mdeq_tiny_fashion.yaml", "--trainer.fast_dev_run=1",
          "--data.batch_size=8", "--trainer.enable_progress_bar=false"])


def test_tiny_fashion_config_is_the_benchmarked_recipe(repo_root, monkeypatch):
    # issue 15: the config ships what benchmarks/deq_fashion.py measured as its CONFIG_RECIPE (widths, solver caps
    # and tolerances, Jacobian-regularisation schedule with forward-cap jitter), so README numbers describe the config
    monkeypatch.syspath_prepend(os.path.join(repo_root, "benchmarks"))
    from deq_fashion import CONFIG_RECIPE, RECIPES, build_mdeq

    recipe = RECIPES[CONFIG_RECIPE]
    cli = create_cli(["-c", f"{repo_root}/configs/implicit/mdeq_tiny_fashion.yaml", "--trainer.logger=false"],
                     run=False)
    net, benchmarked = cli.model.net, build_mdeq(recipe)
    assert [(n, p.shape) for n, p in net.named_parameters()] == [(n, p.shape) for n, p in benchmarked.named_parameters()]
    assert net.deq.cell.blocks[0].drop.p == benchmarked.deq.cell.blocks[0].drop.p == 0.0
    for field in ("f_solver", "f_max_iter", "eval_f_max_iter", "f_tol", "f_stop_mode", "b_solver", "b_max_iter",
                  "b_tol", "b_stop_mode", "backward"):
        assert getattr(net.deq.config, field) == getattr(benchmarked.deq.config, field), field
    jac, ref = cli.model.jac_schedule, recipe["jac"]
    assert (jac.weight, jac.prob, jac.cap_jitter) == (ref.weight, ref.prob, ref.cap_jitter) == (0.4, 0.1, 2)
    assert {jac.cap_delta(step, 0) for step in range(400)} == {-2, -1, 0, 1}


def test_cli_overrides_one_solver_option_and_keeps_the_others(repo_root):
    # `deq` is a typed DEQConfig argument: a command-line override changes one field; in the plain `model_kwargs`
    # dict the same override replaced the whole `deq` dict and silently dropped the config's tolerances and caps
    config = f"{repo_root}/configs/implicit/mdeq_tiny_fashion.yaml"
    base = create_cli(["-c", config, "--trainer.logger=false"], run=False).model.net.deq.config
    cfg = create_cli(["-c", config, "--trainer.logger=false", "--model.deq.f_max_iter=12",
                      "--model.deq.eval_f_max_iter=12"], run=False).model.net.deq.config
    assert (cfg.f_max_iter, cfg.eval_f_max_iter) == (12, 12) != (base.f_max_iter, base.eval_f_max_iter)
    for name in ("f_tol", "f_stop_mode", "b_max_iter", "b_tol", "b_stop_mode"):  # the fields set away from defaults
        assert getattr(cfg, name) == getattr(base, name) != getattr(DEQConfig(), name), name


def test_equilibrium_overlay_is_the_benchmarked_equilibrium_recipe(repo_root, monkeypatch):
    # issue 22: the overlay turns the shipped config into recipe wide_b4_f12 (trained at forward cap 12) solved at the
    # swept test-time cap 16, changing nothing else (widths, adjoint solve, regularisation come from the base config)
    monkeypatch.syspath_prepend(os.path.join(repo_root, "benchmarks"))
    from deq_fashion import EVAL_CAPS, RECIPES, build_mdeq

    base = f"{repo_root}/configs/implicit/mdeq_tiny_fashion.yaml"
    overlay = f"{repo_root}/configs/implicit/mdeq_tiny_fashion_equilibrium.yaml"
    plain = create_cli(["-c", base, "--trainer.logger=false"], run=False)
    cli = create_cli(["-c", base, "-c", overlay, "--trainer.logger=false"], run=False)
    cfg, benchmarked = cli.model.net.deq.config, build_mdeq(RECIPES["wide_b4_f12"])
    assert [(n, p.shape) for n, p in cli.model.net.named_parameters()] == [
        (n, p.shape) for n, p in benchmarked.named_parameters()]
    for field in ("f_solver", "f_max_iter", "f_tol", "f_stop_mode", "b_solver", "b_max_iter", "b_tol", "b_stop_mode",
                  "backward"):
        assert getattr(cfg, field) == getattr(benchmarked.deq.config, field), field
    assert cfg.f_max_iter == 12 and cfg.eval_f_max_iter == 16 in EVAL_CAPS
    changed = {f for f in vars(cfg) if getattr(cfg, f) != getattr(plain.model.net.deq.config, f)}
    assert changed == {"f_max_iter", "eval_f_max_iter"}
    assert cli.model.jac_schedule == plain.model.jac_schedule
    assert str(cli.trainer.default_root_dir) != str(plain.trainer.default_root_dir)  # its own run directory


def test_cifar_recipe_config_builds_mdeq_small(repo_root):
    cli = create_cli(["-c", f"{repo_root}/configs/implicit/mdeq_small_cifar10.yaml", "--trainer.accelerator=cpu",
                      "--trainer.logger=false"], run=False)
    model = cli.model
    assert isinstance(model, DEQClassifier)
    params = sum(p.numel() for p in model.parameters())
    assert 150_000 < params < 175_000  # MDEQ paper: MDEQ-small 170K
    cfg = model.net.deq.config
    # the Jacobian-regularised recipe of locuslab/deq cls_mdeq_LARGE_reg.yaml (issue 15)
    assert (cfg.f_solver, cfg.b_solver, cfg.f_max_iter, cfg.b_max_iter, cfg.f_stop_mode) == ("broyden", "broyden", 8, 7, "rel")
    jac = model.jac_schedule
    assert (jac.weight, jac.prob, jac.cap_jitter, jac.stop_epoch) == (0.4, 0.02, 2, 20)
    warm = [c for c in cli.trainer.callbacks if type(c).__name__ == "DEQWarmup"][0]
    assert (warm.warmup_steps, warm.unroll_layers) == (3000, 10)
    model.eval()
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_benchmark_chooses_the_test_time_cap_on_held_out_images_only(repo_root, monkeypatch):
    # deq_fashion.py may report a cheaper test-time cap, but it must pick it without looking at test accuracy
    monkeypatch.syspath_prepend(os.path.join(repo_root, "benchmarks"))
    from deq_fashion import VAL_TOLERANCE, choose_cap

    assert VAL_TOLERANCE == 0.25
    sweep = [
        {"cap": 3, "val_acc": 0.850, "acc": 0.99},  # best on test, far worse held out: never chosen
        {"cap": 4, "val_acc": 0.8978, "acc": 0.10},  # 0.22 points below cap 6 held out: within the tolerance
        {"cap": 5, "val_acc": 0.8990, "acc": 0.20},
        {"cap": 6, "val_acc": 0.9000, "acc": 0.30},
        {"cap": 8, "val_acc": 0.9010, "acc": 0.40},
    ]
    assert choose_cap(sweep, own_cap=6) == 4
    sweep[1]["val_acc"] = 0.8970  # 0.30 points below: out
    assert choose_cap(sweep, own_cap=6) == 5
